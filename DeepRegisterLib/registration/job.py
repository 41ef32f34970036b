"""The plan of one run: the device, the model and the network grid, on a plan that fits in
memory. It needs torch, so it is made beside the affine stage (see engine.py), on inputs that
inputs.py has already read and checked; what it refuses (a model, a run that cannot fit)
stops that stage too.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import NamedTuple

import numpy as np
import torch

from ..imaging.geometry import Grid
from ..nn import forked_children
from ..nn.devices import resolve_device
from ..nn.models import ModelInfo
from .inputs import Inputs
from .memory_plan import memory_budget, plan_memory
from .model_choice import default_models, resolve_model, suited_default_model
from .network_grid import network_grid


@dataclass(frozen=True)
class Job(Inputs):
    """A checked registration: its inputs and every choice made before the heavy work."""

    model_info: ModelInfo | None
    default_model: bool  # model_info was chosen by model="default", not named by the user
    network_grid: Grid
    started: float  # perf_counter() at the call
    estimated_bytes: int


class _GridPlan(NamedTuple):
    model_info: ModelInfo | None
    network_grid: Grid
    device: torch.device
    estimated_bytes: int
    notes: tuple[str, ...]


def plan_job(
    inputs: Inputs, limits: tuple[np.ndarray, np.ndarray], started: float
) -> tuple[Job, torch.device, tuple[str, ...]]:
    """The job, the device it runs on and the notes on choices made for it (for the caller to
    report: this runs on a worker thread), over the fixed foreground's ``limits``
    (``network_grid.foreground_limits``)."""
    settings = inputs.settings
    device = resolve_device(settings.device)
    forked_children.guard()
    default_model = settings.model == "default"
    dim = inputs.fixed_image.GetDimension()
    model_info = None if default_model else resolve_model(settings.model, dim)
    plan = _plan_grid(inputs, limits, model_info, device)
    job = Job(
        **{field.name: getattr(inputs, field.name) for field in fields(Inputs)},
        model_info=plan.model_info,
        default_model=default_model,
        network_grid=plan.network_grid,
        started=started,
        estimated_bytes=plan.estimated_bytes,
    )
    forked = forked_children.note()
    return job, plan.device, plan.notes + (() if forked is None else (forked,))


def _plan_grid(
    inputs: Inputs,
    limits: tuple[np.ndarray, np.ndarray],
    model_info: ModelInfo | None,
    device: torch.device,
) -> _GridPlan:
    """The network grid over the fixed foreground, the model for it (a default one chosen
    here) and the device, on a plan that fits in memory."""
    settings, preset = inputs.settings, inputs.preset
    fixed_image, moving_image = inputs.fixed_image, inputs.moving_image
    fixed_grid = Grid.of(fixed_image)
    lower, upper = limits
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

    def network_grid_at(spacing_mm: float) -> Grid:
        return network_grid(fixed_grid, spacing_mm, lower, upper)

    moving_picture = moving_image if inputs.moving_colour is None else inputs.moving_colour
    plan = plan_memory(
        fixed_image, moving_picture, lambda mm: int(np.prod(network_grid_at(mm).size)), spacing,
        model_name=None if model_info is None else model_info.name, device=device.type,
        budget_bytes=memory_budget(settings.max_memory_bytes),
        gpu_free_bytes=_gpu_free_bytes(device), settings=settings,
    )  # fmt: skip
    if not plan.use_model:
        model_info = None
    if plan.device == "cpu":
        device = torch.device("cpu")
    grid = network_grid_at(plan.spacing_mm)
    return _GridPlan(model_info, grid, device, plan.estimated_bytes, (*notes, *plan.notes))


def _gpu_free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
