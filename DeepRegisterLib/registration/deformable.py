"""The torch half of a registration: planned beside the affine stage, then run after it.

A worker thread plans the run (device, model, memory: job.py) and smooths the network's inputs
for its grid (network_grid.py) while the affine stage runs on the main one (engine.py): none
of that needs the affine. :func:`on_network_grid` then puts the moving image through the
affine onto the network grid, and :func:`run` is the rest in order, network → optimisation →
outputs, each timed.
"""

from __future__ import annotations

from dataclasses import dataclass

import SimpleITK as sitk
import torch

from ..imaging.geometry import Grid
from .grid_images import GridImages, grid_images
from .job import Job
from .network_grid import SmoothedInputs
from .network_stage import network_stage
from .optimisation_stage import optimisation_stage
from .outputs import output_stage
from .progress import Stages, Stopwatch
from .report import build_report
from .result import RegistrationResult

# Below this fraction of the fixed foreground covered by the moving image, a note says so.
PARTIAL_VIEW = 0.98


@dataclass(frozen=True)
class Planned:
    """The plan of the run and the network's inputs before the affine."""

    job: Job
    device: torch.device
    notes: tuple[str, ...]  # choices made for the run, for the caller to report
    inputs: SmoothedInputs  # for the job's network grid


@dataclass(frozen=True)
class Prepared:
    """The plan of the run and what its deformable stages work on (on the CPU until run)."""

    job: Job
    device: torch.device
    notes: tuple[str, ...]
    images: GridImages


def on_network_grid(
    stages: Stages, planned: Planned, affine: sitk.AffineTransform, notes: tuple[str, ...]
) -> Prepared:
    """The planned run with its images on the network grid, the moving one through the affine;
    ``notes`` (said during the affine stage) come before the plan's."""
    job = planned.job
    smoothed = planned.inputs
    images = grid_images(stages, job, affine, smoothed.fixed, smoothed.moving)
    notes = (*notes, *planned.notes)
    if images.covered < PARTIAL_VIEW:
        note = (
            f"field of view: after the affine stage the moving image covers "
            f"{100 * images.covered:.0f}% of the fixed image's foreground; the NCC reported "
            "is measured where it has data, and beyond it the deformation is the smooth "
            "continuation of the one inside, which no image supports"
        )
        stages.report("network", 0.0, note)
        notes = (*notes, note)
    return Prepared(job, planned.device, notes, images)


def run(
    stages: Stages, prepared: Prepared, affine: sitk.AffineTransform, clock: Stopwatch
) -> RegistrationResult:
    """The deformable stages with the settings' seed (the caller's random state is kept); on
    a GPU that runs out of memory, again on the CPU with the same seed and a note."""
    job, device = prepared.job, prepared.device
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(job.settings.seed)
    try:
        try:
            return _run(stages, prepared, affine, device, prepared.notes, clock)
        except torch.OutOfMemoryError:
            if device.type == "cpu":
                raise
            note = "memory: the GPU ran out of memory, so the registration was run again on the CPU"
            stages.report("network", 0.0, note)
            torch.cuda.empty_cache()
            torch.manual_seed(job.settings.seed)
            notes = (*prepared.notes, note)
            return _run(stages, prepared, affine, torch.device("cpu"), notes, clock)
    finally:
        torch.random.set_rng_state(generator_state)


def _run(
    stages: Stages,
    prepared: Prepared,
    affine: sitk.AffineTransform,
    device: torch.device,
    notes: tuple[str, ...],
    clock: Stopwatch,
) -> RegistrationResult:
    """The stages in order, each timed, with a cancel check between them."""
    job, images = prepared.job, prepared.images.to(device)
    network = network_stage(stages, job, images, device, notes)
    clock.lap("network_s")
    stages.check("after the network")
    deformation = optimisation_stage(stages, job, images, device, network.velocity)
    clock.lap("optimisation_s")
    stages.check("after optimisation")
    outputs = output_stage(stages, job, affine, deformation, device)
    clock.lap("outputs_s")
    report = build_report(job, images, network, deformation, outputs, device, clock.timings)
    stages.report("outputs", 1.0, "done")
    return RegistrationResult(
        fixed_grid=Grid.of(job.fixed_image),
        displacement=outputs.displacement,
        warped=outputs.warped,
        affine=affine,
        warped_labels=outputs.warped_labels,
        jacobian=outputs.jacobian,
        inverse_displacement=None if outputs.inverse is None else outputs.inverse[0],
        report=report,
        deformation=outputs.deformation,
        inverse_deformation=None if outputs.inverse is None else outputs.inverse[1],
    )
