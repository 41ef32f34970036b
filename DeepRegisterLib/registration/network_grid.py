"""The deformable stages' grid, and the network's inputs smoothed for it, without torch.

The plan (job.py) chooses the grid: over the fixed foreground, at the model's spacing or the
preset's finest, coarser where memory asks. Its device and memory checks need torch, which a
fresh process takes about a second of one core to load, while the smoothing needs only ITK.
So while torch loads, the inputs are made for the grid a plan chooses when neither a model of
another spacing nor memory decides (:func:`expected_grid`), and made again only for a plan
that chose another (deformable.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..imaging.geometry import Grid
from ..imaging.resampling import fixed_on_grid, smoothed_for_grid
from .inputs import Inputs
from .preprocessing import FOREGROUND, Voxels, foreground_box

MIN_LEVEL_VOXELS = 16
MAX_NETWORK_VOXELS = 160**3


@dataclass(frozen=True)
class SmoothedInputs:
    """The network's inputs for one grid, before the affine."""

    grid: Grid
    fixed: sitk.Image  # the fixed image smoothed onto the grid
    moving: sitk.Image  # the moving image smoothed for the grid's spacing, where nonzero


def smoothed_inputs(
    grid: Grid,
    normalised: tuple[sitk.Image, sitk.Image],
    voxels: Voxels,
    is_cancelled: Callable[[], bool],
) -> SmoothedInputs:
    """The normalised pair smoothed for ``grid``, reading their voxels only through ``voxels``;
    the affine puts the moving image on the grid later (grid_images.py)."""
    reference = grid.reference_image()
    fixed = fixed_on_grid(normalised[0], reference, is_cancelled, voxels.fixed)
    spacing = reference.GetSpacing()[0]
    moving = smoothed_for_grid(normalised[1], spacing, is_cancelled, voxels=voxels.moving)
    return SmoothedInputs(grid, fixed, moving)


def foreground_limits(inputs: Inputs, voxels: Voxels) -> tuple[np.ndarray, np.ndarray]:
    """The index box (I, J, K) of the fixed foreground, or of the fixed mask where given, the
    preset's margin wider on every side."""
    margin_mm = inputs.preset.foreground_margin_mm
    if voxels.fixed_mask is not None:
        return foreground_box(inputs.fixed_image, voxels.fixed_mask, margin_mm)
    return foreground_box(inputs.fixed_image, voxels.fixed, margin_mm, above=FOREGROUND)


def expected_grid(inputs: Inputs, limits: tuple[np.ndarray, np.ndarray]) -> Grid:
    """The grid a plan chooses when neither a model of another spacing nor memory decides: the
    preset's finest level spacing (the shipped models' own 2 mm) over the fixed foreground's
    ``limits``."""
    spacing_mm = min(level.spacing_mm for level in inputs.preset.levels)
    return network_grid(Grid.of(inputs.fixed_image), spacing_mm, *limits)


def network_grid(fixed_grid: Grid, spacing_mm: float, lower: np.ndarray, upper: np.ndarray) -> Grid:
    """The isotropic grid of the deformable stages, over the fixed foreground box and no more:
    the network pads its input to the size it needs (``VxmDense.velocity``), and every voxel
    added here would be optimised, composed and sampled again at each step."""
    extent = float(min(fixed_grid.extent_mm))
    spacing = max(min(spacing_mm, extent / MIN_LEVEL_VOXELS), min(fixed_grid.spacing))
    # Very anisotropic images (e.g. 0.2 × 5 × 5 mm) would otherwise get a huge isotropic grid.
    volume = float(np.prod(fixed_grid.extent_mm))
    spacing = max(spacing, (volume / MAX_NETWORK_VOXELS) ** (1.0 / fixed_grid.dim))
    return fixed_grid.with_spacing_cropped_to(spacing, lower, upper, multiple=1)
