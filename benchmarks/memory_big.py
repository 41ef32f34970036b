"""Part (b) of ``memory.py``: a CT-like pair registered in a spawned child, its peak and the
engine's estimate; each image binned 1× or 2× for ``--sweep``; the outputs kept, the API's or
the command line's."""

from __future__ import annotations

import itertools
import multiprocessing
import sys
import threading
import time
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from benchmarks.ct_phantom import ct_pair, displacement_mm
from benchmarks.memory import GIB, OUTPUTS, SETTINGS, mem_available, proc_status, reset_peak


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
