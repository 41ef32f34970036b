"""``deepregister register``: one pair from files to files.

Every output path is checked before any input is read, and the outputs are written only when the
whole run succeeded, each atomically: a failed or interrupted run leaves no file behind.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import threading
from pathlib import Path
from typing import Any

from ..errors import InputError
from .exit_codes import EXIT_OK
from .options import add_settings_arguments, settings_from_arguments
from .progress import JsonProgress, ProgressBar


def add_register_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "register",
        help="register a moving image to a fixed image",
        description=(
            "Register MOVING to FIXED: affine stage, deformable network, instance optimisation. "
            "All outputs lie on the fixed image's grid. The transform maps fixed points to "
            "moving points (ITK's resampling convention; Slicer's 'FromParent'), so "
            "SimpleITK's Resample(moving, fixed, transform) reproduces --warped."
        ),
    )
    io = p.add_argument_group("inputs")
    io.add_argument("--fixed", required=True, type=Path, help="fixed (reference) image")
    io.add_argument("--moving", required=True, type=Path, help="moving image to align")
    io.add_argument("--fixed-mask", type=Path, help="region of the fixed image to match")
    io.add_argument("--moving-mask", type=Path, help="region of the moving image to use")
    io.add_argument(
        "--labels", nargs="+", type=Path, default=[], help="moving label maps to carry along"
    )
    io.add_argument(
        "--fixed-labels", type=Path, help="fixed label map: reports Dice per label of --labels"
    )
    io.add_argument(
        "--initial-transform",
        type=Path,
        help="linear ITK transform (.tfm/.h5/.mat), fixed → moving",
    )
    out = p.add_argument_group("outputs (all optional; formats from the suffix)")
    out.add_argument("--warped", type=Path, help="warped moving image (.nii.gz, .nrrd, .mha)")
    out.add_argument(
        "--transform",
        type=Path,
        help="total transform: ITK .h5/.tfm, or a displacement-field image (.nii.gz/.nrrd/.mha)",
    )
    out.add_argument("--displacement", type=Path, help="also the displacement field as an image")
    out.add_argument(
        "--inverse-transform",
        type=Path,
        help="inverse (moving → fixed) transform; computed on request",
    )
    out.add_argument(
        "--warped-labels", nargs="+", type=Path, default=[], help="one output per --labels input"
    )
    out.add_argument("--jacobian", type=Path, help="Jacobian determinant image")
    out.add_argument("--qa-png", type=Path, help="QA picture: slices of fixed/moving/warped/…")
    out.add_argument("--report", type=Path, help="JSON report (metrics, timings, versions)")
    add_settings_arguments(p.add_argument_group("settings"))
    p.add_argument(
        "--progress",
        choices=["auto", "json", "none"],
        default="auto",
        help="auto: a bar on a terminal, a line per 10 %% in a log; json: one JSON object per "
        "line on standard output (progress, then the outputs and the report) for programs",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar (--progress none)")
    p.set_defaults(run=run_register)


def _outputs(args: argparse.Namespace) -> list[Path]:
    return [
        path
        for path in (
            args.warped, args.transform, args.displacement, args.inverse_transform,
            args.jacobian, args.qa_png, args.report, *args.warped_labels,
        )
        if path is not None
    ]  # fmt: skip


def _write_outputs(result, args, fixed, moving) -> list[Path]:
    """Stage every output, then move them all into place together (or none of them)."""
    from ..imaging import fileio

    plan: list[tuple[Path, Any]] = []
    if args.warped:
        plan.append((args.warped, lambda p: fileio.write_image(result.warped, p)))
    if args.transform:
        plan.append((args.transform, lambda p: fileio.write_transform(result.transform(), p)))
    if args.displacement:
        plan.append((args.displacement, lambda p: fileio.write_image(result.displacement, p)))
    if args.inverse_transform:
        inverse = result.inverse_transform()
        plan.append((args.inverse_transform, lambda p: fileio.write_transform(inverse, p)))
    # Checked before the run: none (--labels for Dice only), or one per --labels input.
    for path, source in zip(args.warped_labels, args.labels, strict=False):
        image = result.warped_labels[str(source)]
        plan.append((path, lambda p, image=image: fileio.write_image(image, p)))
    if args.jacobian and result.jacobian is not None:
        plan.append((args.jacobian, lambda p: fileio.write_image(result.jacobian, p)))
    if args.qa_png:
        from ..evaluation.figures import qa_figure

        plan.append(
            (args.qa_png, lambda p: qa_figure(fixed, moving, result.warped, result.jacobian, p))
        )
    if args.report:
        text = json.dumps(result.report, indent=2, default=str) + "\n"
        plan.append((args.report, lambda p: p.write_text(text)))
    with contextlib.ExitStack() as stack:
        for path, write in plan:
            staged = stack.enter_context(fileio.atomic_write_path(path))
            write(staged)
    return [path for path, _ in plan]


def run_register(args: argparse.Namespace) -> int:
    if len(args.warped_labels) not in (0, len(args.labels)):
        raise InputError("give one --warped-labels output per --labels input, in the same order")
    settings = settings_from_arguments(args, compute_inverse=args.inverse_transform is not None)
    outputs = _outputs(args)
    if not outputs:
        raise InputError("nothing to write: give at least one output, e.g. --warped or --transform")
    from ..imaging import fileio
    from ..registration.engine import register

    fileio.check_writable(outputs)
    fixed = fileio.read_image(args.fixed, "fixed image")
    moving = fileio.read_image(args.moving, "moving image")
    initial = (
        None if args.initial_transform is None else fileio.read_transform(args.initial_transform)
    )
    result = register(
        fixed,
        moving,
        settings,
        fixed_mask=args.fixed_mask,
        moving_mask=args.moving_mask,
        moving_labels={str(path): path for path in args.labels},
        fixed_labels=args.fixed_labels,
        initial_transform=initial,
        progress=_progress(args),
        cancel=threading.Event(),
    )
    written = _write_outputs(result, args, fixed, moving)
    if args.progress == "json":
        JsonProgress().finished([str(path) for path in written], result.report)
        return EXIT_OK
    print_summary(result.report)
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def _progress(args: argparse.Namespace):
    if args.quiet or args.progress == "none":
        return None
    return JsonProgress() if args.progress == "json" else ProgressBar()


def print_summary(report: dict) -> None:
    parts = [
        f"time {report['runtime_s']:.1f} s on {report['device']}",
        f"preset {report['preset']}",
        f"NCC {report['ncc_before']:.3f} → {report['ncc_affine']:.3f} (affine) → "
        f"{report['ncc_after']:.3f}",
    ]
    if "folding_percent" in report:
        parts.append(f"det J ≤ 0: {report['folding_percent']:.4f} %")
    if "mean_dice" in report:
        parts.append(f"mean Dice {report['mean_dice']:.3f}")
    print("; ".join(parts))
    for note in report.get("notes", []):
        print(f"note: {note}")
