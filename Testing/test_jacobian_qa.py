"""The result's det J and its QA figures, made from the deformation ``v`` alone, equal finite
differences of the whole displacement field; without a det J image the figures are the same."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch

from DeepRegisterLib.errors import RegistrationCancelled
from DeepRegisterLib.imaging import metrics
from DeepRegisterLib.imaging.geometry import Grid, affine_parameters
from DeepRegisterLib.registration.jacobian import jacobian_and_qa
from DeepRegisterLib.registration.warping import Displacement, deformed_box


def never() -> bool:
    return False


def oblique_case(seed: int = 0) -> tuple[Displacement, np.ndarray, Grid]:
    """A rough ``v`` on a 2 mm grid inside an oblique, anisotropic fixed grid, behind an affine
    that scales (det A ≠ 1)."""
    fixed = sitk.Image([30, 26, 22], sitk.sitkFloat32)
    fixed.SetSpacing((0.9, 1.1, 1.3))
    fixed.SetOrigin((4.0, -3.0, 7.0))
    rotation = sitk.VersorTransform((0.1, -0.2, 0.3), 0.4).GetMatrix()
    fixed.SetDirection(rotation)
    grid = Grid.of(fixed)
    network = grid.with_spacing_cropped_to(2.0, np.array([6, 5, 4]), np.array([22, 19, 16]), 2)
    generator = torch.Generator().manual_seed(seed)
    flow = 0.8 * torch.randn((1, 3, *network.shape), generator=generator)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix((1.1, 0.05, 0.0, -0.02, 0.95, 0.03, 0.0, 0.01, 1.2))
    affine.SetTranslation((1.5, -0.5, 2.0))
    matrix, _ = affine_parameters(affine, 3)
    return Displacement(affine, flow, network, grid), matrix, network


def test_det_j_from_v_equals_the_dense_fields_and_is_det_a_beyond_the_box() -> None:
    field, matrix, network = oblique_case()
    dense = sitk.GetArrayFromImage(metrics.jacobian_determinant(field.image()))
    image, qa = jacobian_and_qa(field, matrix, network, None, True, never)
    ours = sitk.GetArrayFromImage(image)
    assert Grid.of(image) == field.grid
    # The dense field's ramps of ±30 mm cost float32 bits; v's differences do not.
    np.testing.assert_allclose(ours, dense, rtol=1e-5, atol=1e-5)
    beyond = np.ones(ours.shape, dtype=bool)
    beyond[deformed_box(network, field.grid)] = False
    assert beyond.any()
    assert np.all(ours[beyond] == np.float32(np.linalg.det(matrix)))
    assert 0 < qa["folding_percent"] < 50  # a rough v folds somewhere: both counts are tested
    whole = metrics.determinant_statistics(image)
    assert qa["folding_percent"] == whole.folding_percent
    assert qa["sdlogj"] == pytest.approx(whole.sdlogj, rel=1e-12)


def test_the_figures_need_no_image_and_follow_the_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    field, matrix, network = oblique_case(seed=1)
    inside = np.random.default_rng(2).random(field.grid.shape) < 0.6
    region = field.grid.apply_to(sitk.GetImageFromArray(inside.astype(np.uint8)))
    image, _ = jacobian_and_qa(field, matrix, network, None, True, never)
    none, qa = jacobian_and_qa(field, matrix, network, region, False, never)
    assert none is None
    within = metrics.determinant_statistics(image, region)
    assert qa["folding_percent"] == pytest.approx(within.folding_percent, rel=1e-12)
    assert qa["sdlogj"] == pytest.approx(within.sdlogj, rel=1e-12)
    # Two rows a slab: the same image (a one-row halo), and a cancel request is answered.
    monkeypatch.setattr(metrics, "_JACOBIAN_BLOCK_VOXELS", 2 * 26 * 30)
    in_slabs, qa_slabs = jacobian_and_qa(field, matrix, network, region, True, never)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(in_slabs), sitk.GetArrayFromImage(image))
    assert qa_slabs["sdlogj"] == pytest.approx(qa["sdlogj"], rel=1e-12)
    calls = iter(range(100))
    with pytest.raises(RegistrationCancelled, match="det J"):
        jacobian_and_qa(field, matrix, network, region, False, lambda: next(calls) == 3)


def test_a_constant_merges_as_its_voxels_would() -> None:
    statistics, reference = metrics.DeterminantStatistics(), metrics.DeterminantStatistics()
    values = np.array([0.5, 2.0, -1.0, 1.5], dtype=np.float32)
    statistics.add(values)
    statistics.add_constant(0.8, 5)
    statistics.add_constant(-0.1, 2)
    reference.add(np.concatenate([values, np.full(5, 0.8), np.full(2, -0.1)]))
    assert statistics.count == reference.count == 11
    assert statistics.folding_percent == reference.folding_percent == 100 * 3 / 11
    assert statistics.sdlogj == pytest.approx(reference.sdlogj, rel=1e-12)


def _reference_determinant(components: list[np.ndarray], to_index: np.ndarray) -> np.ndarray:
    """det(I + ∂u/∂x) written plainly, with NumPy's gradient and fresh arrays."""
    dim = len(components)
    jacobian = [[np.float32(p == r) + np.zeros_like(components[0]) for r in range(dim)]
                for p in range(dim)]  # fmt: skip
    for p, component in enumerate(components):
        for q in range(dim):
            if component.shape[dim - 1 - q] < 2:
                continue
            du_dq = np.gradient(component, axis=dim - 1 - q, edge_order=1)
            for r in range(dim):
                if to_index[q, r] != 0:
                    jacobian[p][r] = jacobian[p][r] + du_dq * np.float32(to_index[q, r])
    if dim == 2:
        return jacobian[0][0] * jacobian[1][1] - jacobian[0][1] * jacobian[1][0]
    (a, b, c), (d, e, f), (g, h, i) = jacobian
    return a * (e * i - f * h) - b * (d * i - f * g) + c * (d * h - e * g)


@pytest.mark.parametrize(
    ("shape", "aligned"),
    [((7, 9, 11), True), ((7, 9, 11), False), ((2, 5, 6), False), ((1, 5, 6), True),
     ((9, 11), False), ((9, 11), True)],
)  # fmt: skip
def test_det_j_blocks_made_in_place_equal_numpys_gradient_to_the_bit(
    shape: tuple[int, ...], aligned: bool
) -> None:
    """The in-place differences and products give the bits of the plain computation, on
    axis-aligned and oblique grids, with an axis of two voxels and one of one."""
    rng = np.random.default_rng(len(shape) + shape[0])
    dim = len(shape)
    components = [rng.normal(0.0, 0.7, shape).astype(np.float32) for _ in range(dim)]
    spacing = np.diag(rng.uniform(0.5, 2.0, dim))
    rotation = np.linalg.qr(rng.normal(size=(dim, dim)))[0]
    to_index = np.linalg.inv((np.eye(dim) if aligned else rotation) @ spacing)
    kept = [component.copy() for component in components]
    ours = metrics.determinant_block(components, to_index)
    expected = _reference_determinant(components, to_index)
    assert ours.dtype == np.float32
    assert ours.shape == shape
    np.testing.assert_array_equal(ours.view(np.uint32), expected.view(np.uint32))
    for before, after in zip(kept, components, strict=True):
        np.testing.assert_array_equal(before, after)  # the caller's arrays are left as given
