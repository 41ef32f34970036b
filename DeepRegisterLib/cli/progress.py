"""How the command line shows a registration's progress: a bar for people, lines for logs,
JSON lines for programs (the Slicer module's child process, batch workers)."""

from __future__ import annotations

import json
import sys
from typing import Any, TextIO


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


class JsonProgress:
    """One JSON object per line, flushed at once: ``{"event": "progress", "fraction": 0.4,
    "message": "..."}``; :meth:`finished` ends the stream with the outputs and the report."""

    def __init__(self, stream: TextIO | None = None):
        self.stream = stream if stream is not None else sys.stdout

    def emit(self, event: str, **fields: Any) -> None:
        self.stream.write(json.dumps({"event": event, **fields}, default=str) + "\n")
        self.stream.flush()

    def __call__(self, fraction: float, message: str) -> None:
        self.emit("progress", fraction=round(float(fraction), 4), message=message)

    def finished(self, outputs: list[str], report: dict[str, Any]) -> None:
        self.emit("done", outputs=outputs, report=report)
