"""The images the deformable stages work on: fixed and moving on the network grid, the moving
image through the affine, and where the moving image has data to compare.

A moving image may cover only part of the fixed one (a slab, a scan cut off at the neck).
Beyond its field of view it is padding, not tissue, and every similarity compared with the
fixed anatomy there pulled the moving image's edge over it. The loss now counts only where the
moving image has data and the report's similarity looks only there: with each moving brain of
the 20 fs-dev pairs cut to a 60 mm slab, `fast` scored 0.776 → 0.799 mean Dice (local NCC) and
0.689 → 0.727 (MIND). A moving mask counts the same way, so that what it excludes (a lesion
the fixed image lacks) pulls on nothing; it is not eroded, as the fixed mask is not, so a
brain mask on a head still lets the windows at the brain's edge see the skull.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..imaging.resampling import moving_on_grid, resample
from ..nn.filters import box_filter
from .job import Job
from .preprocessing import FOREGROUND
from .progress import Stages

# How far the losses' local windows reach from a voxel, in grid voxels: MIND compares 3-voxel
# patches 2 voxels apart. The moving image's data is taken this far in from its edge, so that
# no window counted as data sees the padding.
LOSS_REACH = 3


@dataclass(frozen=True)
class GridImages:
    """What the deformable stages work on: tensors on the network grid, moving after the affine."""

    fixed: torch.Tensor
    moving: torch.Tensor
    mask: torch.Tensor | None  # the fixed mask, if any
    # Where the moving image has data (a few voxels in from its field of view's edge, within
    # its mask if given), through the affine; None where that covers the fixed foreground
    # (the loss then compares everywhere).
    data: torch.Tensor | None
    # Where the report's similarity looks: the fixed mask or foreground, where the moving
    # image has data.
    region: torch.Tensor
    covered: float  # the fraction of the fixed foreground the moving image covers
    moving_before: sitk.Image  # the moving image on the grid without the affine (for the report)

    def to(self, device: torch.device) -> GridImages:
        """The same images on ``device`` (themselves where they already are)."""
        mask, data = (None if m is None else m.to(device) for m in (self.mask, self.data))
        return GridImages(
            self.fixed.to(device), self.moving.to(device), mask, data, self.region.to(device),
            self.covered, self.moving_before,
        )  # fmt: skip


def grid_images(
    stages: Stages,
    job: Job,
    affine: sitk.AffineTransform,
    fixed_net: sitk.Image,
    moving_smooth: sitk.Image,
) -> GridImages:
    """The network's inputs, on the CPU: the fixed image on the grid, and the moving image
    (smoothed for the grid's spacing) through the affine; refused when the two barely overlap."""
    stop = stages.cancelled
    reference = job.network_grid.reference_image()
    dim = job.fixed_image.GetDimension()
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    moving_net, moving_before = moving_on_grid(moving_smooth, reference, affine, stop)
    cpu = torch.device("cpu")

    def region_on_grid(image: sitk.Image, transform: sitk.Transform) -> torch.Tensor:
        """A 0/1 region (non-zero inside) on the grid through ``transform``."""
        nearest = resample(
            image, reference, transform, sitk.sitkNearestNeighbor, sitk.sitkUInt8, stop
        )
        return to_tensor(nearest, cpu)

    domain = region_on_grid(_domain_image(job.moving_image), affine)
    fixed = to_tensor(fixed_net, cpu)
    mask = None if job.fixed_mask is None else region_on_grid(job.fixed_mask, identity)
    foreground = (fixed > FOREGROUND).to(fixed.dtype) if mask is None else mask
    covered = _covered(foreground, domain)
    data = domain if bool(domain.all()) else _eroded(domain, LOSS_REACH)
    if job.moving_mask is not None:
        data = data * region_on_grid(job.moving_mask, affine)
    if not bool((foreground > data).any()):
        data = None
    region = foreground if covered == 1.0 else foreground * domain
    moving = to_tensor(moving_net, cpu)
    return GridImages(fixed, moving, mask, data, region, covered, moving_before)


def to_tensor(image: sitk.Image, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    array = sitk.GetArrayFromImage(image)
    return torch.as_tensor(array.astype(np.float64 if dtype == torch.float64 else np.float32))[
        None, None
    ].to(device)


def _domain_image(image: sitk.Image) -> sitk.Image:
    """Ones over the image's extent: resampled, it shows where the image has data."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return ones


def _covered(foreground: torch.Tensor, domain: torch.Tensor) -> float:
    """The fraction of the fixed foreground where the moving image has data, refused when it
    is too small to register: after the affine stage the moving image must cover a useful
    part of the fixed one."""
    total = float(foreground.sum())
    if total == 0:
        return 1.0
    fraction = float((foreground * domain).sum()) / total
    if fraction < 0.1:
        raise InputError(
            f"after the affine stage the moving image covers only {100 * fraction:.0f}% of the "
            "fixed image's foreground: the fields of view do not overlap. Check that both "
            "images show the same anatomy, or give an initial transform that brings them close."
        )
    return fraction


def _eroded(domain: torch.Tensor, voxels: int) -> torch.Tensor:
    """``domain`` less ``voxels`` at its edges within the grid (the grid's border is no edge):
    the voxels whose window holds no voxel outside it. A box filter sums one axis at a time
    on every thread; ``max_pool3d``'s 7³ window on one thread took 0.26 s on a whole head's
    grid (3 % of `fast` there), on every pair whose field of view ends inside the grid."""
    return (box_filter(1 - domain, 2 * voxels + 1) == 0).to(domain.dtype)
