"""The threaded box filter and grid sampler give PyTorch's own results, values and gradients,
whatever the number of threads; the sampler really splits a single image across them (as
PyTorch's batch entries here; the compiled sampler's ranges in test_trilinear_sampler.py)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator

import pytest
import torch
import torch.nn.functional as F

from DeepRegisterLib.nn import filters, trilinear_sampler
from DeepRegisterLib.nn.filters import box_filter, grid_sample


@pytest.fixture
def threads() -> Iterator[None]:
    previous = torch.get_num_threads()
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def batches(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The batch size of every call to PyTorch's grid_sample from here on, with the compiled
    sampler off: every image goes to PyTorch."""
    monkeypatch.setattr(trilinear_sampler, "takes", lambda *arguments: False)
    sizes: list[int] = []
    pytorch_grid_sample = F.grid_sample

    def counting(image: torch.Tensor, grid: torch.Tensor, **options) -> torch.Tensor:
        sizes.append(grid.shape[0])
        return pytorch_grid_sample(image, grid, **options)

    monkeypatch.setattr(filters.F, "grid_sample", counting)
    return sizes


def _clipped_window_means(x: torch.Tensor, window: int) -> torch.Tensor:
    """Each voxel's window mean, one voxel at a time: the definition, slowly."""
    half = window // 2
    shape = x.shape[2:]
    means = []
    for index in itertools.product(*(range(n) for n in shape)):
        box = tuple(
            slice(max(0, i - half), min(n, i + half + 1)) for i, n in zip(index, shape, strict=True)
        )
        means.append(x[(slice(None), slice(None), *box)].mean(dim=tuple(range(2, x.dim()))))
    return torch.stack(means, dim=-1).reshape(x.shape)


@pytest.mark.parametrize("shape", [(9, 20), (4, 13, 10)], ids=["2d", "3d"])
@pytest.mark.parametrize("window", [1, 3, 5, 7])
@pytest.mark.parametrize("channels", [1, 3])
def test_box_filter_averages_the_part_of_each_window_inside_the_grid(
    shape: tuple[int, ...], window: int, channels: int
) -> None:
    # The 3D grid has an axis shorter than the widest windows (``avg_pool`` refuses those).
    generator = torch.Generator().manual_seed(window)
    x = torch.rand((1, channels, *shape), generator=generator, dtype=torch.float64)
    upstream = torch.rand_like(x)

    def value_and_gradient(function) -> tuple[torch.Tensor, torch.Tensor]:
        leaf = x.clone().requires_grad_(True)
        out = function(leaf)
        (out * upstream).sum().backward()
        return out.detach(), leaf.grad

    ours = value_and_gradient(lambda t: box_filter(t, window))
    reference = value_and_gradient(lambda t: _clipped_window_means(t, window))
    torch.testing.assert_close(ours[0], reference[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[1], reference[1], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("window", [3, 5])
def test_box_filter_gradient_is_itself_differentiable(window: int) -> None:
    # The backward pass reuses the forward sum (the window sum is its own adjoint): check both
    # derivatives against finite differences, on a grid with an axis shorter than the window.
    generator = torch.Generator().manual_seed(window)
    x = torch.rand((2, 2, 3, 6, 5), generator=generator, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: box_filter(t, window), (x,))
    assert torch.autograd.gradgradcheck(lambda t: box_filter(t, window), (x,))


@pytest.mark.parametrize(
    ("shape", "least"),
    [((2, 3, 4, 13, 10), 1), ((1, 3, 82, 80, 80), None), ((3, 2, 11, 9), 1)],
    ids=["3d-batch", "3d-brain-grid-size", "2d"],
)
def test_box_filter_plane_by_plane_gives_the_bits_of_all_planes_at_once(
    shape: tuple[int, ...], least: int | None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Large planes (a 2 mm brain grid's velocity channels) are filtered one after the other,
    for the cache; each voxel's sum is the same sequence of additions, so values and
    gradients are the same bits as with every plane at once."""
    generator = torch.Generator().manual_seed(len(shape))
    x = torch.rand(shape, generator=generator)
    upstream = torch.rand(shape, generator=generator)

    def value_and_gradient(planes_from: int) -> tuple[torch.Tensor, torch.Tensor]:
        monkeypatch.setattr(filters, "PLANE_MIN_POINTS", planes_from)
        leaf = x.clone().requires_grad_(True)
        out = box_filter(leaf, 5)
        (out * upstream).sum().backward()
        return out.detach(), leaf.grad

    by_plane = value_and_gradient(least or filters.PLANE_MIN_POINTS)
    assert math.prod(shape[2:]) >= (least or filters.PLANE_MIN_POINTS)
    at_once = value_and_gradient(math.prod(shape) + 1)
    assert torch.equal(by_plane[0], at_once[0])
    assert torch.equal(by_plane[1], at_once[1])


def test_box_filter_refuses_an_even_window() -> None:
    with pytest.raises(ValueError, match="odd window, got 4"):
        box_filter(torch.zeros((1, 1, 8, 8)), 4)


@pytest.mark.parametrize("shape", [(23, 17), (7, 11, 13)], ids=["2d", "3d"])
@pytest.mark.parametrize("mode", ["bilinear", "nearest"])
@pytest.mark.parametrize("padding_mode", ["zeros", "border"])
@pytest.mark.parametrize("count", [1, 2, 3])
def test_grid_sample_matches_pytorch_on_any_number_of_threads(
    shape: tuple[int, ...],
    mode: str,
    padding_mode: str,
    count: int,
    threads: None,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Small grids split too (the number of points is prime or odd: the last chunk is padded).
    monkeypatch.setattr(filters, "PARALLEL_MIN_POINTS", 1)
    torch.set_num_threads(count)
    generator = torch.Generator().manual_seed(count)
    image = torch.rand((1, 2, *shape), generator=generator, dtype=torch.float64)
    # Points reach past the border, where the padding modes differ.
    grid = torch.rand((1, *shape, len(shape)), generator=generator, dtype=torch.float64) * 2.4 - 1.2
    upstream = torch.rand((1, 2, *shape), generator=generator, dtype=torch.float64)

    def values_and_gradients(function) -> tuple[torch.Tensor, ...]:
        image_leaf = image.clone().requires_grad_(True)
        grid_leaf = grid.clone().requires_grad_(True)
        out = function(image_leaf, grid_leaf)
        (out * upstream).sum().backward()
        return out.detach(), image_leaf.grad, grid_leaf.grad

    ours = values_and_gradients(lambda i, g: grid_sample(i, g, mode, padding_mode))
    theirs = values_and_gradients(
        lambda i, g: F.grid_sample(i, g, mode=mode, padding_mode=padding_mode, align_corners=True)
    )
    torch.testing.assert_close(ours[0], theirs[0], rtol=0, atol=0)
    for mine, reference in zip(ours[1:], theirs[1:], strict=True):
        torch.testing.assert_close(mine, reference, rtol=1e-12, atol=1e-12)


def test_grid_sample_splits_one_image_into_a_batch_per_thread(
    threads: None, batches: list[int]
) -> None:
    image = torch.rand((1, 1, 40, 40, 41))
    grid = torch.zeros((1, 40, 40, 41, 3))
    torch.set_num_threads(2)
    grid_sample(image, grid)  # 65 600 points: two chunks of at least PARALLEL_MIN_POINTS_3D
    grid_sample(image[:, :, :2], grid[:, :2, :40, :40])  # too few points to be worth splitting
    torch.set_num_threads(1)
    grid_sample(image, grid)
    assert batches == [2, 1, 1]


def test_grid_sample_splits_3d_points_sooner_when_the_image_needs_no_gradient(
    threads: None, batches: list[int]
) -> None:
    """The affine search samples 20 000 voxels of a moving image that needs no gradient: split.
    Not when each chunk would need a gradient buffer the image's size, nor in 2D."""
    torch.set_num_threads(2)
    image = torch.rand((1, 1, 30, 30, 30))
    points = 2 * filters.PARALLEL_MIN_POINTS_3D
    grid_sample(image, torch.zeros((1, 1, 1, points, 3)))
    grid_sample(image, torch.zeros((1, 1, 1, points - 1, 3)))
    grid_sample(image.clone().requires_grad_(True), torch.zeros((1, 1, 1, points, 3)))
    grid_sample(image[:, :, 0], torch.zeros((1, 1, points, 2)))
    assert batches == [2, 1, 1, 1]


def test_grid_sample_bounds_the_gradient_copies_of_an_image(
    threads: None, batches: list[int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(filters, "PARALLEL_MIN_POINTS", 1)
    monkeypatch.setattr(filters, "PARALLEL_MIN_POINTS_3D", 1)
    image = torch.rand((1, 3, 6, 6, 6))
    grid = torch.zeros((1, 6, 6, 6, 3))
    torch.set_num_threads(filters.MAX_GRADIENT_CHUNKS + 4)
    grid_sample(image, grid)
    grid_sample(image.requires_grad_(True), grid).sum().backward()
    assert batches == [filters.MAX_GRADIENT_CHUNKS + 4, filters.MAX_GRADIENT_CHUNKS]
