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
    stretch between two cancel checks (how long a cancel request can wait).

A parent-side watchdog kills a child before the machine runs out of memory (other programs
share it) and says so. Results go to ``--out``/<date>-memory.md (+ a PNG of the RSS curve).
"""

from __future__ import annotations

import argparse
import datetime
import itertools
import json
import multiprocessing
import os
import platform
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from benchmarks.ct_phantom import ct_pair, displacement_mm  # noqa: E402
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


# --- (b) big CT-like volumes ------------------------------------------------------------------


class CheckClock:
    """A cancel token that never cancels but times every check, naming where it was made."""

    WRAPPERS = (
        "is_set",
        "cancelled",
        "check",
        "tick",
        "<lambda>",
        "stop_if",
        "stop_if_cancelled",
        "cancel_point",
    )

    def __init__(self):
        self.times: list[tuple[float, str]] = []

    def progress(self, fraction: float, message: str) -> None:
        pass

    def is_set(self) -> bool:
        frame = sys._getframe(1)
        while frame.f_back is not None and frame.f_code.co_name in self.WRAPPERS:
            frame = frame.f_back
        where = f"{Path(frame.f_code.co_filename).stem}.{frame.f_code.co_name}:{frame.f_lineno}"
        self.times.append((time.perf_counter(), where))
        return False


def big_run(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    shrink: tuple[int, int],
    outputs: str,
) -> dict:
    """In a spawned child: build (each image binned ``shrink`` times along every axis: fixed,
    moving), register with ``outputs`` (a key of OUTPUTS), measure; returns a JSON-able dict."""
    import torch

    from DeepRegisterLib import register
    from DeepRegisterLib.registration.memory_plan import estimate_peak_bytes

    out: dict = {"shape": list(shape), "spacing": list(spacing), "threads": torch.get_num_threads()}
    settings = SETTINGS.replace(**OUTPUTS[outputs])
    out["settings"] = settings.to_dict()
    started = time.perf_counter()
    fixed, moving, extent = ct_pair(shape, spacing)
    fixed, moving = (
        sitk.BinShrink(image, [factor] * 3) if factor > 1 else image
        for image, factor in zip((fixed, moving), shrink, strict=True)
    )
    out["sizes"] = [list(fixed.GetSize()), list(moving.GetSize())]
    out["build_s"] = time.perf_counter() - started
    out["build_peak"] = proc_status("VmHWM")
    out["rss_before"] = proc_status("VmRSS")
    out["peak_reset"] = reset_peak()
    clock = CheckClock()
    started = time.perf_counter()
    result = register(fixed, moving, settings, progress=clock.progress, cancel=clock)
    finished = time.perf_counter()
    out["wall_s"] = finished - started
    out["peak"] = proc_status("VmHWM")
    out["rss_after"] = proc_status("VmRSS")
    out["report_estimate"] = result.report["estimated_peak_bytes"]
    out["network_grid"] = result.report["network_grid"]
    out["timings"] = result.report["timings"]
    out["ncc"] = [
        result.report["ncc_before"],
        result.report["ncc_affine"],
        result.report["ncc_after"],
    ]
    out["folding_percent"] = result.report.get("folding_percent")
    assert (
        estimate_peak_bytes(fixed, moving, int(np.prod(out["network_grid"]["size"])), settings)
        == (out["report_estimate"])
    )
    # Cancel latency: the longest stretch without a check, incl. before the first one (pre-flight)
    # and after the last one (what a late request cannot stop).
    marks = [(started, "start"), *clock.times, (finished, "returned")]
    gaps = [(b[0] - a[0], f"{a[1]} → {b[1]}") for a, b in itertools.pairwise(marks)]
    out["checks"] = len(clock.times)
    out["longest_gaps"] = sorted(gaps, reverse=True)[:4]
    # Accuracy against the known field, on every 8th voxel inside the body.
    f = sitk.GetArrayViewFromImage(fixed)[::8, ::8, ::8]
    u = _every_8th_displacement(result, fixed)
    grid = [
        np.asarray(fixed.GetOrigin())[a]
        + fixed.GetSpacing()[a] * np.arange(fixed.GetSize()[a])[::8]
        for a in range(3)
    ]
    points = np.stack(np.meshgrid(*grid[::-1], indexing="ij")[::-1], axis=-1).astype(np.float32)
    truth = displacement_mm(points, np.asarray(extent))
    body = f > -500
    out["error_mm"] = float(np.linalg.norm(u - truth, axis=-1)[body].mean())
    out["error_before_mm"] = float(np.linalg.norm(truth, axis=-1)[body].mean())
    return out


def _every_8th_displacement(result, fixed: sitk.Image) -> np.ndarray:
    """The displacement at every 8th voxel of ``fixed``: the kept dense field's, or the
    transform's where none was kept (the command line's outputs)."""
    if result.displacement is not None:
        return sitk.GetArrayViewFromImage(result.displacement)[::8, ::8, ::8]
    size = [-(-n // 8) for n in fixed.GetSize()]
    spacing = [8 * step for step in fixed.GetSpacing()]
    field = sitk.TransformToDisplacementField(
        result.transform(), sitk.sitkVectorFloat32, size, fixed.GetOrigin(), spacing,
        fixed.GetDirection(),
    )  # fmt: skip
    return sitk.GetArrayFromImage(field)


def _child(queue, shape, spacing, shrink, outputs) -> None:
    try:
        queue.put(("ok", big_run(shape, spacing, shrink, outputs)))
    except BaseException as error:  # reported to the parent, with where it happened
        import traceback

        queue.put(("error", f"{type(error).__name__}: {error}\n{traceback.format_exc()}"))


def big(
    shape: tuple[int, int, int],
    spacing: tuple[float, float, float],
    reserve: int,
    shrink: tuple[int, int] = (1, 1),
    outputs: str = "api",
) -> dict:
    """Run :func:`big_run` in a spawned child, sampling its RSS; kill it if the machine would
    drop below ``reserve`` bytes available."""
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    child = context.Process(target=_child, args=(queue, shape, spacing, shrink, outputs))
    started = time.perf_counter()
    child.start()
    sampled = {"max_rss": 0, "min_available": mem_available(), "killed": None}

    def watch() -> None:
        while child.is_alive():
            rss = proc_status("VmRSS", child.pid)
            available = mem_available()
            sampled["max_rss"] = max(sampled["max_rss"], rss)
            sampled["min_available"] = min(sampled["min_available"], available)
            if available < reserve:
                sampled["killed"] = (
                    f"killed by the watchdog at VmRSS {rss / GIB:.2f} GiB: "
                    f"only {available / GIB:.2f} GiB left on the machine"
                )
                child.kill()
                return
            time.sleep(0.1)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    outcome = None
    while outcome is None and (child.is_alive() or not queue.empty()):
        try:
            outcome = queue.get(timeout=1.0)
        except Exception:  # queue.Empty
            continue
    child.join()
    watcher.join()
    result = {
        "shape": list(shape),
        "spacing": list(spacing),
        "shrink": list(shrink),
        "outputs": outputs,
        **sampled,
        "exitcode": child.exitcode,
        "elapsed_s": time.perf_counter() - started,
    }
    if outcome is None:
        result["error"] = sampled["killed"] or f"the child died (exit code {child.exitcode})"
    elif outcome[0] == "error":
        result["error"] = outcome[1]
    else:
        result.update(outcome[1])
    return result


def describe_big(r: dict) -> list[str]:
    name = "×".join(map(str, r["shape"])) + " (" + "×".join(f"{s:g}" for s in r["spacing"]) + " mm)"
    if r.get("shrink", [1, 1]) != [1, 1]:
        name += ", fixed binned {}×, moving {}×".format(*r["shrink"])
    if "error" in r:
        return [
            f"- **{name}: FAILED** after {r['elapsed_s']:.0f} s; sampled peak RSS "
            f"{r['max_rss'] / GIB:.2f} GiB, least available {r['min_available'] / GIB:.2f} GiB.",
            "",
            "```",
            r["error"].strip(),
            "```",
        ]
    t = r["timings"]
    increase = r["peak"] - r["rss_before"]
    lines = [
        f"- **{name}**, {r['threads']} torch threads: build {r['build_s']:.0f} s; registration "
        f"wall time **{r['wall_s']:.1f} s** (affine {t.get('affine_s', 0):.1f}, network grid + "
        f"network {t.get('network_s', 0):.1f}, optimisation {t.get('optimisation_s', 0):.1f}, "
        f"outputs {t.get('outputs_s', 0):.1f} s); network grid {r['network_grid']['size']} at "
        f"{r['network_grid']['spacing_mm']:g} mm",
        f"  - peak RSS of the registration (VmHWM{' after a reset' if r['peak_reset'] else ''}): "
        f"**{r['peak'] / GIB:.2f} GiB**; RSS before {r['rss_before'] / GIB:.2f} GiB (the two "
        f"images), after {r['rss_after'] / GIB:.2f} GiB; building the pair peaked at "
        f"{r['build_peak'] / GIB:.2f} GiB; sampled by the parent {r['max_rss'] / GIB:.2f} GiB",
        f"  - `memory_plan.estimate_peak_bytes`: **{r['report_estimate'] / GIB:.2f} GiB**; the "
        f"registration's own increase (peak − RSS before) {increase / GIB:.2f} GiB = "
        f"{increase / r['report_estimate']:.2f} × the estimate",
        f"  - NCC {r['ncc'][0]:.3f} → {r['ncc'][1]:.3f} (affine) → {r['ncc'][2]:.3f}; mean "
        f"error against the known field {r['error_before_mm']:.2f} → {r['error_mm']:.2f} mm; "
        + (
            f"det J ≤ 0: {r['folding_percent']:.4f} %"
            if r["folding_percent"] is not None
            else "det J not computed (the command line's outputs)"
        ),
        f"  - cancel checks: {r['checks']}; longest stretches without one: "
        + "; ".join(f"{s:.1f} s ({where})" for s, where in r["longest_gaps"]),
    ]
    return lines


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


def main(argv: list[str] | None = None) -> int:
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
    args = parser.parse_args(argv)

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
        curve = repeat(args.runs, args.size)
        plot(curve, stem.with_suffix(".png"))
        lines += [
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
        lines.append("")
    if not args.repeat_only:
        lines += [
            f"## (b) Big CT-like volumes (int16), preset fast, CPU, {args.outputs} outputs",
            "",
        ]
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
        lines.append("")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {stem.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
