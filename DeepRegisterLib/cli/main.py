"""The ``deepregister`` command line.

Exit codes: 0 success; 2 unusable input, options or model (the message says what to change);
3 not enough memory; 130 interrupted (Ctrl-C); 1 an unexpected error (a bug: please report it).
Outputs are written only when the whole run succeeded, each atomically.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import threading
from collections.abc import Sequence
from pathlib import Path

from .. import __version__
from ..errors import DeepRegisterError, InputError, ModelError, RegistrationCancelled, ResourceError
from ..registration.presets import PRESETS
from .evaluate import add_evaluate_parser
from .exit_codes import EXIT_ERROR, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_MEMORY, EXIT_OK
from .train import add_train_parser


class ProgressBar:
    """A one-line bar on a terminal; a line per 10 % when the output is a log file."""

    def __init__(self, stream=sys.stderr, width: int = 30):
        self.stream, self.width = stream, width
        self.interactive = stream.isatty()
        self.last_decile = -1

    def __call__(self, fraction: float, message: str) -> None:
        percent = int(100 * fraction)
        if self.interactive:
            filled = int(self.width * fraction)
            bar = "#" * filled + "-" * (self.width - filled)
            self.stream.write(f"\r[{bar}] {percent:3d}% {message:<40.40}")
            if fraction >= 1.0:
                self.stream.write("\n")
            self.stream.flush()
        elif percent // 10 > self.last_decile:
            self.last_decile = percent // 10
            print(f"PROGRESS {percent}% {message}", file=self.stream, flush=True)


def _add_register_parser(subparsers) -> None:
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
    io.add_argument(
        "--no-affine",
        action="store_true",
        help="skip the affine stage (use --initial-transform as is, or identity)",
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
    opt = p.add_argument_group("options")
    opt.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        default="balanced",
        help="; ".join(f"{name}: {preset.summary()}" for name, preset in PRESETS.items())
        + " (default balanced)",
    )
    opt.add_argument(
        "--model", default="default", help="model name, .pt path or folder; 'none' for no network"
    )
    opt.add_argument("--similarity", choices=["lncc", "mse", "mind"], help="default: lncc")
    opt.add_argument(
        "--regularization",
        type=float,
        help="smoothness weight (preset default 1); 10 gives fields about as smooth as ANTs SyN's"
        " for a little overlap",
    )
    opt.add_argument("--iterations", type=int, help="total optimisation steps (overrides preset)")
    opt.add_argument("--device", default="auto", help="auto, cpu or cuda")
    opt.add_argument("--seed", type=int, default=0)
    opt.add_argument(
        "--max-memory",
        type=float,
        metavar="GIB",
        help="memory this run may use (default: 90 %% of what is available); when short, the "
        "deformable stages run on a coarser grid and say so",
    )
    opt.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(run=_run_register)


def _write_outputs(result, args, fixed, moving) -> list[Path]:
    """Stage every output, then move them all into place together (or none of them)."""
    from ..imaging import fileio

    plan: list[tuple[Path, object]] = []
    if args.warped:
        plan.append((args.warped, lambda p: fileio.write_image(result.warped, p)))
    if args.transform:
        plan.append((args.transform, lambda p: fileio.write_transform(result.transform(), p)))
    if args.displacement:
        plan.append((args.displacement, lambda p: fileio.write_image(result.displacement, p)))
    if args.inverse_transform:
        plan.append(
            (
                args.inverse_transform,
                lambda p: fileio.write_transform(result.inverse_transform(), p),
            )
        )
    # Checked before the run: none (--labels for Dice only), or one per --labels input.
    if args.warped_labels:
        for path, source in zip(args.warped_labels, args.labels, strict=True):
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


def _run_register(args) -> int:
    from ..imaging import fileio
    from ..registration.engine import register

    if len(args.warped_labels) not in (0, len(args.labels)):
        raise InputError("give one --warped-labels output per --labels input, in the same order")
    outputs = [
        args.warped, args.transform, args.displacement, args.inverse_transform, args.jacobian,
        args.qa_png, args.report, *args.warped_labels,
    ]  # fmt: skip
    if not any(outputs):
        raise InputError("nothing to write: give at least one output, e.g. --warped or --transform")
    fileio.check_writable(outputs)
    fixed = fileio.read_image(args.fixed, "fixed image")
    moving = fileio.read_image(args.moving, "moving image")
    initial = (
        None if args.initial_transform is None else fileio.read_transform(args.initial_transform)
    )
    cancel = threading.Event()
    result = register(
        fixed,
        moving,
        fixed_mask=args.fixed_mask,
        moving_mask=args.moving_mask,
        moving_labels={str(path): path for path in args.labels},
        fixed_labels=args.fixed_labels,
        initial_transform=initial,
        affine=not args.no_affine,
        preset=args.preset,
        model=args.model,
        similarity=args.similarity,
        regularization=args.regularization,
        iterations=args.iterations,
        compute_inverse=args.inverse_transform is not None,
        compute_jacobian=True,
        device=args.device,
        max_memory_bytes=None if args.max_memory is None else int(args.max_memory * 2**30),
        seed=args.seed,
        progress=None if args.quiet else ProgressBar(),
        cancel=cancel,
    )
    written = _write_outputs(result, args, fixed, moving)
    _print_summary(result.report)
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK


def _print_summary(report: dict) -> None:
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


def _add_demo_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "demo",
        help="register a generated pair with a known deformation (no data needed)",
        description=(
            "Generates a 3D phantom and a moving copy deformed by a known smooth deformation "
            "and rotation on an oblique, anisotropic grid, registers them, prints the error "
            "against the truth and writes every output into --output."
        ),
    )
    p.add_argument("--output", type=Path, default=Path("deepregister-demo"))
    p.add_argument("--preset", choices=sorted(PRESETS), default="fast")
    p.add_argument("--dim", type=int, choices=[2, 3], default=3)
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(run=_run_demo)


def _run_demo(args) -> int:
    from .demo import run_demo

    run_demo(args.output, preset=args.preset, dim=args.dim, device=args.device,
             progress=None if args.quiet else ProgressBar())  # fmt: skip
    return EXIT_OK


def _add_models_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the models found: dimension, spacing, recursive passes, the contrasts "
        "they are for, their place among the defaults (the engine takes the first that suits "
        "a run), and where",
    )
    p.set_defaults(run=_run_models)


def _run_models(args) -> int:
    from ..nn.models import DEFAULT_MODELS, available_models, search_path

    models = available_models()
    for name, info in sorted(models.items()):
        dim = info.network.dim
        candidates = DEFAULT_MODELS.get(dim, ())
        default = f"default {candidates.index(name) + 1}" if name in candidates else "-"
        print(
            f"{name:20} {dim}D  {info.spacing_mm:g} mm  "
            f"{info.passes} pass{'es' if info.passes > 1 else '  '}  "
            f"{info.contrast:4} contrast  "
            f"{default:9}  {info.weights}"
        )
    if not models:
        print("no models installed; registration uses instance optimisation alone")
    print("search path: " + ", ".join(str(p) for p in search_path()))
    return EXIT_OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="deepregister",
        description=(
            "Deep-learning deformable registration of medical images (CT, MRI; 2D and 3D). "
            "Run 'deepregister demo' for a self-contained example, "
            "'deepregister register --help' for the main command."
        ),
        epilog="Exit codes: 0 ok, 1 unexpected error, 2 bad input/options/model, "
        "3 not enough memory, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    _add_register_parser(subparsers)
    _add_demo_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_train_parser(subparsers)
    _add_models_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except (InputError, ModelError) as error:
        print(f"deepregister: error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except ResourceError as error:
        print(f"deepregister: not enough memory: {error}", file=sys.stderr)
        return EXIT_MEMORY
    except (KeyboardInterrupt, RegistrationCancelled):
        print("deepregister: interrupted; no output was written", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DeepRegisterError as error:
        print(f"deepregister: error: {error}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
