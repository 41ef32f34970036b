"""Which torch device a run uses: the user's word, checked against what this machine has."""

from __future__ import annotations

import torch

from ..errors import InputError


def resolve_device(device: str) -> torch.device:
    """The GPU for "auto" when there is one; a GPU asked for but absent is refused."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise InputError("device 'cuda' was requested but no CUDA GPU is available; use 'cpu'")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InputError(f"unknown device {device!r}; choose auto, cpu or cuda")
    return torch.device(device)
