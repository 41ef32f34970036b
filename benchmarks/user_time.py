#!/usr/bin/env python
"""What a user waits for: ``deepregister register`` from start to files on disk.

    python benchmarks/user_time.py --pairs 2 --presets fast balanced
    python benchmarks/user_time.py --repo before=/tmp/old-checkout --repo after=.
    python benchmarks/user_time.py --smoke --out /tmp/user-time
    python benchmarks/user_time.py --ct --presets fast

Each pair runs the command a user types (fixed, moving, preset, the outputs) in a fresh
process, timed from outside (wall time and peak RSS, from a launcher); its progress lines split
the time into start-up and reading, the engine, and writing. Then the same command with the
labels and a report, in another fresh process: the engine's stages, Dice and folding, its own
time, and whether it wrote the same files (the same seed gives the same result). ANTs SyN
(antspyx, its default ``SyN``) runs on the same pairs in the same run: read, register, write
the warped image, then its labels; every time is also given as a multiple of SyN's. A
benchmark, never a test.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO))

from benchmarks.command_pairs import ct_pairs, fsdev, phantoms  # noqa: E402
from benchmarks.run_benchmark import DEFAULT_DATA, DEFAULT_OUT, machine_info, usable_cores  # noqa: E402
from benchmarks.user_time_report import markdown  # noqa: E402

#: Output name → (register option, file name); ``--outputs`` picks among them.
OUTPUTS = {
    "warped": ("--warped", "warped.nii.gz"),
    "warped-mha": ("--warped", "warped.mha"),
    "transform": ("--transform", "transform.h5"),
    "field": ("--transform", "transform.nii.gz"),
    "displacement": ("--displacement", "displacement.nii.gz"),
    "inverse": ("--inverse-transform", "inverse.h5"),
    "inverse-field": ("--inverse-displacement", "inverse.mha"),
    "jacobian": ("--jacobian", "jacobian.nii.gz"),
    "qa": ("--qa-png", "qa.png"),
}
#: SyN reads, registers and writes its warped image and labels, as the command line does.
ANTS_SCRIPT = """
import sys, ants
fixed, moving, labels = (ants.image_read(path) for path in sys.argv[1:4])
out = sys.argv[4]
result = ants.registration(fixed, moving, type_of_transform="SyN", outprefix=out + "/syn_")
ants.image_write(result["warpedmovout"], out + "/warped.nii.gz")
print("REGISTERED", file=sys.stderr, flush=True)
warped_labels = ants.apply_transforms(
    fixed, labels, result["fwdtransforms"], interpolator="nearestNeighbor"
)
ants.image_write(warped_labels, out + "/warped_labels.nii.gz")
"""


#: Every timed command starts from this small launcher, which reports the command's wall time and
#: peak memory through a pipe. Started straight from the benchmark, a command would report at
#: least the benchmark's own peak: ``subprocess`` starts children by vfork, and Linux carries the
#: high-water mark of the address space an ``exec`` leaves into the new program's peak, so every
#: figure after the benchmark had compared two brains would read as its 0.5–2 GB. The launcher's
#: own mark is about 10 MB.
_LAUNCHER = """
import os, resource, subprocess, sys, time
started = time.perf_counter()
code = subprocess.call(sys.argv[2:])
wall = time.perf_counter() - started
peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
os.write(int(sys.argv[1]), f"{wall} {peak_kb}".encode())
sys.exit(code if code >= 0 else 128 - code)
"""


def timed_child(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run ``command``; its wall time, peak RSS, exit code, and when each stderr line came."""
    started = time.perf_counter()
    read_end, write_end = os.pipe()
    process = subprocess.Popen(
        [sys.executable, "-S", "-c", _LAUNCHER, str(write_end), *command],
        cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        pass_fds=(write_end,),
    )  # fmt: skip
    os.close(write_end)
    lines: list[tuple[float, str]] = []

    def drain_stderr() -> None:
        for line in process.stderr:
            lines.append((time.perf_counter() - started, line.rstrip()))

    reader = threading.Thread(target=drain_stderr)
    reader.start()
    stdout = process.stdout.read()
    process.wait()
    outside = time.perf_counter() - started
    reader.join()
    with os.fdopen(read_end) as measured:
        figures = measured.read().split()  # none if the command could not start
    wall, peak_kb = (float(figures[0]), int(figures[1])) if figures else (outside, 0)
    launch = outside - wall  # the launcher's own start, before the command's clock started
    return {
        "wall_s": wall,
        "peak_rss_mb": peak_kb / 1024,
        "returncode": process.returncode,
        "stderr": [(max(0.0, at - launch), line) for at, line in lines],
        "stdout": stdout,
    }


def checked(child: dict[str, Any], what: str) -> dict[str, Any]:
    """``child`` (a :func:`timed_child` result) if it exited 0; else an error with its last
    lines of standard error."""
    if child["returncode"] != 0:
        errors = "\n".join(line for _, line in child["stderr"][-5:])
        raise RuntimeError(f"{what} failed ({child['returncode']}): {errors}")
    return child


def startup_s(repo: Path, env: dict[str, str], runs: int = 3) -> float:
    """Median time of ``deepregister register --help`` from ``repo``: interpreter and imports."""
    command = [sys.executable, "-m", "DeepRegisterLib", "register", "--help"]
    return statistics.median(timed_child(command, env, repo)["wall_s"] for _ in range(runs))


def _register(
    repo: Path, env: dict[str, str], pair: dict[str, str], preset: str, outputs: Sequence[str],
    folder: Path, device: str, extra: Sequence[str] = (), pause_s: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """``deepregister register`` with ``outputs`` in ``folder`` (and ``extra`` options), timed
    after ``pause_s`` idle seconds."""
    command = [
        sys.executable, "-m", "DeepRegisterLib", "register", "--fixed", pair["fixed"],
        "--moving", pair["moving"], "--preset", preset, "--device", device, *extra,
    ]  # fmt: skip
    for name in outputs:
        option, file_name = OUTPUTS[name]
        command += [option, str(folder / file_name)]
    time.sleep(pause_s)
    return checked(timed_child(command, env, repo), "register")


def run_register(
    repo: Path, env: dict[str, str], pair: dict[str, str], preset: str, outputs: Sequence[str],
    folders: tuple[Path, Path], device: str = "auto", pause_s: float = 0.0,
) -> dict[str, Any]:  # fmt: skip
    """The command alone in ``folders[0]``, then with labels and a report in ``folders[1]``,
    each after ``pause_s`` idle seconds."""
    alone, checked = folders
    child = _register(repo, env, pair, preset, outputs, alone, device, pause_s=pause_s)
    progress = [t for t, line in child["stderr"] if line.startswith("PROGRESS")]
    report_path = checked / "report.json"
    extra = ["--labels", pair["moving_labels"], "--fixed-labels", pair["fixed_labels"]]
    with_labels = _register(
        repo, env, pair, preset, outputs, checked, device,
        [*extra, "--report", str(report_path)], pause_s=pause_s,
    )  # fmt: skip
    report = json.loads(report_path.read_text())
    return {
        "total_s": child["wall_s"],
        "before_engine_s": progress[0],
        "engine_s": progress[-1] - progress[0],
        "after_engine_s": child["wall_s"] - progress[-1],
        "peak_rss_mb": child["peak_rss_mb"],
        "bytes_written": sum(p.stat().st_size for p in alone.iterdir()),
        "checked_s": with_labels["wall_s"],
        "checked_peak_rss_mb": with_labels["peak_rss_mb"],
        "device": report["device"],
        "stages_s": report.get("timings", {}),
        "mean_dice": report.get("mean_dice"),
        "dice_27": dice_27(report) if pair.get("structures") != "tissues" else None,
        "folding_percent": report.get("folding_percent"),
        "same_outputs": same_outputs(alone, checked, outputs),
    }


def same_outputs(first: Path, second: Path, outputs: Sequence[str]) -> bool | None:
    """Whether two folders hold the same transforms and images (read back, not byte by byte:
    a file's header may differ); None when no output can be compared so."""
    import numpy as np
    import SimpleITK as sitk

    compared = None
    for name in outputs:
        file_name = OUTPUTS[name][1]
        if file_name.endswith(".png"):
            continue
        a, b = first / file_name, second / file_name
        if file_name.endswith((".h5", ".tfm", ".mat")):
            same = _transform_values(a) == _transform_values(b)
        else:
            images = sitk.ReadImage(str(a)), sitk.ReadImage(str(b))  # alive while viewed
            same = np.array_equal(*map(sitk.GetArrayViewFromImage, images))
        compared = same if compared is None else compared and same
    return compared


def _transform_values(path: Path) -> list[tuple[float, ...]]:
    """Every parameter of every transform in a file (a dense field's values included)."""
    import SimpleITK as sitk

    transform = sitk.ReadTransform(str(path))
    parts = sitk.CompositeTransform(transform)
    values = []
    for index in range(parts.GetNumberOfTransforms()):
        part = parts.GetNthTransform(index)
        values += [part.GetFixedParameters(), part.GetParameters()]
    return values


def run_ants(pair: dict[str, str], env: dict[str, str], folder: Path) -> dict[str, Any]:
    command = [
        sys.executable, "-c", ANTS_SCRIPT, pair["fixed"], pair["moving"], pair["moving_labels"],
        str(folder),
    ]  # fmt: skip
    child = checked(timed_child(command, env, folder), "ANTs")
    import SimpleITK as sitk

    from DeepRegisterLib.imaging import metrics

    fixed_labels = sitk.ReadImage(pair["fixed_labels"])
    warped = sitk.ReadImage(str(folder / "warped_labels.nii.gz"))
    per_label = metrics.dice_per_label(
        fixed_labels, sitk.Cast(warped, fixed_labels.GetPixelID()), metrics.FREESURFER_EVAL_LABELS
    )
    registered = next(t for t, line in child["stderr"] if line == "REGISTERED")
    return {
        "total_s": registered,
        "with_labels_s": child["wall_s"],
        "peak_rss_mb": child["peak_rss_mb"],
        "dice_27": metrics.mean_dice(per_label),
    }


def dice_27(report: dict[str, Any]) -> float | None:
    """Mean Dice over the 27 FreeSurfer structures every benchmark scores (the report's own
    mean covers every label of the fixed map, small ones included)."""
    from DeepRegisterLib.imaging import metrics

    per_label = next(iter(report.get("dice", {}).values()), None)
    if per_label is None:
        return None
    chosen = {k: v for k, v in per_label.items() if int(k) in metrics.FREESURFER_EVAL_LABELS}
    return metrics.mean_dice(chosen)


def child_env(repo: Path, threads: int) -> dict[str, str]:
    """The environment of a timed run: ``repo`` first on the path (what is already on it, such
    as packages unpacked beside an interpreter, stays after it), ``threads`` threads."""
    path = os.pathsep.join(p for p in (str(repo), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONPATH=path, ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS=str(threads))
    env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    return env


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=2, help="fs-dev pairs (default 2)")
    parser.add_argument("--presets", nargs="+", default=["fast", "balanced"])
    parser.add_argument(
        "--outputs", nargs="+", default=["warped", "transform"], choices=sorted(OUTPUTS),
        help="outputs to ask for (default: warped transform = .nii.gz warped image, .h5 "
        "transform); warped-mha = the warped image as a compressed .mha; field = the "
        "transform as a .nii.gz displacement-field image; "
        "inverse-field = the dense inverse (--inverse-displacement .mha)",
    )  # fmt: skip
    parser.add_argument("--no-ants", action="store_true", help="skip ANTs SyN")
    parser.add_argument("--ants-pairs", type=int, help="run SyN on this many pairs only")
    parser.add_argument(
        "--repo", action="append", metavar="LABEL=PATH",
        help="run the command line from this checkout (repeatable, e.g. before=/tmp/old); "
        "default: this one",
    )  # fmt: skip
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the fs-dev folder")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument(
        "--device", default="auto", help="register's --device (default auto: a GPU if any)"
    )
    parser.add_argument(
        "--pause", type=float, default=0.0, metavar="S",
        help="idle seconds before each command, as between a user's commands: a virtual "
        "machine's host may take freed memory back meanwhile, which the next command then "
        "pays for as fresh pages (default 0: back to back, as a script's loop)",
    )  # fmt: skip
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tag", default="", help="suffix for the result files' names")
    parser.add_argument("--smoke", action="store_true", help="one tiny phantom pair, no ANTs")
    parser.add_argument(
        "--heads", action="store_true",
        help="whole-head T1 images (T1.nii.gz) instead of the skull-stripped brains",
    )  # fmt: skip
    parser.add_argument(
        "--ct", action="store_true",
        help="one CT-like pair (512² × 600 at 0.78 × 0.78 × 1 mm, int16, NRRD; labels by HU: "
        "lungs, soft tissue, bone) instead of the brains; no ANTs",
    )  # fmt: skip
    args = parser.parse_args(argv)
    if args.ct:
        args.pairs, args.no_ants = 1, True
    if args.smoke:
        args.pairs, args.presets, args.no_ants = 1, ["fast"], True
    repos = args.repo or [f"this={REPO}"]
    args.repos = {item.split("=", 1)[0]: Path(item.split("=", 1)[1]).resolve() for item in repos}
    return args


def measure(args: argparse.Namespace, work: Path, save: Callable[[dict], None]) -> dict:
    """Every version's runs pair by pair, then SyN (the longest) on ``--ants-pairs`` pairs;
    ``save`` gets the results after each run, so a stopped run keeps what it measured."""
    if args.smoke or args.ct:
        pairs = phantoms(args.pairs, work) if args.smoke else ct_pairs(work)
    else:
        pairs = fsdev(args.data, args.pairs, "T1" if args.heads else "brainmask")
    envs = {label: child_env(repo, args.threads) for label, repo in args.repos.items()}
    results: dict[str, Any] = {
        "startup_s": {label: startup_s(repo, envs[label]) for label, repo in args.repos.items()},
        "runs": [],
        "ants": {},
    }
    for pair in pairs:
        for preset in args.presets:
            for label, repo in args.repos.items():
                folders = (Path(tempfile.mkdtemp(dir=work)), Path(tempfile.mkdtemp(dir=work)))
                row = run_register(
                    repo, envs[label], pair, preset, args.outputs, folders, args.device,
                    pause_s=args.pause,
                )  # fmt: skip
                row.update(pair=pair["name"], preset=preset, version=label)
                results["runs"].append(row)
                print(
                    f"{pair['name']} {preset} {label}: {row['total_s']:.1f} s alone, "
                    f"{row['checked_s']:.1f} s with labels and report",
                    flush=True,
                )
                save(results)
    for pair in [] if args.no_ants else pairs[: args.ants_pairs or len(pairs)]:
        folder = Path(tempfile.mkdtemp(dir=work))
        results["ants"][pair["name"]] = run_ants(pair, envs[next(iter(envs))], folder)
        print(f"{pair['name']} ANTs SyN {results['ants'][pair['name']]['total_s']:.1f} s")
        save(results)
    return results


def save_report(out: Path, stem: str, results: dict[str, Any], text: str) -> None:
    """A run's JSON and Markdown (``text``) as ``out/stem.json`` and ``.md``; the Markdown
    printed too."""
    (out / f"{stem}.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / f"{stem}.md").write_text(text)
    print(text)
    print(f"wrote {out / stem}.md and .json")


def report_stem(args: argparse.Namespace, kind: str) -> str:
    """``DATE-KIND[-TAG]``, the reports' name, with ``--out`` made; exit 2 without the data."""
    if not (args.smoke or args.ct) and not args.data.is_dir():
        script = kind.replace("-", "_")
        print(f"{script}: no fs-dev data at {args.data} (use --data or --smoke)", file=sys.stderr)
        raise SystemExit(2)
    args.out.mkdir(parents=True, exist_ok=True)
    return f"{datetime.date.today().isoformat()}-{kind}{'-' + args.tag if args.tag else ''}"


def main(argv: Sequence[str] | None = None) -> int:
    from DeepRegisterLib.nn.devices import resolve_device

    args = parse_args(argv)
    stem = report_stem(args, "user-time")
    context = {
        "machine": machine_info(str(resolve_device(args.device))),
        "options": {k: v for k, v in vars(args).items() if k not in ("repos", "repo")},
        "repos": {label: str(path) for label, path in args.repos.items()},
    }

    def save(results: dict[str, Any]) -> None:
        text = json.dumps({**results, **context}, indent=2, default=str) + "\n"
        (args.out / f"{stem}.json").write_text(text)
        (args.out / f"{stem}.md").write_text(markdown(results, args))

    with tempfile.TemporaryDirectory(prefix="deepregister-user-time-") as work:
        results = measure(args, Path(work), save)
    print(markdown(results, args))
    print(f"wrote {args.out / stem}.md and .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
