"""The numeric precision the U-Net runs in, in training and in validation alike."""

from __future__ import annotations

import contextlib

import torch


def autocast(device: torch.device, mixed_precision: bool | None):
    """bfloat16 autocast (no loss scaling needed); by default on a GPU only."""
    if mixed_precision or (mixed_precision is None and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()
