"""The affine search's levels: at each resolution, fixed voxels sampled once with the seed, the
moving image's copy, and the mutual information of the two under a pose.

Levels are made once per spacing from the run's working copies (affine.py) and kept for the
run (``Levels``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..imaging.geometry import Grid
from ..nn.filters import grid_sample
from ..nn.mutual_information import SampledMutualInformation
from .affine import WorkingCopies

MIN_METRIC_SAMPLES = 20_000
SAMPLED_FRACTION = 0.05


@dataclass(frozen=True)
class Pose:
    """Fixed → moving points: ``y = matrix (x − centre) + centre + shift``; ``poses`` of them
    at once, for the searches that try several starts together."""

    matrix: torch.Tensor  # (poses, dim, dim) float64
    shift: torch.Tensor  # (poses, dim) float64

    @classmethod
    def joined(cls, *poses: Pose) -> Pose:
        return cls(torch.cat([p.matrix for p in poses]), torch.cat([p.shift for p in poses]))

    def picked(self, numbers: torch.Tensor | list[int]) -> Pose:
        return Pose(self.matrix[numbers], self.shift[numbers])


class Level:
    """One resolution: fixed voxels sampled once (as offsets from the centre), the moving copy,
    and the mutual information of the two under a pose."""

    def __init__(
        self,
        fixed: sitk.Image,
        moving: sitk.Image,
        masks: tuple[sitk.Image | None, sitk.Image | None],
        spacing_mm: float,
        centre: np.ndarray,
        generator: torch.Generator,
        device: torch.device,
        samples: int | None = None,
    ):
        """``samples`` fixed voxels (default: SAMPLED_FRACTION, at least MIN_METRIC_SAMPLES)."""
        fixed_grid, moving_grid = Grid.of(fixed), Grid.of(moving)
        self.spacing_mm = spacing_mm
        values = torch.from_numpy(sitk.GetArrayFromImage(fixed)).reshape(-1)
        candidates = torch.arange(values.numel())
        if masks[0] is not None:
            candidates = torch.from_numpy(sitk.GetArrayViewFromImage(masks[0]).ravel() > 0)
            candidates = candidates.nonzero()[:, 0]
        if samples is None:
            samples = max(MIN_METRIC_SAMPLES, round(SAMPLED_FRACTION * len(candidates)))
        count = min(len(candidates), samples)
        chosen = candidates[torch.randperm(len(candidates), generator=generator)[:count]]
        chosen = chosen.sort().values  # memory order: the moving copy is read in fewer lines
        index_kji = np.stack(np.unravel_index(chosen.numpy(), fixed_grid.shape), axis=-1)
        points = fixed_grid.index_to_physical_points(index_kji[:, ::-1].astype(np.float64))
        self.offsets = torch.from_numpy(points - centre).float().to(device)
        self.metric = SampledMutualInformation(values[chosen].to(device))
        self.moving = _as_volume(moving, device)
        self.moving_mask = None if masks[1] is None else _as_volume(masks[1], device)
        # grid_sample's coordinates of a moving point: ``scale · (A y + b) − 1`` per axis.
        to_index, offset = moving_grid.physical_to_index_affine()
        scale = moving_grid.index_to_sampler_scale
        self._to_sampler = torch.from_numpy(scale[:, None] * to_index).to(device)
        self._sampler_offset = torch.from_numpy(scale * offset - 1.0).to(device)
        self._centre = torch.from_numpy(centre).to(device)

    def similarity(self, pose: Pose) -> torch.Tensor:
        """The mutual information under each of the poses, (poses,)."""
        linear = self._to_sampler @ pose.matrix
        constant = (self._centre + pose.shift) @ self._to_sampler.T + self._sampler_offset
        coordinates = torch.baddbmm(
            constant.float()[:, None], self.offsets.expand(len(linear), -1, -1),
            linear.float().transpose(1, 2),
        )  # fmt: skip
        dim = coordinates.shape[-1]
        where = coordinates.view(1, *[1] * (dim - 1), -1, dim)
        inside = (coordinates.abs().amax(dim=-1) <= 1.0).float()
        if self.moving_mask is not None:
            within = grid_sample(self.moving_mask, where.detach(), "nearest")
            inside = inside * (within.view(inside.shape) > 0).float()
        values = grid_sample(self.moving, where, "bilinear", "border").view(inside.shape)
        return self.metric(values, inside)


def _as_volume(image: sitk.Image, device: torch.device) -> torch.Tensor:
    array = sitk.GetArrayFromImage(image).astype(np.float32, copy=False)
    return torch.from_numpy(array)[None, None].to(device)


class Levels:
    """Each spacing's level, made when first asked for from the run's working copies.

    A search's levels share one generator, drawn in the order they are asked for; a level with
    its own ``samples`` (the turned starts') is drawn by a generator of its own, so the
    searches' samples are the same with or without it.
    """

    def __init__(self, copies: WorkingCopies, centre: np.ndarray, seed: int, device: torch.device):
        self._copies, self._centre, self._seed, self.device = copies, centre, seed, device
        self._generator = torch.Generator().manual_seed(seed)  # on the CPU: the same sample
        self._levels: dict[tuple[float, int | None], Level] = {}

    def at(self, spacing_mm: float, samples: int | None = None) -> Level:
        """The level at ``spacing_mm``: a search's, or one of ``samples`` voxels."""
        if (spacing_mm, samples) not in self._levels:
            masks = self._copies.masks_at(spacing_mm)
            draw = self._generator if samples is None else torch.Generator().manual_seed(self._seed)
            self._levels[spacing_mm, samples] = Level(
                *self._copies.at(spacing_mm), masks, spacing_mm, self._centre, draw, self.device,
                samples,
            )  # fmt: skip
        return self._levels[spacing_mm, samples]
