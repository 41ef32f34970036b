"""Progress, cancel and the clock of one run: each stage's own 0→1 progress on one overall bar,
the points where a run asks whether it should stop, and each stage's wall time."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar, Protocol

from ..errors import stop_if_cancelled

ProgressCallback = Callable[[float, str], None]


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class Stages:
    """Maps each stage's own 0→1 progress onto one overall 0→1 bar."""

    callback: ProgressCallback | None
    cancel: CancelToken | None

    BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {
        "checks": (0.0, 0.02),
        "affine": (0.02, 0.35),
        "network": (0.35, 0.45),
        "optimisation": (0.45, 0.88),
        "outputs": (0.88, 1.0),
    }

    def report(self, stage: str, fraction: float, message: str) -> None:
        if self.callback is not None:
            low, high = self.BOUNDS[stage]
            self.callback(low + (high - low) * min(max(fraction, 0.0), 1.0), message)

    def reporter(self, stage: str) -> ProgressCallback:
        return lambda fraction, message: self.report(stage, fraction, message)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def check(self, where: str) -> None:
        stop_if_cancelled(self.cancelled, where)


class Stopwatch:
    """Each stage's wall time: ``lap(name)`` records the time since the previous lap."""

    def __init__(self) -> None:
        self.timings: dict[str, float] = {}
        self._last = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = now - self._last
        self._last = now
