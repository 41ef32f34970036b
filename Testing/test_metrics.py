"""Metrics against hand-computed cases, in 2D and 3D, on oblique anisotropic grids."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.errors import InputError
from DeepRegisterLib.imaging import distances, metrics
from DeepRegisterLib.imaging.geometry import Grid, image_from_array


def _rotation(dim: int) -> np.ndarray:
    """An oblique direction matrix (rotations about two axes in 3D)."""
    a, b = math.radians(25.0), math.radians(-40.0)
    rz = np.array([[math.cos(a), -math.sin(a)], [math.sin(a), math.cos(a)]])
    if dim == 2:
        return rz
    r1 = np.eye(3)
    r1[:2, :2] = rz
    r2 = np.eye(3)
    r2[1:, 1:] = np.array([[math.cos(b), -math.sin(b)], [math.sin(b), math.cos(b)]])
    return r1 @ r2


def _oblique_grid(dim: int) -> Grid:
    size = (14, 11, 9)[:dim]
    spacing = (0.8, 1.7, 2.5)[:dim]
    origin = (-12.0, 30.5, 7.25)[:dim]
    return Grid(size, spacing, origin, tuple(_rotation(dim).ravel()))


def _physical_points(grid: Grid) -> np.ndarray:
    """LPS position of every voxel, shape (*array shape, dim)."""
    index = np.stack(np.meshgrid(*[np.arange(s) for s in grid.size], indexing="ij"), axis=-1)
    points = grid.index_to_physical_points(index.reshape(-1, grid.dim).astype(np.float64))
    # meshgrid "ij" over (I, J, K) gives (I, J, K) order; arrays are (K, J, I).
    return points.reshape(*grid.size, grid.dim).transpose(*reversed(range(grid.dim)), grid.dim)


def _field(vectors: np.ndarray, grid: Grid) -> sitk.Image:
    image = sitk.GetImageFromArray(vectors.astype(np.float64), isVector=True)
    return grid.apply_to(image)


def _labels(array: np.ndarray, grid: Grid | None = None) -> sitk.Image:
    image = sitk.GetImageFromArray(array.astype(np.uint8))
    return grid.apply_to(image) if grid else image


@pytest.mark.parametrize("dim", [2, 3])
def test_identity_field_has_unit_jacobian_and_no_folding(dim: int) -> None:
    grid = _oblique_grid(dim)
    identity = _field(np.zeros((*grid.shape, dim)), grid)

    jacobian = metrics.jacobian_determinant(identity)

    assert jacobian.GetPixelID() == sitk.sitkFloat32
    assert Grid.of(jacobian) == grid
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(jacobian), 1.0)
    assert metrics.folding_percent(jacobian) == 0.0
    assert metrics.sdlogj(jacobian) == 0.0


@pytest.mark.parametrize("dim", [2, 3])
def test_jacobian_of_linear_map_on_oblique_anisotropic_grid_is_its_determinant(dim: int) -> None:
    grid = _oblique_grid(dim)
    x = _physical_points(grid)
    centre = x.reshape(-1, dim).mean(axis=0)
    scale = np.diag([1.3, 0.7, 1.9][:dim])
    # A non-diagonal map in physical space: a wrong spacing or direction handling changes det.
    linear = _rotation(dim).T @ scale @ _rotation(dim) @ scale
    displacement = (x - centre) @ (linear - np.eye(dim)).T

    jacobian = metrics.jacobian_determinant(_field(displacement, grid))

    np.testing.assert_allclose(
        sitk.GetArrayViewFromImage(jacobian), np.linalg.det(linear), rtol=1e-5
    )


@pytest.mark.parametrize("dim", [2, 3])
def test_uniform_scaling_gives_the_scale_product(dim: int) -> None:
    grid = _oblique_grid(dim)
    x = _physical_points(grid)
    scale = np.array([1.5, 0.8, 1.25][:dim])
    displacement = (x - np.asarray(grid.origin)) * (scale - 1.0)

    jacobian = metrics.jacobian_determinant(_field(displacement, grid))

    np.testing.assert_allclose(sitk.GetArrayViewFromImage(jacobian), np.prod(scale), rtol=1e-5)


@pytest.mark.parametrize("dim", [2, 3])
def test_fold_gives_non_positive_determinant_exactly_where_expected(dim: int) -> None:
    spacing = (2.0, 1.0, 0.5)[:dim]
    shape = (4, 5, 12)[-dim:]  # array (K, J, I); the fold runs along I
    # u_x(i) in mm: flat, then a slope of -2 mm/mm between i = 4 and 8, then flat again.
    i = np.arange(shape[-1])
    u_x = -2.0 * np.clip(i - 4, 0, 4) * spacing[0]
    # Central differences give du/dx = 0,0,0,0,-1,-2,-2,-2,-1,0,0,0 → det J = 1 + du/dx.
    expected_det = np.array([1, 1, 1, 1, 0, -1, -1, -1, 0, 1, 1, 1], dtype=np.float32)
    vectors = np.zeros((*shape, dim))
    vectors[..., 0] = u_x
    grid = Grid(tuple(reversed(shape)), spacing, (0.0,) * dim, tuple(np.eye(dim).ravel()))

    jacobian = metrics.jacobian_determinant(_field(vectors, grid))

    det = sitk.GetArrayViewFromImage(jacobian)
    np.testing.assert_allclose(det, np.broadcast_to(expected_det, shape), atol=1e-6)
    assert metrics.folding_percent(jacobian) == pytest.approx(100.0 * 5 / 12)
    no_fold = np.zeros(shape, dtype=np.uint8)
    no_fold[..., :4] = 1
    assert metrics.folding_percent(jacobian, _labels(no_fold, grid)) == 0.0
    assert metrics.sdlogj(jacobian, _labels(no_fold, grid)) == 0.0
    assert metrics.sdlogj(jacobian) > 5.0  # folded voxels count as log(1e-9)


def test_jacobian_in_slabs_equals_the_whole_volume(monkeypatch: pytest.MonkeyPatch) -> None:
    grid = _oblique_grid(3)
    rng = np.random.default_rng(3)
    field = _field(rng.normal(size=(*grid.shape, 3)).cumsum(axis=0) * 0.1, grid)
    whole = sitk.GetArrayFromImage(metrics.jacobian_determinant(field))
    monkeypatch.setattr(metrics, "_JACOBIAN_BLOCK_VOXELS", 2 * grid.size[0] * grid.size[1])

    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(metrics.jacobian_determinant(field)), whole
    )


def test_jacobian_of_a_single_slice_or_voxel_uses_the_axes_it_has() -> None:
    """An axis of length 1 contributes no derivative: a slice's det J is its in-plane one, and
    a single voxel's is 1 (the identity), on an image of its own size either way."""
    in_plane = np.zeros((1, 5, 6, 3), dtype=np.float32)
    in_plane[..., 0] = 0.5 * np.arange(6)  # x stretched by 1.5 in a 1 mm plane
    field = sitk.GetImageFromArray(in_plane, isVector=True)
    np.testing.assert_allclose(sitk.GetArrayFromImage(metrics.jacobian_determinant(field)), 1.5)
    voxel = sitk.GetImageFromArray(np.full((1, 1, 1, 3), 2.0, dtype=np.float32), isVector=True)
    det = sitk.GetArrayFromImage(metrics.jacobian_determinant(voxel))
    assert det.shape == (1, 1, 1)
    assert det.dtype == np.float32
    assert det[0, 0, 0] == 1.0


def test_sdlogj_of_two_known_values() -> None:
    det = np.array([[1.0, math.e], [1.0, math.e]], dtype=np.float32)
    assert metrics.sdlogj(sitk.GetImageFromArray(det)) == pytest.approx(0.5, rel=1e-6)


def test_jacobian_rejects_a_scalar_image() -> None:
    with pytest.raises(InputError, match="components"):
        metrics.jacobian_determinant(sitk.Image([8, 8], sitk.sitkFloat32))


def test_empty_or_misplaced_mask_is_rejected() -> None:
    jacobian = sitk.Image([6, 6], sitk.sitkFloat32) + 1.0
    with pytest.raises(InputError, match="empty"):
        metrics.folding_percent(jacobian, sitk.Image([6, 6], sitk.sitkUInt8))
    with pytest.raises(InputError, match="same grid"):
        metrics.sdlogj(jacobian, sitk.Image([7, 6], sitk.sitkUInt8) + 1)


@pytest.mark.parametrize("dim", [2, 3])
def test_dice_of_two_overlapping_boxes(dim: int) -> None:
    shape = (20,) * dim
    fixed, warped = np.zeros(shape), np.zeros(shape)
    box = (slice(2, 12),) * dim
    shifted = (*box[:-1], slice(7, 17))  # half of the box along I
    fixed[box] = 1
    warped[shifted] = 1
    fixed[(slice(15, 17),) * dim] = 2  # only in fixed
    warped[(0,) * dim] = 3  # only in warped

    dice = metrics.dice_per_label(_labels(fixed), _labels(warped))

    assert dice == {1: pytest.approx(0.5), 2: 0.0}
    assert metrics.mean_dice(dice) == pytest.approx(0.25)
    explicit = metrics.dice_per_label(_labels(fixed), _labels(warped), labels=[1, 3, 9])
    assert explicit[1] == pytest.approx(0.5)
    assert explicit[3] == 0.0
    assert math.isnan(explicit[9])
    assert metrics.mean_dice(explicit) == pytest.approx(0.25)  # the nan label is left out


def test_identical_label_maps_have_dice_one_and_hd95_zero() -> None:
    labels = np.zeros((16, 16, 16))
    labels[3:9, 4:12, 5:10] = 4
    image = _labels(labels)
    assert metrics.dice_per_label(image, image) == {4: 1.0}
    assert distances.hd95(image, image, 4) == pytest.approx(0.0, abs=1e-5)


def test_dice_counts_negative_and_large_labels() -> None:
    fixed = np.array([[-5, -5, 70000, 0]], dtype=np.int32)
    warped = np.array([[-5, 0, 70000, 70000]], dtype=np.int32)
    dice = metrics.dice_per_label(sitk.GetImageFromArray(fixed), sitk.GetImageFromArray(warped))
    assert dice == {-5: pytest.approx(2 / 3), 70000: pytest.approx(2 / 3)}


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.float32])
def test_dice_counted_in_chunks_equals_a_direct_count(monkeypatch, dtype) -> None:
    monkeypatch.setattr(metrics, "_COUNT_CHUNK", 37)  # many chunks, the last one partial
    rng = np.random.default_rng(0)
    fixed = rng.integers(0, 6, size=(9, 10, 11)).astype(dtype)
    warped = np.where(rng.random(fixed.shape) < 0.7, fixed, rng.integers(0, 8, fixed.shape))
    warped = warped.astype(dtype)
    dice = metrics.dice_per_label(sitk.GetImageFromArray(fixed), sitk.GetImageFromArray(warped))
    expected = {
        label: 2
        * np.sum((fixed == label) & (warped == label))
        / (np.sum(fixed == label) + np.sum(warped == label))
        for label in range(1, 6)
    }
    assert list(dice) == list(expected)
    assert dice == pytest.approx(expected, abs=1e-12)


def test_same_grid_tolerates_file_round_off_only() -> None:
    a = sitk.Image([4, 5, 6], sitk.sitkUInt8)
    b = sitk.Image([4, 5, 6], sitk.sitkFloat32)
    b.SetOrigin((1e-6, 0.0, 0.0))
    assert metrics.same_grid(a, b)
    b.SetOrigin((0.01, 0.0, 0.0))
    assert not metrics.same_grid(a, b)
    assert not metrics.same_grid(a, sitk.Image([4, 5, 7], sitk.sitkUInt8))


def test_mean_dice_of_nothing_is_nan() -> None:
    assert math.isnan(metrics.mean_dice({}))
    assert math.isnan(metrics.mean_dice({5: float("nan")}))


def test_dice_rejects_maps_on_different_grids_and_non_integer_labels() -> None:
    a = _labels(np.ones((8, 8)))
    b = _labels(np.ones((8, 8)))
    b.SetSpacing((1.0, 2.0))
    with pytest.raises(InputError, match="same grid"):
        metrics.dice_per_label(a, b)
    fractional = sitk.GetImageFromArray(np.full((8, 8), 0.5, dtype=np.float32))
    with pytest.raises(InputError, match="non-integer"):
        metrics.dice_per_label(a, fractional)


def _brute_force_hd95(a: np.ndarray, b: np.ndarray, spacing: np.ndarray) -> float:
    """Face-connected boundary voxels and all-pairs distances, for small 2D masks."""

    def surface(mask: np.ndarray) -> np.ndarray:
        padded = np.pad(mask, 1)
        interior = padded[1:-1, 1:-1].copy()
        for axis in range(2):
            for step in (1, -1):
                interior &= np.roll(padded, step, axis=axis)[1:-1, 1:-1]
        return np.argwhere(mask & ~interior)[:, ::-1] * spacing  # (x, y) in mm

    sa, sb = surface(a), surface(b)
    distances = np.linalg.norm(sa[:, None] - sb[None], axis=-1)
    return max(np.percentile(distances.min(axis=1), 95), np.percentile(distances.min(axis=0), 95))


def test_hd95_of_concentric_squares_matches_brute_force_on_anisotropic_grid() -> None:
    spacing = np.array([0.7, 1.6])
    inner, outer = np.zeros((30, 30), bool), np.zeros((30, 30), bool)
    inner[10:20, 12:18] = True
    outer[6:24, 5:25] = True
    a, b = _labels(inner), _labels(outer)
    a.SetSpacing(tuple(spacing))
    b.SetSpacing(tuple(spacing))

    value = distances.hd95(a, b)

    assert value == pytest.approx(_brute_force_hd95(inner, outer, spacing))
    assert value == pytest.approx(distances.hd95(b, a))


def test_hd95_of_concentric_spheres_is_the_radius_difference() -> None:
    k, j, i = np.mgrid[:40, :40, :40] - 19.5
    radius = np.sqrt(k**2 + j**2 + i**2)
    small = _labels(np.where(radius <= 8, 5, 0))
    large = _labels(np.where(radius <= 14, 5, 0))

    # Discrete surfaces are accurate to about one voxel.
    assert distances.hd95(small, large, label=5) == pytest.approx(6.0, abs=1.0)


def test_hd95_of_objects_touching_the_image_border() -> None:
    a, b = np.zeros((10, 10)), np.zeros((10, 10))
    a[:, :4] = 1  # columns 0-3, touching three borders
    b[:, :6] = 1  # columns 0-5
    # Shared border surfaces are at distance 0, the inner edges 2 mm apart: most of both
    # surfaces (the border runs) are shared, so the 95th percentile is the edge distance.
    assert distances.hd95(_labels(a), _labels(b)) == pytest.approx(2.0, abs=1e-5)


def test_hd95_of_empty_objects() -> None:
    empty = _labels(np.zeros((10, 10)))
    box = np.zeros((10, 10))
    box[3:6, 3:6] = 2
    assert math.isnan(distances.hd95(empty, empty))
    assert distances.hd95(empty, _labels(box)) == math.inf
    assert math.isnan(distances.hd95(_labels(box), _labels(box), label=7))


@pytest.mark.parametrize("dim", [2, 3])
def test_tre_of_a_known_translation(dim: int) -> None:
    offset = np.array([2.0, -3.0, 1.5][:dim])
    transform = sitk.TranslationTransform(dim, tuple(offset))
    rng = np.random.default_rng(1)
    fixed = rng.uniform(-50, 50, size=(6, dim))
    errors = np.array([0.0, 1.0, 2.0, 0.5, 3.0, 0.0])
    direction = rng.normal(size=(6, dim))
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    moving = fixed + offset + errors[:, None] * direction

    np.testing.assert_allclose(
        distances.target_registration_error(fixed, moving, transform), errors, atol=1e-9
    )


def test_tre_rejects_unpaired_or_wrong_dimension_points() -> None:
    transform = sitk.TranslationTransform(3)
    with pytest.raises(InputError, match="pair up"):
        distances.target_registration_error(np.zeros((3, 3)), np.zeros((4, 3)), transform)
    with pytest.raises(InputError, match="transform is 3D"):
        distances.target_registration_error(np.zeros((3, 2)), np.zeros((3, 2)), transform)
    with pytest.raises(InputError, match=r"\(N, 2\) or \(N, 3\)"):
        distances.target_registration_error(np.zeros(3), np.zeros(3), transform)
    with pytest.raises(InputError, match="NaN"):
        distances.target_registration_error(np.full((1, 3), np.nan), np.zeros((1, 3)), transform)


@pytest.mark.parametrize("dim", [2, 3])
def test_ncc_and_mutual_information(dim: int) -> None:
    rng = np.random.default_rng(0)
    values = rng.normal(size=(12,) * dim)
    a = image_from_array(values)
    assert metrics.ncc(a, a) == pytest.approx(1.0)
    assert metrics.ncc(a, image_from_array(3.0 - 2.0 * values)) == pytest.approx(-1.0)
    assert metrics.mutual_information(a, a) == pytest.approx(2.0)
    noise = image_from_array(rng.normal(size=values.shape))
    assert abs(metrics.ncc(a, noise)) < 0.2
    assert 1.0 <= metrics.mutual_information(a, noise, bins=8) < 1.2


def test_ncc_within_a_mask_and_for_constant_images() -> None:
    values = np.arange(16.0).reshape(4, 4)
    other = values.copy()
    other[0] = [9.0, -3.0, 7.0, 100.0]  # outside the mask, it must not matter
    mask = np.ones((4, 4))
    mask[0] = 0
    a, b = image_from_array(values), image_from_array(other)
    assert metrics.ncc(a, b, _labels(mask)) == pytest.approx(1.0)
    assert metrics.ncc(a, b) < 0.9
    constant = image_from_array(np.ones((4, 4)))
    assert math.isnan(metrics.ncc(a, constant))
    assert math.isnan(metrics.mutual_information(constant, constant))
    with pytest.raises(InputError, match="bins"):
        metrics.mutual_information(a, b, bins=1)


@pytest.mark.parametrize("dim", [2, 3])
def test_inverse_consistency_of_translation_fields(dim: int) -> None:
    fixed_grid = _oblique_grid(dim)
    moving_grid = Grid(fixed_grid.size, fixed_grid.spacing, fixed_grid.origin, fixed_grid.direction)
    shift = np.array([1.2, -0.6, 0.9][:dim])
    forward = _field(np.broadcast_to(shift, (*fixed_grid.shape, dim)), fixed_grid)
    inverse = _field(np.broadcast_to(-shift, (*moving_grid.shape, dim)), moving_grid)

    exact = distances.inverse_consistency_error(forward, inverse)
    assert exact["mean_mm"] == pytest.approx(0.0, abs=1e-9)
    assert exact["max_mm"] == pytest.approx(0.0, abs=1e-9)
    assert 0.0 < exact["fraction_outside"] < 0.5  # T pushes the far edge off the moving grid

    identity = _field(np.zeros((*moving_grid.shape, dim)), moving_grid)
    off = distances.inverse_consistency_error(forward, identity)
    assert off["mean_mm"] == pytest.approx(np.linalg.norm(shift))
    assert off["max_mm"] == pytest.approx(np.linalg.norm(shift))


def test_inverse_consistency_with_mask_and_nowhere_inside() -> None:
    grid = Grid((8, 8), (1.0, 1.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    forward = _field(np.full((8, 8, 2), 100.0), grid)  # everything lands off the inverse grid
    inverse = _field(np.zeros((8, 8, 2)), grid)
    mask = np.zeros((8, 8))
    mask[2:4, 2:4] = 1
    result = distances.inverse_consistency_error(forward, inverse, _labels(mask, grid))
    assert math.isnan(result["mean_mm"])
    assert result["fraction_outside"] == 1.0
    with pytest.raises(InputError, match="dimension"):
        distances.inverse_consistency_error(forward, sitk.Image([4, 4, 4], sitk.sitkVectorFloat64))
