"""Run a batch: check every job, skip the finished ones, run the rest on Dask, summarise.

Dask's ``distributed`` does the scheduling, the retries of jobs whose worker died and the
spreading over machines; this module only decides what to run and keeps the user informed: a
progress line (done / failed / left, time left) and ``batch.log`` in the output folder.
"""

from __future__ import annotations

import os
import sys
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, TextIO

from ..errors import InputError
from ..registration.settings import RegistrationSettings
from .jobs import BatchJob, check_jobs
from .summary import summary_row, write_summary
from .worker import DEFAULT_OUTPUTS, EVENT_TOPIC, OUTPUT_FILES, finished_report, run_job

LOG_FILE = "batch.log"


@dataclass
class BatchOutcome:
    """Every job's summary row (in the jobs' order) and the summary files written."""

    rows: list[dict[str, Any]]
    summary_files: list[Path]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [row for row in self.rows if row["status"] == "failed"]


class BatchLog:
    """Timestamped lines in ``batch.log``; written from the client's threads, so locked."""

    def __init__(self, path: Path):
        self.path, self._lock = path, threading.Lock()

    def __call__(self, text: str) -> None:
        stamp = datetime.now().isoformat(timespec="seconds")
        with self._lock, self.path.open("a", encoding="utf-8") as stream:
            stream.write(f"{stamp} {text}\n")

    def event(self, event: tuple[float, dict[str, Any]]) -> None:
        """A worker's message (``worker.run_job``), as Dask's ``subscribe_topic`` hands it."""
        _, message = event
        self(f"{message['job']}: {message['message']} [{message.get('worker', '?')}]")


class BatchProgress:
    """One line: a bar on a terminal, else a line per finished job (for log files)."""

    def __init__(self, total: int, skipped: int, stream: TextIO | None):
        self.total, self.skipped, self.stream = total, skipped, stream
        self.done = self.failed = 0
        self.started = time.perf_counter()

    def update(self, row: dict[str, Any]) -> None:
        self.done += 1
        self.failed += row["status"] == "failed"
        if self.stream is None:
            return
        left = self.total - self.skipped - self.done
        elapsed = time.perf_counter() - self.started
        eta = f", about {_duration(elapsed / self.done * left)} left" if left else ""
        line = (
            f"batch: {self.skipped + self.done}/{self.total} done ({self.failed} failed, "
            f"{self.skipped} skipped), {left} to go{eta}"
        )
        if self.stream.isatty():
            self.stream.write(f"\r{line:<90}" + ("\n" if not left else ""))
        else:
            self.stream.write(f"{line} — {row['id']} {row['status']}\n")
        self.stream.flush()


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    return f"{seconds / 60:.0f} min" if seconds < 5400 else f"{seconds / 3600:.1f} h"


def _prepare_folder(out_dir: str | os.PathLike) -> Path:
    folder = Path(out_dir).expanduser().resolve()
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise InputError(f"cannot create the output folder {folder}: {error}") from None
    if not os.access(folder, os.W_OK):
        raise InputError(f"the output folder {folder} is not writable")
    return folder


def _submit_and_collect(
    client: Any,
    todo: Sequence[BatchJob],
    arguments: tuple[Any, ...],
    log: BatchLog,
    progress: BatchProgress,
) -> dict[str, dict[str, Any]]:
    from distributed import as_completed

    client.subscribe_topic(EVENT_TOPIC, log.event)
    run = uuid.uuid4().hex[:8]
    futures = {
        client.submit(run_job, job, *arguments, key=f"register-{job.id}-{run}", pure=False): job
        for job in todo
    }
    rows = {}
    for future in as_completed(futures):
        job = futures[future]
        try:
            row = future.result()
        except Exception as error:  # KilledWorker: its worker died on every attempt
            row = summary_row(job.id, None, "failed", f"{type(error).__name__}: {error}")
            log(f"{job.id}: failed: {row['error']}")
        rows[job.id] = row
        progress.update(row)
    return rows


def job_settings(settings: RegistrationSettings, outputs: tuple[str, ...]) -> RegistrationSettings:
    """What every job computes for ``outputs``: the inverse only when asked for, and never the
    float64 dense field (a second a brain), since the jobs write ``.h5`` transforms."""
    if "inverse" in outputs:
        settings = settings.replace(compute_inverse=True)
    return settings.replace(compute_displacement=False)


def run_batch(
    jobs: Sequence[BatchJob],
    out_dir: str | os.PathLike,
    settings: RegistrationSettings | None = None,
    *,
    outputs: Sequence[str] = DEFAULT_OUTPUTS,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_job: int | None = None,
    retries: int = 1,
    stream: TextIO | None = sys.stderr,
) -> BatchOutcome:
    """Register every job into ``out_dir/<id>/`` and write the summary; see the module doc.

    ``scheduler``: an existing Dask scheduler's address; else a local cluster of ``workers``
    processes (default: what cores and memory allow). ``retries``: how often a job whose worker
    died is run again. Bad jobs raise ``InputError`` (all of them listed) before anything runs.
    """
    settings = settings or RegistrationSettings()
    outputs = tuple(dict.fromkeys(outputs))
    unknown = sorted(set(outputs) - set(OUTPUT_FILES))
    if unknown:
        raise InputError(
            f"unknown output(s) {', '.join(unknown)}; choose from {', '.join(OUTPUT_FILES)}"
        )
    settings = job_settings(settings, outputs)
    if not jobs:
        raise InputError("the batch has no jobs")
    headers = check_jobs(jobs)
    folder = _prepare_folder(out_dir)
    log = BatchLog(folder / LOG_FILE)
    values = settings.to_dict()
    rows: dict[str, dict[str, Any]] = {}
    for job in jobs:
        report = finished_report(job, folder / job.id, outputs, values)
        if report is not None:
            rows[job.id] = summary_row(job.id, report, "skipped")
    todo = [job for job in jobs if job.id not in rows]
    log(f"batch of {len(jobs)} job(s): {len(rows)} already done, {len(todo)} to run")
    if todo:
        from .cluster import dask_client, plan_workers

        plan = None if scheduler else plan_workers(todo, headers, settings, workers)
        where = f"scheduler {scheduler}" if plan is None else plan.describe()
        log(where)
        if stream is not None:
            print(f"batch: {len(todo)} job(s) to run on the {where}", file=stream, flush=True)
        threads = threads_per_job or (plan.threads if plan else None)
        progress = BatchProgress(len(jobs), len(rows), stream)
        try:
            with dask_client(plan, scheduler, retries) as client:
                rows |= _submit_and_collect(
                    client, todo, (values, outputs, str(folder), threads), log, progress
                )
        except BaseException as error:
            log(f"batch stopped ({type(error).__name__}); finished jobs are kept, rerun to resume")
            raise
    ordered = [rows[job.id] for job in jobs]
    failed = sum(row["status"] == "failed" for row in ordered)
    log(f"batch finished: {len(ordered) - failed} ok or skipped, {failed} failed")
    return BatchOutcome(ordered, write_summary(ordered, folder, values))
