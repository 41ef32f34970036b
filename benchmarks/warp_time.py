#!/usr/bin/env python
"""More images through a saved transform: ``deepregister apply`` beside ANTs on the same file.

    python benchmarks/warp_time.py --pairs 4
    python benchmarks/warp_time.py --pairs 4 --series 100
    python benchmarks/warp_time.py --smoke --no-ants --series 5 --out /tmp/warp-time
    python benchmarks/warp_time.py --ct --no-ants --rounds 2 --repo before=/tmp/old --repo after=.

Each pair is registered once (``fast``: the warped scan and labels, the ``.h5`` transform), then
the moving scan and its labels are warped again through that ``.h5``, each way in a fresh
process timed from outside, start to files: ``deepregister apply``, and antspyx's
``apply_transforms`` (ANTs reads our composite transform as it reads its own). Both results are
compared with what ``register`` wrote. With ``--series N``, a 4D series made of the moving scan
(N volumes at 3 mm, as an fMRI run; intensities drifting 0.2 % a volume) is warped onto the
fixed grid at 3 mm both ways as well (ANTs: ``imagetype=3``), and the two results compared.
A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO))

from benchmarks.command_pairs import ct_pairs, fsdev, phantoms  # noqa: E402
from benchmarks.run_benchmark import DEFAULT_DATA, DEFAULT_OUT, machine_info, usable_cores  # noqa: E402
from benchmarks.user_time import (  # noqa: E402
    checked,
    child_env,
    report_stem,
    save_report,
    timed_child,
)

#: ANTs as a user scripts it: read, apply the transform to the scan and the labels, write.
ANTS_SCRIPT = """
import sys, ants
fixed, moving, labels, transform, out = sys.argv[1:6]
fixed = ants.image_read(fixed)
for name, path, how in (("scan", moving, "linear"), ("labels", labels, "nearestNeighbor")):
    warped = ants.apply_transforms(fixed, ants.image_read(path), [transform], interpolator=how)
    ants.image_write(warped, out + "/" + name + ".nii.gz")
"""


ANTS_SERIES_SCRIPT = """
import sys, ants
reference, series, transform, out = sys.argv[1:5]
warped = ants.apply_transforms(
    ants.image_read(reference), ants.image_read(series), [transform], imagetype=3
)
ants.image_write(warped, out)
"""
SERIES_SPACING_MM = 3.0


def series_files(pair: dict[str, str], volumes: int, folder: Path) -> tuple[Path, Path]:
    """The moving scan as a 16-bit 4D series at 3 mm, and the fixed grid at 3 mm."""
    import numpy as np
    import SimpleITK as sitk

    def at_3mm(path: str) -> sitk.Image:
        image = sitk.ReadImage(path, sitk.sitkFloat32)
        factor = [SERIES_SPACING_MM / step for step in image.GetSpacing()]
        size = [max(1, round(n / f)) for n, f in zip(image.GetSize(), factor, strict=True)]
        smoothed = sitk.SmoothingRecursiveGaussian(image, SERIES_SPACING_MM / 2)
        spacing = [SERIES_SPACING_MM] * 3
        return sitk.Resample(smoothed, size, sitk.Transform(), sitk.sitkLinear,
                             image.GetOrigin(), spacing, image.GetDirection())  # fmt: skip

    volume = sitk.GetArrayFromImage(at_3mm(pair["moving"]))
    frames = np.stack([np.rint(volume * (1 + 0.002 * t)) for t in range(volumes)])
    series = sitk.GetImageFromArray(frames.astype(np.int16), isVector=False)
    moving = at_3mm(pair["moving"])
    direction = np.eye(4)
    direction[:3, :3] = np.reshape(moving.GetDirection(), (3, 3))
    series.SetSpacing((*moving.GetSpacing(), 2.0))
    series.SetOrigin((*moving.GetOrigin(), 0.0))
    series.SetDirection(direction.ravel().tolist())
    paths = folder / "series.nii.gz", folder / "reference.nii.gz"
    sitk.WriteImage(series, str(paths[0]))
    sitk.WriteImage(at_3mm(pair["fixed"]), str(paths[1]))
    return paths


def _series_row(
    pair: dict[str, str], transform: Path, volumes: int, repo: Path, threads: int, work: Path,
    ants: bool,
) -> dict[str, Any]:  # fmt: skip
    """The series through ``transform`` by ``apply`` (from ``repo``) and by ANTs, timed; how
    far apart."""
    env = child_env(repo, threads)
    import numpy as np
    import SimpleITK as sitk

    folder = Path(tempfile.mkdtemp(prefix="s", dir=work))
    series, reference = series_files(pair, volumes, folder)
    ours, theirs = folder / "ours.nii.gz", folder / "ants.nii.gz"
    child = checked(timed_child([
        sys.executable, "-m", "DeepRegisterLib", "apply", "--transform", str(transform),
        "--reference", str(reference), "--image", str(series), str(ours),
    ], env, repo), "deepregister apply (series)")  # fmt: skip
    row = {"series_apply_s": child["wall_s"], "series_apply_peak_mb": child["peak_rss_mb"]}
    if ants:
        command = [sys.executable, "-c", ANTS_SERIES_SCRIPT, str(reference), str(series)]
        child = checked(timed_child([*command, str(transform), str(theirs)], env, REPO), "ANTs")
        ours_array, theirs_array = (
            sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)
            for path in (ours, theirs)
        )
        row.update(
            series_ants_s=child["wall_s"],
            series_ants_peak_mb=child["peak_rss_mb"],
            series_max_abs=float(np.abs(ours_array - theirs_array).max()),
        )
    return row


def _agreement(folder: Path, registered: Path) -> dict[str, float]:
    """How far ``folder``'s scan and labels are from what ``register`` wrote."""
    import numpy as np
    import SimpleITK as sitk

    def read(path: Path) -> np.ndarray:
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(np.float64)

    scan = read(folder / "scan.nii.gz") - read(registered / "warped.nii.gz")
    labels = read(folder / "labels.nii.gz") != read(registered / "labels.nii.gz")
    return {"scan_max_abs": float(np.abs(scan).max()), "labels_differing": int(labels.sum())}


def measure_pair(
    pair: dict[str, str], repos: dict[str, Path], threads: int, work: Path, ants: bool,
    series: int, rounds: int,
) -> list[dict[str, Any]]:  # fmt: skip
    """Register once (this checkout), then time each way of warping the scan and labels (and a
    series) again: each version's ``apply`` ``rounds`` times, alternated, run from its own
    checkout, and ANTs once."""
    this = child_env(REPO, threads)
    registered = Path(tempfile.mkdtemp(prefix="r", dir=work))
    transform = registered / "transform.h5"
    deepregister = [sys.executable, "-m", "DeepRegisterLib"]
    checked(timed_child([
        *deepregister, "register", "--fixed", pair["fixed"], "--moving", pair["moving"],
        "--preset", "fast", "--device", "cpu", "--quiet", "--transform", str(transform),
        "--warped", str(registered / "warped.nii.gz"), "--labels", pair["moving_labels"],
        "--warped-labels", str(registered / "labels.nii.gz"),
    ], this, REPO), "register")  # fmt: skip
    rows = []
    for _ in range(rounds):
        for version, repo in repos.items():
            env = child_env(repo, threads)
            ours = Path(tempfile.mkdtemp(prefix="d", dir=work))
            child = checked(timed_child([
                *deepregister, "apply", "--transform", str(transform), "--reference",
                pair["fixed"], "--image", pair["moving"], str(ours / "scan.nii.gz"),
                "--labels", pair["moving_labels"], str(ours / "labels.nii.gz"),
            ], env, repo), "deepregister apply")  # fmt: skip
            row = {
                "pair": pair["name"],
                "version": version,
                "apply_s": child["wall_s"],
                "apply_peak_mb": child["peak_rss_mb"],
                "apply_vs_register": _agreement(ours, registered),
            }
            if series:
                row.update(_series_row(pair, transform, series, repo, threads, work, ants))
            rows.append(row)
    if ants:
        theirs = Path(tempfile.mkdtemp(prefix="a", dir=work))
        command = [sys.executable, "-c", ANTS_SCRIPT, pair["fixed"], pair["moving"]]
        command += [pair["moving_labels"], str(transform), str(theirs)]
        child = checked(timed_child(command, this, REPO), "ANTs")
        for row in rows:
            row.update(
                ants_s=child["wall_s"],
                ants_peak_mb=child["peak_rss_mb"],
                ants_vs_register=_agreement(theirs, registered),
            )
    return rows


#: A table column: its heading, and its cell for a row.
Column = tuple[str, Callable[[dict[str, Any]], str]]


def report_head(title: str, results: dict[str, Any]) -> list[str]:
    """A report's title and the line saying how it was run."""
    return [
        f"# {title}",
        "",
        f"Command: `{results['command']}`; {results['machine'].get('cpu', '')}, "
        f"{results['options']['threads']} threads.",
        "",
    ]


def add_repo_option(parser: argparse.ArgumentParser, what: str) -> None:
    """``--repo LABEL=PATH`` (repeatable): the checkouts that run ``what``."""
    parser.add_argument(
        "--repo", action="append", metavar="LABEL=PATH",
        help=f"{what} from this checkout (repeatable, e.g. before=/tmp/old); default: this one",
    )  # fmt: skip


def parsed(parser: argparse.ArgumentParser, argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, with ``repos``: label → checkout, each resolved."""
    args = parser.parse_args(argv)
    repos = args.repo or [f"this={REPO}"]
    args.repos = {item.split("=", 1)[0]: Path(item.split("=", 1)[1]).resolve() for item in repos}
    return args


def new_results(script: str, args: argparse.Namespace, argv: Sequence[str] | None) -> dict:
    """A run's record before its rows: how it was run, where, from which checkouts."""
    return {
        "command": " ".join([f"python benchmarks/{script}", *(argv or sys.argv[1:])]),
        "machine": machine_info("cpu"),
        "options": {key: str(value) for key, value in vars(args).items() if key != "repos"},
        "repos": {label: str(path) for label, path in getattr(args, "repos", {}).items()},
        "runs": [],
    }


def chosen_pairs(args: argparse.Namespace, work: Path) -> list[dict[str, str]]:
    """The phantom (``--smoke``), the CT-like pair (``--ct``) or ``--pairs`` fs-dev pairs."""
    if args.smoke or args.ct:
        return phantoms(1, work) if args.smoke else ct_pairs(work)
    return fsdev(args.data, args.pairs)


def markdown(results: dict[str, Any]) -> str:
    rows = results["runs"]
    ants = all("ants_s" in row for row in rows)
    columns: list[Column] = [
        ("pair", lambda row: row["pair"]),
        ("version", lambda row: row["version"]),
        ("apply s", lambda row: f"{row['apply_s']:.2f}"),
        ("against register", lambda row: _against(row["apply_vs_register"])),
        ("peak MB", lambda row: f"{row['apply_peak_mb']:.0f}"),
    ]
    ants_columns: list[Column] = [
        ("ANTs s", lambda row: f"{row['ants_s']:.2f}"),
        ("× ANTs", lambda row: f"{row['apply_s'] / row['ants_s']:.2f}"),
        ("ANTs against register", lambda row: _against(row["ants_vs_register"])),
        ("ANTs peak MB", lambda row: f"{row['ants_peak_mb']:.0f}"),
    ]
    lines = [
        *report_head("Warping more images through a saved transform", results),
        "Each time is a fresh process, start to both files (the moving scan, linear; its labels, "
        "nearest neighbour) on the fixed grid, through `register`'s `.h5`. "
        "*Against register*: the largest intensity difference from `register`'s own warped "
        "scan, and the label voxels that differ from its warped labels.",
        "",
        *_table(rows, columns + (ants_columns if ants else [])),
    ]
    summaries = [
        _means([row for row in rows if row["version"] == version], "apply_s",
               "ants_s" if ants else None, version)
        for version in dict.fromkeys(row["version"] for row in rows)
    ]  # fmt: skip
    return "\n".join([*lines, "", *summaries, "", *_series_markdown(results), ""])


def _against(comparison: dict[str, Any]) -> str:
    return f"{comparison['scan_max_abs']:g} / {comparison['labels_differing']}"


def _table(rows: list[dict[str, Any]], columns: list[Column]) -> list[str]:
    """A Markdown table: a heading row, its rule, and a line per row."""
    return [
        "| " + " | ".join(heading for heading, _ in columns) + " |",
        "|" + "---|" * len(columns),
        *("| " + " | ".join(cell(row) for _, cell in columns) + " |" for row in rows),
    ]


def _means(rows: list[dict[str, Any]], ours: str, theirs: str | None, version: str) -> str:
    """The mean time a pair, ``apply``'s and (given ``theirs``) ANTs', with their ratio."""
    mean = statistics.mean(row[ours] for row in rows)
    summary = f"Mean ({version}): `apply` {mean:.2f} s a pair"
    if theirs is not None:
        ants_mean = statistics.mean(row[theirs] for row in rows)
        summary += f", ANTs {ants_mean:.2f} s ({mean / ants_mean:.2f}×)"
    return summary + "."


def _series_markdown(results: dict[str, Any]) -> list[str]:
    rows = [row for row in results["runs"] if "series_apply_s" in row]
    if not rows:
        return []
    ants = all("series_ants_s" in row for row in rows)
    columns: list[Column] = [
        ("pair", lambda row: row["pair"]),
        ("version", lambda row: row["version"]),
        ("series: apply s", lambda row: f"{row['series_apply_s']:.2f}"),
        ("peak MB", lambda row: f"{row['series_apply_peak_mb']:.0f}"),
    ]
    ants_columns: list[Column] = [
        ("ANTs s", lambda row: f"{row['series_ants_s']:.2f}"),
        ("× ANTs", lambda row: f"{row['series_apply_s'] / row['series_ants_s']:.2f}"),
        ("apart", lambda row: f"{row['series_max_abs']:g}"),
        ("ANTs peak MB", lambda row: f"{row['series_ants_peak_mb']:.0f}"),
    ]
    lines = [
        f"A 4D series of {results['options']['series']} volumes (the moving scan at 3 mm, "
        "16-bit) onto the fixed grid at 3 mm; *apart*: the largest difference between the two "
        "results (ANTs writes floats, `apply` rounds to the series' integers).",
        "",
        *_table(rows, columns + (ants_columns if ants else [])),
    ]
    summaries = [
        _means([row for row in rows if row["version"] == version], "series_apply_s",
               "series_ants_s" if ants else None, version)
        for version in dict.fromkeys(row["version"] for row in rows)
    ]  # fmt: skip
    return [*lines, "", *summaries]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="fs-dev pairs (default 4)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the fs-dev folder")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--no-ants", action="store_true", help="skip ANTs (antspyx)")
    parser.add_argument("--series", type=int, default=0, metavar="N",
                        help="also warp a 4D series of N volumes (default: none)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="one small phantom pair")
    parser.add_argument("--ct", action="store_true", help="the CT-like pair (512² × 600)")
    add_repo_option(parser, "time apply")
    parser.add_argument("--rounds", type=int, default=1, help="apply runs per version, alternated")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tag", default="", help="suffix for the report's file names")
    return parsed(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stem = report_stem(args, "warp-time")
    results = new_results("warp_time.py", args, argv)
    with tempfile.TemporaryDirectory(prefix="deepregister-warp-time-") as work:
        for pair in chosen_pairs(args, Path(work)):
            rows = measure_pair(
                pair, args.repos, args.threads, Path(work), not args.no_ants, args.series,
                args.rounds,
            )  # fmt: skip
            results["runs"] += rows
            print(json.dumps(rows), flush=True)
    save_report(args.out, stem, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
