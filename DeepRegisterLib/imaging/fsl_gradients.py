"""FSL's ``.bvec``/``.bval`` files: a NIfTI diffusion series' directions, as dcm2niix writes
them beside it.

A bvec is given along the image's own axes, in FSL's "radiological" voxel frame: where the
image's voxel-to-world matrix has a positive determinant (stored neurologically), FSL counts
its first axis the other way, so that component is negated (MRtrix's and FreeSurfer's readers
do the same). Across a registration the directions are turned in the world and written along
the output grid's axes, by the same rule.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .output_paths import full_suffix, stem

NIFTI_SUFFIXES = (".nii", ".nii.gz")


def companion(image_path: str | os.PathLike, suffix: str) -> Path:
    """``series.bvec`` (or ``.bval``) beside ``series.nii.gz``."""
    path = Path(image_path)
    return path.with_name(stem(path) + suffix)


def files_beside(image_path: str | os.PathLike) -> dict[str, Path]:
    """The FSL files that come with a NIfTI image, by suffix: its ``.bvec`` and, where there is
    one, its ``.bval``; none without a bvec."""
    if full_suffix(Path(image_path)) not in NIFTI_SUFFIXES:
        return {}
    found = {suffix: companion(image_path, suffix) for suffix in (".bvec", ".bval")}
    if not found[".bvec"].is_file():
        return {}
    return {suffix: path for suffix, path in found.items() if path.is_file()}


def fsl_axes(direction: np.ndarray) -> np.ndarray:
    """The 3×3 map from FSL's bvec frame to LPS for an image of ``direction`` (LPS, columns
    the voxel axes): the axes themselves, the first one negated when their determinant is
    positive. (RAS flips two axes, so the determinant's sign is the same in either.)"""
    flip = np.diag([-1.0, 1.0, 1.0]) if np.linalg.det(direction) > 0 else np.eye(3)
    return direction @ flip


def read_bvecs(path: str | os.PathLike, direction: np.ndarray, count: int) -> np.ndarray | None:
    """The ``count`` directions of a bvec file in LPS, (count, 3); None when the file does not
    hold that many (three rows, FSL's layout, or three columns, the HCP's) or is not numbers."""
    try:
        table = np.loadtxt(path, ndmin=2)
    except ValueError:
        return None
    if table.shape == (count, 3) and count != 3:
        table = table.T
    if table.shape != (3, count):
        return None
    return (fsl_axes(direction) @ table).T


def bvec_text(directions: np.ndarray, direction: np.ndarray) -> str:
    """``directions`` (LPS, (n, 3)) as a bvec file for an image of ``direction``: three rows."""
    table = fsl_axes(direction).T @ directions.T  # the map is orthonormal: its inverse
    return "".join(" ".join(f"{v:.6f}" for v in row) + "\n" for row in table + 0.0)
