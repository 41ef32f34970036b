#!/usr/bin/env python
"""Memory benchmark: leaks over many registrations, and the peak on big CT-like volumes.

    python benchmarks/memory.py                       # both parts (the big one takes minutes)
    python benchmarks/memory.py --repeat-only --runs 50 --size 48
    python benchmarks/memory.py --big-only --big-shape 512 512 600
    python benchmarks/memory.py --big-only --sweep --out /tmp/memory

(a) ``--runs`` registrations of one small phantom pair in a row in this process, printing the
    resident set (VmRSS) after each; the verdict is the growth between run 10 and the last.
(b) Synthetic CT-like pairs (int16, −1024…3071 HU: air, body, fat, lungs, spine, ribs; the
    moving one shifted and smoothly deformed by a known field), a ``--medium-shape`` (256³)
    and a ``--big-shape`` (512² × 600) one, each registered with ``preset="fast"`` on the CPU
    in its own spawned process. Reported: wall time per stage, the peak resident set of the
    registration (VmHWM, reset after the images are built when the kernel allows it, and a
    parent-side sampler),
    :func:`memory_plan.estimate_peak_bytes`, the error against the known field, and the longest
    stretch between two cancel checks (how long a cancel request can wait). ``--sweep``: the
    big pair four times instead, each image binned 1× or 2×; ``--outputs command``: the
    command line's outputs rather than the Python API's (``memory_big.py``).

A parent-side watchdog kills a child before the machine runs out of memory (other programs
share it) and says so. Results go to ``--out``/<date>-memory.md (+ a PNG of the RSS curve).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402

from DeepRegisterLib import RegistrationSettings  # noqa: E402

MIB = 2**20
GIB = 2**30
#: Every registration here: the fast preset on the CPU, the default model.
SETTINGS = RegistrationSettings(preset="fast", device="cpu")
#: ``--outputs``: the Python API's defaults, or the command line's (``--warped`` and an ``.h5``
#: transform: no dense displacement, no det J).
OUTPUTS = {
    "api": {},
    "command": {"compute_displacement": False, "compute_jacobian": False, "keep_jacobian": False},
}


def proc_status(field: str, pid: int | str = "self") -> int:
    """A ``/proc/<pid>/status`` memory field (VmRSS, VmHWM) in bytes; 0 if unavailable."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def mem_available() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0: write 5 to clear_refs); False if refused."""
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as clear:
            clear.write("5")
        return True
    except OSError:
        return False


# --- (a) many registrations in a row --------------------------------------------------------


def repeat(runs: int, size: int) -> dict:
    from DeepRegisterLib import register
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

    pair = phantom_pair(demo_grid(3, size), amplitude_mm=4.0, rotation_deg=5.0)
    rss, seconds = [], []
    print(f"(a) {runs} registrations of a {pair.fixed.GetSize()} phantom pair, preset fast")
    for run in range(1, runs + 1):
        started = time.perf_counter()
        result = register(pair.fixed, pair.moving, SETTINGS)
        seconds.append(time.perf_counter() - started)
        del result
        rss.append(proc_status("VmRSS"))
        print(f"  run {run:3d}: {seconds[-1]:5.2f} s, VmRSS {rss[-1] / MIB:8.1f} MiB", flush=True)
    reference = min(10, runs) - 1
    growth = rss[-1] - rss[reference]
    per_run = growth / max(runs - 1 - reference, 1)
    verdict = (
        f"growth from run {reference + 1} to run {runs}: {growth / MIB:+.1f} MiB "
        f"({per_run / MIB:+.2f} MiB per run) — "
        + ("no leak" if abs(growth) < 20 * MIB else "LEAK SUSPECTED")
    )
    print("  " + verdict)
    return {
        "size": list(pair.fixed.GetSize()),
        "settings": SETTINGS.to_dict(),
        "rss": rss,
        "seconds": seconds,
        "verdict": verdict,
        "vmhwm": proc_status("VmHWM"),
    }


def plot(curve: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 3.5))
    runs = np.arange(1, len(curve["rss"]) + 1)
    axis.plot(runs, np.asarray(curve["rss"]) / MIB, marker=".")
    axis.set_xlabel("registration")
    axis.set_ylabel("VmRSS after the run (MiB)")
    axis.set_title(f"{len(runs)} registrations of a {'×'.join(map(str, curve['size']))} pair")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--size", type=int, default=48, help="phantom size for (a)")
    parser.add_argument("--medium-shape", type=int, nargs=3, default=[256, 256, 256])
    parser.add_argument("--big-shape", type=int, nargs=3, default=[512, 512, 600])
    parser.add_argument("--big-spacing", type=float, nargs=3, default=[0.78, 0.78, 1.0])
    parser.add_argument(
        "--reserve-gib",
        type=float,
        default=1.5,
        help="kill a child when the machine has less than this available",
    )
    parser.add_argument("--repeat-only", action="store_true")
    parser.add_argument("--big-only", action="store_true")
    parser.add_argument(
        "--sweep",
        action="store_true",
        help="(b) the big pair four times, the fixed and the moving image each binned 1× or 2× "
        "along every axis (what each image's size costs), instead of the medium and big pairs",
    )
    parser.add_argument(
        "--outputs",
        choices=sorted(OUTPUTS),
        default="api",
        help="(b) the Python API's default outputs (the dense displacement and det J among "
        "them) or the command line's (the warped image and an .h5 transform)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    return parser


def _repeated_section(args: argparse.Namespace, stem: Path) -> list[str]:
    """(a): the registrations in a row, their RSS curve plotted beside the report."""
    curve = repeat(args.runs, args.size)
    plot(curve, stem.with_suffix(".png"))
    lines = [
        "## (a) Registrations in a row",
        "",
        f"{args.runs} × `register(preset='fast', device='cpu')` on a "
        f"{'×'.join(map(str, curve['size']))} phantom pair in one process: "
        f"**{curve['verdict']}**; median {np.median(curve['seconds']):.2f} s a run; "
        f"process peak {curve['vmhwm'] / MIB:.0f} MiB.",
        "",
        f"![RSS after each run]({stem.with_suffix('.png').name})",
        "",
        "| run | VmRSS (MiB) |",
        "|---:|---:|",
    ]
    lines += [
        f"| {i} | {rss / MIB:.1f} |"
        for i, rss in enumerate(curve["rss"], 1)
        if i in (1, 2, 5, 10, 20, 30, 40) or i == len(curve["rss"])
    ]
    return [*lines, ""]


def _big_section(args: argparse.Namespace, stem: Path) -> list[str]:
    """(b): each big pair in its own process, its figures written beside the report."""
    from benchmarks.memory_big import big, describe_big

    lines = [f"## (b) Big CT-like volumes (int16), preset fast, CPU, {args.outputs} outputs", ""]
    big_pair = (tuple(args.big_shape), tuple(args.big_spacing))
    runs = (
        [(*big_pair, (f, m)) for f in (1, 2) for m in (1, 2)]
        if args.sweep
        else [(tuple(args.medium_shape), (1.0, 1.0, 1.0), (1, 1)), (*big_pair, (1, 1))]
    )
    for shape, spacing, shrink in runs:
        print(f"(b) {shape} at {spacing} mm, binned {shrink} …", flush=True)
        r = big(shape, spacing, int(args.reserve_gib * GIB), shrink, args.outputs)
        for line in describe_big(r):
            print("  " + line, flush=True)
        lines += describe_big(r)
        binned = "" if shrink == (1, 1) else "-binned{}{}".format(*shrink)
        (stem.parent / f"{stem.name}-{'x'.join(map(str, shape))}{binned}.json").write_text(
            json.dumps(r, indent=2, default=str) + "\n"
        )
    return [*lines, ""]


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    lines = [
        f"# Memory benchmark, {datetime.date.today()}",
        "",
        f"{platform.node()}, {os.cpu_count()} CPUs, {platform.python_version()}, "
        f"{mem_available() / GIB:.1f} GiB available at the start; "
        f"`python benchmarks/memory.py {' '.join(argv or sys.argv[1:])}`",
        "",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{datetime.date.today()}-memory"
    if not args.big_only:
        lines += _repeated_section(args, stem)
    if not args.repeat_only:
        lines += _big_section(args, stem)
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
