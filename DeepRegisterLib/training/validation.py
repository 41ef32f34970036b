"""Validation: mean Dice of the network's flow alone, on real labelled or held-out synthetic pairs.

Real pairs are scored exactly as the engine would run on them (affine first, then the network
on the isotropic grid cropped to the fixed foreground); the best validated weights become the
model. Only the main process validates in a distributed run.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError
from ..imaging.geometry import flow_voxels_to_mm
from ..imaging.metrics import dice_per_label, mean_dice
from ..nn.networks import VxmDense, integrate_velocity, warp
from .checkpoints import RunState, save_weights
from .config import TrainingConfig
from .pairs import PairFiles, prepare_pair
from .precision import autocast
from .synthesis import Synthesiser

SYNTHETIC_VALIDATION_PAIRS = 4

Say = Callable[[str], None]


@dataclass
class ValidationPair:
    """Network inputs of one pair and how to score a voxel flow on it (mean Dice)."""

    name: str
    fixed: torch.Tensor
    moving: torch.Tensor
    score: Callable[[torch.Tensor | None], float]  # None: no deformation (affine only)


def real_validation_pair(
    files: PairFiles, spacing_mm: float, labels: Sequence[int] | None = None
) -> ValidationPair:
    """Mean Dice on the network grid of labels warped by ``A(x + u(x))`` in one resampling.

    Composing the affine and the flow before resampling (as the engine does) keeps the moving
    labels from being interpolated twice, which would penalise the network unfairly.
    """
    if files.fixed_labels is None or files.moving_labels is None:
        raise InputError(f"validation pair {files.name} needs fixed and moving label maps")
    pair = prepare_pair(files, spacing_mm)
    reference = pair.grid.reference_image()
    fixed_labels = sitk.GetImageFromArray(pair.fixed_labels[0, 0].numpy().astype(np.int32))
    pair.grid.apply_to(fixed_labels)

    def score(flow: torch.Tensor | None) -> float:
        transform: sitk.Transform = pair.affine
        if flow is not None:
            mm = flow_voxels_to_mm(flow.detach().double().cpu(), pair.grid)[0]
            field = pair.grid.apply_to(
                sitk.GetImageFromArray(mm.movedim(0, -1).numpy(), isVector=True)
            )
            # ITK applies a composite's last transform first: x ↦ A(x + u(x)).
            transform = sitk.CompositeTransform(
                [pair.affine, sitk.DisplacementFieldTransform(field)]
            )
        warped = sitk.Resample(
            pair.moving_labels_image, reference, transform, sitk.sitkNearestNeighbor, 0
        )
        return mean_dice(dice_per_label(fixed_labels, warped, labels))

    return ValidationPair(pair.name, pair.fixed, pair.moving, score)


def _label_dice(fixed: torch.Tensor, warped: torch.Tensor) -> float:
    """Mean Dice over the non-zero labels of ``fixed`` (integer tensors)."""
    values = [v for v in torch.unique(fixed).tolist() if v != 0]
    scores = []
    for value in values:
        a, b = fixed == value, warped == value
        scores.append(2.0 * float((a & b).sum()) / float(a.sum() + b.sum()))
    return float(np.mean(scores)) if scores else float("nan")


def synthetic_validation_pairs(
    synthesiser: Synthesiser, count: int, seed: int
) -> list[ValidationPair]:
    """Held-out synthetic pairs scored by label Dice: validation that needs no data at all."""
    generator = torch.Generator(device=synthesiser.device).manual_seed(seed + 7_777_777)
    pairs = []
    for index in range(count):
        pair = synthesiser(generator)

        def score(flow: torch.Tensor | None, pair=pair) -> float:
            moving = pair.moving_labels.float()
            if flow is not None:
                moving = warp(moving, flow.to(moving.device), mode="nearest")
            return _label_dice(pair.fixed_labels, moving.round().long())

        pairs.append(ValidationPair(f"synthetic-{index}", pair.fixed, pair.moving, score))
    return pairs


def network_scores(
    network: VxmDense,
    pairs: Sequence[ValidationPair],
    device: torch.device,
    mixed_precision: bool | None = None,
    passes: int = 1,
) -> list[float]:
    """Mean Dice per pair with the network's flow alone (no instance optimisation), from the
    symmetric inference the engine runs (``passes``: as its model JSON says)."""
    was_training = network.training
    network.eval()
    scores = []
    with torch.inference_mode(), autocast(device, mixed_precision):
        for pair in pairs:
            fixed, moving = pair.fixed.to(device), pair.moving.to(device)
            velocity = network.recursive_velocity(fixed, moving, passes).float()
            flow = integrate_velocity(velocity, network.config.integration_steps)
            scores.append(pair.score(flow))
    network.train(was_training)
    return scores


def validation_pairs(
    config: TrainingConfig,
    synthesiser: Synthesiser,
    validation: Sequence[PairFiles],
    eval_labels: Sequence[int] | None,
    say: Say,
) -> list[ValidationPair]:
    """The real labelled pairs given, or held-out synthetic ones: validation needs no data."""
    if validation:
        say(f"preparing {len(validation)} validation pairs (affine + resampling)")
        pairs = [
            real_validation_pair(files, config.spacing_mm, eval_labels) for files in validation
        ]
    else:
        pairs = synthetic_validation_pairs(synthesiser, SYNTHETIC_VALIDATION_PAIRS, config.seed)
    if any(p.fixed.dim() - 2 != config.dim for p in pairs):
        raise InputError(f"the validation pairs must be {config.dim}D, like the training shape")
    return pairs


class Validator:
    """Scores the network on the validation pairs and keeps the best weights in ``best``."""

    def __init__(
        self,
        pairs: list[ValidationPair],
        config: TrainingConfig,
        device: torch.device,
        best: Path,
        say: Say,
    ):
        self.pairs, self.config, self.device, self.best, self.say = pairs, config, device, best, say
        self.affine_scores = [p.score(None) for p in pairs]
        self.affine_only = float(np.mean(self.affine_scores))
        say(f"validation, affine only: mean Dice {self.affine_only:.4f}")

    def scores(self, network: VxmDense) -> list[float]:
        """Each pair's Dice with the network as the engine (and the saved model) runs it."""
        config = self.config
        return network_scores(
            network, self.pairs, self.device, config.mixed_precision, config.inference_passes
        )

    def __call__(self, network: VxmDense, state: RunState) -> list[float]:
        """Validate at ``state.step``; save the weights to ``best`` if they score best so far."""
        scores = self.scores(network)
        score = float(np.mean(scores))
        if score > state.best_score:
            state.best_score, state.best_step = score, state.step
            save_weights(network, self.best)
        each = " ".join(f"{s:.3f}" for s in scores)
        self.say(
            f"step {state.step}: validation mean Dice {score:.4f} (pairs: {each}; best "
            f"{state.best_score:.4f} @ {state.best_step})"
        )
        return scores
