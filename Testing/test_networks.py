"""The network: its size, its inference in one or both orders and in passes, and the
integration of its velocity."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import image_on
from small_networks import SMALL, random_pair

from DeepRegisterLib.imaging import metrics
from DeepRegisterLib.imaging.geometry import Grid, flow_voxels_to_mm
from DeepRegisterLib.nn.networks import (
    NetworkConfig,
    VxmDense,
    _normalised_identity,
    integrate_velocity,
    warp,
)


@pytest.mark.parametrize(
    "config",
    [
        NetworkConfig(dim=2),
        NetworkConfig(dim=3),
        NetworkConfig(dim=3, **SMALL),
        NetworkConfig(dim=2, encoder=(4, 8), decoder=(8, 4, 4)),
        NetworkConfig(dim=3, encoder=(16, 32, 32, 32), decoder=(32, 32, 32, 32, 32, 16, 16)),
    ],
    ids=["2d-default", "3d-default", "3d-small", "2d-short", "3d-vxm1"],
)
def test_the_parameter_count_from_the_config_equals_the_real_count(config: NetworkConfig):
    network = VxmDense(config)
    assert config.parameter_count() == sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("dim", [2, 3])
def test_an_untrained_network_predicts_a_near_zero_flow(dim: int) -> None:
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=dim)).eval()
    fixed, moving = random_pair(dim, size=32)
    with torch.inference_mode():
        warped, flow, _ = network(fixed, moving)
    assert flow.abs().max() < 1e-2  # voxels
    assert (warped - moving).abs().max() < 0.05


@pytest.mark.parametrize("dim", [2, 3])
def test_symmetric_inference_swaps_to_the_inverse_field(dim: int) -> None:
    """Swapping fixed and moving negates the velocity, so exp(−v) is exactly the inverse map
    the other order asks for; one pass alone has no such guarantee."""
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=dim, **SMALL)).eval()
    for parameter in network.flow.parameters():  # an untrained head predicts ~0: scale it up
        parameter.data.normal_(std=0.1)
    fixed, moving = random_pair(dim)
    with torch.inference_mode():
        forward = network.symmetric_velocity(fixed, moving)
        backward = network.symmetric_velocity(moving, fixed)
        one_pass = network.velocity(fixed, moving)
        other_pass = network.velocity(moving, fixed)
    torch.testing.assert_close(backward, -forward, rtol=0, atol=0)
    torch.testing.assert_close(forward, (one_pass - other_pass) / 2)
    assert not torch.allclose(one_pass, -other_pass, atol=1e-3)


@pytest.mark.parametrize("dim", [2, 3])
def test_recursive_inference_adds_a_correction_and_still_swaps_to_the_inverse(dim: int) -> None:
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=dim, **SMALL)).eval()
    for parameter in network.flow.parameters():
        parameter.data.normal_(std=0.1)
    fixed, moving = random_pair(dim)
    with torch.inference_mode():
        once = network.recursive_velocity(fixed, moving, 1)
        twice = network.recursive_velocity(fixed, moving, 2)
        swapped = network.recursive_velocity(moving, fixed, 2)
        symmetric = network.symmetric_velocity(fixed, moving)
    torch.testing.assert_close(once, symmetric, rtol=0, atol=0)
    torch.testing.assert_close(swapped, -twice, rtol=0, atol=0)
    assert not torch.allclose(twice, once, atol=1e-3)


def test_one_sided_recursive_inference_runs_one_forward_pass_per_pass() -> None:
    """``symmetric=False`` (what `fast` asks for) is the (fixed, moving) order alone: half the
    forward passes, and the refinement adds the one-sided correction."""
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=3, **SMALL)).eval()
    for parameter in network.flow.parameters():
        parameter.data.normal_(std=0.1)
    fixed, moving = random_pair(3)
    calls = []
    network.unet.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        once = network.recursive_velocity(fixed, moving, 1, symmetric=False)
        assert len(calls) == 1
        twice = network.recursive_velocity(fixed, moving, 2, symmetric=False)
        assert len(calls) == 3
        direct = network.velocity(fixed, moving)
    torch.testing.assert_close(once, direct, rtol=0, atol=0)
    assert not torch.allclose(twice, once, atol=1e-3)


def swirl(dim: int, size: int, turn: float, sigma: float) -> torch.Tensor:
    """A smooth, divergence-free vortex in the first two array axes (voxels), ``turn`` rad/voxel
    at its centre, fading over ``sigma`` voxels."""
    axes = [torch.arange(size, dtype=torch.float64) - (size - 1) / 2] * dim
    centred = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    weight = turn * torch.exp(-(centred**2).sum(0) / (2 * sigma**2))
    velocity = torch.zeros((1, dim, *[size] * dim), dtype=torch.float64)
    velocity[0, 0], velocity[0, 1] = -weight * centred[1], weight * centred[0]
    return velocity


@pytest.mark.parametrize("dim", [2, 3])
def test_integrating_a_smooth_velocity_gives_a_positive_jacobian(dim: int) -> None:
    """The velocity used directly as a displacement folds; its exponential does not (and, the
    velocity being divergence-free, stays close to volume-preserving)."""
    size = 32
    velocity = swirl(dim, size, turn=3.0, sigma=5.0)  # up to ≈ 9 voxels
    grid = Grid(tuple([size] * dim), (1.0,) * dim, (0.0,) * dim, tuple(np.eye(dim).ravel()))

    def det_j(flow: torch.Tensor) -> np.ndarray:
        mm = flow_voxels_to_mm(flow, grid)[0].numpy()
        field = image_on(grid, np.moveaxis(mm, 0, -1).copy(), vector=True)
        return sitk.GetArrayFromImage(metrics.jacobian_determinant(field))

    assert det_j(velocity).min() < 0  # the raw field folds: the test case is demanding
    integrated = det_j(integrate_velocity(velocity, steps=7))
    assert integrated.min() > 0.5
    assert np.abs(integrated - 1).mean() < 0.05


def test_following_only_the_last_squarings_keeps_the_flow_and_approximates_the_gradient() -> None:
    """The optimisation differentiates only the last squarings: the flow is the same to the
    bit, the gradient nears the exact one as more squarings are followed, and it is the exact
    one when all are (and, following none, the linear stand-in alone)."""
    velocity = swirl(3, 32, turn=3.0, sigma=5.0)  # up to ≈ 9 voxels: a demanding case
    upstream = torch.randn(velocity.shape, generator=torch.Generator().manual_seed(0))

    def flow_and_gradient(differentiated: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        parameter = velocity.clone().requires_grad_(True)
        flow = integrate_velocity(parameter, 7, differentiated)
        (flow * upstream.to(flow.dtype)).sum().backward()
        return flow.detach(), parameter.grad

    exact_flow, exact_gradient = flow_and_gradient(None)
    errors = []
    for differentiated in (0, 1, 2, 3, 7):
        flow, gradient = flow_and_gradient(differentiated)
        assert torch.equal(flow, exact_flow)
        errors.append(float((gradient - exact_gradient).norm() / exact_gradient.norm()))
        if differentiated == 0:
            torch.testing.assert_close(gradient, upstream.to(gradient.dtype))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] == 0.0
    assert errors[2] < 0.2  # two squarings followed, as the optimisation does


def plain_warp(image: torch.Tensor, flow: torch.Tensor, padding_mode: str) -> torch.Tensor:
    """``warp`` as plain tensor operations: the flow normalised for grid_sample, reordered to
    x first, plus the identity's coordinates."""
    shape = tuple(flow.shape[2:])
    scale = torch.tensor([2.0 / (n - 1) for n in shape], dtype=flow.dtype)
    moved = (flow * scale.view(1, len(shape), *[1] * len(shape))).flip(1).movedim(1, -1)
    grid = moved + _normalised_identity(shape, flow.device, flow.dtype)
    return F.grid_sample(image, grid, padding_mode=padding_mode, align_corners=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(2, 2, 9, 11), (2, 3, 7, 8, 9)], ids=["2d", "3d"])
def test_warping_samples_at_identity_plus_flow_with_the_same_bits_and_gradients(
    shape: tuple[int, ...], dtype: torch.dtype
) -> None:
    """The sampling grid is written channel by channel (``_SamplingGrid``): its samples, and
    the gradients with respect to both the image and the flow, are the plain definition's."""
    generator = torch.Generator().manual_seed(8)
    image = torch.randn(shape, generator=generator, dtype=dtype)
    flow = 2 * torch.randn((shape[0], len(shape) - 2, *shape[2:]), generator=generator, dtype=dtype)
    upstream = torch.randn(shape, generator=generator, dtype=dtype)

    def warped_and_gradients(function, padding_mode: str) -> tuple[torch.Tensor, ...]:
        leaves = image.clone().requires_grad_(True), flow.clone().requires_grad_(True)
        warped = function(*leaves, padding_mode=padding_mode)
        (warped * upstream).sum().backward()
        return warped.detach(), leaves[0].grad, leaves[1].grad

    for padding_mode in ("zeros", "border"):
        ours = warped_and_gradients(warp, padding_mode)
        plain = warped_and_gradients(plain_warp, padding_mode)
        for a, b in zip(ours, plain, strict=True):
            assert torch.equal(a, b)
        assert bool(ours[2].abs().sum() > 0)
