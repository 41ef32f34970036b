"""The end of a run: the best validated weights saved as a model, with what the card needs.

The model's JSON records the training summary (data, configuration, time, validation before and
after), so a model card can be written from it and a model traced back to how it was made.
"""

from __future__ import annotations

import platform
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .. import __version__
from ..nn.models import ModelInfo, save_model
from ..nn.networks import VxmDense
from .checkpoints import BEST, RunState, load_weights
from .config import TrainingConfig
from .label_maps import LabelMaps
from .pairs import PairFiles
from .validation import Validator


@dataclass
class TrainingResult:
    model: ModelInfo
    summary: dict[str, Any]


def training_data(
    label_maps: LabelMaps | None,
    real_pairs: Sequence[PairFiles],
    init_model: str | Path | None,
    parent: ModelInfo | None,
) -> dict[str, Any]:
    """What the network learnt from, for the model card."""
    return {
        "label_maps": None if label_maps is None else label_maps.names,
        "label_map_spacing_mm": None if label_maps is None else label_maps.spacing_mm,
        "label_maps_aligned": None if label_maps is None else label_maps.aligned,
        "real_pairs": [p.name for p in real_pairs],
        "initial_weights": None if init_model is None else str(init_model),
        # By checksum too: a name may later stand for other weights.
        "initial_weights_sha256": None if parent is None else parent.sha256,
    }


def save_best_model(
    network: VxmDense,
    config: TrainingConfig,
    state: RunState,
    validator: Validator,
    *,
    out: Path,
    model_dir: Path,
    name: str,
    data: dict[str, Any],
    real_validation: bool,
    parent: ModelInfo | None,
    processes: int,
) -> TrainingResult:
    """Save the best validated weights (possibly the initial ones: then the card must say so)
    as model ``name`` in ``model_dir``, with the run's summary in its JSON."""
    device = next(network.parameters()).device
    load_weights(network, out / BEST, device)
    summary = {
        "deepregister_version": __version__,
        "steps": state.step,
        "steps_planned": config.steps,
        "training_minutes": round(state.elapsed_s / 60, 2),
        "seconds_per_step": round(state.elapsed_s / max(state.step, 1), 3),
        "device": str(device),
        "processes": processes,  # torchrun's: each trained on batch_size pairs a step
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "config": config.to_json(),
        "data": data,
        "validation": {
            "pairs": [p.name for p in validator.pairs],
            "kind": "real" if real_validation else "synthetic",
            "metric": "mean Dice, network only (no instance optimisation)",
            "affine_only": validator.affine_scores,
            "initial": state.initial_scores,  # step 0: random weights, or those of init_model
            "best": validator.scores(network),
            "best_step": state.best_step,
        },
    }
    extra: dict[str, Any] = {
        "input_spacing_mm": config.spacing_mm,
        "passes": config.inference_passes,
        "similarity": config.similarity,
        "training": summary,
    }
    if parent is not None and parent.max_extent_mm is not None:
        # A fine-tune sees the parent's kind of images: its field-of-view guard still holds.
        extra["max_extent_mm"] = parent.max_extent_mm
    info = save_model(network, model_dir, name, extra)
    validator.say(f"saved model {info.name!r} to {info.weights}")
    return TrainingResult(info, summary)
