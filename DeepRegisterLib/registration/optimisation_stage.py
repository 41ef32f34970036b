"""The instance-optimisation stage: the velocity refined on the pair, integrated into the
deformation on the network grid."""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import torch

from ..imaging.geometry import Grid, flow_voxels_to_mm
from ..nn.networks import integrate_velocity, warp
from .grid_images import GridImages
from .job import Job
from .network_grid import MIN_LEVEL_VOXELS
from .optimisation import level_shape, optimise_velocity
from .presets import Preset
from .progress import Stages


@dataclass(frozen=True)
class Deformation:
    """The deformable part on the network grid: its velocity, integrated in ``steps`` squarings
    to ``flow_mm`` (LPS mm), the moving image it warps, and the optimisation's loss trace."""

    velocity: torch.Tensor
    steps: int
    flow_mm: torch.Tensor
    warped: torch.Tensor
    trace: list[float]


def optimisation_stage(
    stages: Stages,
    job: Job,
    images: GridImages,
    device: torch.device,
    velocity: torch.Tensor | None,
) -> Deformation:
    """Refines ``velocity`` (the network's, or none: identity) over the preset's levels."""
    fixed = images.fixed
    levels = _network_levels(job.preset, job.network_grid, tuple(fixed.shape[2:]))
    trace: list[float] = []
    if levels:
        velocity, trace = optimise_velocity(
            fixed, images.moving, images.mask, levels,
            similarity=job.settings.similarity, regularization=job.settings.regularization_weight,
            learning_rate=job.preset.learning_rate,
            window=job.preset.window_for(job.settings.similarity),
            folding_weight=job.preset.folding_weight, folding_margin=job.preset.folding_margin,
            initial_velocity=velocity, data=images.data, progress=stages.reporter("optimisation"),
            is_cancelled=stages.cancelled,
        )  # fmt: skip
    if velocity is None:
        dim = job.fixed_image.GetDimension()
        velocity = torch.zeros((1, dim, *fixed.shape[2:]), device=device)
    # The most squarings of any level, not the last level's (which its loss saw): with those
    # (3) `balanced` folded on one of the 20 fs-dev pairs, for 0.0002 more Dice (fast: 0.0001).
    steps = max((level.integration_steps for _, level in levels), default=7)
    with torch.inference_mode():
        flow = integrate_velocity(velocity, steps)
        warped = warp(images.moving, flow)
        flow_mm = flow_voxels_to_mm(flow, job.network_grid)
    return Deformation(velocity, steps, flow_mm, warped, trace)


def _network_levels(preset: Preset, grid: Grid, shape: tuple[int, ...]):
    """Each level's grid shape and the level at the spacing it runs at (the grid's where that
    is coarser), coarse first; never fewer than 16 voxels across the box.

    The levels keep their spacing on a coarser grid (a large field of view held to
    MAX_NETWORK_VOXELS, or a memory plan): scaled with a 3 mm grid, `fast` lost 0.0049 Dice on
    the 20 fs-dev pairs (better on 2) to save 0.2 s."""
    extent = float(min(np.asarray(grid.size) * np.asarray(grid.spacing)))
    levels = []
    for level in preset.levels:
        if level.iterations <= 0:
            continue
        spacing = min(level.spacing_mm, extent / MIN_LEVEL_VOXELS)
        factor = max(spacing / grid.spacing[0], 1.0)
        actual = factor * grid.spacing[0]
        if actual != level.spacing_mm:  # its control grid as many times coarser
            control = actual * (level.control_mm / level.spacing_mm)
            level = replace(level, spacing_mm=actual, control_mm=control)
        levels.append((level_shape(shape, factor), level))
    return levels
