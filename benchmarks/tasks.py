"""What the benchmark hands a child process (a method, a pair, the run's settings) and what a
method hands back. Plain data: the parent pickles it to spawned children."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import SimpleITK as sitk

from DeepRegisterLib import RegistrationSettings


@dataclass(frozen=True)
class PairSpec:
    """One registration problem, as files (children read them; nothing big is pickled)."""

    name: str
    fixed: str
    moving: str
    fixed_labels: str
    moving_labels: str
    region: str | None = None  # fixed-grid mask for the det J statistics
    labels: tuple[int, ...] | None = None  # scored labels; None: those in the fixed map


@dataclass(frozen=True)
class Settings:
    """How every method of one benchmark run is configured.

    ``registration`` is what every DeepRegister row starts from (``--model``,
    ``--regularization``, the device, the seed, MIND for ``--cross-contrast``); each row then
    sets its own fields (:data:`benchmarks.methods.DEEPREGISTER_ROWS`).
    """

    registration: RegistrationSettings = field(default_factory=RegistrationSettings)
    threads: int = 1
    cross_contrast: bool = False
    smoke: bool = False
    elastix_iterations: int | None = None  # None: elastix's default (256 per resolution)
    demons_iterations: int = 100

    @property
    def seed(self) -> int:
        return self.registration.seed


@dataclass(frozen=True)
class Task:
    method: str
    pair: PairSpec
    settings: Settings


@dataclass
class Output:
    """What a method hands back, all on the fixed grid.

    ``displacement`` may be a function that builds the field: it is called after the clock
    and the memory reading stop, because sampling a baseline's transform as a dense field is
    part of scoring it, not of the method.
    """

    warped_labels: sitk.Image
    displacement: sitk.Image | Callable[[], sitk.Image] | None = None  # None: identity
    notes: dict[str, Any] = field(default_factory=dict)
