"""Invariants that must hold on ANY image geometry, checked with hypothesis.

Geometries: 2D and 3D, 12–24 voxels per axis, spacings 0.2–5 mm and anisotropic (up to 4×
between axes, see :func:`geometries`), oblique and flipped (det −1) directions, origins far
from zero. Images are drawn in index space (a textured body with two inner blobs), so they fit
every grid whatever its spacing.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import image_on, rotation_matrix
from hypothesis import HealthCheck, Phase, assume, given, settings
from hypothesis import strategies as st

from DeepRegisterLib.imaging import fileio
from DeepRegisterLib.imaging.geometry import Grid, flow_voxels_to_mm
from DeepRegisterLib.registration.engine import register
from DeepRegisterLib.registration.image_warping import warp_image

# No shrinking: every example is a registration, and shrinking one failure took 5 minutes.
PROPERTY_SETTINGS = settings(
    max_examples=15,
    deadline=None,
    phases=[Phase.explicit, Phase.reuse, Phase.generate],
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
FAST = dict(preset="fast", model=None, device="cpu")


@st.composite
def geometries(draw, dim: int | None = None) -> Grid:
    """A random grid. Per-axis spacings are a base spacing (0.2–5 mm) times 0.5–2, clipped to
    0.2–5 mm: the network grid is isotropic at about the finest spacing, so unbounded
    anisotropy (0.2 × 5 × 5 mm) makes a 24³ image a 600² × 14 network grid and a 14 s run
    (reported separately); 4× keeps every example well under a second."""
    dim = dim or draw(st.sampled_from([2, 3]))
    size = tuple(draw(st.lists(st.integers(12, 24), min_size=dim, max_size=dim)))
    base = draw(st.floats(0.2, 5.0))
    factors = draw(st.lists(st.floats(0.5, 2.0), min_size=dim, max_size=dim))
    spacing = tuple(float(np.clip(base * f, 0.2, 5.0)) for f in factors)
    origin = tuple(draw(st.lists(st.floats(-300.0, 300.0), min_size=dim, max_size=dim)))
    axis = draw(st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(0.1, 1)))
    angle = draw(st.floats(-180.0, 180.0))
    direction = rotation_matrix(axis[:dim], angle)
    if draw(st.booleans()):  # left-handed, as many RAS-stored files are
        direction = direction @ np.diag([1.0] * (dim - 1) + [-1.0])
    return Grid(size, spacing, origin, tuple(direction.ravel()))


def body(grid: Grid, shift_voxels: np.ndarray | None = None) -> sitk.Image:
    """A textured ellipse(oid) with two inner blobs, drawn in index space (0…~230, float32);
    ``shift_voxels`` (I, J[, K]) moves the content by that many voxels."""
    shift = np.zeros(grid.dim) if shift_voxels is None else np.asarray(shift_voxels)
    # Coordinates in [-1, 1] per array axis (K, J, I), the content moved by ``shift``.
    axes = [
        (np.arange(n) - (n - 1) / 2 - s) / ((n - 1) / 2)
        for n, s in zip(grid.shape, shift[::-1], strict=True)
    ]
    coords = np.meshgrid(*axes, indexing="ij")
    radius = np.sqrt(sum((c / r) ** 2 for c, r in zip(coords, (0.7, 0.65, 0.6), strict=False)))
    image = 80.0 / (1.0 + np.exp((radius - 1.0) / 0.06))
    image += 15.0 * np.prod([np.cos(3.0 * c + 0.4) for c in coords], axis=0) * (radius < 1)
    for centre, height in (((0.25, -0.2, 0.1), 120.0), ((-0.3, 0.25, -0.15), 60.0)):
        r2 = sum((c - x) ** 2 for c, x in zip(coords, centre, strict=False))
        image += height * np.exp(-r2 / 0.03)
    return image_on(grid, image.astype(np.float32))


def centred_like(grid: Grid, target: Grid, direction: np.ndarray) -> Grid:
    """``grid``'s size and spacing with ``direction``, centred on ``target``'s centre."""

    def centre(g: Grid, d: np.ndarray) -> np.ndarray:
        return d @ np.diag(g.spacing) @ ((np.asarray(g.size) - 1) / 2.0)

    origin = np.asarray(target.origin) + centre(target, target.direction_matrix)
    origin = origin - centre(grid, direction)
    return Grid(grid.size, grid.spacing, tuple(origin), tuple(np.asarray(direction).ravel()))


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


# --- the identity -------------------------------------------------------------------------


@settings(PROPERTY_SETTINGS, max_examples=8)
@given(grid=geometries())
def test_an_identical_pair_does_not_fold(grid: Grid) -> None:
    fixed = body(grid)
    result = register(fixed, sitk.Image(fixed), affine=False, iterations=6, **FAST)
    assert result.report["folding_percent"] == 0.0
    assert float(array(result.jacobian).min()) > 0.0


@pytest.mark.parametrize(
    "grid",
    [
        Grid((12, 12), (0.2, 0.2), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0)),
        Grid((14, 13, 12), (0.7, 0.5, 0.6), (-20.0, 35.0, 110.0),
             tuple(rotation_matrix((0.3, -0.5, 1.0), 35.0).ravel())),
    ],
    ids=["2d", "3d-oblique"],
)  # fmt: skip
def test_an_identical_pair_gives_a_zero_displacement(grid: Grid) -> None:
    """The true answer is exactly 0. A tenth of a voxel is below what Dice, landmark errors
    or a viewer can show, and far above float32 round-off; the warped image must then be the
    fixed image up to interpolation (1 % of the range)."""
    fixed = body(grid)
    result = register(fixed, sitk.Image(fixed), affine=False, iterations=10, **FAST)
    length = np.linalg.norm(array(result.displacement), axis=-1)
    assert length.max() <= 0.1 * min(grid.spacing)
    value_range = float(np.ptp(array(fixed)))
    assert np.abs(array(result.warped) - array(fixed)).max() <= 0.01 * value_range


# --- a known translation ------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(grid=geometries(), fractions=st.lists(st.floats(-1.0, 1.0), min_size=3, max_size=3))
def test_a_translation_given_as_initial_transform_is_the_displacement_exactly(
    grid: Grid, fractions: list[float]
) -> None:
    """Nothing is estimated (no affine stage, 0 iterations): u(x) = t at every voxel, to
    1e-6 mm (float32 round-off of |t| ≤ 8 mm is below 5e-7 mm). |t| stays within a quarter of
    the field of view, else the images rightly no longer overlap."""
    reach = min(8.0, 0.25 * float(min(grid.extent_mm)))
    t = reach * np.asarray(fractions[: grid.dim])
    fixed = body(grid)
    result = register(
        fixed, fixed, affine=False, initial_transform=sitk.TranslationTransform(grid.dim, t),
        iterations=0, **FAST,
    )  # fmt: skip
    np.testing.assert_allclose(
        array(result.displacement), np.broadcast_to(t, (*grid.shape, grid.dim)), rtol=0, atol=1e-6
    )
    assert result.report["optimisation_steps"] == 0


# --- our warp and ITK's, through the file we write ------------------------------------------


@settings(PROPERTY_SETTINGS, max_examples=10)
@given(
    fixed_grid=geometries(),
    moving_axis=st.tuples(st.floats(-1, 1), st.floats(-1, 1), st.floats(0.1, 1)),
    moving_degrees=st.floats(-30.0, 30.0),
    shift=st.lists(st.floats(0.5, 1.5) | st.floats(-1.5, -0.5), min_size=3, max_size=3),
)
def test_the_warped_image_equals_simpleitk_resampling_through_the_written_h5(
    fixed_grid: Grid,
    moving_axis: tuple[float, ...],
    moving_degrees: float,
    shift: list[float],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """The moving image lies on its own grid (turned about the fixed centre, its content moved
    by ½–1½ voxels); a few steps give a non-trivial field (examples where nothing moved are
    discarded). ITK reads our .h5 and must reproduce ``warped`` to 1e-3 of the range."""
    dim = fixed_grid.dim
    rotation = rotation_matrix(moving_axis[:dim], moving_degrees)
    moving_grid = centred_like(fixed_grid, fixed_grid, fixed_grid.direction_matrix @ rotation)
    fixed = body(fixed_grid)
    moving = body(moving_grid, np.asarray(shift[:dim]))
    result = register(fixed, moving, affine=False, iterations=3, **FAST)
    assume(np.abs(array(result.displacement)).max() > 1e-3)  # a field that really moves points

    path = tmp_path_factory.mktemp("h5") / "transform.h5"
    fileio.write_transform(result.transform(), path)
    itk = sitk.Resample(moving, fixed, fileio.read_transform(path), sitk.sitkLinear, 0.0,
                        sitk.sitkFloat32)  # fmt: skip
    value_range = float(np.ptp(array(moving)))
    assert np.abs(array(result.warped) - array(itk)).max() < 1e-3 * value_range


# --- the building blocks ------------------------------------------------------------------


@PROPERTY_SETTINGS
@given(fixed_grid=geometries(), data=st.data())
def test_a_zero_field_reproduces_the_image_where_the_grids_coincide(
    fixed_grid: Grid, data: st.DataObject
) -> None:
    """On its own grid the image comes back (to float32 round-off: grid_sample's normalised
    coordinates); on another grid over the same region it equals ITK's identity resampling."""
    image = body(fixed_grid)
    zero = np.zeros((*fixed_grid.shape, fixed_grid.dim))
    same = array(warp_image(image, zero, fixed_grid))
    np.testing.assert_allclose(same, array(image), rtol=0, atol=1e-6 * float(np.ptp(same)))

    other = data.draw(geometries(dim=fixed_grid.dim))  # its spacing then fits the fixed extent:
    other = Grid(other.size, tuple(fixed_grid.extent_mm / np.asarray(other.size)), other.origin,
                 other.direction)  # fmt: skip
    moving = body(centred_like(other, fixed_grid, other.direction_matrix))
    expected = array(sitk.Resample(moving, fixed_grid.reference_image(), sitk.Transform(),
                                   sitk.sitkLinear, 0.0, sitk.sitkFloat32))  # fmt: skip
    assert np.ptp(expected) > 0  # the grids overlap where the image has content
    ours = array(warp_image(moving, zero, fixed_grid))
    assert np.abs(ours - expected).max() < 1e-3 * float(np.ptp(array(moving)))


@settings(max_examples=25, deadline=None)
@given(grid=geometries(), seed=st.integers(0, 2**31 - 1), scale=st.floats(1e-3, 1e3))
def test_voxels_to_mm_keeps_float64_at_any_scale(grid: Grid, seed: int, scale: float) -> None:
    """The mm vectors solved back through the grid's index-to-physical matrix are the voxel
    flow again, in float64 at any scale (no single-precision step inside)."""
    rng = np.random.default_rng(seed)
    vectors = torch.as_tensor(scale * rng.normal(size=(2, grid.dim, *grid.shape)))
    mm = flow_voxels_to_mm(vectors, grid).numpy()
    ijk = np.linalg.solve(grid.index_to_physical, mm.reshape(2, grid.dim, -1))
    np.testing.assert_allclose(
        ijk[:, ::-1].reshape(vectors.shape), vectors.numpy(), rtol=1e-10, atol=1e-12 * scale
    )
    # Lengths in mm are voxel steps times the spacing: the round trip is not trivially I.
    step = torch.zeros((1, grid.dim, *grid.shape), dtype=torch.float64)
    step[:, -1] = 1.0  # one voxel along the last array axis = ITK axis I
    corner = (0, slice(None), *[0] * grid.dim)
    length = torch.linalg.vector_norm(flow_voxels_to_mm(step, grid)[corner])
    assert math.isclose(float(length), grid.spacing[0], rel_tol=1e-12)
