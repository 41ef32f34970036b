"""The conventions that must never drift, pinned on OBLIQUE, ANISOTROPIC grids in 2D and 3D.

* ``result.displacement`` is a vector image on the fixed grid, LPS mm, with ``T(x) = x + u(x)``
  mapping fixed points to moving points, so ``warped(x) = moving(T(x))`` (ITK resampling).
* Arrays are (K, J, I); a network flow has one channel per array axis (channel 0 = K in 3D) and
  converts to mm as ``D · diag(spacing) · d_ijk``.

How the expected displacement is derived (the phantom is an analytic function ``f`` of LPS mm):
the fixed image is ``fixed(x) = f(x)`` and the moving image is built as
``moving(y) = f(S⁻¹(y))`` for a known point map ``S``. The registration must make
``warped(x) = moving(T(x)) = f(S⁻¹(T(x)))`` equal ``f(x)``, hence ``T = S`` and
``u(x) = S(x) − x``. For a pure shift ``S(x) = x + t`` this reads: the moving image is the fixed
image translated by +t mm (``moving(y) = fixed(y − t)``), and ``u = +t``.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import Phantom, grid_centre, grid_points, image_on, oblique_grid, rotation_matrix
from hypothesis import given, settings
from hypothesis import strategies as st

from DeepRegisterLib.imaging.geometry import Grid, flow_voxels_to_mm
from DeepRegisterLib.nn.networks import warp
from DeepRegisterLib.registration.engine import register
from DeepRegisterLib.registration.image_warping import warp_image


def known_linear_map(kind: str, dim: int, centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(M, b) of a known ``S(x) = M x + b``: a shift, a rotation about ``centre`` plus a shift,
    or a general affine map (scale + shear) about ``centre`` plus a shift."""
    if kind == "translation":
        return np.eye(dim), np.array([3.0, -2.0, 2.5][:dim])
    if kind == "rotation":
        matrix = rotation_matrix((2.0, -1.0, 1.0)[:dim], 10.0)
        shift = np.array([1.5, 1.5, -1.0][:dim])
    else:
        matrix = np.array([[1.06, 0.05, -0.03], [-0.04, 0.95, 0.06], [0.02, -0.05, 1.04]])
        matrix = matrix[:dim, :dim]
        shift = np.array([-2.0, 1.0, 1.5][:dim])
    return matrix, centre - matrix @ centre + shift


def as_sitk_affine(matrix: np.ndarray, offset: np.ndarray) -> sitk.AffineTransform:
    transform = sitk.AffineTransform(len(offset))
    transform.SetMatrix(tuple(matrix.ravel()))
    transform.SetTranslation(tuple(offset))
    return transform


def moving_through(phantom: Phantom, fixed_grid: Grid, matrix: np.ndarray, offset: np.ndarray):
    """``moving(y) = f(S⁻¹(y))`` with ``S(x) = M x + b``, sampled on a grid of its own: another
    oblique direction and anisotropy, centred where ``S`` takes the fixed grid's centre."""
    dim = fixed_grid.dim
    centre = matrix @ grid_centre(fixed_grid) + offset
    grid = oblique_grid(
        dim,
        size=(38, 42, 34)[:dim],
        spacing=(1.1, 1.5, 1.2)[:dim],
        degrees=-30.0,
        axis=(-1.0, 0.5, 2.0),
        centre=centre,
    )
    inverse = np.linalg.inv(matrix)
    return phantom.image(grid, through=lambda y: (y - offset) @ inverse.T)


def phantom_interior(phantom: Phantom, grid: Grid, depth: float = 0.8) -> np.ndarray:
    """Voxels well inside the phantom's body (ellipsoidal radius < ``depth``), (K, J, I)."""
    return phantom.ellipsoids[0].radius_at(grid_points(grid)) < depth


def displacement_array(result) -> np.ndarray:
    return sitk.GetArrayFromImage(result.displacement)


def test_a_moving_image_shifted_by_plus_t_gives_a_displacement_of_plus_t(
    a_phantom: Phantom, an_oblique_grid: Grid
) -> None:
    # moving(y) = fixed(y − t): the anatomy at fixed point x sits at x + t in the moving image,
    # so T(x) = x + t maps each fixed point onto its moving counterpart and u = +t (not −t).
    dim = an_oblique_grid.dim
    t = np.array([3.0, -2.0, 2.5][:dim])
    fixed = a_phantom.image(an_oblique_grid)
    moving = a_phantom.image(an_oblique_grid, through=lambda y: y - t)

    result = register(fixed, moving, preset="fast", model=None, device="cpu")

    u = displacement_array(result)[phantom_interior(a_phantom, an_oblique_grid)]
    voxel = max(an_oblique_grid.spacing)
    assert np.linalg.norm(np.median(u, axis=0) - t) < 0.25 * voxel
    assert np.linalg.norm(u - t, axis=1).max() < voxel
    assert np.linalg.norm(u + t, axis=1).min() > np.linalg.norm(t)  # the opposite sign is far
    # The displacement lives on the fixed grid, in mm: same geometry as the fixed image.
    assert result.displacement.GetNumberOfComponentsPerPixel() == dim
    assert result.displacement.GetSize() == fixed.GetSize()
    assert np.allclose(result.displacement.GetDirection(), fixed.GetDirection())
    assert np.allclose(result.displacement.GetSpacing(), fixed.GetSpacing())
    assert np.allclose(result.displacement.GetOrigin(), fixed.GetOrigin())


@pytest.mark.parametrize("kind", ["rotation", "affine"])
def test_a_known_rotation_or_affine_map_is_recovered_within_a_voxel(
    a_phantom: Phantom, an_oblique_grid: Grid, kind: str
) -> None:
    matrix, offset = known_linear_map(kind, an_oblique_grid.dim, grid_centre(an_oblique_grid))
    fixed = a_phantom.image(an_oblique_grid)
    moving = moving_through(a_phantom, an_oblique_grid, matrix, offset)

    result = register(fixed, moving, preset="fast", model=None, device="cpu")

    points = grid_points(an_oblique_grid)
    expected = points @ matrix.T + offset - points  # u(x) = S(x) − x
    inside = phantom_interior(a_phantom, an_oblique_grid)
    error = np.linalg.norm(displacement_array(result) - expected, axis=-1)[inside]
    voxel = max(an_oblique_grid.spacing)
    assert np.median(error) < 0.5 * voxel
    assert error.max() < voxel
    # The map is far from the identity, so this is not passed by doing nothing.
    assert np.linalg.norm(expected[inside], axis=-1).mean() > voxel


@pytest.mark.parametrize("kind", ["translation", "rotation", "affine"])
def test_an_initial_transform_alone_is_the_displacement_exactly(
    a_phantom: Phantom, an_oblique_grid: Grid, kind: str
) -> None:
    """affine=False + initial_transform + iterations=0: nothing is estimated, so the field
    must be exactly ``known(x) − x`` and the warped image exactly ITK's resampling."""
    matrix, offset = known_linear_map(kind, an_oblique_grid.dim, grid_centre(an_oblique_grid))
    known = as_sitk_affine(matrix, offset)
    fixed = a_phantom.image(an_oblique_grid)
    moving = moving_through(a_phantom, an_oblique_grid, matrix, offset)

    result = register(
        fixed,
        moving,
        affine=False,
        initial_transform=known,
        iterations=0,
        model=None,
        device="cpu",
        preset="fast",
    )

    # ITK's own evaluation of known(x) − x on the fixed grid is the reference.
    reference = sitk.TransformToDisplacementField(
        known,
        sitk.sitkVectorFloat64,
        fixed.GetSize(),
        fixed.GetOrigin(),
        fixed.GetSpacing(),
        fixed.GetDirection(),
    )
    # 1e-5 mm: the engine composes in float32 (relative error ~1e-7 of the coordinates).
    np.testing.assert_allclose(
        displacement_array(result), sitk.GetArrayFromImage(reference), rtol=0, atol=1e-5
    )
    if kind == "translation":  # the sign, once more, in its plainest form: u = +t everywhere
        np.testing.assert_allclose(
            displacement_array(result),
            np.broadcast_to(offset, displacement_array(result).shape),
            rtol=0,
            atol=1e-5,
        )
    expected_warped = sitk.Resample(moving, fixed, known, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    np.testing.assert_allclose(
        sitk.GetArrayFromImage(result.warped),
        sitk.GetArrayFromImage(expected_warped),
        rtol=0,
        atol=1e-3,
    )


def test_warped_at_x_is_the_moving_image_at_x_plus_u(a_phantom: Phantom, an_oblique_grid: Grid):
    """``warped(x) = moving(x + u(x))``, checked point by point with SimpleITK's evaluator."""
    dim = an_oblique_grid.dim
    t = np.array([2.2, -1.3, 0.7][:dim])
    moving = a_phantom.image(an_oblique_grid, through=lambda y: y - t)
    displacement = image_on(
        an_oblique_grid, np.broadcast_to(t, (*an_oblique_grid.shape, dim)).copy(), vector=True
    )

    warped = warp_image(moving, displacement)

    rng = np.random.default_rng(3)
    interior = np.argwhere(phantom_interior(a_phantom, an_oblique_grid))
    for kji in interior[rng.choice(len(interior), 25, replace=False)]:
        x = an_oblique_grid.index_to_physical_points(kji[::-1][None].astype(float))[0]
        expected = moving.EvaluateAtPhysicalPoint(tuple(x + t), sitk.sitkLinear)
        assert warped[tuple(int(i) for i in kji[::-1])] == pytest.approx(expected, abs=1e-3)


def test_a_one_voxel_flow_along_each_array_axis_is_that_axis_step_in_mm(
    an_oblique_grid: Grid,
) -> None:
    dim = an_oblique_grid.dim
    reference = an_oblique_grid.reference_image()
    origin = np.asarray(reference.GetOrigin())
    for channel in range(dim):  # channel c = array axis c = ITK index axis dim − 1 − c
        flow = torch.zeros((1, dim, *an_oblique_grid.shape), dtype=torch.float64)
        flow[:, channel] = 1.0
        mm = flow_voxels_to_mm(flow, an_oblique_grid)[(0, slice(None), *[0] * dim)].numpy()
        step = [0.0] * dim
        step[dim - 1 - channel] = 1.0
        expected = np.asarray(reference.TransformContinuousIndexToPhysicalPoint(step)) - origin
        np.testing.assert_allclose(mm, expected, rtol=0, atol=1e-12)
        # Written out: D[:, axis] · spacing[axis].
        axis = dim - 1 - channel
        direction = np.asarray(an_oblique_grid.direction).reshape(dim, dim)
        np.testing.assert_allclose(
            mm, direction[:, axis] * an_oblique_grid.spacing[axis], rtol=0, atol=1e-12
        )


def test_a_known_voxel_flow_converts_to_the_mm_vector_simpleitk_computes(
    an_oblique_grid: Grid,
) -> None:
    """An arbitrary flow d (K, J, I voxels) at voxel p lands at index p + d; its mm vector is
    ITK's physical(p + d) − physical(p)."""
    dim = an_oblique_grid.dim
    reference = an_oblique_grid.reference_image()
    rng = np.random.default_rng(1)
    flow = torch.as_tensor(rng.normal(scale=2.0, size=(1, dim, *an_oblique_grid.shape)))
    mm = flow_voxels_to_mm(flow, an_oblique_grid)[0].numpy()
    for kji in rng.integers(0, an_oblique_grid.shape, size=(10, dim)):
        d_kji = flow[(0, slice(None), *(int(i) for i in kji))].numpy()
        ijk = kji[::-1].astype(float)
        start = np.asarray(reference.TransformContinuousIndexToPhysicalPoint(tuple(ijk)))
        end = reference.TransformContinuousIndexToPhysicalPoint(tuple(ijk + d_kji[::-1]))
        np.testing.assert_allclose(mm[(slice(None), *kji)], np.asarray(end) - start, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(
    dim=st.sampled_from([2, 3]),
    spacing=st.lists(st.floats(0.2, 5.0), min_size=3, max_size=3),
    degrees=st.floats(-170.0, 170.0),
    axis=st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(0.1, 1)),
    flip=st.booleans(),
)
def test_flow_conversion_matches_itk_on_any_oblique_anisotropic_grid(
    dim: int, spacing: list[float], degrees: float, axis: tuple[float, ...], flip: bool
) -> None:
    grid = oblique_grid(
        dim, size=(5, 4, 3)[:dim], spacing=tuple(spacing[:dim]), degrees=degrees, axis=axis
    )
    if flip:  # a left-handed direction matrix (as in many RAS-stored files) must work too
        direction = np.asarray(grid.direction).reshape(dim, dim) @ np.diag(
            [-1.0] + [1.0] * (dim - 1)
        )
        grid = Grid(grid.size, grid.spacing, grid.origin, tuple(direction.ravel()))
    flow = torch.as_tensor(np.random.default_rng(0).normal(size=(1, dim, *grid.shape)))
    mm = flow_voxels_to_mm(flow, grid)[0].numpy()
    reference = grid.reference_image()
    for kji in np.ndindex(*grid.shape):
        ijk = np.array(kji[::-1], dtype=float)
        d_ijk = flow[(0, slice(None), *kji)].numpy()[::-1]
        start = np.asarray(reference.TransformContinuousIndexToPhysicalPoint(tuple(ijk)))
        end = np.asarray(reference.TransformContinuousIndexToPhysicalPoint(tuple(ijk + d_ijk)))
        np.testing.assert_allclose(mm[(slice(None), *kji)], end - start, atol=1e-9)
    # Lengths scale with the spacing only: a unit K step is spacing[K] mm long.
    unit = torch.zeros((1, dim, *grid.shape), dtype=torch.float64)
    unit[:, 0] = 1.0
    length = torch.linalg.vector_norm(
        flow_voxels_to_mm(unit, grid)[(0, slice(None), *[0] * dim)]
    ).item()
    assert length == pytest.approx(grid.spacing[dim - 1])


def test_a_network_flow_in_voxels_warps_like_its_mm_field_resampled_by_itk(
    a_phantom: Phantom, an_oblique_grid: Grid
) -> None:
    """The network's spatial transformer (voxels, array-axis channels) and ITK resampling with
    the mm field from ``flow_voxels_to_mm`` are the same warp: pins channel order, D·diag(s)
    and the sign in one go."""
    grid = an_oblique_grid
    dim = grid.dim
    image = a_phantom.image(grid)
    k = [np.linspace(0, np.pi, n) for n in grid.shape]
    mesh = np.meshgrid(*k, indexing="ij")
    flow = np.stack([1.5 * np.sin(mesh[(c + 1) % dim] + c) for c in range(dim)])[None]
    flow_t = torch.as_tensor(flow)
    volume = torch.as_tensor(sitk.GetArrayFromImage(image).astype(np.float64))[None, None]
    by_network = warp(volume, flow_t)[0, 0].numpy()

    mm = flow_voxels_to_mm(flow_t, grid)[0].numpy()  # (dim, K, J, I)
    displacement = image_on(grid, np.moveaxis(mm, 0, -1).copy(), vector=True)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    by_itk = sitk.GetArrayFromImage(sitk.Resample(image, image, transform, sitk.sitkLinear, 0.0))

    inner = tuple(slice(3, n - 3) for n in grid.shape)  # borders: zero vs ITK padding
    assert np.abs(by_network[inner] - by_itk[inner]).max() < 1e-3
    assert np.abs(by_network[inner] - sitk.GetArrayFromImage(image)[inner]).max() > 20  # it moved
