"""Checkpoints: the tensors and the bookkeeping a run needs to continue exactly where it stopped.

A checkpoint holds the model and optimiser tensors and where the run stands (:class:`RunState`);
it loads with ``weights_only=True``, so resuming never unpickles arbitrary objects. Every process
of a distributed run loads it; only the main process writes it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..imaging.fileio import atomic_write_path
from ..nn.models import ModelInfo, load_model
from ..nn.networks import VxmDense

CHECKPOINT, BEST = "checkpoint.pt", "best.pt"


@dataclass
class RunState:
    """Where a run stands, besides its tensors: what a checkpoint records and a resume restores."""

    step: int = 0
    elapsed_s: float = 0.0  # training and validation time over all sessions of the run
    best_score: float = -math.inf
    best_step: int = 0
    initial_scores: list[float] | None = None  # validation at step 0


def _save_tensors(data: dict[str, Any], path: Path) -> None:
    with atomic_write_path(path) as staged:
        torch.save(data, staged)


def weights(network: VxmDense) -> dict[str, torch.Tensor]:
    """A detached CPU copy of the network's tensors: what checkpoints and best.pt hold."""
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}


def save_weights(network: VxmDense, path: Path) -> None:
    _save_tensors(weights(network), path)


def save_checkpoint(
    path: Path, network: VxmDense, optimiser: torch.optim.Optimizer, state: RunState
) -> None:
    _save_tensors(
        {
            "model": weights(network),
            "optimiser": optimiser.state_dict(),
            "step": state.step,
            "elapsed_s": state.elapsed_s,
            "best_score": state.best_score,
            "best_step": state.best_step,
            "initial_scores": state.initial_scores,
            "network": network.config.to_json(),
        },
        path,
    )


def load_checkpoint(
    path: Path, network: VxmDense, optimiser: torch.optim.Optimizer, device: torch.device
) -> RunState:
    """Restore the network and optimiser from ``path``; the run's state to continue from."""
    data = torch.load(path, map_location=device, weights_only=True)
    if data["network"] != network.config.to_json():
        raise InputError(
            f"{path} was made for another network ({data['network']}); use a new output folder "
            "or the same network options"
        )
    network.load_state_dict(data["model"])
    optimiser.load_state_dict(data["optimiser"])
    return RunState(
        int(data["step"]),
        float(data["elapsed_s"]),
        float(data["best_score"]),
        int(data["best_step"]),
        list(data["initial_scores"]),
    )


def load_weights(network: VxmDense, path: Path, device: torch.device) -> None:
    network.load_state_dict(torch.load(path, map_location=device, weights_only=True))


def load_parent_weights(network: VxmDense, parent: ModelInfo) -> None:
    """Start from a model's weights (to fine-tune it or continue a coarser stage)."""
    if parent.network != network.config:
        raise InputError(
            f"model {parent.name!r} has another network ({parent.network}); give the same "
            "network options to start from it"
        )
    network.load_state_dict(load_model(parent).state_dict())
