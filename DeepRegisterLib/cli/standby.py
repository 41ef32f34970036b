"""``python -m DeepRegisterLib.cli.standby``: a ``deepregister`` process started before its job.

Starting Python and importing torch take a second or more (several on some Slicer installs), and
the Slicer module's child process would pay it on every Apply. A standby process pays it while
the user is still choosing volumes: it starts loading the engine at once, then reads its command
line, the arguments of ``deepregister`` as one JSON list on one line of stdin, and runs it as
``deepregister`` would (same outputs, progress and exit codes). Stdin closed without a line (its
parent let it go, or ended) ends it quietly.
"""

from __future__ import annotations

import json
import sys

from .exit_codes import EXIT_INPUT


def arguments_from(line: str) -> list[str] | None:
    """The command line a parent sent; None when it sent none."""
    if not line.strip():
        return None
    arguments = json.loads(line)
    if not isinstance(arguments, list) or not all(isinstance(a, str) for a in arguments):
        raise ValueError("expected one JSON list of strings")
    return arguments


def main() -> None:
    from ..registration.torch_loading import load_torch_beside

    load_torch_beside()
    line = sys.stdin.readline()
    try:
        arguments = arguments_from(line)
    except ValueError as error:
        print(
            f"deepregister standby: error: unusable command line {line!r}: {error}", file=sys.stderr
        )
        sys.exit(EXIT_INPUT)
    if arguments is not None:
        from .main import run

        run(arguments)  # ends the process with the command line's exit code


if __name__ == "__main__":
    main()
