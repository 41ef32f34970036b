"""Pre-flight: the inputs of one call read, checked and planned into a :class:`Job`.

Everything that can be refused is refused here, before any heavy work: bad images, masks and
label maps, a model that does not fit, a run that cannot fit in memory.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..imaging.fileio import read_image
from ..imaging.geometry import Grid, is_linear
from ..nn.devices import resolve_device
from ..nn.models import ModelInfo
from .model_choice import default_models, resolve_model, suited_default_model
from .preflight import (
    check_intensity_image,
    check_label_map,
    check_same_dimension,
    mask_on_grid,
    memory_budget,
    plan_memory,
)
from .preprocessing import foreground_box, normalised_for_registration
from .presets import Preset
from .progress import Stages
from .settings import RegistrationSettings

ImageLike = sitk.Image | str | os.PathLike

MIN_LEVEL_VOXELS = 16
MAX_NETWORK_VOXELS = 160**3


@dataclass(frozen=True)
class Job:
    """A checked registration: its inputs and every choice made before the heavy work."""

    fixed_image: sitk.Image
    fixed_norm: sitk.Image  # normalised_for_registration(fixed_image)
    moving_image: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    label_maps: dict[str, sitk.Image]
    fixed_labels: sitk.Image | None
    initial_transform: sitk.Transform | None
    settings: RegistrationSettings
    preset: Preset  # the settings' preset, iterations applied
    model_info: ModelInfo | None
    default_model: bool  # model_info was chosen by model="default", not named by the user
    network_grid: Grid
    started: float  # perf_counter() at the call
    estimated_bytes: int


class _MasksAndLabels(NamedTuple):
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    label_maps: dict[str, sitk.Image]
    fixed_labels: sitk.Image | None


class _GridPlan(NamedTuple):
    fixed_norm: sitk.Image
    model_info: ModelInfo | None
    network_grid: Grid
    device: torch.device
    estimated_bytes: int
    notes: tuple[str, ...]


def check_inputs(
    fixed: ImageLike,
    moving: ImageLike,
    settings: RegistrationSettings,
    stages: Stages,
    started: float,
    *,
    fixed_mask: ImageLike | None,
    moving_mask: ImageLike | None,
    moving_labels: Mapping[str, ImageLike] | None,
    fixed_labels: ImageLike | None,
    initial_transform: sitk.Transform | None,
) -> tuple[Job, torch.device, tuple[str, ...]]:
    """The job, the device it runs on and the notes on choices made for it (already reported)."""
    stages.report("checks", 0.0, "checking inputs")
    fixed_image = _as_image(fixed, "fixed image")
    moving_image = _as_image(moving, "moving image")
    check_intensity_image(fixed_image, "the fixed image")
    check_intensity_image(moving_image, "the moving image")
    stages.check("during the input checks")
    check_same_dimension(fixed_image, moving_image)
    dim = fixed_image.GetDimension()
    preset = settings.resolved_preset()
    if initial_transform is not None and not is_linear(initial_transform, dim):
        raise InputError(
            "the initial transform must be linear (rigid/affine); apply a deformable initial "
            "transform to the moving image first"
        )
    device = resolve_device(settings.device)
    default_model = settings.model == "default"
    model_info = None if default_model else resolve_model(settings.model, dim)
    extras = _checked_masks_and_labels(
        fixed_image, moving_image, fixed_mask, moving_mask, moving_labels, fixed_labels
    )
    plan = _plan_grid(
        stages, settings, preset, fixed_image, moving_image, extras.fixed_mask, model_info, device
    )
    job = Job(
        fixed_image=fixed_image, fixed_norm=plan.fixed_norm, moving_image=moving_image,
        **extras._asdict(), initial_transform=initial_transform, settings=settings,
        preset=preset, model_info=plan.model_info, default_model=default_model,
        network_grid=plan.network_grid, started=started, estimated_bytes=plan.estimated_bytes,
    )  # fmt: skip
    return job, plan.device, plan.notes


def _as_image(image: ImageLike, what: str) -> sitk.Image:
    return image if isinstance(image, sitk.Image) else read_image(image, what)


def _checked_masks_and_labels(
    fixed_image: sitk.Image,
    moving_image: sitk.Image,
    fixed_mask: ImageLike | None,
    moving_mask: ImageLike | None,
    moving_labels: Mapping[str, ImageLike] | None,
    fixed_labels: ImageLike | None,
) -> _MasksAndLabels:
    dim = fixed_image.GetDimension()
    fixed_mask_img = (
        None if fixed_mask is None
        else mask_on_grid(_as_image(fixed_mask, "fixed mask"), fixed_image, "the fixed mask")
    )  # fmt: skip
    moving_mask_img = (
        None if moving_mask is None
        else mask_on_grid(_as_image(moving_mask, "moving mask"), moving_image, "the moving mask")
    )  # fmt: skip
    label_maps = {
        name: check_label_map(_as_image(image, f"label map {name!r}"), f"label map {name!r}")
        for name, image in (moving_labels or {}).items()
    }
    for name, labels in label_maps.items():
        if labels.GetDimension() != dim:
            raise InputError(f"label map {name!r} is {labels.GetDimension()}D, images are {dim}D")
    fixed_label_img = (
        None if fixed_labels is None
        else check_label_map(_as_image(fixed_labels, "fixed labels"), "the fixed label map")
    )  # fmt: skip
    return _MasksAndLabels(fixed_mask_img, moving_mask_img, label_maps, fixed_label_img)


def _plan_grid(
    stages: Stages,
    settings: RegistrationSettings,
    preset: Preset,
    fixed_image: sitk.Image,
    moving_image: sitk.Image,
    fixed_mask: sitk.Image | None,
    model_info: ModelInfo | None,
    device: torch.device,
) -> _GridPlan:
    """The network grid over the fixed foreground, the model for it (a default one chosen
    here) and the device, on a plan that fits in memory."""
    fixed_grid = Grid.of(fixed_image)
    stages.check("during the input checks")
    # Normalised once: it gives both the foreground box and the network's fixed input.
    fixed_norm = normalised_for_registration(fixed_image, stages.cancelled)
    stages.check("during the input checks")
    foreground = fixed_mask if fixed_mask is not None else fixed_norm > 0.05
    lower, upper = foreground_box(fixed_image, foreground)
    notes: tuple[str, ...] = ()
    extent_mm = float(np.max((upper - lower + 1) * np.asarray(fixed_grid.spacing)))
    if settings.model == "default":
        dim = fixed_image.GetDimension()
        model_info, notes = suited_default_model(
            default_models(dim), settings.similarity, extent_mm
        )
    elif model_info is not None:
        model_info.check()
    spacing = (
        model_info.spacing_mm if model_info is not None
        else min(level.spacing_mm for level in preset.levels)
    )  # fmt: skip
    multiple = model_info.network.multiple if model_info is not None else 2

    def network_grid_at(spacing_mm: float) -> Grid:
        return _network_grid(fixed_grid, spacing_mm, lower, upper, multiple)

    plan = plan_memory(
        fixed_image, moving_image, lambda mm: int(np.prod(network_grid_at(mm).size)), spacing,
        model_name=None if model_info is None else model_info.name, device=device.type,
        budget_bytes=memory_budget(settings.max_memory_bytes),
        gpu_free_bytes=_gpu_free_bytes(device),
    )  # fmt: skip
    notes = (*notes, *plan.notes)
    for note in notes:
        stages.report("checks", 0.5, note)
    if not plan.use_model:
        model_info = None
    if plan.device == "cpu":
        device = torch.device("cpu")
    network_grid = network_grid_at(plan.spacing_mm)
    stages.report("checks", 1.0, "inputs checked")
    return _GridPlan(fixed_norm, model_info, network_grid, device, plan.estimated_bytes, notes)


def _network_grid(
    fixed_grid: Grid, spacing_mm: float, lower: np.ndarray, upper: np.ndarray, multiple: int
) -> Grid:
    """The isotropic grid of the deformable stages, over the fixed foreground box."""
    extent = float(min(fixed_grid.extent_mm))
    spacing = max(min(spacing_mm, extent / MIN_LEVEL_VOXELS), min(fixed_grid.spacing))
    # Very anisotropic images (e.g. 0.2 × 5 × 5 mm) would otherwise get a huge isotropic grid.
    volume = float(np.prod(fixed_grid.extent_mm))
    spacing = max(spacing, (volume / MAX_NETWORK_VOXELS) ** (1.0 / fixed_grid.dim))
    return fixed_grid.with_spacing_cropped_to(spacing, lower, upper, multiple)


def _gpu_free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
