"""The command line's exit codes, and the one wrapper that maps a sub-command's errors to them."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from ..errors import InputError

EXIT_OK, EXIT_ERROR, EXIT_INPUT, EXIT_MEMORY, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
#: ``batch``: every job ran, and some failed (each recorded in its error.json and the summary).
EXIT_JOBS_FAILED = 4


def run_reporting_errors(command: str, work: Callable[[], object]) -> int:
    """Run ``work``: 0 on success, 2 for unusable input (message printed), 1 for anything else
    (traceback printed, with a request to report it)."""
    try:
        work()
    except InputError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return EXIT_INPUT
    except Exception as error:
        traceback.print_exc()
        print(
            f"{command}: unexpected error ({type(error).__name__}); please report it with the "
            "traceback above.",
            file=sys.stderr,
        )
        return EXIT_ERROR
    return EXIT_OK
