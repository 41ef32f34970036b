"""Real image pairs: listed in files, then prepared as the engine prepares its inputs.

A pair is affine-aligned and resampled to the isotropic network grid cropped to the fixed
foreground (the engine's preprocessing), so training and validation see what the engine feeds
its network.
"""

from __future__ import annotations

import csv
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..imaging.fileio import IMAGE_SUFFIXES, full_suffix, read_image
from ..imaging.geometry import Grid
from ..imaging.output_paths import stem
from ..imaging.resampling import network_inputs
from ..registration.affine_search import register_normalised
from ..registration.preprocessing import (
    FOREGROUND,
    foreground_box,
    normalised_for_registration,
)
from ..registration.presets import get_preset
from ..registration.settings import RegistrationSettings

#: The network grid's margin past the fixed foreground in the engine's default run.
_DEFAULT_MARGIN_MM = get_preset(RegistrationSettings().preset).foreground_margin_mm


@dataclass
class TrainingItem:
    """One training example (1, 1, *shape): images, and labels when it has them."""

    fixed: torch.Tensor
    moving: torch.Tensor
    labels: tuple[torch.Tensor, torch.Tensor] | None


@dataclass(frozen=True)
class PairFiles:
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None

    @property
    def name(self) -> str:
        """``sub-02/brainmask→sub-01/brainmask``: folder and file, as data sets name subjects."""
        return f"{_short(self.moving)}→{_short(self.fixed)}"


def _short(path: Path) -> str:
    return f"{path.parent.name}/{stem(path)}"


def read_pairs_csv(path: str | Path) -> list[PairFiles]:
    """Pairs from a CSV with columns ``fixed,moving[,fixed_labels,moving_labels]``.

    Relative paths are taken relative to the CSV's folder, so a data set travels as one folder.
    """
    path = Path(path)
    try:
        with path.open(newline="") as stream:
            rows = list(csv.DictReader(stream))
    except OSError as error:
        raise InputError(f"cannot read the pair list {path}: {error}") from None
    if not rows or not {"fixed", "moving"} <= set(rows[0]):
        raise InputError(f"{path} needs a header with at least the columns 'fixed' and 'moving'")

    def resolve(value: str | None) -> Path | None:
        if not value:
            return None
        file = Path(value) if Path(value).is_absolute() else path.parent / value
        if not file.exists():
            raise InputError(f"{path}: file not found: {file}")
        return file

    pairs = []
    for row in rows:
        fixed, moving = resolve(row["fixed"]), resolve(row["moving"])
        if fixed is None or moving is None:
            raise InputError(f"{path}: every row needs a fixed and a moving image")
        pairs.append(
            PairFiles(
                fixed, moving, resolve(row.get("fixed_labels")), resolve(row.get("moving_labels"))
            )
        )
    return pairs


def pairs_in_folder(folder: str | Path) -> list[PairFiles]:
    """Every ordered pair of the images in ``folder`` (no labels: use a CSV for those)."""
    folder = Path(folder)
    images = sorted(p for p in folder.iterdir() if full_suffix(p) in IMAGE_SUFFIXES)
    if len(images) < 2:
        raise InputError(f"{folder} holds {len(images)} images; pairs need at least 2")
    return [PairFiles(f, m) for f, m in itertools.permutations(images, 2)]


def read_pairs(source: str | Path) -> list[PairFiles]:
    """Pairs from a CSV file or a folder of images."""
    source = Path(source)
    if source.is_dir():
        return pairs_in_folder(source)
    if not source.exists():
        raise InputError(f"pair list not found: {source}")
    return read_pairs_csv(source)


def _tensor(image: sitk.Image, dtype=torch.float32) -> torch.Tensor:
    array = sitk.GetArrayFromImage(image)
    return torch.from_numpy(array.astype(np.float32 if dtype == torch.float32 else np.int64))[
        None, None
    ]


@dataclass
class PreparedPair:
    """A pair on the network grid, after the affine stage, as the engine would feed it.

    Tensors are (1, 1, *grid.shape); labels are original label values (int64) or ``None``.
    """

    name: str
    grid: Grid
    affine: sitk.Transform
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor | None
    moving_labels: torch.Tensor | None
    moving_labels_image: sitk.Image | None


def prepare_pair(files: PairFiles, spacing_mm: float, seed: int = 0) -> PreparedPair:
    """Affine-align a pair and resample it to the network grid (the engine's preprocessing, as
    its default preset crops): the foreground box, which the network pads to its size multiple
    itself."""
    fixed = read_image(files.fixed, "fixed image")
    moving = read_image(files.moving, "moving image")
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(f"{files.name}: the fixed and moving images differ in dimension")
    dim = fixed.GetDimension()
    fixed_norm = normalised_for_registration(fixed)
    moving_norm = normalised_for_registration(moving)
    affine = register_normalised(fixed_norm, moving_norm, seed=seed)
    fixed_voxels = sitk.GetArrayViewFromImage(fixed_norm)
    box = foreground_box(fixed, fixed_voxels, _DEFAULT_MARGIN_MM, above=FOREGROUND)
    grid = Grid.of(fixed).with_spacing_cropped_to(spacing_mm, *box, multiple=1)
    reference = grid.reference_image()
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    fixed_net, moving_net, _ = network_inputs(fixed_norm, moving_norm, reference, affine)

    def labels(
        path: Path | None, transform: sitk.Transform
    ) -> tuple[sitk.Image | None, torch.Tensor | None]:
        if path is None:
            return None, None
        image = read_image(path, "label map")
        if image.GetDimension() != dim:
            raise InputError(f"label map {path} is {image.GetDimension()}D, images are {dim}D")
        image = sitk.Cast(image, sitk.sitkInt32)
        on_grid = sitk.Resample(image, reference, transform, sitk.sitkNearestNeighbor, 0)
        return image, _tensor(on_grid, torch.int64)

    _, fixed_labels = labels(files.fixed_labels, identity)
    moving_labels_image, moving_labels = labels(files.moving_labels, affine)
    return PreparedPair(
        files.name, grid, affine, _tensor(fixed_net), _tensor(moving_net), fixed_labels,
        moving_labels, moving_labels_image,
    )  # fmt: skip


class RealPairs:
    """Real training pairs, prepared (affine + resampling) when first drawn and then cached."""

    def __init__(self, files: Sequence[PairFiles], spacing_mm: float, dim: int):
        if not files:
            raise InputError("the real pair list is empty")
        self.files = list(files)
        self.spacing_mm, self.dim = spacing_mm, dim
        self._cache: dict[int, PreparedPair] = {}

    def __len__(self) -> int:
        return len(self.files)

    def prepared(self, index: int) -> PreparedPair:
        if index not in self._cache:
            pair = prepare_pair(self.files[index], self.spacing_mm)
            if pair.grid.dim != self.dim:
                raise InputError(f"{pair.name} is {pair.grid.dim}D; training is {self.dim}D")
            self._cache[index] = pair
        return self._cache[index]

    def draw(self, generator: torch.Generator, shape: tuple[int, ...]) -> TrainingItem:
        """A random crop (zero-padded where the grid is smaller) of a random pair."""
        pair = self.prepared(int(torch.randint(len(self.files), (), generator=generator)))
        starts = [
            int(torch.randint(abs(g - s) + 1, (), generator=generator))
            for g, s in zip(pair.grid.shape, shape, strict=True)
        ]

        def crop(volume: torch.Tensor) -> torch.Tensor:
            out = volume.new_zeros((1, 1, *shape))
            source, target = [slice(None)] * 2, [slice(None)] * 2
            for g, s, start in zip(pair.grid.shape, shape, starts, strict=True):
                length = min(g, s)
                source.append(slice(start, start + length) if g > s else slice(0, g))
                target.append(slice(0, s) if g > s else slice(start, start + length))
            out[tuple(target)] = volume[tuple(source)]
            return out

        labels = None
        if pair.fixed_labels is not None and pair.moving_labels is not None:
            labels = (crop(pair.fixed_labels), crop(pair.moving_labels))
        return TrainingItem(crop(pair.fixed), crop(pair.moving), labels)
