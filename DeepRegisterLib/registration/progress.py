"""Progress and cancel for one run: each stage's own 0→1 progress on one overall bar, and the
points where a run asks whether it should stop."""

from __future__ import annotations

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
