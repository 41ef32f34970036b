"""The training loss: image similarity + diffusion regulariser + optional soft Dice on labels.

The Dice term on warped labels makes training semi-supervised, as VoxelMorph's; with the
similarity weight at 0 labels alone teach the alignment, as SynthMorph's loss.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..nn.losses import soft_dice
from ..nn.networks import integrate_velocity, warp
from ..nn.regularizers import diffusion
from .config import TrainingConfig
from .pairs import TrainingItem
from .precision import autocast

Velocity = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def dice_loss(fixed: torch.Tensor, moving: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Soft Dice of one-hot moving labels warped by ``flow`` against the fixed labels.

    One-hot over the labels present in this pair only (background left out), which keeps the
    channel count — and the cost of warping them — as small as the pair allows.
    """
    values, inverse = torch.unique(torch.stack([fixed, moving]), return_inverse=True)
    count = len(values)
    fixed_1h = F.one_hot(inverse[0, :, 0], count).movedim(-1, 1).float()
    moving_1h = F.one_hot(inverse[1, :, 0], count).movedim(-1, 1).float()
    keep = slice(1, None) if values[0] == 0 and count > 1 else slice(None)
    return soft_dice(fixed_1h[:, keep], warp(moving_1h[:, keep], flow))


def training_losses(
    velocity_of: Velocity,
    items: Sequence[TrainingItem],
    config: TrainingConfig,
    similarity: Callable[..., torch.Tensor],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The weighted total ("loss") and its terms, named as the log's columns; a term whose
    weight is 0 is not computed (nor logged). ``velocity_of(fixed, moving)`` is the network's
    velocity as the loss sees it (one pass, or the engine's recursive passes)."""
    fixed = torch.cat([i.fixed for i in items]).to(device)
    moving = torch.cat([i.moving for i in items]).to(device)
    with autocast(device, config.mixed_precision):
        velocity = velocity_of(fixed, moving)
    flow = integrate_velocity(velocity.float(), config.network.integration_steps)
    terms = {"regularization": diffusion(flow), "dice_loss": flow.new_zeros(())}
    if config.similarity_weight > 0:
        terms["similarity"] = similarity(fixed, warp(moving, flow))
    labelled = [(n, i.labels) for n, i in enumerate(items) if i.labels is not None]
    if config.dice_weight > 0 and labelled:
        terms["dice_loss"] = sum(
            dice_loss(f.to(device), m.to(device), flow[n : n + 1]) for n, (f, m) in labelled
        ) / len(labelled)
    total = config.regularization * terms["regularization"]
    total = total + config.dice_weight * terms["dice_loss"]
    if "similarity" in terms:
        total = total + config.similarity_weight * terms["similarity"]
    return {"loss": total, **terms}
