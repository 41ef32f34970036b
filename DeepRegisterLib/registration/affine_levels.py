"""The affine search's levels: at each resolution, fixed voxels sampled once with the seed, and
the moving image's copy; and the poses searched over them.

Without torch, so that a fresh process builds them, and searches them with the compiled descent
(affine_descent.py), while torch still loads. Levels are made once per spacing from the run's
working copies (affine.py) and kept for the run (``Levels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..imaging.geometry import Grid
from .affine import WorkingCopies

MIN_METRIC_SAMPLES = 20_000
SAMPLED_FRACTION = 0.05
# The mutual information's joint histogram: bins along each axis, and what keeps log() finite
# for an empty bin (far below the 1 / (16 · samples) of one tap).
BINS = 32
LOG_FLOOR = 1e-12


def fixed_bins(values: np.ndarray) -> np.ndarray:
    """The joint histogram's row of each fixed intensity in [0, 1]: a plain bin count."""
    return np.round(np.clip(values, 0.0, 1.0) * (BINS - 1)).astype(np.int32)


def parameter_count(dim: int, rigid: bool) -> int:
    """A pose's parameters in the descent: its angles (one in 2D, three in 3D) or its matrix's
    entries, then its shift."""
    return ((1 if dim == 2 else 3) if rigid else dim * dim) + dim


@dataclass(frozen=True)
class Steps:
    """A level's descent (affine_search.py): at most ``iterations`` steps, the first of
    ``first`` parameter units (a unit moves points by about a millimetre: angles and matrix
    entries are scaled by ``radius_mm``), cut by ``relaxation`` where the direction turns back,
    ending below ``min_step``."""

    iterations: int
    first: float
    radius_mm: float
    relaxation: float
    min_step: float


@dataclass(frozen=True)
class Pose:
    """Fixed → moving points: ``y = matrix (x − centre) + centre + shift``; ``poses`` of them
    at once, for the searches that try several starts together."""

    matrix: np.ndarray  # (poses, dim, dim) float64
    shift: np.ndarray  # (poses, dim) float64

    @classmethod
    def joined(cls, *poses: Pose) -> Pose:
        return cls(
            np.concatenate([p.matrix for p in poses]), np.concatenate([p.shift for p in poses])
        )

    def picked(self, numbers: np.ndarray | list[int]) -> Pose:
        return Pose(self.matrix[numbers], self.shift[numbers])

    def __len__(self) -> int:
        return len(self.shift)


class Level:
    """One resolution: fixed voxels sampled once (as offsets from the centre, and their
    histogram bins), the moving copy (and mask), and the map from moving points to
    ``grid_sample``'s coordinates of that copy: ``to_sampler · y + sampler_offset``."""

    def __init__(
        self,
        fixed: sitk.Image,
        moving: sitk.Image,
        masks: tuple[sitk.Image | None, sitk.Image | None],
        spacing_mm: float,
        centre: np.ndarray,
        generator: np.random.Generator,
        samples: int | None = None,
    ):
        """``samples`` fixed voxels (default: SAMPLED_FRACTION, at least MIN_METRIC_SAMPLES)."""
        fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
        self.spacing_mm, self.dim, self.centre = spacing_mm, fixed.GetDimension(), centre
        values = sitk.GetArrayViewFromImage(fixed).ravel()
        if masks[0] is None:
            candidates = np.arange(values.size)
        else:
            candidates = np.flatnonzero(sitk.GetArrayViewFromImage(masks[0]).ravel() > 0)
        if samples is None:
            samples = max(MIN_METRIC_SAMPLES, round(SAMPLED_FRACTION * len(candidates)))
        count = min(len(candidates), samples)
        # Sorted into memory order: the moving copy is read in fewer lines.
        chosen = np.sort(candidates[generator.permutation(len(candidates))[:count]])
        index_kji = np.stack(np.unravel_index(chosen, fixed_grid.shape), axis=-1)
        points = fixed_grid.index_to_physical_points(index_kji[:, ::-1].astype(np.float64))
        self.offsets = points - centre  # (samples, dim), mm
        self.fixed_bins = fixed_bins(values[chosen])
        self.moving = sitk.GetArrayFromImage(moving).astype(np.float32, copy=False)
        self.moving_mask = (
            None
            if masks[1] is None
            else (sitk.GetArrayViewFromImage(masks[1]) > 0).astype(np.uint8)
        )
        to_index, offset = moving_grid.physical_to_index_affine()
        scale = moving_grid.index_to_sampler_scale
        self.to_sampler = scale[:, None] * to_index
        self.sampler_offset = scale * offset - 1.0


class Levels:
    """Each spacing's level, made when first asked for from the run's working copies.

    A search's levels share one generator, drawn in the order they are asked for; a level with
    its own ``samples`` (the turned starts') is drawn by a generator of its own, so the
    searches' samples are the same with or without it.
    """

    def __init__(self, copies: WorkingCopies, centre: np.ndarray, seed: int):
        self._copies, self._centre, self._seed = copies, centre, seed
        self._generator = np.random.default_rng(seed)
        self._levels: dict[tuple[float, int | None], Level] = {}

    def at(self, spacing_mm: float, samples: int | None = None) -> Level:
        """The level at ``spacing_mm``: a search's, or one of ``samples`` voxels."""
        if (spacing_mm, samples) not in self._levels:
            masks = self._copies.masks_at(spacing_mm)
            draw = self._generator if samples is None else np.random.default_rng(self._seed)
            self._levels[spacing_mm, samples] = Level(
                *self._copies.at(spacing_mm), masks, spacing_mm, self._centre, draw, samples
            )
        return self._levels[spacing_mm, samples]
