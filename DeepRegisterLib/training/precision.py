"""The numeric precision the U-Net runs in, in training and in validation alike."""

from __future__ import annotations

import contextlib

import torch

# torch.cpu's own feature probes (private, so looked up rather than assumed).
_BFLOAT16_PROBES = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")


def autocast(device: torch.device, mixed_precision: bool | None):
    """bfloat16 autocast (no loss scaling needed); by default on a GPU only."""
    if mixed_precision or (mixed_precision is None and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def cpu_has_bfloat16() -> bool | None:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX); None when this torch
    cannot tell. Without it, bfloat16 autocast on the CPU is emulated: a training step took
    31 s instead of 3 on such a machine here, where one with AVX512-BF16 saves a third."""
    probes = [getattr(torch.cpu, name, None) for name in _BFLOAT16_PROBES]
    answers = [bool(probe()) for probe in probes if probe is not None]
    return any(answers) if answers else None


def slow_mixed_precision_note(device: torch.device, mixed_precision: bool | None) -> str | None:
    """A note for bfloat16 autocast asked for on a CPU that would only emulate it."""
    if device.type != "cpu" or not mixed_precision or cpu_has_bfloat16() is not False:
        return None
    return (
        "note: this CPU has no bfloat16 instructions (AVX512-BF16 or AMX), so mixed precision "
        "is emulated and several times slower here; train without --mixed-precision"
    )
