"""The ``deepregister`` command line.

Exit codes: 0 success; 2 unusable input, options or model (the message says what to change);
3 not enough memory; 130 interrupted (Ctrl-C); 1 an unexpected error (a bug: please report it).
Outputs are written only when the whole run succeeded, each atomically.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import __version__
from ..errors import DeepRegisterError, InputError, ModelError, RegistrationCancelled, ResourceError
from ..process_memory import keep_freed_memory
from .apply import add_apply_parser
from .batch import add_batch_parser
from .demo import add_demo_parser
from .evaluate import add_evaluate_parser
from .exit_codes import EXIT_ERROR, EXIT_INPUT, EXIT_INTERRUPTED, EXIT_MEMORY, EXIT_OK
from .register import add_register_parser
from .train import add_train_parser


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
        "3 not enough memory, 4 some batch jobs failed, 130 interrupted.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_register_parser(subparsers)
    add_apply_parser(subparsers)
    add_batch_parser(subparsers)
    add_demo_parser(subparsers)
    add_evaluate_parser(subparsers)
    add_train_parser(subparsers)
    _add_models_parser(subparsers)
    return parser


def run(argv: Sequence[str] | None = None) -> None:
    """The ``deepregister`` program on ``argv`` (default ``sys.argv[1:]``). After ``register``,
    with its outputs written and closed and its threads joined, the process ends without
    Python's finalisation: with torch loaded that takes 0.3 s, which a user waits for on every
    pair (and Slicer, on every run). The other commands, with clusters to close and logs to
    flush, end as Python ends. A ``register`` process, living for one registration, keeps the
    memory its stages free for the next to reuse (see process_memory)."""
    args = build_parser().parse_args(argv)
    if args.command != "register":
        sys.exit(_run(args))
    keep_freed_memory()
    code = _run(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line's exit code for ``argv`` (default ``sys.argv[1:]``)."""
    return _run(build_parser().parse_args(argv))


def _run(args: argparse.Namespace) -> int:
    try:
        return args.run(args)
    except (InputError, ModelError) as error:
        print(f"deepregister: error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except ResourceError as error:
        print(f"deepregister: not enough memory: {error}", file=sys.stderr)
        return EXIT_MEMORY
    except (KeyboardInterrupt, RegistrationCancelled):
        kept = "finished jobs are kept" if args.command == "batch" else "no output was written"
        print(f"deepregister: interrupted; {kept}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except DeepRegisterError as error:
        print(f"deepregister: error: {error}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # Whoever read standard output has gone (``| head``): stop quietly, as a program
        # stopped by SIGPIPE does. Outputs are written all or none, so none was; the rest of
        # what is printed (and Python's last flush) goes nowhere.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    run()
