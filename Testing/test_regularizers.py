"""The flow penalties: their hand-written gradients equal autograd's of the plain definitions;
det J is the metric's; and optimising with the folding penalty leaves no fold where the same
optimisation without it folds."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from DeepRegisterLib.imaging import metrics
from DeepRegisterLib.nn.networks import integrate_velocity
from DeepRegisterLib.nn.regularizers import (
    _add_gradient_adjoint,
    _cofactors,
    _gradient,
    _jacobian,
    diffusion,
    flow_jacobian_determinant,
    folding_penalty,
)
from DeepRegisterLib.registration.optimisation import optimise_velocity
from DeepRegisterLib.registration.presets import Level


def blurred(field: torch.Tensor, passes: int = 2) -> torch.Tensor:
    pool = F.avg_pool3d if field.dim() == 5 else F.avg_pool2d
    for _ in range(passes):
        field = pool(field, 3, stride=1, padding=1, count_include_pad=False)
    return field


@pytest.mark.parametrize("dim", [2, 3])
def test_the_jacobian_of_a_linear_flow_is_its_determinant_everywhere(dim: int) -> None:
    matrix = torch.tensor([[0.3, -0.2, 0.1], [0.25, -0.4, 0.05], [-0.1, 0.2, 0.6]])[:dim, :dim]
    shape = (9, 10, 11)[:dim]
    points = torch.stack(
        torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in shape), indexing="ij")
    )
    flow = torch.einsum("rc,c...->r...", matrix, points)[None]
    expected = torch.linalg.det(torch.eye(dim) + matrix)
    torch.testing.assert_close(flow_jacobian_determinant(flow), expected.expand(1, *shape))


def test_the_jacobian_agrees_with_the_metric_on_the_image_grid() -> None:
    generator = torch.Generator().manual_seed(3)
    flow = blurred(torch.randn((1, 3, 14, 15, 16), generator=generator) * 10, passes=3)
    # metrics.jacobian_determinant reads a physical (x, y, z) displacement on an image whose
    # array is (z, y, x): channel r of the flow moves along array axis r.
    vectors = flow[0].flip(0).permute(1, 2, 3, 0).double().numpy()
    displacement = sitk.GetImageFromArray(vectors, isVector=True)
    expected = sitk.GetArrayFromImage(metrics.jacobian_determinant(displacement))
    ours = flow_jacobian_determinant(flow)[0].numpy()
    inner = (slice(1, -1),) * 3  # one-sided differences at the border may differ
    np.testing.assert_allclose(ours[inner], expected[inner], atol=1e-5)
    assert (expected <= 0).any(), "the field should fold somewhere, or the test shows little"


def test_the_folding_penalty_counts_only_what_falls_below_the_margin() -> None:
    identity = torch.zeros((1, 3, 8, 8, 8))
    assert float(folding_penalty(identity)) == 0.0
    flip = torch.zeros((1, 2, 8, 8))
    flip[0, 0] = -1.5 * torch.arange(8.0).view(8, 1)  # det J = 1 − 1.5 everywhere
    assert float(folding_penalty(flip, margin=0.05)) == pytest.approx(0.55)


@pytest.mark.parametrize("shape", [(40, 40), (24, 24, 24)], ids=["2d", "3d"])
def test_optimising_with_the_folding_penalty_leaves_no_fold(shape: tuple[int, ...]) -> None:
    """Unrelated noise images and no smoothness weight: the optimisation folds, unless told
    not to."""
    generator = torch.Generator().manual_seed(0)
    fixed = blurred(torch.rand((1, 1, *shape), generator=generator))
    moving = blurred(torch.rand((1, 1, *shape), generator=generator))
    levels = [(shape, Level(1.0, 60, 5, control_mm=1.0))]

    def folded_share(weight: float) -> float:
        velocity, trace = optimise_velocity(
            fixed, moving, None, levels, similarity="mse", regularization=0.0,
            learning_rate=1.0, window=5, folding_weight=weight,
        )  # fmt: skip
        assert trace[-1] < trace[0]
        det = flow_jacobian_determinant(integrate_velocity(velocity, 5))
        return float((det <= 0).float().mean())

    assert folded_share(0.0) > 0.005
    assert folded_share(10.0) == 0.0


def test_a_wider_folding_margin_keeps_the_field_unfolded_between_its_nodes() -> None:
    """The engine samples its 2 mm field at 1 mm, between the nodes the penalty sees: there a
    field whose nodes all keep det J above 0.05 can fold, and one kept above 0.15 does not."""
    shape = (24, 24, 24)
    generator = torch.Generator().manual_seed(2)
    fixed = blurred(torch.rand((1, 1, *shape), generator=generator))
    moving = blurred(torch.rand((1, 1, *shape), generator=generator))
    levels = [(shape, Level(1.0, 60, 5, control_mm=1.0))]

    def folded_shares(margin: float) -> tuple[float, float]:
        velocity, _ = optimise_velocity(
            fixed, moving, None, levels, similarity="mse", regularization=0.0,
            learning_rate=1.0, window=5, folding_weight=10.0, folding_margin=margin,
        )  # fmt: skip
        flow = integrate_velocity(velocity, 5)
        finer = F.interpolate(flow, scale_factor=2, mode="trilinear", align_corners=False) * 2
        return tuple(
            float((flow_jacobian_determinant(f) <= 0).float().mean()) for f in (flow, finer)
        )

    nodes, between = folded_shares(0.05)
    assert nodes == 0.0
    assert between > 0.0
    assert folded_shares(0.15) == (0.0, 0.0)


def plain_diffusion(flow: torch.Tensor) -> torch.Tensor:
    spatial = flow.dim() - 2
    return sum(torch.diff(flow, dim=axis).pow(2).mean() for axis in range(2, flow.dim())) / spatial


def plain_folding_penalty(flow: torch.Tensor, margin: float) -> torch.Tensor:
    """The definition, through autograd: det J from ``torch.gradient`` and a cofactor
    expansion (``torch.linalg.det`` of the stacked matrices)."""
    spatial = flow.dim() - 2
    grads = torch.gradient(flow, dim=tuple(range(2, flow.dim())))  # grads[c][:, r] = ∂u_r/∂x_c
    jacobian = torch.stack(grads, dim=-1).movedim(1, -2)  # (N, *shape, r, c)
    det = torch.linalg.det(torch.eye(spatial, dtype=flow.dtype) + jacobian)
    return F.relu(margin - det).mean()


@pytest.mark.parametrize(
    "shape", [(2, 5), (7, 9), (3, 2, 6), (6, 7, 8)], ids=["2d-thin", "2d", "3d-thin", "3d"]
)
@pytest.mark.parametrize("batch", [1, 2])
def test_the_penalties_value_and_gradient_equal_autograds_of_their_definitions(
    shape: tuple[int, ...], batch: int
) -> None:
    generator = torch.Generator().manual_seed(len(shape) * 10 + batch)
    flow = torch.randn((batch, len(shape), *shape), generator=generator, dtype=torch.float64)
    # Large enough that some voxels fold and others do not: both branches of the penalty.
    flow = 0.6 * flow
    weights = torch.rand(2, generator=generator, dtype=torch.float64) + 0.5

    def value_and_gradient(penalties) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = flow.clone().requires_grad_(True)
        value = weights[0] * penalties[0](leaf) + weights[1] * penalties[1](leaf, 0.05)
        value.backward()
        return value.detach(), leaf.grad

    ours = value_and_gradient((diffusion, folding_penalty))
    plain = value_and_gradient((plain_diffusion, plain_folding_penalty))
    det = flow_jacobian_determinant(flow)
    assert bool((det < 0.05).any())
    assert bool((det > 0.05).any())
    torch.testing.assert_close(ours[0], plain[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], plain[1], rtol=1e-10, atol=1e-12)


def test_a_flow_that_folds_nowhere_gets_no_folding_gradient() -> None:
    flow = 0.01 * torch.randn((1, 3, 6, 7, 8), generator=torch.Generator().manual_seed(5))
    leaf = flow.requires_grad_(True)
    penalty = folding_penalty(leaf)
    penalty.backward()
    assert float(penalty.detach()) == 0.0
    assert torch.equal(leaf.grad, torch.zeros_like(flow))


@pytest.mark.parametrize("shape", [(2, 5), (3, 2, 6), (6, 7, 8)], ids=["2d", "3d-thin", "3d"])
def test_the_jacobians_differences_are_torch_gradients_bit_for_bit(shape: tuple[int, ...]) -> None:
    flow = torch.randn((2, len(shape), *shape), generator=torch.Generator().manual_seed(6))
    axes = tuple(range(2, flow.dim()))
    for axis, expected in zip(axes, torch.gradient(flow, dim=axes), strict=True):
        assert torch.equal(_gradient(flow, axis), expected)


def whole_grid_folding_gradient(flow: torch.Tensor, margin: float) -> torch.Tensor:
    """The penalty's backward computed on every voxel of the grid, as before it kept to the
    folds' box."""
    folded = margin - flow_jacobian_determinant(flow) > 0
    weight = folded.to(flow.dtype).mul_(-1.0 / folded.numel())
    cofactors = _cofactors(_jacobian(flow))
    out = torch.zeros_like(flow)
    for r in range(flow.shape[1]):
        for c in range(flow.shape[1]):
            _add_gradient_adjoint(out.select(1, r), cofactors[r][c] * weight, 1 + c)
    return out


@pytest.mark.parametrize(
    "where",
    [(slice(5, 8), slice(9, 12), slice(4, 6)), (slice(0, 3), slice(14, 16), slice(8, 10))],
    ids=["inside", "at-the-edges"],
)
@pytest.mark.parametrize("batch", [1, 2])
def test_the_folding_gradient_kept_to_the_folds_box_is_the_whole_grids_to_the_bit(
    where: tuple[slice, ...], batch: int
) -> None:
    """Folds in a small box (one touching the grid's first and last voxels along some axes):
    the backward pass on that box alone gives the same bits, and nothing outside it."""
    generator = torch.Generator().manual_seed(7)
    flow = 0.02 * torch.randn((batch, 3, 12, 16, 14), generator=generator)
    size = tuple(axis.stop - axis.start for axis in where)
    flow[(-1, slice(None), *where)] += torch.randn((3, *size), generator=generator)
    leaf = flow.clone().requires_grad_(True)
    folding_penalty(leaf, 0.05).backward()
    expected = whole_grid_folding_gradient(flow, 0.05)
    folded = flow_jacobian_determinant(flow) < 0.05
    assert 0 < int(folded.sum()) < folded.numel() // 20, "a few folds, or the box is the grid"
    assert torch.equal(leaf.grad, expected)
    assert int((expected != 0).sum()) > int(folded.sum())
