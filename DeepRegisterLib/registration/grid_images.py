"""The affine stage, and the images it hands the deformable stages on the network grid.

ITK's affine stage runs on one thread (for determinism, see affine.py): the smoothing of the
network inputs, which does not depend on the affine, runs beside it on another.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..imaging.resampling import antialiased, fixed_on_grid, moving_on_grid, resample
from .affine import register_normalised, to_affine
from .beside import Beside
from .job import Job
from .preprocessing import normalised_for_registration
from .progress import Stages


@dataclass(frozen=True)
class GridImages:
    """What the deformable stages work on: tensors on the network grid, moving after the affine."""

    fixed: torch.Tensor
    moving: torch.Tensor
    mask: torch.Tensor | None  # the fixed mask, if any
    moving_before: sitk.Image  # the moving image on the grid without the affine (for the report)


def affine_and_grid_images(
    stages: Stages, job: Job, device: torch.device, lap: Callable[[str], None]
) -> tuple[sitk.AffineTransform, GridImages]:
    """The affine transform and the images on the network grid; ``lap("affine_s")`` is called
    when the affine stage is done."""
    stop = stages.cancelled
    reference = job.network_grid.reference_image()
    affine_tx, fixed_net, moving_smooth = _affine_beside_smoothing(stages, job, reference)
    lap("affine_s")
    stages.check("after the affine stage")
    dim = job.fixed_image.GetDimension()
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    moving_net, moving_before = moving_on_grid(moving_smooth, reference, affine_tx, stop)
    del moving_smooth
    moving_domain = resample(
        _domain_image(job.moving_image), reference, affine_tx, sitk.sitkNearestNeighbor,
        sitk.sitkUInt8, stop,
    )  # fmt: skip
    _check_overlap(fixed_net, moving_domain)
    f_t = to_tensor(fixed_net, device)
    m_t = to_tensor(moving_net, device)
    mask_t = (
        None if job.fixed_mask is None
        else to_tensor(
            resample(
                job.fixed_mask, reference, identity, sitk.sitkNearestNeighbor, sitk.sitkUInt8,
                stop,
            ),
            device,
        )
    )  # fmt: skip
    return affine_tx, GridImages(f_t, m_t, mask_t, moving_before)


def to_tensor(image: sitk.Image, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    array = sitk.GetArrayFromImage(image)
    return torch.as_tensor(array.astype(np.float64 if dtype == torch.float64 else np.float32))[
        None, None
    ].to(device)


def _affine_beside_smoothing(
    stages: Stages, job: Job, reference: sitk.Image
) -> tuple[sitk.AffineTransform, sitk.Image, sitk.Image]:
    """The affine, the fixed image on the grid, and the moving image smoothed for it."""
    stop = stages.cancelled
    # Normalised once, for the affine stage and the network inputs; dropped after them.
    moving_norm = normalised_for_registration(job.moving_image, stop)
    with Beside(stop, "while preparing the images") as alongside:
        fixed_net_job = alongside.submit(fixed_on_grid, job.fixed_norm, reference)
        moving_smooth_job = alongside.submit(antialiased, moving_norm, reference.GetSpacing()[0])
        affine_tx = _affine_transform(stages, job, moving_norm)
        fixed_net = alongside.result(fixed_net_job)
        moving_smooth = alongside.result(moving_smooth_job)
    return affine_tx, fixed_net, moving_smooth


def _affine_transform(stages: Stages, job: Job, moving_norm: sitk.Image) -> sitk.AffineTransform:
    dim = job.fixed_image.GetDimension()
    if job.settings.affine:
        return register_normalised(
            job.fixed_norm, moving_norm,
            fixed_mask=job.fixed_mask, moving_mask=job.moving_mask,
            initial_transform=job.initial_transform, iterations=job.preset.affine_iterations,
            finest_mm=job.preset.affine_finest_mm, seed=job.settings.seed,
            progress=stages.reporter("affine"), is_cancelled=stages.cancelled,
        )  # fmt: skip
    if job.initial_transform is not None:
        return to_affine(job.initial_transform, dim)
    return sitk.AffineTransform(dim)


def _domain_image(image: sitk.Image) -> sitk.Image:
    """Ones over the image's extent: resampled, it shows where the image has data."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return ones


def _check_overlap(fixed_net: sitk.Image, moving_domain: sitk.Image) -> None:
    """After the affine stage the moving image must cover a useful part of the fixed one."""
    fg = sitk.GetArrayViewFromImage(fixed_net) > 0.05
    covered = sitk.GetArrayViewFromImage(moving_domain) > 0
    if fg.sum() == 0:
        return
    fraction = float((fg & covered).sum() / fg.sum())
    if fraction < 0.1:
        raise InputError(
            f"after the affine stage the moving image covers only {100 * fraction:.0f}% of the "
            "fixed image's foreground: the fields of view do not overlap. Check that both "
            "images show the same anatomy, or give an initial transform that brings them close."
        )
