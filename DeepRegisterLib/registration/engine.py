"""Register one image pair: checks → affine → network → instance optimisation → outputs.

The deformable part runs on a "network grid": isotropic, the fixed image's orientation, cropped
to the fixed foreground. Its displacement is composed with the affine into ONE field sampled on
the fixed image's own grid, in LPS millimetres: ``T(x) = A(x + v(x))``, ``u(x) = T(x) − x``.

This module holds the sequence and imports no torch itself. Every stage needs torch, and in a
fresh process (the command line, Slicer's child process) loading it takes about a second:
:func:`load_torch_beside` (torch_loading.py) starts that on a daemon thread while the inputs
are read and checked. Meanwhile what needs no torch runs: the affine stage on the main thread
(its search compiled, affine_descent.c), the network's inputs on a worker (network_grid.py),
which then plans the run (job.py) once torch has loaded.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import SimpleITK as sitk

from ..errors import RegistrationCancelled
from . import affine_search
from .affine import WorkingCopies, to_affine, turned_note
from .beside import Beside
from .inputs import ImageLike, Inputs, check_inputs
from .network_grid import expected_grid, foreground_limits, smoothed_inputs
from .preprocessing import Voxels, normalised_pair
from .progress import CancelToken, ProgressCallback, Stages, Stopwatch
from .result import RegistrationResult
from .settings import RegistrationSettings
from .torch_loading import load_torch_beside, torch_is_loading

if TYPE_CHECKING:  # the torch half, imported where it runs
    from .deformable import Planned, Prepared

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
    Bad input raises ``InputError`` before any work is done; a model or a memory plan that
    cannot work (``ModelError``, ``ResourceError``) as soon as torch has loaded, stopping the
    affine stage begun beside it.

    When the run would not fit in memory (90 % of what is available, and at most
    ``max_memory_gib``), the deformable stages run on a coarser grid, or on the CPU when the
    GPU is short or runs out; each such choice is a progress message and a line in
    ``report["notes"]``. ``ResourceError`` only when no such path fits.
    """
    started = time.perf_counter()
    load_torch_beside()
    settings = (settings or RegistrationSettings()).replace(**options)
    stages = Stages(progress, cancel)
    inputs = check_inputs(
        fixed, moving, settings, stages,
        fixed_mask=fixed_mask, moving_mask=moving_mask, moving_labels=moving_labels,
        fixed_labels=fixed_labels, initial_transform=initial_transform,
    )  # fmt: skip
    clock = Stopwatch()
    prepared, affine = _affine_and_plan(stages, inputs, started)
    clock.lap("affine_s")
    stages.check("after the affine stage")
    from .deformable import run  # loaded by the worker that planned the run

    return run(stages, prepared, affine, clock)


def _affine_and_plan(
    stages: Stages, inputs: Inputs, started: float
) -> tuple[Prepared, sitk.AffineTransform]:
    """The affine search on the main thread while a worker plans the run and smooths the
    network's inputs; then the moving image through the affine onto the network grid. The
    full-resolution working images (normalised, smoothed: 64 MB each at 256³) end with this
    call, so the deformable stages reuse their memory instead of taking fresh pages."""
    # Normalised once: the affine stage's input, the foreground box and the network's input.
    fixed_norm, moving_norm, inverted = normalised_pair(
        inputs.fixed_image, inputs.moving_image, inputs.windows,
        one_contrast=inputs.settings.similarity != "mind", is_cancelled=stages.cancelled,
    )  # fmt: skip
    if inverted is not None:
        stages.report("affine", 0.0, inverted)
    voxels = Voxels.of(fixed_norm, moving_norm, inputs.fixed_mask)  # before the affine's filters
    with Beside(stages.cancelled, "while preparing the images") as beside:
        normalised = fixed_norm, moving_norm
        preparing = beside.submit(_prepare, inputs, normalised, voxels, started)
        try:
            affine = _affine(
                stages, inputs, fixed_norm, moving_norm, lambda: beside.failed(preparing)
            )
        except RegistrationCancelled:
            if beside.failed(preparing) and not stages.cancelled():
                beside.result(preparing)  # raises the plan's own error: that is what stopped it
            raise
        planned = beside.result(preparing)
    turned = None if inputs.initial_transform is not None else turned_note(affine)
    for line in (turned, *planned.notes):
        if line is not None:
            stages.report("affine", 1.0, line)
    from .deformable import on_network_grid

    said = (*inputs.notes, inverted, turned)
    noted = tuple(line for line in said if line is not None)  # each reported when made
    return on_network_grid(stages, planned, affine, noted), affine


def _prepare(
    inputs: Inputs,
    normalised: tuple[sitk.Image, sitk.Image],
    voxels: Voxels,
    started: float,
    is_cancelled: Callable[[], bool],
) -> Planned:
    """On the worker, beside the affine search: the run's plan, and the network's inputs
    smoothed for its grid. While torch still loads the inputs come first, for the grid a plan
    most likely chooses (network_grid.py), and are made again only if it chose another."""
    limits, smoothed = foreground_limits(inputs, voxels), None
    if torch_is_loading():
        grid = expected_grid(inputs, limits)
        smoothed = smoothed_inputs(grid, normalised, voxels, is_cancelled)
    from .deformable import Planned
    from .job import plan_job

    job, device, notes = plan_job(inputs, limits, started)
    if smoothed is None or smoothed.grid != job.network_grid:
        del smoothed  # its memory free before the plan's grid takes its own
        smoothed = smoothed_inputs(job.network_grid, normalised, voxels, is_cancelled)
    return Planned(job, device, notes, smoothed)


def _affine(
    stages: Stages,
    inputs: Inputs,
    fixed_norm: sitk.Image,
    moving_norm: sitk.Image,
    also_stop: Callable[[], bool],
) -> sitk.AffineTransform:
    """The affine: the search over the pair's working copies, without waiting for torch."""
    dim = inputs.fixed_image.GetDimension()
    if not inputs.settings.affine:
        if inputs.initial_transform is not None:
            return to_affine(inputs.initial_transform, dim)
        return sitk.AffineTransform(dim)

    def is_cancelled() -> bool:
        return stages.cancelled() or also_stop()

    copies = WorkingCopies(
        (fixed_norm, moving_norm), (inputs.fixed_mask, inputs.moving_mask),
        inputs.preset.affine_finest_mm, is_cancelled,
    )  # fmt: skip
    return affine_search.search_copies(
        copies, initial_transform=inputs.initial_transform,
        iterations=inputs.preset.affine_iterations, seed=inputs.settings.seed,
        progress=stages.reporter("affine"), is_cancelled=is_cancelled,
    )  # fmt: skip
