"""``deepregister evaluate``: score any registration result from files and write a report.

Kept apart from ``main.py`` so the command can be wired in with two calls
(:func:`add_evaluate_parser`, :func:`run_evaluate`) and tested without the registration engine.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .exit_codes import run_reporting_errors


def add_evaluate_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``evaluate`` subcommand to ``parser.add_subparsers()``'s result."""
    parser = subparsers.add_parser(
        "evaluate",
        help="score a registration (Dice, HD95, TRE, det J, similarity) and write a report",
        description=(
            "Evaluate a fixed → moving transform from any tool (DeepRegister, ANTs, elastix, "
            "Slicer) and write report.json, report.md, report.html and PNG figures."
        ),
    )
    parser.add_argument("--fixed", type=Path, required=True, help="fixed image")
    parser.add_argument("--moving", type=Path, required=True, help="moving image")
    parser.add_argument(
        "--transform",
        type=Path,
        required=True,
        help="fixed → moving transform: an ITK transform file (.h5, .tfm, .txt, .mat) or a "
        "displacement-field image (.nii.gz, .nrrd, .mha) in LPS mm",
    )
    parser.add_argument(
        "--inverse-transform", type=Path, help="moving → fixed transform, for inverse consistency"
    )
    parser.add_argument("--fixed-labels", type=Path, help="label map on the fixed image")
    parser.add_argument("--moving-labels", type=Path, help="label map on the moving image")
    parser.add_argument(
        "--labels",
        nargs="+",
        metavar="LABEL",
        help="labels to score (integers), or 'freesurfer' for the 27 standard FreeSurfer "
        "structures; default: every non-zero label in the fixed label map",
    )
    parser.add_argument(
        "--label-names", type=Path, help="colour table naming the labels (FreeSurferColorLUT.txt)"
    )
    parser.add_argument(
        "--fixed-landmarks", type=Path, help="landmarks on the fixed image (.mrk.json/.fcsv/.csv)"
    )
    parser.add_argument("--moving-landmarks", type=Path, help="matching landmarks on the moving")
    parser.add_argument("--out", type=Path, required=True, help="folder for the report")
    parser.set_defaults(run=run_evaluate)  # cli.main dispatches with args.run(args)
    return parser


def _evaluate_files(args: argparse.Namespace) -> dict[str, Path]:
    # Imported here: they pull in torch, SimpleITK and matplotlib, which --help must not wait for.
    from ..evaluation.evaluate import evaluate, evaluation_images, read_label_names
    from ..evaluation.figures import write_report
    from ..evaluation.landmarks import read_landmarks
    from ..imaging.fileio import read_image, read_transform
    from ..imaging.metrics import parse_labels

    fixed = read_image(args.fixed, "fixed image")
    moving = read_image(args.moving, "moving image")
    transform = read_transform(args.transform)
    dim = fixed.GetDimension()

    def optional(path: Path | None, reader: Callable[..., Any], *extra: Any, **options: Any) -> Any:
        return None if path is None else reader(path, *extra, **options)

    images = evaluation_images(fixed, moving, transform)
    result = evaluate(
        fixed,
        moving,
        transform,
        fixed_labels=optional(args.fixed_labels, read_image, "fixed label map"),
        moving_labels=optional(args.moving_labels, read_image, "moving label map"),
        fixed_landmarks=optional(args.fixed_landmarks, read_landmarks, dimension=dim),
        moving_landmarks=optional(args.moving_landmarks, read_landmarks, dimension=dim),
        inverse_transform=optional(args.inverse_transform, read_transform),
        label_names=optional(args.label_names, read_label_names),
        labels=parse_labels(args.labels, "--labels"),
        images=images,
    )
    written = write_report(result, args.out, images)
    _print_summary(result, written)
    return written


def _print_summary(result: dict[str, Any], written: dict[str, Path]) -> None:
    def show(value: float | None, digits: int = 3) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    similarity = result["similarity"]
    print(
        f"NCC {show(similarity['before']['ncc'])} → {show(similarity['after']['ncc'])}; "
        f"folded voxels {show(result['jacobian']['folding_percent'], 4)} %; "
        f"SDlogJ {show(result['jacobian']['sdlogj'], 4)}"
    )
    if "labels" in result:
        labels = result["labels"]
        print(
            f"mean Dice {show(labels['mean_dice_before'])} → {show(labels['mean_dice'])}; "
            f"mean HD95 {show(labels['mean_hd95_mm'], 2)} mm"
        )
    if "landmarks" in result:
        before, after = result["landmarks"]["tre_before_mm"], result["landmarks"]["tre_mm"]
        print(f"mean TRE {show(before['mean'], 2)} → {show(after['mean'], 2)} mm")
    print(f"report: {written['html']}")


def run_evaluate(args: argparse.Namespace) -> int:
    """Run the subcommand; 0 on success, 2 for unusable input (message printed), 1 otherwise."""
    return run_reporting_errors("deepregister evaluate", lambda: _evaluate_files(args))
