"""Tiny training runs for the training tests: shapes, configurations, label-map "heads" and
image files (seconds on one CPU thread), and the fixture that keeps torch on one thread. Shared
by the test_training_*.py modules."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegisterLib.nn.networks import NetworkConfig
from DeepRegisterLib.training.config import TrainingConfig

SHAPES = {2: (32, 32), 3: (16, 16, 16)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tests share two cores with other work; one thread also keeps results bitwise stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(dim: int = 2, **changes) -> TrainingConfig:
    base = TrainingConfig(
        shape=SHAPES[dim],
        spacing_mm=1.0,
        steps=6,
        learning_rate=1e-3,
        validate_every=3,
        checkpoint_every=3,
        network=NetworkConfig(dim=dim, encoder=(8, 8, 8, 8), decoder=(8, 8, 8, 8, 8, 8)),
    )
    return dataclasses.replace(base, **changes)


def _head(tmp_path: Path, name: str, transform: sitk.Transform | None = None) -> Path:
    """An asymmetric three-label "head" (1 mm), optionally moved by ``transform``."""
    k, j, i = np.mgrid[:48, :48, :48].astype(float)
    outer = ((i - 24) / 15) ** 2 + ((j - 24) / 12) ** 2 + ((k - 24) / 10) ** 2 <= 1
    inner = ((i - 20) / 6) ** 2 + ((j - 26) / 5) ** 2 + ((k - 24) / 4) ** 2 <= 1
    blob = (i - 32) ** 2 + (j - 18) ** 2 + (k - 27) ** 2 <= 9
    array = np.where(blob, 17, np.where(inner, 4, np.where(outer, 2, 0))).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    if transform is not None:
        image = sitk.Resample(image, image, transform, sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(image, str(tmp_path / name))
    return tmp_path / name


def _write(array: np.ndarray, path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path
