"""The batch of a training step: synthetic and real pairs, each drawn from its own generator.

A batch item's generator is seeded by (seed, step, its place in the whole step's batch), so a
step's batch never depends on how the run was interrupted, and N processes with batch b (process
r draws places r·b … r·b + b − 1) draw exactly the pairs that one process with batch N·b draws.
"""

from __future__ import annotations

import torch

from .config import TrainingConfig
from .pairs import RealPairs, TrainingItem
from .synthesis import Synthesiser

# Places in the batch are this far apart in seed space (a CPU generator keeps only a seed's low
# 32 bits): golden-ratio multiples of 2**32, so the seeds of the first 1024 places stay ≥ 1.9
# million apart, more steps than any run takes.
_PLACE_STRIDE = 2_654_435_761


def item_generator(seed: int, step: int, place: int, device: torch.device) -> torch.Generator:
    """The generator of batch place ``place`` at ``step`` (place 0: the seed of a batch-1 run)."""
    return torch.Generator(device=device).manual_seed(
        seed * 1_000_003 + step + place * _PLACE_STRIDE
    )


def draw_item(
    config: TrainingConfig,
    synthesiser: Synthesiser,
    real: RealPairs | None,
    generator: torch.Generator,
) -> TrainingItem:
    """A real pair's random crop (with probability ``real_fraction``) or a synthetic pair."""
    device = synthesiser.device
    if (
        real is not None
        and float(torch.rand((), generator=generator, device=device)) < config.real_fraction
    ):
        seed = int(torch.randint(2**62, (), generator=generator, device=device))
        return real.draw(torch.Generator().manual_seed(seed), config.shape)
    pair = synthesiser(generator)
    return TrainingItem(pair.fixed, pair.moving, (pair.fixed_labels, pair.moving_labels))


def draw_batch(
    config: TrainingConfig,
    synthesiser: Synthesiser,
    real: RealPairs | None,
    step: int,
    rank: int = 0,
) -> list[TrainingItem]:
    """Process ``rank``'s ``config.batch_size`` items of ``step``'s batch."""
    first = rank * config.batch_size
    return [
        draw_item(
            config, synthesiser, real, item_generator(config.seed, step, place, synthesiser.device)
        )
        for place in range(first, first + config.batch_size)
    ]
