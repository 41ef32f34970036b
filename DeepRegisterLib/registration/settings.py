"""Every registration option, declared once: name, type, default, allowed values and help.

:class:`RegistrationSettings` is the one source of truth. The command line builds its options
from it (:mod:`DeepRegisterLib.cli.options`), the Python API and the Slicer bridge take it (or
its field names as keywords), the Slicer module's parameter node maps onto it in one function,
a child process receives it as JSON, and every report records it. Adding a setting is one field
here (plus its widget in the module).

Importing this module is cheap (no torch, no numpy): the command line's ``--help`` and the Slicer
module's parameter node read it.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import InputError
from .presets import PRESETS, Preset, get_preset

#: The similarity measures the optimisation knows (``nn.losses`` implements them).
SIMILARITIES = ("lncc", "mse", "mind")
DEVICES = ("auto", "cpu", "cuda")
_DEVICE = re.compile(r"^(auto|cpu|cuda(:\d+)?)$")


def _option(default: Any, help: str, *, choices: tuple[str, ...] = (), cli: str = "flag"):
    """A field with its help text; ``cli`` says how the command line offers it: "flag" (an
    option of its own) or "derived" (set from the outputs asked for, e.g. an inverse)."""
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices, "cli": cli}
    )


def _preset_help() -> str:
    return "; ".join(f"{name}: {preset.summary()}" for name, preset in PRESETS.items())


@dataclass(frozen=True)
class RegistrationSettings:
    """How to register a pair. Frozen and checked when made: an instance is always usable.

    ``None`` for ``regularization`` and ``iterations`` means "the preset's value".
    """

    preset: str = _option("balanced", _preset_help(), choices=tuple(PRESETS))
    model: str = _option(
        "default", "model name, .pt path or folder; 'default' chooses one, 'none' for no network"
    )
    similarity: str = _option(
        "lncc",
        "lncc for the same contrast, mind across contrasts (T1 to T2, CT to MR), mse for "
        "identical intensities",
        choices=SIMILARITIES,
    )
    regularization: float | None = _option(
        None,
        "smoothness weight (default: the preset's, 1); 10 gives fields about as smooth as "
        "ANTs SyN's for a little overlap",
    )
    iterations: int | None = _option(
        None, "total instance-optimisation steps (default: the preset's; 0: network only)"
    )
    affine: bool = _option(
        True,
        "an affine stage before the deformable ones (without it, the initial transform is used "
        "as it is, or identity)",
    )
    compute_inverse: bool = _option(
        False, "also compute the inverse (moving to fixed) transform", cli="derived"
    )
    compute_warped: bool = _option(True, "warp the moving image onto the fixed grid", cli="derived")
    compute_displacement: bool = _option(
        True,
        "keep the transform as a dense float32 field on the fixed grid (12 bytes a voxel); "
        "without it the transform is the affine and the network-grid deformation",
        cli="derived",
    )
    compute_inverse_displacement: bool = _option(
        False,
        "with compute_inverse, keep the inverse as a dense float32 field on the moving grid too "
        "(12 bytes a voxel); without it the inverse is the network-grid deformation and the "
        "affine's inverse",
        cli="derived",
    )
    compute_jacobian: bool = _option(
        True, "compute the Jacobian determinant and its QA figures", cli="derived"
    )
    keep_jacobian: bool = _option(
        True,
        "keep the Jacobian determinant as an image (4 bytes a voxel); without it only its QA "
        "figures (folding, SDlogJ) are kept",
        cli="derived",
    )
    device: str = _option("auto", "auto, cpu, cuda or cuda:N", choices=DEVICES)
    seed: int = _option(0, "random seed: the same seed, inputs and device give the same result")
    max_memory_gib: float | None = _option(
        None,
        "memory this run may use (default: 90 % of what is available); when short, the "
        "deformable stages run on a coarser grid and say so",
    )

    def __post_init__(self) -> None:
        if self.model is None:  # the API's way of saying "no network"
            object.__setattr__(self, "model", "none")
        elif isinstance(self.model, os.PathLike):
            object.__setattr__(self, "model", os.fspath(self.model))
        for field in dataclasses.fields(self):
            _check(field, getattr(self, field.name))

    def replace(self, **changes: Any) -> RegistrationSettings:
        """A copy with ``changes`` (field names); unknown names are refused with the list."""
        unknown = sorted(set(changes) - set(field_names()))
        if unknown:
            raise InputError(
                f"unknown setting(s) {', '.join(unknown)}; the settings are "
                f"{', '.join(field_names())}"
            )
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> RegistrationSettings:
        """From :meth:`to_dict`'s output (a report, a child process's JSON)."""
        return cls().replace(**dict(values))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_preset(self) -> Preset:
        """The preset's levels, with ``iterations`` spread over them when given."""
        preset = get_preset(self.preset)
        return preset if self.iterations is None else preset.with_iterations(self.iterations)

    @property
    def regularization_weight(self) -> float:
        if self.regularization is None:
            return get_preset(self.preset).regularization
        return self.regularization

    @property
    def max_memory_bytes(self) -> int | None:
        return None if self.max_memory_gib is None else int(self.max_memory_gib * 2**30)


def field_names() -> tuple[str, ...]:
    return tuple(field.name for field in dataclasses.fields(RegistrationSettings))


def _check(field: dataclasses.Field, value: Any) -> None:
    """Refuse a value that does not fit the field, saying which values would."""
    name, choices = field.name, field.metadata["choices"]
    kind = field.type.split(" | ")[0]  # "float | None" → "float" (postponed annotations)
    if value is None and "None" in field.type:
        return
    if kind == "bool":
        if not isinstance(value, bool):
            raise InputError(f"{name} must be True or False, got {value!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise InputError(f"{name} must be a whole number ≥ 0, got {value!r}")
    elif kind == "float":
        number = isinstance(value, int | float) and not isinstance(value, bool)
        if not number or not math.isfinite(value) or value < 0:
            raise InputError(f"{name} must be a number ≥ 0, got {value!r}")
        if name == "max_memory_gib" and value == 0:
            raise InputError("the memory limit max_memory_gib must be positive, got 0")
    elif not isinstance(value, str) or not value.strip():
        raise InputError(f"{name} must be a non-empty string, got {value!r}")
    if name == "device":
        if not _DEVICE.match(value):
            raise InputError(f"unknown device {value!r}; choose auto, cpu, cuda or cuda:N")
    elif choices and value not in choices:
        raise InputError(f"unknown {name} {value!r}; choose one of {', '.join(choices)}")
