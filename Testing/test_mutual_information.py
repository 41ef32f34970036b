"""The sampled Mattes mutual information the affine stage maximises."""

from __future__ import annotations

import math

import pytest
import torch

from DeepRegisterLib.registration.affine_levels import BINS, fixed_bins
from DeepRegisterLib.registration.mutual_information import SampledMutualInformation


@pytest.fixture
def values() -> torch.Tensor:
    return torch.rand(20_000, generator=torch.Generator().manual_seed(0))


def _metric(fixed_values: torch.Tensor) -> SampledMutualInformation:
    return SampledMutualInformation(torch.from_numpy(fixed_bins(fixed_values.numpy())))


def test_an_image_shares_most_information_with_itself_and_none_with_noise(values) -> None:
    metric = _metric(values)
    everywhere = torch.ones_like(values)
    itself = metric(values, everywhere)
    noise = metric(torch.rand(values.shape, generator=torch.Generator().manual_seed(1)), everywhere)
    assert itself > 2.0  # close to log(32) = 3.47 for uniform values, less the Parzen blur
    assert itself < math.log(BINS)
    assert abs(noise) < 0.05


def test_a_monotone_or_inverted_contrast_keeps_the_information(values) -> None:
    metric = _metric(values)
    everywhere = torch.ones_like(values)
    itself = metric(values, everywhere)
    assert float(metric(1.0 - values, everywhere)) == pytest.approx(float(itself), rel=0.02)
    assert metric(values**2, everywhere) > 0.8 * itself


def test_samples_outside_the_moving_image_do_not_count(values) -> None:
    metric = _metric(values)
    inside = (torch.arange(len(values)) % 2 == 0).float()
    scrambled = torch.where(inside > 0, values, torch.rand(values.shape))
    assert metric(scrambled, inside) > 0.9 * metric(values, torch.ones_like(values))
    assert metric(values, torch.zeros_like(values)) == 0.0  # no overlap: no information


def test_the_gradient_is_the_derivative_of_the_information(values) -> None:
    """The B-spline window makes the metric differentiable in each moving value: the gradient
    agrees with central differences along a random direction."""
    fixed = values.double()
    metric = _metric(fixed)
    everywhere = torch.ones_like(fixed)
    moving = (0.7 * fixed + 0.1 * torch.rand(fixed.shape, dtype=torch.float64)).requires_grad_()
    metric(moving, everywhere).backward()
    direction = torch.randn(fixed.shape, dtype=torch.float64)
    step = 1e-4
    with torch.no_grad():
        ahead = metric(moving + step * direction, everywhere)
        behind = metric(moving - step * direction, everywhere)
    numeric = float(ahead - behind) / (2 * step)
    assert float((moving.grad * direction).sum()) == pytest.approx(numeric, rel=1e-3)


def test_poses_measured_together_each_get_their_own_histogram(values) -> None:
    """The affine stage's turned starts are measured at once, (poses, samples): each row's MI
    is the one it has alone, to the bit (each histogram is summed in sample order)."""
    metric = _metric(values)
    generator = torch.Generator().manual_seed(2)
    rows = torch.stack([values, values**2, torch.rand(values.shape, generator=generator)])
    weights = (torch.rand(rows.shape, generator=generator) > 0.3).float()
    together = metric(rows, weights)
    assert together.shape == (3,)
    alone = torch.stack([metric(row, weight) for row, weight in zip(rows, weights, strict=True)])
    assert torch.equal(together, alone)
    assert together[0] > together[1] > together[2]
