"""The output stage: the deformation composed with the affine onto the fixed grid, and what is
made from it (warped image and labels, inverse, Jacobian determinant and its QA figures)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import SimpleITK as sitk
import torch

from ..imaging.apply_transform import in_type_of
from ..imaging.geometry import Grid, flow_voxels_to_mm
from ..imaging.intensity_window import IntensityWindow
from ..nn.networks import integrate_velocity
from .beside import Beside
from .image_warping import Reach, warp_images
from .jacobian import jacobian_and_qa
from .job import Job
from .optimisation_stage import Deformation
from .progress import Stages
from .warping import Displacement, deformation_field, inverse_displacement


@dataclass
class Outputs:
    displacement: sitk.Image | None  # None unless the settings keep it
    deformation: sitk.Image  # v on the network grid: the transform is [affine, deformation]
    warped: sitk.Image | None  # None unless the settings ask for it
    warped_labels: dict[str, sitk.Image]
    # The dense inverse on the moving grid (None unless the settings ask for it) and w on the
    # network grid; None unless the inverse is asked for.
    inverse: tuple[sitk.Image | None, sitk.Image] | None
    jacobian: sitk.Image | None  # None unless the settings keep it
    qa: dict[str, Any] = field(default_factory=dict)  # folding_percent and sdlogj, if computed


def output_stage(
    stages: Stages,
    job: Job,
    affine: sitk.AffineTransform,
    deformation: Deformation,
    device: torch.device,
) -> Outputs:
    stages.report("outputs", 0.0, "composing the transform")
    stop = stages.cancelled
    displacement, field = _displacement(job, affine, deformation, stop)
    reach = Reach.of(affine, deformation.flow_mm)
    # det J is numpy on one core: it runs beside the warps, which keep torch's threads busy.
    with Beside(stop, "while writing outputs") as beside:
        qa = None
        if job.settings.compute_jacobian:
            keep = job.settings.keep_jacobian
            region = job.fixed_mask
            qa = beside.submit(jacobian_and_qa, field, reach.matrix, job.network_grid, region, keep)
        stages.report("outputs", 0.3, "warping the moving image")
        with torch.inference_mode():
            warped, warped_labels = _warped(job, field, reach, device, stop)
            inverse = None
            if job.settings.compute_inverse:
                stages.report("outputs", 0.6, "inverting the transform")
                inverse = _inverse(job, affine, deformation, stop)
        deformation_image = deformation_field(deformation.flow_mm, job.network_grid)
        outputs = Outputs(displacement, deformation_image, warped, warped_labels, inverse, None)
        if qa is not None:
            stages.report("outputs", 0.8, "computing the Jacobian determinant")
            outputs.jacobian, outputs.qa = beside.result(qa)
    stages.check("while writing outputs")
    return outputs


def _displacement(
    job: Job, affine: sitk.AffineTransform, deformation: Deformation, stop: Callable[[], bool]
) -> tuple[sitk.Image | None, Displacement]:
    """The dense field on the fixed grid as a float32 image when the settings keep it (else
    None: it costs a second a brain), and the same values evaluated where warping and det J
    read them, so that their outputs do not depend on whether the image was kept."""
    grid = Grid.of(job.fixed_image)
    with torch.inference_mode():
        field = Displacement(affine, deformation.flow_mm, job.network_grid, grid, stop)
        return (field.image() if job.settings.compute_displacement else None), field


def _warped(
    job: Job,
    field: Displacement,
    reach: Reach,
    device: torch.device,
    stop: Callable[[], bool],
) -> tuple[sitk.Image | None, dict[str, sitk.Image]]:
    """The moving image (if asked for; in colour, channel by channel, where it came so) and
    every label map, warped in one pass: they share their sampling coordinates."""
    channels = _channels(job) if job.settings.compute_warped else []
    movings = [(to_warp, False) for to_warp, _, _ in channels]
    movings += [(labels, True) for labels in job.label_maps.values()]
    if not movings:
        return None, {}
    grid = Grid.of(job.fixed_image)
    warped = warp_images(movings, field, grid, device, stop, reach)
    images = [
        in_type_of(image + padding, channel) if padding else image
        for image, (_, padding, channel) in zip(warped, channels, strict=False)
    ]
    labels = dict(zip(job.label_maps, warped[len(channels) :], strict=True))
    if not images:
        return None, labels
    return (images[0] if len(images) == 1 else sitk.Compose(images)), labels


def _channels(job: Job) -> list[tuple[sitk.Image, float, sitk.Image]]:
    """(what to warp, its padding, the channel) for the grey moving image or each colour
    channel. Where a background is bright (a photograph on white) it pads outside the image:
    ``channel − padding`` is warped (padding with 0) and the padding added back."""
    if job.moving_colour is None:
        pairs = [(job.moving_image, job.windows[1].padding)]
    else:
        colour = job.moving_colour
        pairs = [
            (channel, IntensityWindow.of(channel).padding)
            for channel in (
                sitk.VectorIndexSelectionCast(colour, c)
                for c in range(colour.GetNumberOfComponentsPerPixel())
            )
        ]
    return [
        (sitk.Cast(channel, sitk.sitkFloat32) - padding if padding else channel, padding, channel)
        for channel, padding in pairs
    ]


def _inverse(
    job: Job,
    affine: sitk.AffineTransform,
    deformation: Deformation,
    stop: Callable[[], bool],
) -> tuple[sitk.Image | None, sitk.Image]:
    """``w = exp(−v)`` (exact for a stationary velocity): the inverse is ``[w, affine⁻¹]``;
    and moving → fixed as a dense field on the moving grid when the settings ask for it
    (200 MB for a 1 mm brain)."""
    inverse_flow = integrate_velocity(-deformation.velocity, deformation.steps)
    inverse_mm = flow_voxels_to_mm(inverse_flow, job.network_grid)
    dense = None
    if job.settings.compute_inverse_displacement:
        moving = Grid.of(job.moving_image)
        dense = inverse_displacement(affine, inverse_mm, job.network_grid, moving, stop)
    return dense, deformation_field(inverse_mm, job.network_grid)
