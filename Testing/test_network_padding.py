"""The network runs on any grid size: its input is zero-padded to the U-Net's size multiple and
its velocity cropped back, so the engine's grids need not grow to that multiple."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from DeepRegisterLib.nn.networks import NetworkConfig, VxmDense

SMALL = dict(encoder=(8, 8, 8), decoder=(8, 8, 8, 8))  # size multiple 8


def a_network(dim: int) -> VxmDense:
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=dim, **SMALL)).eval()
    for parameter in network.flow.parameters():  # an untrained head predicts ~0: scale it up
        parameter.data.normal_(std=0.1)
    return network


def a_pair(shape: tuple[int, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand((1, 1, *shape), generator=generator), torch.rand(
        (1, 1, *shape), generator=generator
    )


@pytest.mark.parametrize("shape", [(13, 10), (11, 16, 9)], ids=["2d", "3d"])
def test_a_grid_off_the_multiple_is_padded_evenly_with_zeros_and_cropped_back(shape) -> None:
    network = a_network(len(shape))
    fixed, moving = a_pair(shape)
    # By hand: each axis padded to 16, the odd voxel after, as F.pad takes them (last axis first).
    before = [(16 - n) // 2 for n in shape]
    after = [16 - n - b for n, b in zip(shape, before, strict=True)]
    pads = [p for b, a in zip(before[::-1], after[::-1], strict=True) for p in (b, a)]
    crop = tuple(slice(b, b + n) for b, n in zip(before, shape, strict=True))

    with torch.inference_mode():
        velocity = network.velocity(fixed, moving)
        padded = network.flow(network.unet(F.pad(torch.cat([moving, fixed], dim=1), pads)))

    assert velocity.shape == (1, len(shape), *shape)
    assert velocity.is_contiguous()
    torch.testing.assert_close(velocity, padded[(..., *crop)], rtol=0, atol=0)
    assert velocity.abs().max() > 1e-2  # the head was scaled up: the comparison means something


def test_a_grid_on_the_multiple_is_not_padded() -> None:
    network = a_network(3)
    fixed, moving = a_pair((16, 8, 24))
    with torch.inference_mode():
        velocity = network.velocity(fixed, moving)
        direct = network.flow(network.unet(torch.cat([moving, fixed], dim=1)))
    torch.testing.assert_close(velocity, direct, rtol=0, atol=0)


def test_symmetric_and_recursive_passes_run_on_a_grid_off_the_multiple() -> None:
    """Both swap to the inverse field exactly, as on a multiple-sized grid."""
    network = a_network(3)
    fixed, moving = a_pair((11, 14, 10))
    with torch.inference_mode():
        twice = network.recursive_velocity(fixed, moving, 2)
        swapped = network.recursive_velocity(moving, fixed, 2)
    assert twice.shape == (1, 3, 11, 14, 10)
    torch.testing.assert_close(swapped, -twice, rtol=0, atol=0)
