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
import dataclasses
import datetime
import importlib.metadata
import importlib.util
import json
import multiprocessing
import os
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402

from benchmarks import report  # noqa: E402
from benchmarks.methods import (  # noqa: E402
    ALL_METHODS,
    METHOD_LABELS,
    PACKAGES,
    SMOOTH_REGULARIZATION,
    PairSpec,
    Settings,
    Task,
    run_tasks,
)

DEFAULT_DATA = REPO.parent / "shared" / "data" / "fs-dev"
DEFAULT_OUT = REPO / "benchmarks" / "results"
SMOKE_METHODS = ("identity", "affine", "fast", "ants")


# --- pairs ------------------------------------------------------------------------------------


def subjects_in(data: Path) -> list[str]:
    return sorted(
        d.name
        for d in data.iterdir()
        if d.is_dir() and (d / "brainmask.nii.gz").exists() and (d / "aseg.nii.gz").exists()
    )


def ordered_pairs(subjects: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered (moving, fixed) pair, in a fixed, documented order.

    First a ring in which, for five subjects, every subject is fixed once and moving once:
    ``moving = s[(2k+1) mod n], fixed = s[2k mod n]`` for k = 0…n−1 — sub-02→sub-01,
    sub-04→sub-03, sub-01→sub-05, sub-03→sub-02, sub-05→sub-04 — so ``--pairs 2`` is
    sub-02→sub-01 (the reference pair of shared/README.md) and sub-04→sub-03 (four different
    subjects). Then the remaining pairs sorted by (fixed, moving).
    """
    n = len(subjects)
    order: list[tuple[str, str]] = []
    for k in range(n):
        pair = (subjects[(2 * k + 1) % n], subjects[(2 * k) % n])
        if pair[0] != pair[1] and pair not in order:
            order.append(pair)
    rest = sorted(
        ((m, f) for f in subjects for m in subjects if m != f and (m, f) not in order),
        key=lambda p: (p[1], p[0]),
    )
    return order + rest


def _region_file(image: sitk.Image, folder: Path, name: str) -> str:
    path = folder / f"{name}-region.nii.gz"
    sitk.WriteImage(sitk.Cast(image > 0, sitk.sitkUInt8), str(path))
    return str(path)


def t2_like(brain: sitk.Image) -> sitk.Image:
    """A T2-like contrast from a skull-stripped T1: inverted and non-linearly remapped.

    Inside the brain mask (voxels > 0) ``255 · (1 − v/p99)^1.5`` with ``v`` clipped to the
    99th percentile, 0 outside: CSF becomes bright, white matter dark, and the mapping is not
    linear, so no method can succeed by merely flipping the sign of a correlation.
    """
    array = sitk.GetArrayFromImage(brain).astype(np.float32)
    inside = array > 0
    top = float(np.percentile(array[inside], 99)) if inside.any() else 1.0
    remapped = 255.0 * np.clip(1.0 - np.minimum(array, top) / top, 0.0, 1.0) ** 1.5
    out = sitk.GetImageFromArray(np.where(inside, remapped, 0.0).astype(np.float32))
    out.CopyInformation(brain)
    return out


def axial_axis(image: sitk.Image) -> int:
    """The index axis (ITK order) closest to the S–I (LPS z) direction."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2])))


def _slice(image: sitk.Image, axis: int, index: int) -> sitk.Image:
    """One slice as a 2D image with the in-plane spacing, origin 0 and identity direction."""
    array = sitk.GetArrayFromImage(image)
    array_axis = 2 - axis  # ITK axis i is numpy axis (dim - 1 - i)
    plane = np.take(array, index, axis=array_axis)
    spacing = [s for a, s in enumerate(image.GetSpacing()) if a != axis]
    out = sitk.GetImageFromArray(np.ascontiguousarray(plane))
    out.SetSpacing(spacing)
    return out


def prepare_2d(spec: PairSpec, folder: Path) -> PairSpec:
    """Matched axial slices: DeepRegister's 3D affine first, then the same slice of both.

    The moving volume and labels are resampled onto the fixed grid through the 3D affine, and
    the slice through the middle of the fixed brain's S–I extent is taken from both, so the 2D
    problem is the residual in-plane deformation. "identity" in 2D is therefore "after 3D affine".
    """
    from DeepRegisterLib.registration.engine import register

    fixed = sitk.ReadImage(spec.fixed)
    labels = sitk.ReadImage(spec.fixed_labels)
    moving_labels = {"aseg": sitk.ReadImage(spec.moving_labels)}
    result = register(
        fixed,
        sitk.ReadImage(spec.moving),
        moving_labels=moving_labels,
        iterations=0,
        model="none",
        compute_jacobian=False,
        device="cpu",
    )
    axis = axial_axis(fixed)
    brain = sitk.GetArrayViewFromImage(fixed) > 0
    occupied = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != 2 - axis)))
    index = round((occupied[0] + occupied[-1]) / 2) if occupied.size else fixed.GetSize()[axis] // 2
    stem = spec.name.replace("→", "_to_")
    paths = {}
    for key, image in (
        ("fixed", fixed),
        ("moving", result.warped),
        ("fixed_labels", labels),
        ("moving_labels", result.warped_labels["aseg"]),
    ):
        path = folder / f"{stem}-2d-{key}.nii.gz"
        sitk.WriteImage(_slice(image, axis, index), str(path))
        paths[key] = str(path)
    region = _region_file(sitk.ReadImage(paths["fixed"]), folder, f"{stem}-2d")
    return PairSpec(name=f"{spec.name} (slice {index})", region=region, labels=spec.labels, **paths)


def fsdev_pairs(
    data: Path, count: int | None, folder: Path, cross_contrast: bool
) -> list[PairSpec]:
    from DeepRegisterLib.imaging.metrics import FREESURFER_EVAL_LABELS

    pairs = ordered_pairs(subjects_in(data))
    specs = []
    for moving, fixed in pairs[:count] if count else pairs:
        moving_image = str(data / moving / "brainmask.nii.gz")
        name = f"{moving}→{fixed}"
        if cross_contrast:
            path = folder / f"{moving}-t2like.nii.gz"
            if not path.exists():
                sitk.WriteImage(t2_like(sitk.ReadImage(moving_image)), str(path))
            moving_image = str(path)
        specs.append(
            PairSpec(
                name=name,
                fixed=str(data / fixed / "brainmask.nii.gz"),
                moving=moving_image,
                fixed_labels=str(data / fixed / "aseg.nii.gz"),
                moving_labels=str(data / moving / "aseg.nii.gz"),
                region=_region_file(
                    sitk.ReadImage(str(data / fixed / "brainmask.nii.gz")), folder, fixed
                ),
                labels=FREESURFER_EVAL_LABELS,
            )
        )
    return specs


def smoke_pairs(count: int, folder: Path, cross_contrast: bool) -> list[PairSpec]:
    """Phantom pairs on a small oblique, anisotropic grid with a known deformation."""
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

    specs = []
    for seed in range(count):
        pair = phantom_pair(demo_grid(3, 32), seed=seed)
        moving = t2_like(pair.moving) if cross_contrast else pair.moving
        paths = {}
        for key, image in (
            ("fixed", pair.fixed),
            ("moving", moving),
            ("fixed_labels", pair.fixed_labels),
            ("moving_labels", pair.moving_labels),
        ):
            path = folder / f"phantom{seed}-{key}.nii.gz"
            sitk.WriteImage(image, str(path))
            paths[key] = str(path)
        region = _region_file(pair.fixed_labels, folder, f"phantom{seed}")
        specs.append(PairSpec(name=f"phantom {seed}", region=region, **paths))
    return specs


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


def available_methods(requested: Sequence[str], notes: list[str]) -> list[str]:
    """The requested methods whose packages are installed; a note for each one skipped."""
    chosen = []
    for method in requested:
        if method in PACKAGES:
            module, package = PACKAGES[method]
            if importlib.util.find_spec(module) is None or not _installed(package):
                notes.append(
                    f"{METHOD_LABELS[method]} skipped: `{package}` is not installed "
                    f"(`pip install {package}`, or `pip install -e .[bench]`)."
                )
                continue
        chosen.append(method)
    return chosen


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def model_note(
    dim: int, model: str, similarity: str, methods: list[str], notes: list[str]
) -> list[str]:
    """Say which network the presets start from; drop "network-only" when there is none.

    For ``default`` the engine's own choice for this similarity, so the network-only row never
    silently runs without a network.
    """
    from DeepRegisterLib.registration.engine import (
        default_models,
        resolve_model,
        suited_default_model,
    )

    try:
        if model == "default":
            info, _ = suited_default_model(default_models(dim), similarity, extent_mm=0.0)
        else:
            info = resolve_model(model, dim)
    except Exception as error:  # a named model that is missing or does not fit
        notes.append(f"`--model {model}` cannot be used: {error}")
        info = None
    if info is not None:
        notes.append(
            f"DeepRegister presets start from the {dim}D model `{info.name}` (`--model {model}`, "
            f"SHA-256 {info.sha256[:12]}…); the network-only row is that model alone."
        )
        return methods
    notes.append(
        f"No {dim}D network for `--model {model}`: the DeepRegister presets run instance "
        "optimisation from the identity after the affine stage, and the network-only row is "
        "left out."
    )
    return [m for m in methods if m != "network-only"]


# --- machine and versions -----------------------------------------------------------------------


def usable_cores() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


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


# --- report -------------------------------------------------------------------------------------


def variant_name(args: argparse.Namespace) -> str:
    parts = [
        name
        for name, on in (
            ("smoke", args.smoke),
            ("cross-contrast", args.cross_contrast),
            ("2d", args.two_d),
            ("gpu", args.gpu),
        )
        if on
    ]
    if args.tag:
        parts.append(args.tag)
    return "-".join(parts)


def write_report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    methods: list[str],
    pairs: list[PairSpec],
    notes: list[str],
    machine: dict[str, Any],
    timing: dict[str, Any],
) -> tuple[str, Path]:
    """Markdown (returned and written), JSON of every row, and the two figures."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variant = variant_name(args)
    stem = out / (timing["date"] + (f"-{variant}" if variant else ""))
    summaries = report.summarise(rows, methods)
    table = report.main_table(summaries)
    figure_paths = report.figures(rows, methods, stem)
    threads = sorted({r["torch_threads"] for r in rows if "torch_threads" in r})
    ok_dims = "2D matched axial slices" if args.two_d else "3D volumes"
    data = (
        "phantom pairs (DeepRegisterLib.imaging.phantoms, 32-voxel oblique grid)"
        if args.smoke
        else (f"fs-dev ({Path(args.data).resolve()}), {ok_dims}")
    )
    md = [
        f"# DeepRegister benchmark — {timing['date']}" + (f" ({variant})" if variant else ""),
        "",
        f"Command: `{timing['command']}`",
        "",
        *(
            []
            if timing.get("complete", True)
            else ["**Interim report, written while the run was still going.**", ""]
        ),
        f"Data: {data}; {len(pairs)} pair(s): " + ", ".join(p.name for p in pairs) + ".",
        "Contrast: "
        + (
            "moving images remapped to a T2-like contrast (inverted, `255·(1−v/p99)^1.5` inside "
            'the brain); DeepRegister uses `similarity="mind"`, ANTs and elastix Mattes MI.'
            if args.cross_contrast
            else "same contrast (T1 brainmask ↔ T1 brainmask)."
        ),
        "",
        "## Results",
        "",
        table,
        "",
        "Dice: mean ± sd over every (pair, structure) value; HD95: mean over structures and "
        "pairs; % det J ≤ 0 and SDlogJ inside the fixed brain mask; time: registration plus "
        "warping the labels (no file I/O, no scoring), mean ± sd over pairs; × ANTs SyN: the "
        "per-pair ratio to ANTs SyN's time on the same pair in this run, averaged; peak RSS: "
        "high-water resident memory of the method's own child process (includes the Python "
        "interpreter and imported libraries; the identity row is that baseline).",
        "",
        f"![Dice per method]({figure_paths['dice'].name})",
        f"![Time per method]({figure_paths['time'].name})",
        "",
        "### Per pair (mean Dice / time)",
        "",
        report.pair_table(rows, methods, [p.name for p in pairs]),
        "",
        "### Per structure (mean Dice over pairs)",
        "",
        report.structure_table(rows, methods),
        "",
    ]
    if not args.smoke:
        md += [
            "### Performance targets",
            "",
            report.targets(summaries, args.gpu),
            "",
            "(The targets are stated for 3D T1 pairs at 256³, 1 mm, on 2 CPU cores.)"
            if (args.two_d or args.cross_contrast)
            else "",
            "",
        ]
    fingerprints = sorted({r["library_fingerprint"] for r in rows if "library_fingerprint" in r})
    if len(fingerprints) > 1:
        notes = [
            *notes,
            f"DeepRegisterLib changed while this benchmark ran ({len(fingerprints)} different "
            "source fingerprints: " + ", ".join(fingerprints) + "); rows are not all from the "
            "same library version — see `library_fingerprint` per row in the JSON.",
        ]
    failures = [e for s in summaries for e in s.errors]
    if notes or failures:
        md += ["### Notes", ""] + [f"- {n}" for n in notes]
        md += [f"- failed: {f}" for f in failures] + [""]
    usable = machine.get("usable_cores")
    md += [
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}; {machine['logical_cores']} logical cores ({usable} usable); "
        f"RAM {machine['ram_gb']} GB; {machine['platform']}",
        f"- Threads: torch {threads or '?'}, ITK/ANTs/elastix {args.threads} "
        f"(`--threads {args.threads}`); device for DeepRegister: {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else ""),
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
        + (f"; DeepRegisterLib fingerprint {', '.join(fingerprints)}" if fingerprints else ""),
        f"- Load average (1 min) at start {timing['load_start']:.2f}, at end "
        f"{timing['load_end']:.2f}, on {usable} usable cores; benchmark wall time "
        f"{timing['wall_s'] / 60:.1f} min.",
        "",
        "**Timings.** "
        + (args.note + " " if args.note else "")
        + "Methods ran one at a time, interleaved pair by pair, each in a fresh process. When "
        "the load average exceeds the core count, other work competed for the CPU: absolute "
        "times are then inflated and noisy, and the ratios to ANTs SyN measured in the same run "
        "are the meaningful figure.",
        "",
        report.PUBLISHED,
    ]
    text = "\n".join(md)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": timing["command"],
                "machine": machine,
                "timing": timing,
                "settings": vars(args),
                "pairs": [dataclasses.asdict(p) for p in pairs],
                "methods": methods,
                "notes": notes,
                "rows": rows,
            },
            indent=1,
            default=str,
        )
    )
    return text, stem.with_suffix(".md")


# --- command line -------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="fs-dev folder (sub-*/)")
    parser.add_argument(
        "--pairs",
        type=int,
        default=None,
        help="use the first N pairs of the documented order (default: all ordered pairs; "
        "2 with --smoke)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        default=None,
        metavar="METHOD",
        help=f"any of {', '.join(ALL_METHODS)} (comma or space separated; default: all, or "
        f"{', '.join(SMOKE_METHODS)} with --smoke)",
    )
    parser.add_argument("--cross-contrast", action="store_true", help="T2-like moving images")
    parser.add_argument("--2d", dest="two_d", action="store_true", help="matched axial slices")
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
    args = parser.parse_args(argv)
    requested = args.methods or (SMOKE_METHODS if args.smoke else ALL_METHODS)
    args.methods = [m for item in requested for m in item.split(",") if m]
    unknown = sorted(set(args.methods) - set(ALL_METHODS))
    if unknown:
        parser.error(
            f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(ALL_METHODS)}"
        )
    if args.pairs is not None and args.pairs < 1:
        parser.error("--pairs must be ≥ 1")
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
    device = "cpu"
    if args.gpu:
        import torch

        if not torch.cuda.is_available():
            print("--gpu: no CUDA GPU is available to torch on this machine.", file=sys.stderr)
            return 2
        device = "cuda"
    data = Path(args.data)
    if not args.smoke and not (data.is_dir() and len(subjects_in(data)) >= 2):
        print(
            f"No fs-dev data at {data} (need sub-*/brainmask.nii.gz and aseg.nii.gz for at least "
            "two subjects). Pass --data PATH, or run --smoke for the phantom benchmark.",
            file=sys.stderr,
        )
        return 2
    notes: list[str] = []
    if args.smoke:
        notes.append(
            "Smoke run: phantom pairs, all tasks in one child process (peak memory reset per "
            "task where the kernel allows, but it includes what earlier tasks left resident); "
            "it checks the machinery, its numbers mean little."
        )
    methods = available_methods(args.methods, notes)
    similarity = "mind" if args.cross_contrast else "lncc"
    methods = model_note(2 if args.two_d else 3, args.model, similarity, methods, notes)
    settings = Settings(
        device=device,
        threads=args.threads,
        cross_contrast=args.cross_contrast,
        smoke=args.smoke,
        elastix_iterations=args.elastix_iterations,
        demons_iterations=args.demons_iterations,
        model=args.model,
        regularization=args.regularization,
    )
    if args.regularization is not None:
        notes.append(
            f"The DeepRegister presets ran with regularization {args.regularization:g} "
            "(`--regularization`) instead of each preset's own; their rows keep their names."
        )
    load_start = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="deepregister-bench-") as scratch:
        folder = Path(scratch)
        if args.smoke:
            pairs = smoke_pairs(args.pairs or 2, folder, args.cross_contrast)
        else:
            pairs = fsdev_pairs(data, args.pairs, folder, args.cross_contrast)
        if args.two_d:
            print(f"preparing {len(pairs)} matched axial slice pair(s) (3D affine first)…")
            pairs = [prepare_2d(p, folder) for p in pairs]
        print(
            f"{len(methods)} method(s) × {len(pairs)} pair(s), one fresh process each, "
            f"{args.threads} thread(s): {', '.join(methods)}",
            flush=True,
        )
        tasks = [Task(method, pair, settings) for pair in pairs for method in methods]
        # One fresh process per task; --smoke shares one to save interpreter start-ups.
        batches = [tasks] if args.smoke else [[task] for task in tasks]
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

        try:
            for batch in batches:
                for row in run_in_child(batch, args.timeout):
                    rows.append(row)
                    print(_progress_line(len(rows), len(tasks), row), flush=True)
                if not args.smoke and batch[-1].method == methods[-1] and len(rows) < len(tasks):
                    print(f"(report so far: {write(final=False)})", flush=True)
        except KeyboardInterrupt:
            notes.append(
                f"Interrupted after {len(rows)} of {len(tasks)} tasks; the tables cover those."
            )
        path = write(final=True)
    print()
    print(report.main_table(report.summarise(rows, methods)))
    print()
    for note in notes:
        print(f"note: {note}")
    print(f"report: {path}")
    return 0 if all(row.get("status") == "ok" for row in rows) else 3


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
