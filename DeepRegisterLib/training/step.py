"""One optimisation step: draw this process's share of the batch, compute the loss, update.

In a distributed run the network's velocity runs through
:class:`~torch.nn.parallel.DistributedDataParallel`, which averages the gradients of all
processes in the backward pass: every process then takes the same Adam step and the weights stay
identical everywhere, as if one process had trained on the whole batch.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ..nn.losses import similarity_function
from ..nn.networks import VxmDense
from .batches import draw_batch
from .config import TrainingConfig
from .distributed import Ranks
from .objective import training_losses
from .pairs import RealPairs
from .synthesis import Synthesiser


class _Velocity(nn.Module):
    """The velocity the loss sees, as a module's forward: DDP averages the gradients only of
    what runs through its wrapped module's forward."""

    def __init__(self, network: VxmDense, passes: int):
        super().__init__()
        self.network, self.passes = network, passes

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        if self.passes:
            return self.network.recursive_velocity(fixed, moving, self.passes)
        return self.network.velocity(fixed, moving)


class TrainingStep:
    """Runs step after step of one run; built after the weights are loaded, because DDP
    copies the main process's weights to all the others when it wraps the network."""

    def __init__(
        self,
        network: VxmDense,
        optimiser: torch.optim.Optimizer,
        config: TrainingConfig,
        synthesiser: Synthesiser,
        real: RealPairs | None,
        ranks: Ranks,
    ):
        self.optimiser, self.config, self.ranks = optimiser, config, ranks
        self.synthesiser, self.real = synthesiser, real
        self.device = next(network.parameters()).device
        self.similarity = similarity_function(config.similarity)
        self.velocity: nn.Module = _Velocity(network, config.passes)
        if ranks.is_distributed:
            devices = [self.device] if self.device.type == "cuda" else None
            self.velocity = DistributedDataParallel(self.velocity, device_ids=devices)

    def __call__(self, step: int) -> dict[str, float]:
        """Train on ``step``'s batch; the loss and its terms, averaged over all processes."""
        config = self.config
        items = draw_batch(config, self.synthesiser, self.real, step, self.ranks.rank)
        losses = training_losses(self.velocity, items, config, self.similarity, self.device)
        # Averaged before the update: every process sees a non-finite loss anywhere and stops.
        values = self.ranks.mean(torch.stack([v.detach() for v in losses.values()]))
        if not torch.isfinite(values[0]):
            raise RuntimeError(f"the loss became {float(values[0])} at step {step}")
        self.optimiser.zero_grad(set_to_none=True)
        for group in self.optimiser.param_groups:
            group["lr"] = config.learning_rate_at(step)
        losses["loss"].backward()
        self.optimiser.step()
        return dict(zip(losses, values.tolist(), strict=True))
