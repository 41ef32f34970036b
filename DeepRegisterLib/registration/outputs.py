"""The output stage: the deformation composed with the affine onto the fixed grid, and what is
made from it (warped image and labels, inverse, Jacobian determinant and its QA figures)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import SimpleITK as sitk
import torch

from ..imaging import metrics
from ..imaging.geometry import Grid, flow_voxels_to_mm
from ..nn.networks import integrate_velocity
from .job import Job
from .optimisation_stage import Deformation
from .progress import Stages
from .warping import compose_displacement, inverse_displacement, warp_image


@dataclass
class Outputs:
    displacement: sitk.Image
    warped: sitk.Image | None  # None unless the settings ask for it
    warped_labels: dict[str, sitk.Image]
    inverse: sitk.Image | None
    jacobian: sitk.Image | None
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
    with torch.inference_mode():
        displacement = compose_displacement(
            affine, deformation.flow_mm, job.network_grid, Grid.of(job.fixed_image), stop
        )
        stages.report("outputs", 0.3, "warping the moving image")
        warped = (
            warp_image(job.moving_image, displacement, device=device, is_cancelled=stop)
            if job.settings.compute_warped
            else None
        )
        warped_labels = {
            name: warp_image(labels, displacement, nearest=True, device=device, is_cancelled=stop)
            for name, labels in job.label_maps.items()
        }
        inverse = None
        if job.settings.compute_inverse:
            stages.report("outputs", 0.6, "inverting the transform")
            inverse = _inverse(job, affine, deformation, stop)
    stages.check("while writing outputs")
    outputs = Outputs(displacement, warped, warped_labels, inverse, None)
    if job.settings.compute_jacobian:
        stages.report("outputs", 0.8, "computing the Jacobian determinant")
        outputs.jacobian = metrics.jacobian_determinant(displacement, stop)
        region = job.fixed_mask
        outputs.qa["folding_percent"] = metrics.folding_percent(outputs.jacobian, region, stop)
        outputs.qa["sdlogj"] = metrics.sdlogj(outputs.jacobian, region, stop)
        stages.check("while writing outputs")
    return outputs


def _inverse(
    job: Job,
    affine: sitk.AffineTransform,
    deformation: Deformation,
    stop: Callable[[], bool],
) -> sitk.Image:
    """Moving → fixed on the moving grid, from ``exp(−v)``: exact for a stationary velocity."""
    inverse_flow = integrate_velocity(-deformation.velocity, deformation.steps)
    inverse_mm = flow_voxels_to_mm(inverse_flow, job.network_grid)
    return inverse_displacement(
        affine, inverse_mm, job.network_grid, Grid.of(job.moving_image), stop
    )
