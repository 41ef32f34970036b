"""How the command line shows a registration's progress: a bar for people, lines for logs."""

from __future__ import annotations

import sys


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
