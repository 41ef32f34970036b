"""Where a batch runs: a local Dask cluster sized to this machine, or an existing scheduler.

Local workers are processes, one job at a time each; how many is what the cores and the
memory allow, with the engine's own (generous) peak-memory estimate for the largest job. The
cores are shared out between them (torch threads per worker = cores / workers), so two workers
on two cores do not run four threads. A worker process that dies mid-job has that job retried
on another (``distributed.scheduler.allowed-failures``).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

from ..process_memory import KEPT_MEMORY_ENVIRONMENT
from ..registration.settings import RegistrationSettings
from .jobs import BatchJob, ImageHeader, more_image


@dataclass(frozen=True)
class WorkerPlan:
    """How many local workers, their threads and memory, and why."""

    workers: int
    threads: int
    memory_limit_bytes: int
    job_bytes: int  # the engine's estimate for the largest job

    def describe(self) -> str:
        gib = 2**30
        return (
            f"local cluster: {self.workers} worker process(es) × {self.threads} thread(s), "
            f"{self.memory_limit_bytes / gib:.1f} GiB each (largest job: about "
            f"{self.job_bytes / gib:.1f} GiB by the engine's estimate)"
        )


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def job_peak_bytes(
    job: BatchJob, headers: Mapping[str, ImageHeader], settings: RegistrationSettings
) -> int:
    """The engine's peak-memory estimate for a job, from the headers alone, and its more
    images' on top (each held read and warped until all are written, and the field the
    engine's warp keeps for them).

    The network grid is taken over the whole fixed image at the finest level's spacing; the
    engine crops it to the foreground (and coarsens very large ones), so this errs on the safe
    side.
    """
    from ..imaging.volumes import SHARED_SLICES_BYTES
    from ..registration.memory_plan import estimate_peak_bytes

    fixed, moving = headers[job.fixed], headers[job.moving]
    spacing = min(level.spacing_mm for level in settings.resolved_preset().levels)
    voxels = 1.0
    for size, step in zip(fixed.size, fixed.spacing, strict=True):
        voxels *= max(1.0, size * step / spacing)
    engine = estimate_peak_bytes(fixed, moving, int(voxels), settings)  # type: ignore[arg-type]
    more = [
        _warped_bytes(headers[path], fixed, more_image(column)[1])
        for column, path in job.more_images
    ]
    # The engine's warp keeps at most SHARED_SLICES_BYTES of the job's field for them all.
    return engine + sum(more) + (SHARED_SLICES_BYTES if more else 0)


def _warped_bytes(image: ImageHeader, fixed: ImageHeader, labels: bool) -> int:
    """A more image read (4 bytes a value at most) and warped onto the fixed grid, by
    ``deepregister apply``'s own rule (``saved_transforms.warp_bytes``)."""
    from ..imaging.geometry import Grid
    from ..registration.saved_transforms import warp_bytes

    dim = fixed.dimension
    identity = tuple(float(row == column) for row in range(dim) for column in range(dim))
    grid = Grid(fixed.size, fixed.spacing, (0.0,) * dim, identity)
    read = 4 * image.components * math.prod(image.size)
    return read + warp_bytes(image, grid, labels)


def plan_workers(
    jobs: Sequence[BatchJob],
    headers: Mapping[str, ImageHeader],
    settings: RegistrationSettings,
    requested: int | None = None,
) -> WorkerPlan:
    """As many workers as cores, jobs and 90 % of the available memory allow (or as asked)."""
    import psutil

    cores = usable_cores()
    memory = psutil.virtual_memory()
    budget = int(0.9 * memory.available)
    job_bytes = max(job_peak_bytes(job, headers, settings) for job in jobs)
    if settings.max_memory_bytes is not None:  # the engine keeps each run within it
        job_bytes = min(job_bytes, settings.max_memory_bytes)
    fit = max(1, budget // max(job_bytes, 1))
    workers = requested or max(1, min(cores, len(jobs), fit))
    return WorkerPlan(workers, max(1, cores // workers), memory.total // workers, job_bytes)


@contextlib.contextmanager
def dask_client(plan: WorkerPlan | None, scheduler: str | None, retries: int) -> Iterator[object]:
    """A ``distributed.Client``: on a new local cluster per ``plan``, or on ``scheduler``."""
    import dask
    from distributed import Client, LocalCluster

    if scheduler is not None:
        with Client(scheduler) as client:
            yield client
        return
    assert plan is not None
    config = {
        # A job whose worker dies is run again on another, ``retries`` times.
        "distributed.scheduler.allowed-failures": retries,
        # Torch's threads are set per job (worker.run_job); nothing else should spawn its own.
        "distributed.nanny.pre-spawn-environ.OMP_NUM_THREADS": plan.threads,
        # Dask's default trim threshold (65536) turned off glibc's adaptive mmap threshold, so
        # every large tensor was mapped and zeroed afresh: one fs-dev pair took 31.0 s, not
        # 17.5. Our workers exist to register: they keep what they free for the next stage and
        # job (see process_memory).
        **{
            f"distributed.nanny.pre-spawn-environ.{name}": value
            for name, value in KEPT_MEMORY_ENVIRONMENT.items()
        },
    }
    with (
        _environment_restored(),
        dask.config.set(config),
        LocalCluster(
            n_workers=plan.workers,
            threads_per_worker=1,
            processes=True,
            memory_limit=plan.memory_limit_bytes,
            dashboard_address=":0",  # any free port: never a clash with another cluster
            silence_logs=logging.ERROR,
        ) as cluster,
        Client(cluster) as client,
    ):
        yield client


@contextlib.contextmanager
def _environment_restored() -> Iterator[None]:
    """Dask's nanny writes its pre-spawn variables (OMP_NUM_THREADS=1, MALLOC_TRIM_THRESHOLD_,
    ...) into this process's own environment; put it back, so that what runs after a batch (a
    child process, torch imported later) sees the user's environment, not the workers'."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
