"""``deepregister batch``: many registrations, on a local Dask cluster or an existing one.

Nothing heavy is imported until the command runs, so ``deepregister --help`` stays quick.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ..errors import InputError
from .exit_codes import EXIT_JOBS_FAILED, EXIT_OK
from .options import add_settings_arguments, settings_from_arguments

#: Mirrors ``batch.worker.OUTPUT_FILES`` (not imported: that would load the engine for --help).
OUTPUTS = ("warped", "transform", "inverse", "labels", "jacobian", "qa")
DEFAULT_OUTPUTS = ("warped", "transform", "labels", "jacobian")

_DESCRIPTION = """\
Register many pairs: every row of a CSV (--jobs), or every image of a folder or glob to one
template (--fixed with --moving). Each job writes a folder OUT/<id>/ (warped.nii.gz,
transform.h5, warped_labels.nii.gz, jacobian.nii.gz, report.json, as --outputs asks); OUT gets
summary.csv, summary.md, summary.png and batch.log. Finished jobs (a valid report for the same
inputs and settings) are skipped, so rerunning a stopped batch resumes it. A failed job is
recorded (OUT/<id>/error.json, the summary) and the others go on; the exit code is then 4.
"""

_EPILOG = """\
CSV columns: fixed, moving (required); id, labels (moving label map), fixed_labels, fixed_mask,
moving_mask (optional; relative paths are relative to the CSV). Without an id column, jobs are
named after the moving images' paths. More images of each moving subject (another sequence, a
lesion mask, a 4D series) go in columns image:<name> and labels:<name>: each is warped onto the
fixed grid with its job's transform, as the job warped its moving image (a series, colour or a
bright background as 'deepregister apply' warps them), into <id>/<name>_warped.nii.gz (an
empty cell: none for that job).

Clusters: without --scheduler a local Dask cluster of worker processes runs the jobs, sized to
the cores and memory. With --scheduler ADDRESS the jobs go to an existing Dask cluster whose
workers can import DeepRegisterLib and read the same paths. On Slurm, PBS or SGE, start one
with dask-jobqueue, e.g. in Python:
  from dask_jobqueue import SLURMCluster
  cluster = SLURMCluster(cores=8, processes=1, memory="32GB", walltime="02:00:00")
  cluster.scale(jobs=10); print(cluster.scheduler_address)
and pass that address. Give workers one thread per job slot ('processes' = job slots); each
job then uses the worker's cores divided by its slots (or --threads-per-job).
"""


def add_batch_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "batch",
        help="register many pairs (CSV or template + folder) on a local or existing Dask cluster",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = p.add_argument_group("jobs (--jobs, or --fixed with --moving)")
    source.add_argument("--jobs", type=Path, metavar="CSV", help="a CSV file of jobs")
    source.add_argument("--fixed", type=Path, help="one fixed image (a template) for every job")
    source.add_argument(
        "--moving", help="with --fixed: a folder of moving images or a glob ('scans/*/T1.nii.gz')"
    )
    source.add_argument("--fixed-mask", type=Path, help="with --fixed: the template's mask")
    out = p.add_argument_group("outputs")
    out.add_argument("--out", required=True, type=Path, help="output folder (made if missing)")
    out.add_argument(
        "--outputs",
        nargs="+",
        choices=OUTPUTS,
        default=list(DEFAULT_OUTPUTS),
        help=f"what each job writes besides report.json (default: {' '.join(DEFAULT_OUTPUTS)})",
    )
    run = p.add_argument_group("where it runs")
    run.add_argument("--scheduler", metavar="ADDRESS", help="an existing Dask scheduler")
    run.add_argument("--workers", type=int, help="local worker processes (default: as fits)")
    run.add_argument(
        "--threads-per-job", type=int, help="torch/ITK threads per job (default: shared cores)"
    )
    run.add_argument(
        "--retries",
        type=int,
        default=1,
        help="how often a job whose worker process died is run again (default 1)",
    )
    run.add_argument("--quiet", action="store_true", help="no progress line")
    add_settings_arguments(p.add_argument_group("settings (as for register)"))
    p.set_defaults(run=run_batch_command)


def _jobs(args: argparse.Namespace):
    from ..batch import jobs_from_csv, jobs_from_template

    if args.jobs is not None:
        if args.fixed is not None or args.moving is not None or args.fixed_mask is not None:
            raise InputError("give either --jobs CSV or --fixed with --moving, not both")
        return jobs_from_csv(args.jobs)
    if args.fixed is None or args.moving is None:
        raise InputError("say what to register: --jobs CSV, or --fixed TEMPLATE --moving FOLDER")
    return jobs_from_template(args.fixed, args.moving, args.fixed_mask)


def run_batch_command(args: argparse.Namespace) -> int:
    for name in ("workers", "threads_per_job"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be at least 1")
    if args.retries < 0:
        raise InputError("--retries must be 0 or more")
    settings = settings_from_arguments(
        args,
        compute_inverse="inverse" in args.outputs,
        compute_warped=bool({"warped", "qa"} & set(args.outputs)),
    )
    from ..batch import run_batch

    outcome = run_batch(
        _jobs(args),
        args.out,
        settings,
        outputs=args.outputs,
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_job=args.threads_per_job,
        retries=args.retries,
        stream=None if args.quiet else sys.stderr,
    )
    for path in outcome.summary_files:
        print(f"wrote {path}")
    if outcome.failed:
        print(
            f"deepregister batch: {len(outcome.failed)} of {len(outcome.rows)} job(s) failed "
            f"(first: {outcome.failed[0]['id']}: {outcome.failed[0]['error']}); see "
            f"{args.out / 'summary.md'}. Rerun the same command to retry only those.",
            file=sys.stderr,
        )
        return EXIT_JOBS_FAILED
    return EXIT_OK
