"""One batch job on a worker: register, write the job's folder, hand back its summary row.

The job's ``report.json`` is written last, after every other output is in place (each one
atomically): a folder with a valid report for the same inputs and settings is a finished job,
anything else is redone. A job that fails writes ``error.json`` instead and returns its error;
it never raises, so one bad scan cannot stop a batch. Only a dying worker process ends a job
without a row; the scheduler then runs it again elsewhere.
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import time
import traceback
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from .cluster import usable_cores
from .jobs import BatchJob, gradient_files, more_image
from .summary import summary_row

#: What a job can write: the choices of ``--outputs``, and the file each one becomes.
OUTPUT_FILES = {
    "warped": "warped.nii.gz",
    "transform": "transform.h5",
    "inverse": "inverse_transform.h5",
    "labels": "warped_labels.nii.gz",
    "jacobian": "jacobian.nii.gz",
    "qa": "qa.png",
}
DEFAULT_OUTPUTS = ("warped", "transform", "labels", "jacobian")
REPORT_FILE, ERROR_FILE = "report.json", "error.json"
#: The Dask event topic on which workers announce each job's start and progress.
EVENT_TOPIC = "deepregister-batch"


def expected_outputs(job: BatchJob, outputs: tuple[str, ...], settings: dict) -> dict[str, Path]:
    """The files this job writes besides its report (labels only where the job has some), by
    ``--outputs`` name, and its more images by column (``image:flair``)."""
    chosen = {
        name: Path(OUTPUT_FILES[name])
        for name in outputs
        if (name != "labels" or job.labels is not None)
        and (name != "jacobian" or settings.get("compute_jacobian", True))
    }
    more = {column: Path(more_image(column)[0]) for column, _ in job.more_images}
    gradients = {
        key: Path(file)
        for column, path in job.more_images
        for key, file in gradient_files(column, path).items()
    }
    return chosen | more | gradients


def finished_report(
    job: BatchJob, folder: Path, outputs: tuple[str, ...], settings: dict
) -> dict[str, Any] | None:
    """The report of a job already done with these inputs, settings and outputs, else None."""
    try:
        report = json.loads((folder / REPORT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(report, dict):
        return None
    batch = report.get("batch", {})
    same = report.get("settings") == settings and batch.get("inputs") == job.inputs()
    files = expected_outputs(job, outputs, settings).values()
    present = all((folder / name).is_file() for name in files)
    return report if same and present else None


def _announce(job_id: str, message: str) -> None:
    """Send a message to the client's log (a no-op outside a Dask worker)."""
    with contextlib.suppress(ImportError, ValueError):
        from distributed import get_worker

        worker = get_worker()
        worker.log_event(EVENT_TOPIC, {"job": job_id, "message": message, "worker": worker.address})


def _threads(requested: int | None) -> int:
    """Torch's and ITK's threads: as asked, else this worker's cores shared by its task slots."""
    if requested:
        return requested
    cores = usable_cores()
    try:
        from distributed import get_worker

        slots = get_worker().state.nthreads
    except (ImportError, ValueError):
        slots = 1
    return max(1, cores // slots)


def _decile_messages(job_id: str) -> Callable[[float, str], None]:
    last = [-1]

    def progress(fraction: float, message: str) -> None:
        if int(10 * fraction) > last[0]:
            last[0] = int(10 * fraction)
            _announce(job_id, f"{100 * fraction:.0f}% {message}")

    return progress


def _write(
    job: BatchJob, result, fixed, moving, folder: Path, files: dict[str, Path]
) -> tuple[str, ...]:
    """Every output of the job, all or none (:func:`fileio.write_together`); the notes on
    what went with its more images."""
    from ..imaging import fileio

    more_writers, notes = _more_image_writers(job, result, fixed)
    writers: dict[str, Callable[[Path], Any]] = {
        "warped": lambda p: fileio.write_image(result.warped, p),
        "transform": lambda p: fileio.write_transform(result.transform(), p),
        "inverse": lambda p: fileio.write_transform(result.inverse_transform(), p),
        "labels": lambda p: fileio.write_image(result.warped_labels["labels"], p),
        "jacobian": lambda p: fileio.write_image(result.jacobian, p),
        **more_writers,
    }
    if "qa" in files:
        from ..evaluation.figures import qa_figure

        writers["qa"] = lambda p: qa_figure(fixed, moving, result.warped, result.jacobian, p)
    fileio.write_together([(folder / file, writers[name]) for name, file in files.items()])
    return notes


def _more_image_writers(
    job: BatchJob, result, fixed
) -> tuple[dict[str, Callable[[Path], Any]], tuple[str, ...]]:
    """Each more image warped onto the fixed grid through the job's transform as the job warped
    its moving image (the engine's warp; ITK where ``deepregister apply`` would use it whatever
    the size), and written, by column; a diffusion series' bvec and bval with it, turned
    (by ``image:dwi.bvec``), and the notes on them. The images are read here, on the calling
    thread: ITK asks its HDF5 reader about every file it opens, which beside the ``.h5``
    transform being written (the writers run side by side) failed or corrupted memory."""
    from ..imaging import fileio
    from ..imaging.geometry import Grid
    from ..imaging.gradient_tables import carried_gradients
    from ..registration.saved_transforms import SavedTransformWarp

    if not job.more_images:
        return {}, ()
    transform, grid = result.transform(), Grid.of(fixed)
    # The job has loaded torch: the engine's warp pays at any size (SavedTransformWarp).
    warp = SavedTransformWarp(transform, grid, 0)
    writers: dict[str, Callable[[Path], Any]] = {}
    notes: list[str] = []
    for column, path in job.more_images:
        file, labels = more_image(column)
        image = fileio.read_image(path, "label map" if labels else "image")
        writers[column] = partial(_write_warped, image, warp, labels)
        if not labels:
            carried = carried_gradients(image, Path(path), Path(file), transform, grid)
            by_name = {name: key for key, name in gradient_files(column, path).items()}
            for target, text in carried.files.items():
                writers[by_name[target.name]] = partial(Path.write_text, data=text)
            notes += [f"{column}: {note}" for note in carried.notes]
    return writers, tuple(notes)


def _write_warped(image, warp, labels: bool, path: Path) -> None:
    from ..imaging import fileio

    fileio.write_image(warp(image, labels), path)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    from ..imaging.fileio import atomic_write_path

    with atomic_write_path(path) as staged:
        staged.write_text(json.dumps(value, indent=2, default=str) + "\n", encoding="utf-8")


def run_job(
    job: BatchJob,
    settings: dict[str, Any],
    outputs: tuple[str, ...],
    out_dir: str,
    threads: int | None = None,
) -> dict[str, Any]:
    """Register one job into ``out_dir/<id>/``; its summary row, ``status`` "ok" or "failed"."""
    started = time.perf_counter()
    folder = Path(out_dir) / job.id
    _announce(job.id, f"started (pid {os.getpid()})")
    try:
        import SimpleITK as sitk
        import torch

        from ..imaging.fileio import read_image
        from ..registration.engine import register
        from ..registration.settings import RegistrationSettings

        count = _threads(threads)
        torch.set_num_threads(count)
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(count)
        files = expected_outputs(job, outputs, settings)
        folder.mkdir(parents=True, exist_ok=True)
        # A report left by other settings must not vouch for the outputs this run replaces.
        (folder / REPORT_FILE).unlink(missing_ok=True)
        fixed = read_image(job.fixed, "fixed image")  # read once: the QA figure shows them too
        moving = read_image(job.moving, "moving image")
        result = register(
            fixed,
            moving,
            RegistrationSettings.from_dict(settings),
            fixed_mask=job.fixed_mask,
            moving_mask=job.moving_mask,
            moving_labels=None if job.labels is None else {"labels": job.labels},
            fixed_labels=job.fixed_labels if job.labels is not None else None,
            progress=_decile_messages(job.id),
        )
        notes = _write(job, result, fixed, moving, folder, files)
        report = dict(result.report)
        report["notes"] = [*report.get("notes", []), *notes]
        report["batch"] = {
            "id": job.id,
            "inputs": job.inputs(),
            "outputs": sorted(str(file) for file in files.values()),
            "threads": count,
            "pid": os.getpid(),
            "job_s": time.perf_counter() - started,
            # The worker process's peak so far: with one job at a time, its largest job's.
            "worker_peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        }
        _write_json(folder / REPORT_FILE, report)
        (folder / ERROR_FILE).unlink(missing_ok=True)
        _announce(job.id, f"done in {report['batch']['job_s']:.1f} s")
        return summary_row(job.id, report, "ok")
    except Exception as error:
        message = f"{type(error).__name__}: {error}"
        with contextlib.suppress(Exception):
            folder.mkdir(parents=True, exist_ok=True)
            _write_json(
                folder / ERROR_FILE,
                {"id": job.id, "inputs": job.inputs(), "error": message,
                 "traceback": traceback.format_exc()},
            )  # fmt: skip
        _announce(job.id, f"failed: {message}")
        return summary_row(job.id, None, "failed", message, time.perf_counter() - started)
