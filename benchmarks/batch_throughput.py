#!/usr/bin/env python
"""Batch throughput: registrations per hour of one preset on the fs-dev pairs, run three ways.

    python benchmarks/batch_throughput.py --pairs 4
    python benchmarks/batch_throughput.py --pairs 20 --workers 1 2 4 --out /tmp/throughput

1. ``loop``: one fresh process registering the pairs one after another with every core;
2. ``batch ×N``: ``deepregister batch`` (``run_batch``) on a local Dask cluster of N worker
   processes, the cores shared out between them.
Every run writes the same outputs (warped image, transform, warped labels, Jacobian, report) and
is timed end to end, process and cluster start-up included. Peak memory is each worker
process's maximum resident set. "Warm job" is what a process that stays (a Dask worker, Slicer's
console) spends on each pair after its first, files read to files written, with the engine's
stages from the jobs' reports: there torch, CUDA and the model are loaded already.
This prints figures; it asserts none (timings are not tests).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO))

from benchmarks.pairs import ordered_pairs, subjects_in  # noqa: E402
from benchmarks.run_benchmark import DEFAULT_DATA  # noqa: E402
from DeepRegisterLib.batch import BatchJob, run_batch  # noqa: E402
from DeepRegisterLib.batch.cluster import usable_cores  # noqa: E402
from DeepRegisterLib.batch.runner import job_settings  # noqa: E402
from DeepRegisterLib.batch.worker import DEFAULT_OUTPUTS, run_job  # noqa: E402
from DeepRegisterLib.registration.settings import RegistrationSettings  # noqa: E402


def fsdev_jobs(data: Path, count: int) -> list[BatchJob]:
    """The first ``count`` pairs in run_benchmark.py's documented order, with aseg labels."""
    jobs = []
    for moving, fixed in ordered_pairs(subjects_in(data))[:count]:
        jobs.append(
            BatchJob(
                id=f"{moving}_to_{fixed}",
                fixed=str(data / fixed / "brainmask.nii.gz"),
                moving=str(data / moving / "brainmask.nii.gz"),
                fixed_labels=str(data / fixed / "aseg.nii.gz"),
                labels=str(data / moving / "aseg.nii.gz"),
            )
        )
    return jobs


def _loop(jobs: list[BatchJob], settings: dict[str, Any], out: str, threads: int) -> dict:
    """In a fresh process: every job in turn, as ``run_batch``'s workers run them."""
    started = time.perf_counter()
    rows = [run_job(job, settings, DEFAULT_OUTPUTS, out, threads) for job in jobs]
    return {
        "wall_s": time.perf_counter() - started,
        "rows": rows,
        "peak_rss_mib": [resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024],
    }


def run_loop(jobs: list[BatchJob], settings: RegistrationSettings, out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    context = multiprocessing.get_context("spawn")
    started = time.perf_counter()
    with ProcessPoolExecutor(1, mp_context=context) as pool:
        values = job_settings(settings, DEFAULT_OUTPUTS).to_dict()  # as run_batch's jobs
        result = pool.submit(_loop, jobs, values, str(out), usable_cores()).result()
    result["wall_s"] = time.perf_counter() - started  # process start-up included
    result["layout"] = f"1 process × {usable_cores()} thread(s)"
    return result


def run_cluster(jobs: list[BatchJob], settings: RegistrationSettings, out: Path, workers: int):
    started = time.perf_counter()
    outcome = run_batch(jobs, out, settings, workers=workers, stream=None)
    wall = time.perf_counter() - started
    peaks: dict[int, float] = {}
    for job in jobs:
        report = json.loads((out / job.id / "report.json").read_text())
        batch = report["batch"]
        peaks[batch["pid"]] = max(peaks.get(batch["pid"], 0), batch["worker_peak_rss_bytes"])
    threads = max(1, usable_cores() // workers)
    return {
        "wall_s": wall,
        "rows": outcome.rows,
        "peak_rss_mib": [peak / 2**20 for peak in peaks.values()],
        "layout": f"{workers} worker(s) × {threads} thread(s)",
    }


STAGES = ("affine_s", "network_s", "optimisation_s", "outputs_s")


def warm_jobs(folder: Path, jobs: list[BatchJob]) -> list[dict]:
    """The reports of the jobs that were not their process's first, in the order they ran."""
    started = []
    for job in jobs:
        path = folder / job.id / "report.json"
        report = json.loads(path.read_text())
        # Written as the job ended: its start is the file's time less the job's.
        started.append((path.stat().st_mtime - report["batch"]["job_s"], report))
    warm, seen = [], set()
    for _, report in sorted(started, key=lambda pair: pair[0]):
        if report["batch"]["pid"] in seen:
            warm.append(report)
        seen.add(report["batch"]["pid"])
    return warm


def table(results: dict[str, dict], pairs: int) -> str:
    base = pairs / results["loop"]["wall_s"]
    lines = [
        "| configuration | layout | wall (s) | pairs/hour | × loop | mean job (s) "
        "| median warm job (s) | warm: affine / network / optimisation / outputs s "
        "| peak RSS per worker (MiB) | mean Dice | failed |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, result in results.items():
        rows = [row for row in result["rows"] if row["status"] == "ok"]
        rate = pairs / result["wall_s"]
        job_s = sum(row["time_s"] for row in rows) / max(len(rows), 1)
        warm = result["warm"]
        warm_s = f"{statistics.median(r['batch']['job_s'] for r in warm):.2f}" if warm else "–"
        stages = " / ".join(
            f"{statistics.mean(r['timings'].get(key, 0) for r in warm):.2f}" if warm else "–"
            for key in STAGES
        )
        dice = [row["mean_dice"] for row in rows if row["mean_dice"] is not None]
        peaks = ", ".join(f"{peak:.0f}" for peak in result["peak_rss_mib"])
        lines.append(
            f"| {name} | {result['layout']} | {result['wall_s']:.1f} | {3600 * rate:.0f} "
            f"| {rate / base:.2f} | {job_s:.1f} | {warm_s} | {stages} | {peaks} "
            f"| {sum(dice) / max(len(dice), 1):.3f} | {len(result['rows']) - len(rows)} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the fs-dev folder")
    parser.add_argument("--pairs", type=int, default=4, help="how many pairs (of 20)")
    parser.add_argument(
        "--workers", type=int, nargs="*", default=[1, 2], help="cluster sizes (none: loop only)"
    )
    parser.add_argument("--preset", default="fast")
    parser.add_argument("--model", default="default")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto (every worker's)")
    parser.add_argument("--out", type=Path, help="keep the outputs here (default: a temp folder)")
    args = parser.parse_args(argv)
    if not args.data.is_dir():
        print(f"no fs-dev data at {args.data}; give --data", file=sys.stderr)
        return 2
    jobs = fsdev_jobs(args.data, args.pairs)
    settings = RegistrationSettings(preset=args.preset, model=args.model, device=args.device)
    with tempfile.TemporaryDirectory(prefix="batch-throughput-") as scratch:
        out = args.out or Path(scratch)
        print(f"{len(jobs)} pair(s), preset {args.preset}, model {args.model}, device "
              f"{args.device}, {usable_cores()} core(s); outputs in {out}", flush=True)  # fmt: skip
        results = {"loop": run_loop(jobs, settings, out / "loop")}
        results["loop"]["warm"] = warm_jobs(out / "loop", jobs)
        print(f"loop: {results['loop']['wall_s']:.1f} s", flush=True)
        for workers in args.workers:
            name = f"batch ×{workers}"
            folder = out / f"batch-{workers}"
            results[name] = run_cluster(jobs, settings, folder, workers)
            results[name]["warm"] = warm_jobs(folder, jobs)
            print(f"{name}: {results[name]['wall_s']:.1f} s", flush=True)
        print()
        print(table(results, len(jobs)))
        if args.out is not None:
            (out / "batch-throughput.json").write_text(json.dumps(results, indent=2, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
