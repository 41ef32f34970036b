#!/usr/bin/env python
"""More images in a process that has loaded torch: the engine's warp beside ITK's.

    python benchmarks/warp_in_process.py --pairs 4 --threads 2
    python benchmarks/warp_in_process.py --smoke --out /tmp/warp-in-process

A batch worker registers a pair, then warps the job's more images through its transform. There
torch is loaded already, so ``SavedTransformWarp`` sends every scalar image to the engine's warp
(``min_voxels=0``), where ``deepregister apply`` leaves a brain to ITK to spare torch's import.
Each pair is registered once (``fast``, in this process); its moving scan and labels then go
through the transform by the engine's warp and by ITK's (the anchor), alternated ``--rounds``
times, each timed alone from the image in memory to the warped image in memory. The engine's
results are compared with the job's own warped scan and labels. A benchmark, never a test.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere, without installing
    sys.path.insert(0, str(REPO))

from benchmarks.run_benchmark import DEFAULT_DATA, DEFAULT_OUT, usable_cores  # noqa: E402
from benchmarks.user_time import report_stem, save_report  # noqa: E402
from benchmarks.warp_time import chosen_pairs, new_results, report_head  # noqa: E402


def _seconds(work: Callable[[], Any]) -> float:
    start = time.perf_counter()
    work()
    return time.perf_counter() - start


def measure_pair(pair: dict[str, str], rounds: int) -> dict[str, Any]:
    """Register once, then time each image through the engine's warp and through ITK's."""
    import numpy as np
    import SimpleITK as sitk

    from DeepRegisterLib import apply_transform, register
    from DeepRegisterLib.imaging.geometry import Grid
    from DeepRegisterLib.registration.saved_transforms import SavedTransformWarp

    fixed, moving = sitk.ReadImage(pair["fixed"]), sitk.ReadImage(pair["moving"])
    labels = sitk.ReadImage(pair["moving_labels"])
    result = register(fixed, moving, moving_labels={"labels": labels}, preset="fast")
    transform = result.transform()
    warp = SavedTransformWarp(transform, Grid.of(fixed), 0)
    row: dict[str, Any] = {"pair": pair["name"]}
    for name, image, is_labels, own in (
        ("scan", moving, False, result.warped),
        ("labels", labels, True, result.warped_labels["labels"]),
    ):
        engine, itk = [], []
        for _ in range(rounds):
            engine.append(_seconds(lambda: warp(image, is_labels)))  # noqa: B023
            itk.append(_seconds(lambda: apply_transform(image, transform, fixed, is_labels)))  # noqa: B023
        ours = sitk.GetArrayFromImage(warp(image, is_labels))
        row[name] = {
            "engine_s": statistics.median(engine),
            "itk_s": statistics.median(itk),
            "differing_from_job": int(np.count_nonzero(ours != sitk.GetArrayViewFromImage(own))),
        }
    return row


def markdown(results: dict[str, Any]) -> str:
    lines = [
        *report_head(
            "More images in a process that has loaded torch: the engine's warp beside ITK's",
            results,
        ),
        "Medians of the rounds, each from the image in memory to its warp in memory, through "
        "the pair's own `fast` transform; *differing*: voxels unlike the job's own warped "
        "scan or labels.",
        "",
        "| pair | scan: engine s | ITK s | × ITK | differing | labels: engine s | ITK s "
        "| × ITK | differing |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        cells = [row["pair"]]
        for name in ("scan", "labels"):
            part = row[name]
            ratio = part["engine_s"] / part["itk_s"]
            cells += [f"{part['engine_s']:.3f}", f"{part['itk_s']:.3f}", f"{ratio:.2f}"]
            cells.append(str(part["differing_from_job"]))
        lines.append("| " + " | ".join(cells) + " |")
    for name in ("scan", "labels"):
        engine = statistics.mean(row[name]["engine_s"] for row in results["runs"])
        itk = statistics.mean(row[name]["itk_s"] for row in results["runs"])
        lines += [
            "",
            f"Mean {name}: the engine {engine:.3f} s, ITK {itk:.3f} s ({engine / itk:.2f}×).",
        ]
    return "\n".join([*lines, ""])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs", type=int, default=4, help="fs-dev pairs (default 4)")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="the fs-dev folder")
    parser.add_argument("--threads", type=int, default=usable_cores())
    parser.add_argument("--rounds", type=int, default=3, help="timings of each, alternated")
    parser.add_argument("--smoke", action="store_true", help="one small phantom pair")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--tag", default="", help="suffix for the report's file names")
    parser.set_defaults(ct=False)  # report_stem's question: fs-dev pairs unless --smoke
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    import SimpleITK as sitk
    import torch

    torch.set_num_threads(args.threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(args.threads)
    stem = report_stem(args, "warp-in-process")
    results = new_results("warp_in_process.py", args, argv)
    with tempfile.TemporaryDirectory(prefix="deepregister-warp-in-process-") as work:
        for pair in chosen_pairs(args, Path(work)):
            results["runs"].append(measure_pair(pair, args.rounds))
            print(json.dumps(results["runs"][-1]), flush=True)
    save_report(args.out, stem, results, markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
