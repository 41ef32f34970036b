"""Register one image pair: pre-flight → affine → network → instance optimisation → outputs.

The deformable part runs on a "network grid": isotropic, the fixed image's orientation, cropped
to the fixed foreground. Its displacement is composed with the affine into ONE field sampled on
the fixed image's own grid, in LPS millimetres: ``T(x) = A(x + v(x))``, ``u(x) = T(x) − x``.
Each stage lives in its own module; this one holds the sequence.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import SimpleITK as sitk
import torch

from ..imaging.geometry import Grid
from .affine_stage import affine_and_grid_images
from .job import ImageLike, Job, check_inputs
from .network_stage import network_stage
from .optimisation_stage import optimisation_stage
from .outputs import output_stage
from .progress import CancelToken, ProgressCallback, Stages
from .report import Stopwatch, build_report
from .result import RegistrationResult
from .settings import RegistrationSettings

__all__ = ["CancelToken", "ImageLike", "ProgressCallback", "register"]


def register(
    fixed: ImageLike,
    moving: ImageLike,
    settings: RegistrationSettings | None = None,
    *,
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    moving_labels: Mapping[str, ImageLike] | None = None,
    fixed_labels: ImageLike | None = None,
    initial_transform: sitk.Transform | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    **options: Any,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; everything returned lives on the fixed image's grid.

    ``settings`` says how (default :class:`RegistrationSettings()`); keyword ``options`` are
    its field names and override it, for the console: ``register(f, m, preset="fast")``.
    Images may be SimpleITK images or file paths. ``initial_transform`` (linear, fixed → moving)
    seeds the affine stage, or replaces it when ``affine=False``. ``cancel`` is anything with
    ``is_set()`` (e.g. ``threading.Event``); a cancelled run raises ``RegistrationCancelled``.
    Bad input raises ``InputError`` before any work is done.

    When the run would not fit in memory (90 % of what is available, and at most
    ``max_memory_gib``), the deformable stages run on a coarser grid, or on the CPU when the
    GPU is short or runs out; each such choice is a progress message and a line in
    ``report["notes"]``. ``ResourceError`` only when no such path fits.
    """
    started = time.perf_counter()
    settings = (settings or RegistrationSettings()).replace(**options)
    stages = Stages(progress, cancel)
    job, device, notes = check_inputs(
        fixed, moving, settings, stages, started,
        fixed_mask=fixed_mask, moving_mask=moving_mask, moving_labels=moving_labels,
        fixed_labels=fixed_labels, initial_transform=initial_transform,
    )  # fmt: skip
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)
    try:
        try:
            return _run(stages, job, device, notes)
        except torch.OutOfMemoryError:
            if device.type == "cpu":
                raise
            note = "memory: the GPU ran out of memory, so the registration was run again on the CPU"
            stages.report("checks", 1.0, note)
            torch.cuda.empty_cache()
            torch.manual_seed(settings.seed)
            return _run(stages, job, torch.device("cpu"), (*notes, note))
    finally:
        torch.random.set_rng_state(generator_state)


def _run(
    stages: Stages, job: Job, device: torch.device, notes: tuple[str, ...]
) -> RegistrationResult:
    """The stages in order, each timed, with a cancel check between them."""
    clock = Stopwatch()
    affine, images = affine_and_grid_images(stages, job, device, clock.lap)
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
