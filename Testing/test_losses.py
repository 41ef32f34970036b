"""Similarity measures: what instance optimisation computes once per level equals the plain
measure exactly, values and gradients; LNCC and MIND equal their definitions computed apart (by
hand, and in numpy)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from DeepRegisterLib.nn.losses import (
    SIMILARITIES,
    lncc,
    mind,
    mind_descriptor,
    similarity_function,
    similarity_to,
)


@pytest.mark.parametrize("name", SIMILARITIES)
@pytest.mark.parametrize("shape", [(20, 24), (12, 16, 14)], ids=["2d", "3d"])
@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked"])
def test_prepared_similarity_equals_the_plain_measure(
    name: str, shape: tuple[int, ...], masked: bool
) -> None:
    generator = torch.Generator().manual_seed(0)
    fixed = torch.rand((1, 1, *shape), generator=generator)
    moving = torch.rand((1, 1, *shape), generator=generator)
    mask = (torch.rand((1, 1, *shape), generator=generator) > 0.3).float() if masked else None
    window = 5

    def value_and_gradient(measure) -> tuple[torch.Tensor, torch.Tensor]:
        warped = moving.clone().requires_grad_(True)
        value = measure(warped)
        value.backward()
        return value.detach(), warped.grad

    plain = similarity_function(name)
    expected = value_and_gradient(lambda warped: plain(fixed, warped, mask, window))
    prepared = value_and_gradient(similarity_to(name, fixed, mask, window))
    assert torch.equal(prepared[0], expected[0])
    assert torch.equal(prepared[1], expected[1])
    assert expected[1].abs().sum() > 0


@pytest.mark.parametrize("name", SIMILARITIES)
def test_where_the_moving_image_has_no_data_nothing_is_compared(name: str) -> None:
    """Beyond a moving image's field of view (``data`` 0) the warped image is padding: what
    lies there, beyond the reach of every local window, changes neither the loss nor its
    gradient; and the loss is a mean over the whole grid, so that its balance with the
    regularizer stays a whole image's."""
    generator = torch.Generator().manual_seed(1)
    shape = (1, 1, 20, 18, 14)
    fixed, moving, other = (torch.rand(shape, generator=generator) for _ in range(3))
    data = torch.zeros(shape)
    data[:, :, :8] = 1.0
    far = torch.zeros(shape)
    far[:, :, 8 + 3 :] = 1.0  # MIND reaches 3 voxels: a 3-voxel patch 2 voxels away
    window = 3 if name == "mind" else 5
    loss = similarity_to(name, fixed, None, window, data)

    def value_and_gradient(warped: torch.Tensor) -> tuple[float, torch.Tensor]:
        warped = warped.clone().requires_grad_(True)
        value = loss(warped)
        value.backward()
        return float(value.detach()), warped.grad

    value, gradient = value_and_gradient(moving)
    changed_value, changed_gradient = value_and_gradient(moving * (1 - far) + other * far)
    assert changed_value == pytest.approx(value, rel=1e-6)
    torch.testing.assert_close(changed_gradient, gradient, rtol=1e-5, atol=1e-8)
    assert float((gradient * far).abs().sum()) == 0.0
    assert float((gradient * data).abs().sum()) > 0.0
    if name == "mse":
        expected = float((((fixed - moving) ** 2) * data).sum() / data.numel())
        assert value == pytest.approx(expected, rel=1e-6)


def test_local_ncc_of_an_image_with_itself_is_minus_one_even_where_flat() -> None:
    image = torch.zeros((1, 1, 16, 16))
    image[..., 4:12, 4:12] = torch.rand((8, 8), generator=torch.Generator().manual_seed(1))
    assert float(lncc(image, image)) == pytest.approx(-1.0, abs=1e-6)


def test_an_unknown_similarity_is_refused_with_the_choices() -> None:
    with pytest.raises(ValueError, match="lncc, mse, mind"):
        similarity_to("ssd", torch.zeros((1, 1, 4, 4)), None, 3)


# --- the measures' values, computed independently by their definitions ----------------------


def box_mean(a: np.ndarray, window: int) -> np.ndarray:
    """Mean over each ``window``-wide box, counting only the voxels inside the array."""
    half = window // 2
    out = np.empty_like(a)
    for index in np.ndindex(a.shape):
        box = tuple(slice(max(i - half, 0), i + half + 1) for i in index)
        out[index] = a[box].mean()
    return out


def reference_lncc(f: np.ndarray, w: np.ndarray, window: int, mask=None) -> float:
    """−mean of (cov² + ε) / (var_f · var_w + ε) over local boxes, ε = 1e-5: VoxelMorph's squared
    local NCC with the ε in numerator and denominator that this implementation documents."""
    eps = 1e-5
    mu_f, mu_w = box_mean(f, window), box_mean(w, window)
    var_f = np.maximum(box_mean(f * f, window) - mu_f**2, 0)
    var_w = np.maximum(box_mean(w * w, window) - mu_w**2, 0)
    cov = box_mean(f * w, window) - mu_f * mu_w
    cc = (cov**2 + eps) / (var_f * var_w + eps)
    return -float(cc.mean() if mask is None else (cc * mask).sum() / mask.sum())


def reference_mind(image: np.ndarray, window: int, distance: int = 2) -> np.ndarray:
    """Heinrich et al. (2012) MIND over the 2·dim neighbours at ``distance`` voxels (edges
    replicated), channel axis first: D_r(x) = box mean of (I(x) − I(x − r))²,
    V(x) = mean_r D_r(x) (floored at 1e-3 of its image mean, + 1e-8), exp(−D_r / V) scaled so
    that each voxel's largest entry is 1."""
    distances = []
    for axis in range(image.ndim):
        positions = np.arange(image.shape[axis])
        for step in (distance, -distance):
            moved = np.take(image, np.clip(positions - step, 0, len(positions) - 1), axis=axis)
            distances.append(box_mean((image - moved) ** 2, window))
    d = np.stack(distances)
    variance = d.mean(axis=0)
    variance = np.maximum(variance, 1e-3 * variance.mean() + 1e-8)
    descriptor = np.exp(-d / variance)
    return descriptor / np.maximum(descriptor.max(axis=0), 1e-6)


def test_lncc_of_a_three_voxel_row_worked_by_hand() -> None:
    """fixed (0, 1, 2), warped (0, 1, 1), window 3 (boxes clipped at the ends):
    voxel 0: {0,1} vs {0,1}: cov = var = 1/4, cc = 1; voxel 2: {1,2} vs {1,1}: cov = var_w = 0,
    cc = ε/ε = 1; voxel 1: var_f = 2/3, var_w = 2/9, cov = 1 − 2/3 = 1/3, cc = (1/9 + ε) /
    (4/27 + ε) ≈ 3/4."""
    eps = 1e-5
    expected = -(1 + (1 / 9 + eps) / (4 / 27 + eps) + 1) / 3
    fixed = torch.tensor([[[[0.0, 1.0, 2.0]]]], dtype=torch.float64)
    warped = torch.tensor([[[[0.0, 1.0, 1.0]]]], dtype=torch.float64)
    assert float(lncc(fixed, warped, window=3)) == pytest.approx(expected, rel=1e-12)
    assert expected == pytest.approx(-11 / 12, abs=1e-4)


@pytest.mark.parametrize("shape", [(7, 9), (5, 6, 7)], ids=["2d", "3d"])
@pytest.mark.parametrize("masked", [False, True], ids=["whole", "masked"])
def test_lncc_and_mind_equal_their_definitions_computed_in_numpy(
    shape: tuple[int, ...], masked: bool
) -> None:
    rng = np.random.default_rng(4)
    fixed = rng.uniform(0, 1, shape)
    warped = 0.6 * fixed + 0.4 * rng.uniform(0, 1, shape)  # related, not equal
    mask = (rng.uniform(0, 1, shape) > 0.4).astype(np.float64) if masked else None

    def tensor(a: np.ndarray | None) -> torch.Tensor | None:
        return None if a is None else torch.from_numpy(a)[None, None]

    ours = float(lncc(tensor(fixed), tensor(warped), tensor(mask), window=5))
    assert ours == pytest.approx(reference_lncc(fixed, warped, 5, mask), rel=1e-10)
    assert -1 < ours < -0.1  # neither perfect nor unrelated: the value says something

    descriptor = mind_descriptor(tensor(fixed), window=3)[0].numpy()
    np.testing.assert_allclose(descriptor, reference_mind(fixed, window=3), rtol=1e-10)
    per_voxel = ((reference_mind(fixed, 3) - reference_mind(warped, 3)) ** 2).mean(axis=0)
    expected = per_voxel.mean() if mask is None else (per_voxel * mask).sum() / mask.sum()
    ours = float(mind(tensor(fixed), tensor(warped), tensor(mask), window=3))
    assert ours == pytest.approx(expected, rel=1e-10)
    assert ours > 1e-3
