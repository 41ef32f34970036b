#!/usr/bin/env python
"""What a user waits for: ``deepregister register`` from start to files on disk.

    python benchmarks/user_time.py --pairs 2 --presets fast balanced
    python benchmarks/user_time.py --repo before=/tmp/old-checkout --repo after=.
    python benchmarks/user_time.py --smoke --out /tmp/user-time

Each run is the real command line in a fresh process, timed from outside (wall time; peak RSS
from ``os.wait4``). Its stderr progress lines split the time: the first one marks the engine's
start, the report's ``runtime_s`` its length, so what comes before is start-up and reading and
what comes after is writing. ``register --help`` alone times the start-up. ANTs SyN (antspyx,
its default ``SyN``: read, register, write the warped image) runs on the same pairs in the same
run, and every time is also given as a multiple of SyN's. A benchmark, never a test.
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

from benchmarks.pairs import ordered_pairs, subjects_in  # noqa: E402
from benchmarks.run_benchmark import DEFAULT_DATA, DEFAULT_OUT, machine_info, usable_cores  # noqa: E402

#: Output name → (register option, file name); ``--outputs`` picks among them.
OUTPUTS = {
    "warped": ("--warped", "warped.nii.gz"),
    "transform": ("--transform", "transform.h5"),
    "field": ("--transform", "transform.nii.gz"),
    "displacement": ("--displacement", "displacement.nii.gz"),
    "inverse": ("--inverse-transform", "inverse.h5"),
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
warped_labels = ants.apply_transforms(
    fixed, labels, result["fwdtransforms"], interpolator="nearestNeighbor"
)
ants.image_write(warped_labels, out + "/warped_labels.nii.gz")
"""


def timed_child(command: list[str], env: dict[str, str], cwd: Path) -> dict[str, Any]:
    """Run ``command``; its wall time, peak RSS, exit code, and when each stderr line came."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    lines: list[tuple[float, str]] = []

    def drain_stderr() -> None:
        for line in process.stderr:
            lines.append((time.perf_counter() - started, line.rstrip()))

    reader = threading.Thread(target=drain_stderr)
    reader.start()
    stdout = process.stdout.read()
    _, status, usage = os.wait4(process.pid, 0)
    wall = time.perf_counter() - started
    process.returncode = os.waitstatus_to_exitcode(status)
    reader.join()
    return {
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "returncode": process.returncode,
        "stderr": lines,
        "stdout": stdout,
    }


def startup_s(repo: Path, env: dict[str, str], runs: int = 3) -> float:
    """Median time of ``deepregister register --help`` from ``repo``: interpreter and imports."""
    command = [sys.executable, "-m", "DeepRegisterLib", "register", "--help"]
    return statistics.median(timed_child(command, env, repo)["wall_s"] for _ in range(runs))


def run_register(
    repo: Path, env: dict[str, str], pair: dict[str, str], preset: str, outputs: Sequence[str],
    folder: Path, device: str = "auto",
) -> dict[str, Any]:  # fmt: skip
    report = folder / "report.json"
    command = [
        sys.executable, "-m", "DeepRegisterLib", "register", "--fixed", pair["fixed"],
        "--moving", pair["moving"], "--labels", pair["moving_labels"],
        "--fixed-labels", pair["fixed_labels"], "--preset", preset, "--report", str(report),
        "--device", device,
    ]  # fmt: skip
    for name in outputs:
        option, file_name = OUTPUTS[name]
        command += [option, str(folder / file_name)]
    child = timed_child(command, env, repo)
    if child["returncode"] != 0:
        errors = "\n".join(line for _, line in child["stderr"][-5:])
        raise RuntimeError(f"register failed ({child['returncode']}): {errors}")
    engine = json.loads(report.read_text())
    first_progress = next(t for t, line in child["stderr"] if line.startswith("PROGRESS"))
    before_engine = first_progress
    return {
        "total_s": child["wall_s"],
        "device": engine["device"],
        "before_engine_s": before_engine,
        "engine_s": engine["runtime_s"],
        "stages_s": engine.get("timings", {}),
        "after_engine_s": child["wall_s"] - before_engine - engine["runtime_s"],
        "peak_rss_mb": child["peak_rss_mb"],
        "mean_dice": engine.get("mean_dice"),
        "dice_27": dice_27(engine),
        "folding_percent": engine.get("folding_percent"),
        "bytes_written": sum(p.stat().st_size for p in folder.iterdir() if p != report),
    }


def run_ants(pair: dict[str, str], env: dict[str, str], folder: Path) -> dict[str, Any]:
    command = [
        sys.executable, "-c", ANTS_SCRIPT, pair["fixed"], pair["moving"], pair["moving_labels"],
        str(folder),
    ]  # fmt: skip
    child = timed_child(command, env, folder)
    if child["returncode"] != 0:
        raise RuntimeError("ANTs failed: " + "\n".join(line for _, line in child["stderr"][-5:]))
    import SimpleITK as sitk

    from DeepRegisterLib.imaging import metrics

    fixed_labels = sitk.ReadImage(pair["fixed_labels"])
    warped = sitk.ReadImage(str(folder / "warped_labels.nii.gz"))
    per_label = metrics.dice_per_label(
        fixed_labels, sitk.Cast(warped, fixed_labels.GetPixelID()), metrics.FREESURFER_EVAL_LABELS
    )
    return {
        "total_s": child["wall_s"],
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


def fsdev(data: Path, count: int) -> list[dict[str, str]]:
    pairs = []
    for moving, fixed in ordered_pairs(subjects_in(data))[:count]:
        pairs.append({
            "name": f"{moving}→{fixed}",
            "fixed": str(data / fixed / "brainmask.nii.gz"),
            "moving": str(data / moving / "brainmask.nii.gz"),
            "fixed_labels": str(data / fixed / "aseg.nii.gz"),
            "moving_labels": str(data / moving / "aseg.nii.gz"),
        })  # fmt: skip
    return pairs


def phantoms(count: int, folder: Path) -> list[dict[str, str]]:
    import SimpleITK as sitk

    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

    pairs = []
    for seed in range(count):
        pair = phantom_pair(demo_grid(3, 24), seed=seed)
        paths = {"name": f"phantom {seed}"}
        for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
            paths[key] = str(folder / f"phantom{seed}-{key}.nii.gz")
            sitk.WriteImage(getattr(pair, key), paths[key])
        pairs.append(paths)
    return pairs


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
        "transform); field = the transform as a .nii.gz displacement-field image",
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
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tag", default="", help="suffix for the result files' names")
    parser.add_argument("--smoke", action="store_true", help="one tiny phantom pair, no ANTs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.pairs, args.presets, args.no_ants = 1, ["fast"], True
    repos = args.repo or [f"this={REPO}"]
    args.repos = {item.split("=", 1)[0]: Path(item.split("=", 1)[1]).resolve() for item in repos}
    return args


def measure(args: argparse.Namespace, work: Path, save: Callable[[dict], None]) -> dict:
    """Every version's runs pair by pair, then SyN (the longest) on ``--ants-pairs`` pairs;
    ``save`` gets the results after each run, so a stopped run keeps what it measured."""
    pairs = phantoms(args.pairs, work) if args.smoke else fsdev(args.data, args.pairs)
    envs = {label: child_env(repo, args.threads) for label, repo in args.repos.items()}
    results: dict[str, Any] = {
        "startup_s": {label: startup_s(repo, envs[label]) for label, repo in args.repos.items()},
        "runs": [],
        "ants": {},
    }
    for pair in pairs:
        for preset in args.presets:
            for label, repo in args.repos.items():
                folder = Path(tempfile.mkdtemp(dir=work))
                row = run_register(
                    repo, envs[label], pair, preset, args.outputs, folder, args.device
                )
                row.update(pair=pair["name"], preset=preset, version=label)
                results["runs"].append(row)
                print(f"{pair['name']} {preset} {label}: {row['total_s']:.1f} s", flush=True)
                save(results)
    for pair in [] if args.no_ants else pairs[: args.ants_pairs or len(pairs)]:
        folder = Path(tempfile.mkdtemp(dir=work))
        results["ants"][pair["name"]] = run_ants(pair, envs[next(iter(envs))], folder)
        print(f"{pair['name']} ANTs SyN {results['ants'][pair['name']]['total_s']:.1f} s")
        save(results)
    return results


def _ratio(seconds: float, syn: float | None) -> str:
    return f"{seconds / syn:.2f}×" if syn else "–"


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _folded(percent: float | None) -> str:
    """A share of folded voxels readable at one voxel (6 × 10⁻⁶ % of a 256³ grid)."""
    return "–" if percent is None else "0" if percent == 0 else f"{percent:.1e}"


def summary(results: dict[str, Any]) -> list[str]:
    """One line per (preset, version) and one for SyN: means over the pairs SyN also ran on
    for the times beside SyN's, and over every pair for the rest."""
    ants = results["ants"]
    lines = [
        "| preset | version | pairs | total s | × SyN | affine / network / optimisation / "
        "outputs s | Dice (27) | pairs folding (max % det J ≤ 0) | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results["runs"]:
        groups.setdefault((row["preset"], row["version"]), []).append(row)
    for (preset, version), rows in groups.items():
        with_syn = [r for r in rows if r["pair"] in ants]
        ratio = (
            statistics.mean(r["total_s"] for r in with_syn)
            / statistics.mean(ants[r["pair"]]["total_s"] for r in with_syn)
            if with_syn
            else None
        )
        stages = " / ".join(
            f"{statistics.mean(r['stages_s'].get(key, 0) for r in rows):.1f}"
            for key in ("affine_s", "network_s", "optimisation_s", "outputs_s")
        )
        dice = [r["dice_27"] for r in rows if r.get("dice_27") is not None]
        folding = [r["folding_percent"] for r in rows if r.get("folding_percent") is not None]
        lines.append(
            f"| {preset} | {version} | {len(rows)} "
            f"| {statistics.mean(r['total_s'] for r in rows):.1f} "
            f"| {'–' if ratio is None else f'{ratio:.2f}×'} | {stages} "
            f"| {_number(statistics.mean(dice) if dice else None, 4)} "
            f"| {sum(f > 0 for f in folding)} ({_folded(max(folding) if folding else None)}) "
            f"| {max(r['peak_rss_mb'] for r in rows):.0f} |"
        )
    if ants:
        dice = [a["dice_27"] for a in ants.values() if a.get("dice_27") is not None]
        lines.append(
            f"| ANTs SyN | antspyx | {len(ants)} "
            f"| {statistics.mean(a['total_s'] for a in ants.values()):.1f} | 1.00× | – "
            f"| {_number(statistics.mean(dice) if dice else None, 3)} | – "
            f"| {max(a['peak_rss_mb'] for a in ants.values()):.0f} |"
        )
    return lines


def _devices(results: dict[str, Any]) -> str:
    """The devices the engine reports it ran on (``--device auto`` decides in each run)."""
    return ", ".join(sorted({str(run.get("device")) for run in results["runs"]})) or "–"


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# What a user waits for: `deepregister register`, start to files on disk",
        "",
        f"Outputs asked for: {', '.join(args.outputs)} (plus --report, and --labels/"
        f"--fixed-labels for Dice); {args.threads} threads; device "
        f"{_devices(results)}; presets {', '.join(args.presets)}.",
        "Start-up is `register --help` alone (median of 3). 'Before engine' is the time to the "
        "first progress line (start-up, imports, reading); 'after engine' is writing and exit. "
        "Ratios are × ANTs SyN's time (read, register, write the warped image and labels) on "
        "the same pairs in the same run. Dice (27): mean over the 27 FreeSurfer structures, "
        "for SyN and DeepRegister alike; % det J ≤ 0 over the fixed grid.",
        "",
        "| version | start-up (--help) s |",
        "|---|---|",
        *[f"| {label} | {s:.2f} |" for label, s in results["startup_s"].items()],
        "",
        *summary(results),
        "",
        "| pair | preset | version | total s | × SyN | before engine s | engine s "
        "| affine / network / optimisation / outputs s | after engine s | peak RSS MB "
        "| MB written | Dice (27) | % det J ≤ 0 |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        syn = results["ants"].get(row["pair"], {}).get("total_s")
        stages = " / ".join(
            f"{row['stages_s'].get(key, 0):.1f}"
            for key in ("affine_s", "network_s", "optimisation_s", "outputs_s")
        )
        lines.append(
            f"| {row['pair']} | {row['preset']} | {row['version']} | {row['total_s']:.1f} "
            f"| {_ratio(row['total_s'], syn)} | {row['before_engine_s']:.1f} "
            f"| {row['engine_s']:.1f} | {stages} | {row['after_engine_s']:.1f} "
            f"| {row['peak_rss_mb']:.0f} | {row['bytes_written'] / 1e6:.0f} "
            f"| {_number(row.get('dice_27'), 3)} | {_folded(row.get('folding_percent'))} |"
        )
    for name, syn in results["ants"].items():
        total, peak = syn["total_s"], syn["peak_rss_mb"]
        dice = _number(syn.get("dice_27"), 3)
        lines.append(f"\nANTs SyN on {name}: {total:.1f} s, peak {peak:.0f} MB, Dice (27) {dice}")
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    from DeepRegisterLib.nn.devices import resolve_device

    args = parse_args(argv)
    if not args.smoke and not args.data.is_dir():
        print(f"user_time: no fs-dev data at {args.data} (use --data or --smoke)", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"{datetime.date.today().isoformat()}-user-time{'-' + args.tag if args.tag else ''}"
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
