"""What one instance-optimisation level hands the next: a level on a grid coarser than the
velocity it refines, when it ``adds_change`` (`fast`'s 4 mm level), passes on its change, so the
velocity's finer detail (the network's) reaches the finer levels intact; otherwise its own field."""

from __future__ import annotations

import pytest
import torch

from DeepRegisterLib.registration.optimisation import optimise_velocity
from DeepRegisterLib.registration.presets import PRESETS, Level

FINE = (33, 31, 29)  # a coarse level's grid, level_shape(FINE, 2), samples every other voxel
COARSE = (17, 16, 15)


def blob(shift: float) -> torch.Tensor:
    """A smooth bright ball on the fine grid, moved ``shift`` voxels along the first axis."""
    axes = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in FINE), indexing="ij")
    centre = [n / 2 for n in FINE]
    centre[0] += shift
    distance = sum((a - c) ** 2 for a, c in zip(axes, centre, strict=True))
    return torch.exp(-distance / 40.0)[None, None]


def odd_voxel_detail() -> torch.Tensor:
    """A flow that is zero on every voxel the coarse grid samples (even indices on all axes)
    and ±0.3 voxels elsewhere: detail only the fine grid can hold."""
    generator = torch.Generator().manual_seed(0)
    detail = 0.3 * torch.randn((1, 3, *FINE), generator=generator)
    sampled = tuple(slice(None, None, 2) for _ in FINE)
    detail[(slice(None), slice(None), *sampled)] = 0.0
    return detail


def one_coarse_level(
    velocity: torch.Tensor, learning_rate: float, adds_change: bool = True
) -> torch.Tensor:
    level = Level(4.0, 4, 3, control_mm=4.0, adds_change=adds_change)
    refined, _ = optimise_velocity(
        blob(0.0), blob(2.0), None, [(COARSE, level)],
        similarity="mse", regularization=0.1, learning_rate=learning_rate, window=5,
        initial_velocity=velocity,
    )  # fmt: skip
    return refined


def test_a_coarse_level_that_changes_nothing_passes_the_velocity_through_exactly() -> None:
    velocity = odd_voxel_detail() + 0.5
    assert torch.equal(one_coarse_level(velocity, learning_rate=0.0), velocity)


@pytest.mark.parametrize("learning_rate", [0.2, 1.0])
def test_detail_finer_than_a_coarse_level_survives_it_unchanged(learning_rate: float) -> None:
    smooth = torch.full((1, 3, *FINE), 0.2)
    detail = odd_voxel_detail()
    without = one_coarse_level(smooth, learning_rate)
    with_detail = one_coarse_level(smooth + detail, learning_rate)
    assert (without - smooth).abs().max() > 0.05  # the level did move the velocity
    torch.testing.assert_close(with_detail - without, detail, atol=1e-5, rtol=0)


def test_a_coarse_level_that_does_not_add_its_change_hands_on_its_own_smoother_field() -> None:
    velocity = odd_voxel_detail() + 0.5
    handed_on = one_coarse_level(velocity, learning_rate=0.0, adds_change=False)
    assert (handed_on - velocity).abs().max() > 0.1  # the odd-voxel detail is smoothed away


def test_only_fasts_coarse_level_adds_its_change() -> None:
    adding = {
        name: [level.adds_change for level in preset.levels] for name, preset in PRESETS.items()
    }
    assert adding == {
        "fast": [True, False], "balanced": [False, False], "accurate": [False, False],
    }  # fmt: skip
