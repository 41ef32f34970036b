#!/usr/bin/env python
"""DeepRegister benchmark: accuracy, regularity, time and memory against classical baselines.

    python benchmarks/run_benchmark.py --pairs 2
    python benchmarks/run_benchmark.py --pairs 1 --cross-contrast
    python benchmarks/run_benchmark.py --2d
    python benchmarks/run_benchmark.py --smoke --out /tmp/bench

Every (method, pair) runs in a fresh child process (``multiprocessing`` spawn), one at a time,
pair by pair, so each peak memory is that method's own and every method sees the same machine
load as the ANTs SyN run it is compared with. See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import importlib.util
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO))


from benchmarks import report  # noqa: E402
from benchmarks.methods import (  # noqa: E402
    ALL_METHODS,
    DEFAULT_METHODS,
    METHOD_LABELS,
    SLOW_METHODS,
    SMOOTH_REGULARIZATION,
    available_methods,
    model_note,
    run_tasks,
)
from benchmarks.pairs import subjects_in  # noqa: E402
from benchmarks.run_report import write_report  # noqa: E402
from benchmarks.tasks import Settings, Task  # noqa: E402
from benchmarks.variants import variant_notes, variant_pairs  # noqa: E402
from DeepRegisterLib import RegistrationSettings  # noqa: E402
from DeepRegisterLib.batch.cluster import usable_cores  # noqa: E402

DEFAULT_DATA = REPO.parent / "shared" / "data" / "fs-dev"
DEFAULT_OUT = REPO / "benchmarks" / "results"
SMOKE_METHODS = ("identity", "affine", "fast", "ants")


# --- running ----------------------------------------------------------------------------------


def run_in_child(tasks: list[Task], timeout_s: float) -> Iterator[dict[str, Any]]:
    """Tasks in a fresh spawned interpreter, one row per task as each finishes.

    A task that has not reported after ``timeout_s`` is stopped ("timeout"); one that kills
    its interpreter (a segfault in a C++ library) gets a "crashed" row. Either way the tasks
    after it go on in a new child.
    """
    context = multiprocessing.get_context("spawn")
    receiver, sender = context.Pipe(duplex=False)
    process = context.Process(target=run_tasks, args=(tasks, sender), daemon=True)
    process.start()
    sender.close()
    failed: tuple[int, str] | None = None
    for number in range(len(tasks)):
        started = time.perf_counter()
        try:
            row = receiver.recv() if receiver.poll(timeout_s) else None
            status = "timeout"
        except EOFError:
            row, status = None, "crashed"
        if row is None:
            failed = (number, status)
            break
        row["process_wall_s"] = time.perf_counter() - started
        yield row
    receiver.close()
    if failed is not None and failed[1] == "timeout":
        process.kill()
    process.join(timeout=60)
    if failed is not None:
        number, status = failed
        if status == "crashed":
            status = f"crashed (exit code {process.exitcode})"
        yield {"method": tasks[number].method, "pair": tasks[number].pair.name, "status": status}
        if number + 1 < len(tasks):
            yield from run_in_child(tasks[number + 1 :], timeout_s)


def machine_info(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ram_gb = float("nan")
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                ram_gb = int(line.split()[1]) / 1024**2
    except OSError:
        pass
    versions = {"python": platform.python_version()}
    for package in ("torch", "SimpleITK", "numpy", "antspyx", "itk-elastix", "deepregister"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = "not installed"
    info: dict[str, Any] = {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable_cores(),
        "ram_gb": round(ram_gb, 1),
        "platform": platform.platform(),
        "versions": versions,
        "device": device,
    }
    if device.startswith("cuda"):
        import torch

        info["gpu"] = torch.cuda.get_device_name(0)
    return info


# --- command line -------------------------------------------------------------------------------


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    _add_pair_options(parser)
    _add_run_options(parser)
    return parser


def _add_pair_options(parser: argparse.ArgumentParser) -> None:
    """Which pairs, which methods, and what is done to the images first."""
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="fs-dev folder (sub-*/)")
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="use the first N pairs of the documented order (default: all ordered pairs; "
        "2 with --smoke)",
    )
    parser.add_argument(
        "--skip",
        type=int,
        default=0,
        help="start after the first K pairs of that order (--skip 1 --pairs 1: sub-04→sub-03), "
        "to add a slow method's pair to an earlier run",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=f"any of {', '.join(ALL_METHODS)} (comma or space separated; default: all but "
        f"{', '.join(SLOW_METHODS)}, which take ~46 min a pair; {', '.join(SMOKE_METHODS)} "
        "with --smoke)",
    )
    parser.add_argument("--cross-contrast", action="store_true", help="T2-like moving images")
    parser.add_argument("--2d", dest="two_d", action="store_true", help="matched axial slices")
    parser.add_argument(
        "--heads", action="store_true",
        help="whole-head T1 images (T1.nii.gz: skull, scalp, neck) instead of the skull-stripped "
        "brains, for the subjects that have one",
    )  # fmt: skip
    parser.add_argument(
        "--negative",
        action="store_true",
        help="every image as its negative (max − v): a bright background, as photographs have",
    )
    parser.add_argument(
        "--turn", type=float, default=0.0, metavar="DEG",
        help="each moving image and its labels turned DEG degrees in their headers (3D: about "
        "x, y and z in turn, pair by pair): how far the affine stage reaches",
    )  # fmt: skip
    parser.add_argument(
        "--slab", type=float, default=0.0, metavar="MM",
        help="each moving image (not its labels) cut to a slab MM thick through its middle: a "
        "field of view that ends inside the anatomy",
    )  # fmt: skip


def _add_run_options(parser: argparse.ArgumentParser) -> None:
    """Where the methods run, with which settings, and where the report goes."""
    parser.add_argument("--gpu", action="store_true", help="DeepRegister on CUDA")
    parser.add_argument("--smoke", action="store_true", help="tiny phantom pairs, < 60 s")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="folder for the report")
    parser.add_argument("--tag", default="", help="suffix for the report's file names")
    parser.add_argument(
        "--threads",
        type=int,
        default=usable_cores(),
        help="threads for torch, ITK, ANTs and elastix",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=None,
        help="seconds per (method, pair) before it is stopped (default 1800; 120 with --smoke)",
    )
    parser.add_argument(
        "--elastix-iterations",
        type=int,
        default=None,
        help="MaximumNumberOfIterations per resolution for elastix (default: elastix's, 256)",
    )
    parser.add_argument("--demons-iterations", type=int, default=100)
    parser.add_argument(
        "--model",
        default="default",
        help='DeepRegister model for the presets and the network-only row: "default" (the '
        'shipped default for the dimension, if any), "none", a model name or a .pt path',
    )
    parser.add_argument(
        "--regularization",
        type=float,
        default=None,
        help="diffusion weight for the DeepRegister presets instead of each preset's own "
        f"(fast-smooth keeps {SMOOTH_REGULARIZATION:g}): one point of the smoothness/overlap curve",
    )
    parser.add_argument("--note", default="", help="free text for the report's timing note")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """The options, methods split on commas; errors name what is wrong."""
    parser = _parser()
    args = parser.parse_args(argv)
    requested = args.methods or (SMOKE_METHODS if args.smoke else DEFAULT_METHODS)
    args.methods = [m for item in requested for m in item.split(",") if m]
    unknown = sorted(set(args.methods) - set(ALL_METHODS))
    if unknown:
        parser.error(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}"
        )
    if args.pairs is not None and args.pairs < 1:
        parser.error("--pairs must be ≥ 1")
    if args.skip < 0 or (args.skip and args.smoke):
        parser.error("--skip must be ≥ 0 and applies to the fs-dev pairs, not --smoke")
    if args.heads and (args.cross_contrast or args.smoke):
        parser.error("--heads takes the fs-dev T1s as they are: not with --cross-contrast, --smoke")
    if args.regularization is not None and args.regularization < 0:
        parser.error("--regularization must be ≥ 0")
    if args.timeout is None:
        args.timeout = 120.0 if args.smoke else 1800.0
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    command = "python benchmarks/run_benchmark.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    for variable in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"):
        os.environ[variable] = str(args.threads)  # inherited by the spawned children
    problem = _cannot_run(args)
    if problem is not None:
        print(problem, file=sys.stderr)
        return 2
    device = "cuda" if args.gpu else "cpu"
    notes: list[str] = []
    if args.smoke:
        notes.append(
            "Smoke run: phantom pairs, all tasks in one child process (peak memory reset per "
            "task where the kernel allows, but it includes what earlier tasks left resident); "
            "it checks the machinery, its numbers mean little."
        )
    methods = available_methods(args.methods, notes)
    similarity = "mind" if args.cross_contrast else "lncc"
    notes += variant_notes(args)
    methods = model_note(2 if args.two_d else 3, args.model, similarity, methods, notes)
    settings = _settings(args, device, similarity)
    if args.regularization is not None:
        notes.append(
            f"The DeepRegister presets ran with regularization {args.regularization:g} "
            "(`--regularization`) instead of each preset's own; their rows keep their names."
        )
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="deepregister-bench-") as scratch:
        pairs = variant_pairs(args, Path(scratch))
        print(
            f"{len(methods)} method(s) × {len(pairs)} pair(s), one fresh process each, "
            f"{args.threads} thread(s): {', '.join(methods)}",
            flush=True,
        )
        tasks = [Task(method, pair, settings) for pair in pairs for method in methods]
        rows: list[dict[str, Any]] = []
        machine = machine_info(device)

        def write(final: bool) -> Path:
            """The report of the rows so far (rewritten after every pair, so that a long run
            stopped early still leaves one)."""
            timing = {
                "date": datetime.date.today().isoformat(),
                "command": command,
                "load_start": load_start,
                "load_end": os.getloadavg()[0],
                "wall_s": time.perf_counter() - started,
                "complete": final,
            }
            done = [p for p in pairs if any(row["pair"] == p.name for row in rows)]
            return write_report(args, rows, methods, done, notes, machine, timing)[1]

        _run_all(args, tasks, rows, notes, lambda: write(final=False))
        path = write(final=True)
    print()
    print(report.main_table(report.summarise(rows, methods)))
    print()
    for note in notes:
        print(f"note: {note}")
    print(f"report: {path}")
    return 0 if all(row.get("status") == "ok" for row in rows) else 3


def _cannot_run(args: argparse.Namespace) -> str | None:
    """Why the benchmark cannot run here, if it cannot: no GPU for ``--gpu``, no data."""
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            return "--gpu: no CUDA GPU is available to torch on this machine."
    data = Path(args.data)
    if not args.smoke and not (data.is_dir() and len(subjects_in(data)) >= 2):
        return (
            f"No fs-dev data at {data} (need sub-*/brainmask.nii.gz and aseg.nii.gz for at least "
            "two subjects). Pass --data PATH, or run --smoke for the phantom benchmark."
        )
    return None


def _settings(args: argparse.Namespace, device: str, similarity: str) -> Settings:
    """The run's settings; ``--model`` and ``--regularization`` are DeepRegister's fields."""
    registration = RegistrationSettings(
        model=args.model, regularization=args.regularization, similarity=similarity, device=device
    )
    return Settings(
        registration=registration,
        threads=args.threads,
        cross_contrast=args.cross_contrast,
        smoke=args.smoke,
        elastix_iterations=args.elastix_iterations,
        demons_iterations=args.demons_iterations,
    )


def _run_all(
    args: argparse.Namespace,
    tasks: list[Task],
    rows: list[dict[str, Any]],
    notes: list[str],
    write_interim: Callable[[], Path],
) -> None:
    """Every task, appending to ``rows``; an interim report after each pair. Ctrl-C stops the
    run with a note, so the report covers what ran."""
    # One fresh process per task; --smoke shares one to save interpreter start-ups.
    batches = [tasks] if args.smoke else [[task] for task in tasks]
    last_method = tasks[-1].method if tasks else None
    try:
        for batch in batches:
            for row in run_in_child(batch, args.timeout):
                rows.append(row)
                print(_progress_line(len(rows), len(tasks), row), flush=True)
            if not args.smoke and batch[-1].method == last_method and len(rows) < len(tasks):
                print(f"(report so far: {write_interim()})", flush=True)
    except KeyboardInterrupt:
        notes.append(
            f"Interrupted after {len(rows)} of {len(tasks)} tasks; the tables cover those."
        )


def _progress_line(done: int, total: int, row: dict[str, Any]) -> str:
    head = f"[{done}/{total}] {row['pair']:<24} {METHOD_LABELS.get(row['method'], row['method'])}"
    if row.get("status") != "ok":
        return f"{head}: {row.get('status')} {row.get('error', '')}"
    dice = row.get("mean_dice")
    return (
        f"{head}: Dice {dice if dice is None else round(dice, 3)}, {row['time_s']:.1f} s, "
        f"folding {row['folding_percent']:.4f}%, peak {row['peak_rss_bytes'] / 1e9:.2f} GB"
    )


if __name__ == "__main__":
    sys.exit(main())
