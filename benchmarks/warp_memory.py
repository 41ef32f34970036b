#!/usr/bin/env python
"""The memory a saved transform's warp takes, measured beside what ``apply`` and ``batch`` count.

    python benchmarks/warp_memory.py --pairs 2 --series 20
    python benchmarks/warp_memory.py --ct --repo before=/tmp/old --repo after=.
    python benchmarks/warp_memory.py --smoke --out /tmp/warp-memory

``deepregister apply`` refuses an input that would not fit in the memory available, and a
batch plans its workers, by ``saved_transforms.warp_bytes``: what warping an image needs beyond
the image itself, by whichever warp takes it (the engine's or ITK's). Each pair is registered
once (``fast``, its ``.h5``); then, each in a fresh process, its moving scan and labels go
through that transform by the engine's warp and by ITK's, and (``--series N``) a 4D series of N
volumes made from the moving scan at 3 mm goes onto the fixed grid by ITK's (the engine takes no
series). Each process reads the transform and the image, resets its peak (Linux's
``clear_refs``), warps, and reports how far its peak rose. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO))

from benchmarks.run_benchmark import DEFAULT_DATA, DEFAULT_OUT, usable_cores  # noqa: E402
from benchmarks.user_time import checked, child_env, report_stem, save_report, timed_child  # noqa: E402
from benchmarks.warp_time import (  # noqa: E402
    add_repo_option,
    chosen_pairs,
    new_results,
    parsed,
    report_head,
    series_files,
)

#: One warp in a fresh process: the rise of its peak resident set (VmHWM) from the moment the
#: image and the transform are in memory (and torch, for the engine), in bytes.
MEASURE = """
import json, sys
import SimpleITK as sitk
from benchmarks.memory import proc_status, reset_peak
from DeepRegisterLib import apply_transform
from DeepRegisterLib.imaging import fileio
from DeepRegisterLib.imaging.geometry import Grid
way, transform, reference, path, labels = sys.argv[1:6]
labels = labels == "labels"
transform = fileio.read_transform(transform)
grid = Grid.of(sitk.ReadImage(reference))
image = sitk.ReadImage(path)
if way == "engine":  # the engine's modules loaded first: the process's, not the warp's
    import DeepRegisterLib.registration.image_warping
    from DeepRegisterLib.registration.saved_transforms import SavedTransformWarp
    warp = SavedTransformWarp(transform, grid, 0)
    assert warp.may_use_engine and warp.engine_takes(image, labels), "not the engine's"
    run = lambda: warp(image, labels)
else:
    run = lambda: apply_transform(image, transform, grid, labels)
assert reset_peak(), "this kernel does not reset the peak"
before = proc_status("VmRSS")
run()
print(json.dumps({"rise_bytes": proc_status("VmHWM") - before}))
"""


def _counted(path: str, reference: str, transform: Path, labels: bool) -> dict[str, int]:
    """What ``apply`` counts for it by each warp, from the headers, by this checkout: ITK's
    need alone, or the engine's (the larger of the two, as a batch counts it) with the field
    its warp keeps."""
    from DeepRegisterLib.imaging import fileio
    from DeepRegisterLib.registration.saved_transforms import SavedTransformWarp, warp_bytes

    grid = fileio.read_grid(Path(reference), "reference")
    header = fileio.image_header(Path(path), "image")
    field = SavedTransformWarp(fileio.read_transform(transform), grid, 0).field_bytes
    return {
        "ITK": warp_bytes(header, grid, labels, engine=False),
        "engine": warp_bytes(header, grid, labels) + field,
    }


def measure_pair(
    pair: dict[str, str], repos: dict[str, Path], threads: int, work: Path, series: int
) -> list[dict[str, Any]]:
    """Register once (this checkout), then each image by each way, from each checkout."""
    folder = Path(tempfile.mkdtemp(prefix="m", dir=work))
    transform = folder / "transform.h5"
    checked(timed_child([
        sys.executable, "-m", "DeepRegisterLib", "register", "--fixed", pair["fixed"],
        "--moving", pair["moving"], "--preset", "fast", "--quiet", "--transform", str(transform),
    ], child_env(REPO, threads), REPO), "register")  # fmt: skip
    images = [("scan", pair["moving"], False, ("engine", "ITK")),
              ("labels", pair["moving_labels"], True, ("engine", "ITK"))]  # fmt: skip
    if series:
        path = str(series_files(pair, series, folder)[0])
        images.append((f"series of {series}", path, False, ("ITK",)))
    rows = []
    for name, path, labels, ways in images:
        counted = _counted(path, pair["fixed"], transform, labels)
        for version, repo in repos.items():
            for way in ways:
                command = [sys.executable, "-c", MEASURE, way.lower(), str(transform)]
                command += [pair["fixed"], path, "labels" if labels else "image"]
                child = checked(timed_child(command, child_env(repo, threads), repo), way)
                rise = json.loads(child["stdout"].strip().splitlines()[-1])["rise_bytes"]
                rows.append({"pair": pair["name"], "image": name, "version": version,
                             "way": way, "rise_mb": rise / 1e6, "counted_mb": counted[way] / 1e6,
                             "warp_s": child["wall_s"]})  # fmt: skip
    return rows


def markdown(results: dict[str, Any]) -> str:
    lines = [
        *report_head(
            "The memory a saved transform's warp takes, beside what `apply` counts", results
        ),
        "*Rise*: how far a fresh process's peak resident set rose while it warped the image "
        "(the image, the transform and the engine's modules already in memory). *Counted*: "
        "what `apply` checks against the memory available beside the image read, from the "
        "headers (`saved_transforms.warp_bytes`, this checkout), where that warp takes the "
        "image: ITK's need alone, or the larger of the two needs (as a batch counts a more "
        "image) and the field the engine's warp keeps (`field_bytes`, once for all images). "
        "*Process s*: the measuring process, start to end.",
        "",
        "| pair | image | version | warp | rise MB | counted MB | rise ÷ counted | process s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        ratio = row["rise_mb"] / row["counted_mb"]
        lines.append(
            f"| {row['pair']} | {row['image']} | {row['version']} | {row['way']} "
            f"| {row['rise_mb']:.0f} | {row['counted_mb']:.0f} | {ratio:.2f} "
            f"| {row['warp_s']:.2f} |"
        )
    return "\n".join([*lines, ""])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=1, help="fs-dev pairs (default 1)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the fs-dev folder")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--series", type=int, default=0, metavar="N",
                        help="also a 4D series of N volumes at 3 mm (default: none)")  # fmt: skip
    parser.add_argument("--smoke", action="store_true", help="one small phantom pair")
    parser.add_argument("--ct", action="store_true", help="the CT-like pair (512² × 600)")
    add_repo_option(parser, "measure the warps")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tag", default="", help="suffix for the report's file names")
    return parsed(parser, argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    stem = report_stem(args, "warp-memory")
    results = new_results("warp_memory.py", args, argv)
    with tempfile.TemporaryDirectory(prefix="deepregister-warp-memory-") as work:
        for pair in chosen_pairs(args, Path(work)):
            rows = measure_pair(pair, args.repos, args.threads, Path(work), args.series)
            results["runs"] += rows
            print(json.dumps(rows), flush=True)
    save_report(args.out, stem, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
