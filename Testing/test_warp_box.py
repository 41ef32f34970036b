"""Warping with a known reach samples only the box of the output grid that can land near a
non-zero moving voxel, and gives exactly what sampling every voxel gives."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import grid_points, image_on, oblique_grid, rotation_matrix

from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
from DeepRegisterLib.registration import image_warping
from DeepRegisterLib.registration.engine import register
from DeepRegisterLib.registration.image_warping import Reach, sampled_box, warp_images


def _padded_pair(dim: int) -> tuple[Grid, list[tuple[sitk.Image, bool]], Grid]:
    """A fixed grid, and a scan and labels that are non-zero only in a block of their grid."""
    size = (40, 36, 32)[:dim]
    fixed = oblique_grid(dim, size=size)
    moving = oblique_grid(dim, size=size, degrees=25.0, spacing=(1.1, 1.0, 1.2)[:dim])
    rng = np.random.default_rng(3)
    block = tuple(slice(n // 3, n // 3 + n // 4) for n in moving.shape)
    scan = np.zeros(moving.shape, np.float32)
    scan[block] = rng.uniform(-50, 200, size=scan[block].shape)
    labels = np.zeros(moving.shape, np.uint8)
    labels[block] = rng.integers(1, 6, size=labels[block].shape)
    movings = [(image_on(moving, scan), False), (image_on(moving, labels), True)]
    return fixed, movings, moving


def _near_affine(fixed: Grid, moving: Grid, stray_mm: float) -> tuple[np.ndarray, Reach]:
    """A displacement ``x + u(x) = M x + t + e(x)`` with |e| ≤ ``stray_mm``, and its reach."""
    dim = fixed.dim
    matrix = rotation_matrix((1.0, -1.0, 0.5)[:dim], 8.0) @ np.diag((1.05, 0.95, 1.02)[:dim])
    points = grid_points(fixed)
    centre = points.reshape(-1, dim).mean(axis=0)
    # Centre the fixed grid on the moving block's middle, so that part of the grid lands there.
    target = moving.index_to_physical_points(np.asarray(moving.size, float)[None] * 0.4)[0]
    translation = target - matrix @ centre
    rng = np.random.default_rng(4)
    stray = rng.normal(size=points.shape)
    stray *= stray_mm / np.linalg.norm(stray, axis=-1, keepdims=True).max()
    field = points @ matrix.T + translation + stray - points
    largest = float(np.linalg.norm(stray, axis=-1).max())
    return field.astype(np.float32), Reach(matrix, translation, largest)


@pytest.mark.parametrize("dim", [2, 3])
def test_a_reach_skips_voxels_and_changes_no_value(dim: int) -> None:
    fixed, movings, moving = _padded_pair(dim)
    field, reach = _near_affine(fixed, moving, stray_mm=1.5)

    everything = warp_images(movings, field, fixed)
    boxed = warp_images(movings, field, fixed, reach=reach)

    for whole, part in zip(everything, boxed, strict=True):
        np.testing.assert_array_equal(sitk.GetArrayFromImage(part), sitk.GetArrayFromImage(whole))
    box = sampled_box(fixed, moving, reach, tuple(slice(0, n) for n in moving.shape))
    small = sampled_box(
        fixed, moving, reach, tuple(slice(n // 3, n // 3 + n // 4) for n in moving.shape)
    )
    assert math.prod(s.stop - s.start for s in small) < 0.6 * math.prod(fixed.shape)
    # A larger support never gives a smaller box.
    assert all(b.start <= a.start and a.stop <= b.stop for a, b in zip(small, box, strict=True))
    values = sitk.GetArrayFromImage(everything[0])
    assert np.count_nonzero(values) > 100  # the test warps something
    outside = np.ones(values.shape, bool)
    outside[small] = False
    assert not values[outside].any()  # every non-zero value lies in the sampled box


def test_the_box_follows_the_reach() -> None:
    """The box is as tight as the reach says: understating it loses values, so what matters is
    that the engine's reach bounds its displacement (the test below)."""
    fixed, movings, moving = _padded_pair(3)
    field, reach = _near_affine(fixed, moving, stray_mm=12.0)
    everything = sitk.GetArrayFromImage(warp_images(movings[:1], field, fixed)[0])

    boxed = warp_images(movings[:1], field, fixed, reach=reach)[0]
    understated = warp_images(
        movings[:1], field, fixed, reach=Reach(reach.matrix, reach.translation, 0.0)
    )[0]

    np.testing.assert_array_equal(sitk.GetArrayFromImage(boxed), everything)
    assert not np.array_equal(sitk.GetArrayFromImage(understated), everything)


def test_the_engine_warps_what_its_displacement_gives() -> None:
    """The engine warps through a box bounded by ‖A‖ · max |v|, building each voxel's sampling
    point in one pass (not from ``u``); its warped labels equal sampling every voxel through the
    displacement it returns, and its warped image does up to float32's rounding of the points."""
    pair = phantom_pair(demo_grid(3, 40), seed=2)
    result = register(
        pair.fixed, pair.moving, moving_labels={"labels": pair.moving_labels},
        preset="fast", iterations=6, device="cpu",
    )  # fmt: skip
    field = sitk.GetArrayFromImage(result.displacement).astype(np.float32)
    image, labels = warp_images(
        [(pair.moving, False), (pair.moving_labels, True)], field, Grid.of(pair.fixed)
    )
    warped = sitk.GetArrayFromImage(result.warped)
    assert np.count_nonzero(warped) > 1000
    scale = float(np.abs(sitk.GetArrayViewFromImage(pair.moving)).max())
    np.testing.assert_allclose(warped, sitk.GetArrayFromImage(image), rtol=0, atol=1e-5 * scale)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(result.warped_labels["labels"]), sitk.GetArrayFromImage(labels)
    )


def test_all_zero_images_sample_nothing_and_stay_zero() -> None:
    fixed, _, moving = _padded_pair(3)
    zeros = [(image_on(moving, np.zeros(moving.shape, np.float32)), False)]
    field, reach = _near_affine(fixed, moving, stray_mm=1.0)
    assert all(s.stop == s.start for s in sampled_box(fixed, moving, reach, None))
    # A reach that says nothing (a non-finite displacement somewhere) samples everything.
    unknown = Reach(reach.matrix, reach.translation, float("nan"))
    assert sampled_box(fixed, moving, unknown, None) == tuple(slice(0, n) for n in fixed.shape)
    (warped,) = warp_images(zeros, field, fixed, reach=reach)
    assert warped.GetSize() == fixed.size
    assert not sitk.GetArrayFromImage(warped).any()


@pytest.mark.parametrize("dim", [2, 3])
def test_only_the_non_zero_box_becomes_a_tensor_and_itk_agrees(
    dim: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A scan becomes a float tensor only around its non-zero block (plus a voxel), and its
    labels are read from their own integers over the same crop; points landing beyond it, or
    across its edge, get what SimpleITK's resampling gives from the whole image."""
    fixed, movings, moving = _padded_pair(dim)
    field, _ = _near_affine(fixed, moving, stray_mm=1.5)
    converted: dict[str, list[tuple[tuple[int, ...], torch.dtype]]] = {}

    def recording(name: str):
        real = getattr(image_warping, name)

        def record(image: sitk.Image, *args, **kwargs) -> torch.Tensor:
            tensor = real(image, *args, **kwargs)
            converted.setdefault(name, []).append((tuple(tensor.shape), tensor.dtype))
            return tensor

        return record

    for name in ("_as_tensor", "_raw_bits"):
        monkeypatch.setattr(image_warping, name, recording(name))
    warped = warp_images(movings, field, fixed)

    crop = tuple(n // 4 + 2 for n in moving.shape)  # the non-zero block of _padded_pair
    labels_type = torch.from_numpy(sitk.GetArrayFromImage(movings[1][0])).dtype
    assert converted == {"_as_tensor": [(crop, torch.float32)], "_raw_bits": [(crop, labels_type)]}
    transform = sitk.DisplacementFieldTransform(
        image_on(fixed, field.astype(np.float64), vector=True)
    )
    for (image, nearest), ours in zip(movings, warped, strict=True):
        interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        by_itk = sitk.Resample(image, fixed.reference_image(), transform, interpolator, 0.0)
        expected, array = sitk.GetArrayFromImage(by_itk), sitk.GetArrayFromImage(ours)
        assert np.count_nonzero(expected) > 50  # the fixed grid sees the block and beyond
        assert np.count_nonzero(expected) < 0.9 * expected.size
        if nearest:
            np.testing.assert_array_equal(array, expected)
        else:
            np.testing.assert_allclose(array, expected, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("side", ["first", "last"])
def test_an_image_that_reaches_its_border_is_warped_as_itk_does_across_it(
    dim: int, side: str
) -> None:
    """Where the non-zero voxels reach the moving grid's border, points within half a voxel
    beyond it take the border's value and points further out zero, as in SimpleITK; elsewhere
    the crop's zero faces alone give zero."""
    grid = oblique_grid(dim, size=(18, 16, 14)[:dim])
    n = grid.shape[0]
    reaching = slice(0, n // 2) if side == "first" else slice(n // 2, n)
    block = (reaching, *[slice(k // 4, 3 * k // 4) for k in grid.shape[1:]])
    rng = np.random.default_rng(5)
    scan = np.zeros(grid.shape, np.float32)
    scan[block] = rng.uniform(10, 200, size=scan[block].shape)
    labels = np.zeros(grid.shape, np.uint8)
    labels[block] = rng.integers(1, 6, size=labels[block].shape)
    movings = [(image_on(grid, scan), False), (image_on(grid, labels), True)]
    # Outward across that border by 0.5 voxel on average, give or take 0.4: some points stay
    # inside, some land within half a voxel beyond it, some further out.
    outward = -1.0 if side == "first" else 1.0
    steps = np.zeros((*grid.shape, dim))
    steps[..., dim - 1] = outward * rng.uniform(0.1, 0.9, size=grid.shape)  # the array's first axis
    field = steps @ np.asarray(grid.index_to_physical).T
    beyond = np.arange(n).reshape(-1, *[1] * (dim - 1)) + steps[..., dim - 1]
    border_band = (
        (beyond < 0) & (beyond >= -0.5)
        if side == "first"
        else (beyond >= n - 1) & (beyond < n - 0.5)
    )
    assert border_band.any()
    assert (np.abs(beyond - np.clip(beyond, 0, n - 1)) > 0.5).any()  # and further out

    warped = warp_images(movings, field.astype(np.float32), grid)

    transform = sitk.DisplacementFieldTransform(image_on(grid, field, vector=True))
    for (image, nearest), ours in zip(movings, warped, strict=True):
        interpolator = sitk.sitkNearestNeighbor if nearest else sitk.sitkLinear
        by_itk = sitk.GetArrayFromImage(
            sitk.Resample(image, grid.reference_image(), transform, interpolator, 0.0)
        )
        assert np.count_nonzero(by_itk[border_band]) > 0  # the border's value, half a voxel out
        if nearest:
            np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), by_itk)
        else:
            np.testing.assert_allclose(sitk.GetArrayFromImage(ours), by_itk, rtol=0, atol=1e-3)
