"""``deepregister register``: one pair from files to files.

Every output path is checked before any input is read, and the outputs are written only when the
whole run succeeded, each atomically: a failed or interrupted run leaves no file behind.
"""

from __future__ import annotations

import argparse
import json
import threading
from functools import partial
from pathlib import Path
from typing import Any

from ..errors import InputError
from ..imaging import output_paths
from .exit_codes import EXIT_OK
from .options import add_settings_arguments, settings_from_arguments
from .progress import JsonProgress, ProgressBar


def add_register_parser(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "register",
        help="register a moving image to a fixed image",
        description=(
            "Register MOVING to FIXED: affine stage, deformable network, instance optimisation. "
            "All output images lie on the fixed image's grid. The transform maps fixed points to "
            "moving points (ITK's resampling convention; Slicer's 'FromParent'), so "
            "SimpleITK's Resample(moving, fixed, transform) reproduces --warped."
        ),
    )
    _add_input_arguments(p.add_argument_group("inputs"))
    _add_output_arguments(
        p.add_argument_group(
            "outputs (all optional; formats from the suffix)",
            "Every output path is checked before any work. Writing the transform of a 256³ "
            "brain (2 cores): .h5 ~0.02 s (20 MB: the affine and the 2 mm deformation); as a "
            "dense field image (200 MB) .nii.gz, .mha or .nrrd 0.2–0.6 s, uncompressed (gzip "
            "would save about 11 % for 0.4 s more). Images that compress are compressed fast.",
        )
    )
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


def _add_input_arguments(io: Any) -> None:
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


def _add_output_arguments(out: Any) -> None:
    out.add_argument(
        "--warped",
        type=Path,
        help="warped moving image (.nii.gz, .nrrd, .mha; in 2D also .png/.tif: 8 or 16 bits as "
        "the moving image's type allows, else rescaled, with a note)",
    )
    out.add_argument(
        "--transform",
        type=Path,
        help="total transform: ITK .h5/.tfm holding the affine and the deformation on the "
        "network grid, as ANTs writes them (ITK and ANTs apply it exactly as --warped was made; "
        "Slicer interpolates its field cubically, ~0.1 mm apart; .mat holds the dense field), "
        "or with an image suffix (.nii.gz/.nrrd/.mha) the dense float32 field on the fixed grid",
    )
    out.add_argument(
        "--displacement",
        type=Path,
        help="the dense displacement field on the fixed grid exactly as computed (float32, bit "
        "for bit; e.g. .mha), beside a --transform .h5",
    )
    out.add_argument(
        "--inverse-transform",
        type=Path,
        help="inverse (moving → fixed) transform, as --transform (an image suffix: the field on "
        "the moving grid); computed only when asked for",
    )
    out.add_argument(
        "--inverse-displacement",
        type=Path,
        help="the inverse field on the moving grid exactly as computed (float32, e.g. .mha)",
    )
    out.add_argument(
        "--warped-labels",
        nargs="+",
        type=Path,
        default=[],
        help="one output per --labels input (in 2D also .png/.tif, 8 or 16 bits); a Slicer "
        "segmentation written as .seg.nrrd keeps its segments' names and colours",
    )
    out.add_argument("--jacobian", type=Path, help="Jacobian determinant image")
    out.add_argument("--qa-png", type=Path, help="QA picture: slices of fixed/moving/warped/…")
    out.add_argument("--report", type=Path, help="JSON report (metrics, timings, versions)")
    out.add_argument(
        "--uncompressed",
        action="store_true",
        help="write the images without compression, for files read back at once: a 1 mm "
        "brain's warped image and det J in 0.04 s instead of 0.07 s, at 4-16 times the bytes",
    )


def _outputs(args: argparse.Namespace) -> list[tuple[str, str, Path]]:
    """(option, kind, path) of every output asked for; kinds as in :mod:`output_paths`."""
    outputs = [
        ("--warped", "image", args.warped),
        ("--transform", "transform", args.transform),
        ("--displacement", "volume", args.displacement),
        ("--inverse-transform", "transform", args.inverse_transform),
        ("--inverse-displacement", "volume", args.inverse_displacement),
        ("--jacobian", "volume", args.jacobian),
        ("--qa-png", "png", args.qa_png),
        ("--report", "json", args.report),
        *(("--warped-labels", "labels", path) for path in args.warped_labels),
    ]
    return [(option, kind, path) for option, kind, path in outputs if path is not None]


def _inputs(args: argparse.Namespace) -> list[Path | None]:
    return [
        args.fixed, args.moving, args.fixed_mask, args.moving_mask, *args.labels,
        args.fixed_labels, args.initial_transform, args.settings_file,
    ]  # fmt: skip


def _check_outputs(args: argparse.Namespace) -> list[tuple[str, str, Path]]:
    """Refuse every unusable output path at once, before any heavy import; the outputs."""
    if len(args.warped_labels) not in (0, len(args.labels)):
        raise InputError("give one --warped-labels output per --labels input, in the same order")
    outputs = _outputs(args)
    output_paths.check_outputs(outputs, _inputs(args))
    return outputs


def _check_against_headers(
    args: argparse.Namespace, outputs: list[tuple[str, str, Path]]
) -> dict[Path, int]:
    """Refuse outputs of the wrong dimension before reading the images; the 8/16-bit type of
    each 2D label picture to write (labels are never rescaled, so an unfit label map is
    refused now)."""
    from ..imaging import fileio

    dimension = fileio.image_dimension(args.fixed, "fixed image")
    output_paths.check_dimension(outputs, dimension)
    pictures = {}
    for source, path in zip(args.labels, args.warped_labels, strict=False):
        if output_paths.full_suffix(path) in output_paths.IMAGE_2D_SUFFIXES:
            from ..imaging.image_2d import label_picture_type

            pictures[path] = label_picture_type(fileio.read_image(source, "label map"), path)
    return pictures


def _settings(args: argparse.Namespace):
    """The settings, with the warped image, the dense field, the inverse and the Jacobian
    computed only where an output needs them (the report records folding when the settings
    ask for it, without a det J image unless one is written)."""
    settings = settings_from_arguments(
        args,
        compute_inverse=bool(args.inverse_transform or args.inverse_displacement),
        compute_warped=bool(args.warped or args.qa_png),
        compute_displacement=bool(args.displacement) or _transform_is_dense(args.transform),
        compute_inverse_displacement=bool(args.inverse_displacement)
        or _transform_is_dense(args.inverse_transform),
    )
    reported = args.report is not None or args.progress == "json"
    image = bool(args.jacobian or args.qa_png)
    jacobian = image or (reported and settings.compute_jacobian)
    return settings.replace(compute_jacobian=jacobian, keep_jacobian=image)


def _as_pictures(result, args, moving, label_types: dict[Path, int]):
    """The 2D outputs written as PNG/TIFF, in 8 or 16 bits, and notes on what was rescaled."""
    import SimpleITK as sitk

    from ..imaging.image_2d import as_picture

    pictures, notes = {}, []
    if args.warped and output_paths.full_suffix(args.warped) in output_paths.IMAGE_2D_SUFFIXES:
        pictures[args.warped], note = as_picture(result.warped, moving.GetPixelID(), args.warped)
        notes += [note] if note else []
    for source, path in zip(args.labels, args.warped_labels, strict=False):
        if path in label_types:
            pictures[path] = sitk.Cast(result.warped_labels[str(source)], label_types[path])
    return pictures, notes


def _write_outputs(result, args, fixed, moving, pictures) -> list[Path]:
    """Every output asked for, all or none (:func:`fileio.write_together`)."""
    from ..imaging import fileio

    write_image = partial(fileio.write_image, compress=not args.uncompressed)
    plan: list[tuple[Path, Any]] = []
    if args.warped:
        warped = pictures.get(args.warped, result.warped)
        plan.append((args.warped, lambda p: write_image(warped, p)))
    if args.transform:
        transform, field = result.transform, result.displacement
        plan.append((args.transform, lambda p: _write_transform(transform, field, p)))
    if args.displacement:
        plan.append((args.displacement, lambda p: write_image(result.displacement, p)))
    if args.inverse_transform:
        inverse, inverse_field = result.inverse_transform, result.inverse_displacement
        plan.append((args.inverse_transform, lambda p: _write_transform(inverse, inverse_field, p)))
    if args.inverse_displacement:
        inverse_field = result.inverse_displacement
        plan.append((args.inverse_displacement, lambda p: write_image(inverse_field, p)))
    # Checked before the run: none (--labels for Dice only), or one per --labels input.
    for path, source in zip(args.warped_labels, args.labels, strict=False):
        image = pictures.get(path, result.warped_labels[str(source)])
        _keep_segments(source, image)
        plan.append((path, lambda p, image=image: write_image(image, p)))
    if args.jacobian:
        plan.append((args.jacobian, lambda p: write_image(result.jacobian, p)))
    if args.qa_png:
        from ..evaluation.figures import qa_figure

        plan.append(
            (args.qa_png, lambda p: qa_figure(fixed, moving, result.warped, result.jacobian, p))
        )
    if args.report:
        text = json.dumps(result.report, indent=2, default=str) + "\n"
        plan.append((args.report, lambda p: p.write_text(text)))
    return fileio.write_together(plan)


def _keep_segments(source: Path, warped) -> None:
    """A Slicer segmentation's segments (names, colours, terminology) onto its warped labels,
    for a ``.seg.nrrd`` or ``.nrrd`` output to keep them (other formats drop them)."""
    from ..imaging import fileio
    from ..imaging.segmentation_file import carry_segments, is_slicer_segmentation

    header = fileio.read_header(source, "label map")
    if is_slicer_segmentation(header):
        carry_segments(header, warped)


def _transform_is_dense(path: Path | None) -> bool:
    """Whether ``--transform`` is written from the dense field (see :func:`_write_transform`)."""
    if path is None:
        return False
    suffix = output_paths.full_suffix(path)
    return suffix in output_paths.IMAGE_SUFFIXES or suffix == ".mat"


def _write_transform(transform, displacement, path: Path) -> None:
    """An ITK transform file of ``transform()``; for an image suffix the dense ``displacement``
    as a float32 field, and for a MATLAB ``.mat`` (one transform a file: ITK reads back no
    composite from it) as a displacement-field transform."""
    from ..imaging import fileio
    from ..registration.result import displacement_transform

    if not _transform_is_dense(path):
        fileio.write_transform(transform(), path)
    elif output_paths.full_suffix(path) == ".mat":
        fileio.write_transform(displacement_transform(displacement), path)
    else:
        fileio.write_field(displacement, path)


def run_register(args: argparse.Namespace) -> int:
    outputs = _check_outputs(args)
    settings = _settings(args)
    from ..registration.torch_loading import load_torch_beside

    # The run goes ahead: torch's import, its longest wait, overlaps SimpleITK's, the header
    # checks and the reads.
    load_torch_beside()
    label_types = _check_against_headers(args, outputs)
    from ..imaging import fileio
    from ..registration.engine import register

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
    pictures, notes = _as_pictures(result, args, moving, label_types)
    result.report.setdefault("notes", []).extend(notes)
    written = _write_outputs(result, args, fixed, moving, pictures)
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
