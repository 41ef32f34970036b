"""Our outputs agree with what SimpleITK (and so ANTs, Slicer) computes from the files we write.

One deformable registration (3D, oblique anisotropic fixed grid; the moving image on a
*different* oblique grid, uint8 intensities 0…255) is shared by the tests in this module.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import Phantom, grid_centre, grid_points, image_on, make_phantom, oblique_grid

from DeepRegisterLib.imaging import fileio, metrics
from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.registration.engine import register
from DeepRegisterLib.registration.image_warping import warp_image, warp_images
from DeepRegisterLib.registration.result import RegistrationResult, displacement_transform
from DeepRegisterLib.registration.warping import (
    Displacement,
    deformation_field,
    inverse_displacement,
)


class Case:
    fixed: sitk.Image
    moving: sitk.Image
    moving_labels: sitk.Image
    interior: np.ndarray  # (K, J, I) voxels of the fixed grid well inside the phantom
    result: RegistrationResult


@pytest.fixture(scope="module")
def a_registration() -> Case:
    fixed_grid = oblique_grid(3)
    moving_grid = oblique_grid(
        3,
        size=(36, 40, 38),
        spacing=(1.4, 1.1, 1.25),
        origin=(-28.0, 10.0, 4.0),
        degrees=-25.0,
        axis=(-2.0, 1.0, 0.5),
    )
    centre = grid_centre(fixed_grid)
    phantom: Phantom = make_phantom(3, centre)

    def inverse_map(y: np.ndarray) -> np.ndarray:
        """S⁻¹ for the moving image: a smooth bend plus a shift of a few mm."""
        r = y - centre
        bend = np.stack(
            [
                2.0 * np.sin(r[..., 1] / 9.0),
                1.5 * np.cos(r[..., 2] / 11.0),
                -1.5 * np.sin(r[..., 0] / 10.0),
            ],
            axis=-1,
        )
        return y + bend + np.array([1.0, -2.0, 1.5])

    case = Case()
    case.fixed = phantom.image(fixed_grid)
    moving = phantom.image(moving_grid, through=inverse_map)
    case.moving = sitk.Cast(
        sitk.Clamp(sitk.Round(moving), sitk.sitkFloat32, 0, 255), sitk.sitkUInt8
    )
    case.moving_labels = phantom.label_map(moving_grid, through=inverse_map)
    case.interior = phantom.ellipsoids[0].radius_at(grid_points(fixed_grid)) < 0.8
    case.result = register(
        case.fixed,
        case.moving,
        moving_labels={"seg": case.moving_labels},
        preset="fast",
        model=None,
        device="cpu",
    )
    return case


def resample_linear(case: Case, transform: sitk.Transform) -> np.ndarray:
    image = sitk.Resample(
        case.moving, case.fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    return sitk.GetArrayFromImage(image)


def test_warped_equals_simpleitk_resampling_through_the_written_h5_transform(
    a_registration: Case, tmp_path: Path
) -> None:
    path = fileio.write_transform(a_registration.result.transform(), tmp_path / "t.h5")
    transform = sitk.ReadTransform(str(path))

    by_itk = resample_linear(a_registration, transform)
    warped = a_registration.result.warped
    assert warped.GetPixelID() == a_registration.moving.GetPixelID() == sitk.sitkUInt8
    ours = sitk.GetArrayFromImage(warped).astype(np.float32)

    # Ours is rounded to the nearest intensity (ITK's own integer output truncates): away from
    # ties, where float32 round-off could tip either way, it is ITK's float result rounded.
    inside = a_registration.interior & (np.abs(by_itk % 1 - 0.5) > 0.05)
    difference = np.abs(ours - by_itk)
    print(
        f"\nwarped vs ITK from .h5: max |Δ| {difference.max():.2e} (whole image), "
        f"{inside.sum()} interior voxels away from ties"
    )
    assert difference.max() < 1.0  # within one intensity step of the uint8 moving image
    np.testing.assert_array_equal(ours[inside], np.rint(by_itk[inside]))
    # Not a trivial agreement: the registration moved things (the identity would differ).
    identity = resample_linear(a_registration, sitk.Transform(3, sitk.sitkIdentity))
    assert np.abs(identity - by_itk)[a_registration.interior].max() > 50


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd"])
def test_a_displacement_image_file_maps_points_as_the_h5_and_as_x_plus_u(
    a_registration: Case, tmp_path: Path, suffix: str
) -> None:
    result = a_registration.result
    fileio.write_image(result.displacement, tmp_path / f"u{suffix}")
    fileio.write_transform(result.transform(), tmp_path / "t.h5")
    field = sitk.ReadImage(str(tmp_path / f"u{suffix}"))
    assert field.GetNumberOfComponentsPerPixel() == 3
    assert metrics.same_grid(field, a_registration.fixed)
    from_image = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    from_h5 = sitk.ReadTransform(str(tmp_path / "t.h5"))  # [affine, v on the network grid]
    exact = displacement_transform(result.displacement)

    grid = Grid.of(a_registration.fixed)
    u = sitk.GetArrayFromImage(result.displacement)
    points = grid_points(grid)
    rng = np.random.default_rng(7)
    # NIfTI stores the grid's direction and origin in float32: ~1e-5 mm of jitter.
    tolerance = 1e-4 if suffix == ".nii.gz" else 1e-9
    for kji in rng.integers(0, grid.shape, size=(40, 3)):
        kji = tuple(int(i) for i in kji)
        x = points[kji]
        expected = x + u[kji]  # T(x) = x + u(x) at grid nodes
        np.testing.assert_allclose(from_image.TransformPoint(tuple(x)), expected, atol=tolerance)
        # u was composed in float32: ~1e-5 mm from the composite ITK evaluates in float64.
        np.testing.assert_allclose(from_h5.TransformPoint(tuple(x)), expected, atol=1e-4)
    # Between nodes (continuous indices inside the grid) the file interpolates u as ITK does.
    for ijk in rng.uniform(1, np.asarray(grid.size) - 2, size=(40, 3)):
        x = a_registration.fixed.TransformContinuousIndexToPhysicalPoint(tuple(ijk))
        np.testing.assert_allclose(
            from_image.TransformPoint(x), exact.TransformPoint(x), atol=tolerance
        )


def test_warped_labels_keep_the_label_set_and_equal_simpleitk_nearest_resampling(
    a_registration: Case, tmp_path: Path
) -> None:
    warped = a_registration.result.warped_labels["seg"]
    assert warped.GetPixelID() == a_registration.moving_labels.GetPixelID()
    assert metrics.same_grid(warped, a_registration.fixed)
    labels_in = set(np.unique(sitk.GetArrayViewFromImage(a_registration.moving_labels)).tolist())
    labels_out = set(np.unique(sitk.GetArrayViewFromImage(warped)).tolist())
    assert labels_out <= labels_in  # nearest neighbour invents no label
    assert labels_out == labels_in  # and on this phantom every structure survives

    path = fileio.write_transform(a_registration.result.transform(), tmp_path / "t.h5")
    by_itk = sitk.Resample(
        a_registration.moving_labels,
        a_registration.fixed,
        sitk.ReadTransform(str(path)),
        sitk.sitkNearestNeighbor,
        0,
    )
    mismatched = int(
        np.count_nonzero(sitk.GetArrayViewFromImage(warped) != sitk.GetArrayViewFromImage(by_itk))
    )
    assert mismatched == 0


def test_warp_image_matches_itk_where_points_fall_outside_or_on_the_moving_border() -> None:
    """ITK's rule at the edge: within half a voxel outside → border value, further → 0."""
    grid = oblique_grid(2, size=(20, 16))
    rng = np.random.default_rng(0)
    moving = image_on(grid, rng.uniform(1, 255, size=grid.shape).astype(np.float32))
    labels = image_on(grid, rng.integers(1, 9, size=grid.shape).astype(np.uint8))
    # A shift of 3.3 voxels along I (in mm): a band of points lands outside, some within ½ voxel.
    shift = np.asarray(grid.index_to_physical) @ np.array([3.3, -0.45])
    displacement = image_on(grid, np.broadcast_to(shift, (*grid.shape, 2)).copy(), vector=True)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))

    ours = sitk.GetArrayFromImage(warp_image(moving, displacement))
    itk = sitk.GetArrayFromImage(
        sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    )
    assert np.abs(ours - itk).max() < 1e-3
    assert (itk == 0).any()  # the case really has points beyond the border …
    assert (itk != 0).any()  # … and inside it

    ours_nn = sitk.GetArrayFromImage(warp_image(labels, displacement, nearest=True))
    itk_nn = sitk.GetArrayFromImage(
        sitk.Resample(labels, labels, transform, sitk.sitkNearestNeighbor, 0)
    )
    np.testing.assert_array_equal(ours_nn, itk_nn)


def test_warping_several_images_in_one_pass_equals_itk_on_each() -> None:
    """A scan and its labels share sampling coordinates; labels on another grid get their own."""
    fixed = oblique_grid(3, size=(18, 20, 14))
    scan_grid = oblique_grid(3, size=(22, 18, 16), degrees=35.0, spacing=(1.1, 1.2, 1.4))
    coarse_grid = oblique_grid(3, size=(12, 10, 9), degrees=-10.0, spacing=(2.0, 2.2, 2.5))
    rng = np.random.default_rng(1)
    scan = image_on(scan_grid, rng.uniform(1, 255, size=scan_grid.shape).astype(np.float32))
    labels = image_on(scan_grid, rng.integers(1, 9, size=scan_grid.shape).astype(np.uint8))
    coarse = image_on(coarse_grid, rng.integers(1, 300, size=coarse_grid.shape).astype(np.int16))
    field = rng.normal(scale=1.5, size=(*fixed.shape, 3))
    displacement = image_on(fixed, field, vector=True)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))
    reference = image_on(fixed, np.zeros(fixed.shape, np.float32))

    warped = warp_images([(scan, False), (labels, True), (coarse, True)], displacement)

    itk_scan = sitk.Resample(scan, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    assert np.abs(sitk.GetArrayFromImage(warped[0]) - sitk.GetArrayFromImage(itk_scan)).max() < 1e-3
    for ours, moving in zip(warped[1:], (labels, coarse), strict=True):
        itk = sitk.Resample(moving, reference, transform, sitk.sitkNearestNeighbor, 0)
        assert ours.GetPixelID() == moving.GetPixelID()
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(itk))
        assert (sitk.GetArrayFromImage(itk) == 0).any()  # some points fall outside each grid
    for ours, (moving, nearest) in zip(warped, ((scan, False), (labels, True)), strict=False):
        alone = warp_image(moving, displacement, nearest=nearest)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(alone))


def test_labels_beyond_float32s_exact_integers_are_warped_exactly() -> None:
    """Labels above 2**24 are sampled in float64: float32 would merge neighbouring values."""
    grid = oblique_grid(3, size=(12, 10, 9))
    rng = np.random.default_rng(2)
    labels = (2**25 + rng.integers(0, 5, size=grid.shape)).astype(np.int64)
    moving = image_on(grid, labels)
    displacement = image_on(grid, rng.normal(scale=0.8, size=(*grid.shape, 3)), vector=True)
    transform = sitk.DisplacementFieldTransform(sitk.Cast(displacement, sitk.sitkVectorFloat64))

    ours = sitk.GetArrayFromImage(warp_image(moving, displacement, nearest=True))
    itk = sitk.GetArrayFromImage(
        sitk.Resample(moving, moving, transform, sitk.sitkNearestNeighbor, 0)
    )
    np.testing.assert_array_equal(ours, itk)
    assert set(np.unique(ours)) - {0} <= set(np.unique(labels))


def _sampled(transform: sitk.Transform, grid: Grid) -> np.ndarray:
    reference = grid.reference_image()
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, reference.GetSize(), reference.GetOrigin(),
        reference.GetSpacing(), reference.GetDirection(),
    )  # fmt: skip
    return sitk.GetArrayFromImage(field)


@pytest.mark.parametrize("dim", [2, 3])
def test_the_transform_files_composite_is_the_dense_field_everywhere(dim: int) -> None:
    """What a ``.h5`` holds, ``[A, v]`` and ``[w, A⁻¹]`` with the fields on the network grid, is
    the dense field on the fixed (moving) grid at every voxel: inside the network grid, in the
    voxel around it where the field fades to zero, and beyond, where only the affine is left."""
    fixed = oblique_grid(dim)
    moving = oblique_grid(dim, degrees=-15.0, spacing=(1.1, 1.0, 1.2)[:dim])
    lower, upper = np.full(dim, 6), np.asarray(fixed.size) - 9
    network = fixed.with_spacing_cropped_to(2.0, lower, upper, 2)
    generator = torch.Generator().manual_seed(dim)
    v = 2.0 * torch.randn((1, dim, *network.shape), generator=generator)  # large at the edge too
    affine = sitk.AffineTransform(dim)
    affine.SetMatrix(tuple((np.eye(dim) + 0.03 * np.ones((dim, dim))).ravel()))
    affine.SetTranslation(tuple(np.linspace(-2.0, 3.0, dim)))
    result = RegistrationResult(
        fixed_grid=fixed,
        displacement=Displacement(affine, v, network, fixed).image(),
        warped=None,
        affine=affine,
        inverse_displacement=inverse_displacement(affine, -v, network, moving),
        deformation=deformation_field(v, network),
        inverse_deformation=deformation_field(-v, network),
    )
    forward, inverse = result.transform(), result.inverse_transform()
    assert isinstance(forward, sitk.CompositeTransform)
    u = sitk.GetArrayViewFromImage(result.displacement)
    assert np.abs(u).max() > 5.0  # v and the affine both move points
    np.testing.assert_allclose(_sampled(forward, fixed), u, rtol=0, atol=1e-4)
    np.testing.assert_allclose(
        _sampled(inverse, moving),
        sitk.GetArrayViewFromImage(result.inverse_displacement),
        rtol=0, atol=1e-4,
    )  # fmt: skip


@pytest.mark.parametrize("dim", [2, 3])
def test_where_each_voxel_lands_is_built_in_one_pass_as_from_the_displacement(dim: int) -> None:
    """``Displacement.mapped(L, c)`` (how the engine's warp finds its sampling points) is
    ``L (x + u(x)) + c`` at every voxel, to float32's rounding, and the same bits whichever
    block of rows holds a voxel."""
    fixed = oblique_grid(dim)
    network = fixed.with_spacing_cropped_to(2.0, np.full(dim, 4), np.asarray(fixed.size) - 5, 2)
    generator = torch.Generator().manual_seed(dim)
    v = 3.0 * torch.randn((1, dim, *network.shape), generator=generator)
    affine = sitk.AffineTransform(dim)
    affine.SetMatrix(tuple((np.eye(dim) + 0.05 * np.arange(dim * dim).reshape(dim, -1)).ravel()))
    affine.SetTranslation(tuple(np.linspace(-4.0, 6.0, dim)))
    field = Displacement(affine, v, network, fixed)
    rng = np.random.default_rng(dim)
    linear, constant = rng.normal(size=(dim, dim)) / 50.0, rng.normal(size=dim)
    whole = tuple(slice(0, n) for n in fixed.shape)
    mapped = field.mapped(linear, constant, whole).numpy()

    u = sitk.GetArrayFromImage(field.image()).astype(np.float64)
    expected = (grid_points(fixed) + u) @ linear.T + constant
    assert np.abs(u).max() > 5.0
    np.testing.assert_allclose(mapped, expected, rtol=0, atol=1e-5)
    rows = (slice(3, 7), *whole[1:])
    np.testing.assert_array_equal(field.mapped(linear, constant, rows).numpy(), mapped[rows])


@pytest.mark.parametrize(
    ("pixel_id", "low", "high", "warped_id"),
    [
        (sitk.sitkUInt8, 0, 255, sitk.sitkUInt8),
        (sitk.sitkInt16, -1024, 3071, sitk.sitkInt16),  # CT: negative values, 12 bits
        (sitk.sitkFloat64, -1.5, 2.5, sitk.sitkFloat32),
    ],
)
def test_an_integer_image_is_warped_into_its_own_type_rounded_a_float_one_into_float32(
    an_oblique_3d_grid: Grid, pixel_id: int, low: float, high: float, warped_id: int,
    tmp_path: Path,
) -> None:  # fmt: skip
    """A scan comes back in the type it came in (a quarter of float32's bytes for 8 bits),
    rounded to the nearest intensity; the file written from it keeps that type."""
    rng = np.random.default_rng(3)
    values = rng.uniform(low, high, an_oblique_3d_grid.shape)
    if pixel_id != sitk.sitkFloat64:
        values = np.rint(values)
    moving = sitk.Cast(image_on(an_oblique_3d_grid, values), pixel_id)
    shift = np.array([0.37, -0.21, 0.55])  # mm: every voxel lands between the moving's voxels
    field = np.broadcast_to(shift, (*an_oblique_3d_grid.shape, 3)).copy()
    ours = warp_image(moving, image_on(an_oblique_3d_grid, field, vector=True))

    by_itk = resample_linear_through(moving, sitk.TranslationTransform(3, tuple(shift)))
    assert ours.GetPixelID() == warped_id
    array = sitk.GetArrayFromImage(ours).astype(np.float64)
    if warped_id == sitk.sitkFloat32:
        np.testing.assert_allclose(array, by_itk, atol=1e-4)  # float32 coordinates
    else:
        away_from_ties = np.abs(by_itk % 1 - 0.5) > 0.01
        assert away_from_ties.mean() > 0.9
        np.testing.assert_array_equal(array[away_from_ties], np.rint(by_itk[away_from_ties]))
        assert np.abs(array - by_itk).max() <= 0.5 + 0.01
    written = sitk.ReadImage(str(fileio.write_image(ours, tmp_path / "warped.nii.gz")))
    assert written.GetPixelID() == warped_id
    np.testing.assert_array_equal(sitk.GetArrayFromImage(written), sitk.GetArrayFromImage(ours))


def resample_linear_through(moving: sitk.Image, transform: sitk.Transform) -> np.ndarray:
    """SimpleITK's linear resampling onto the moving image's own grid, in float64."""
    image = sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat64)
    return sitk.GetArrayFromImage(image)


def test_resampling_onto_a_grid_equals_resampling_onto_its_image() -> None:
    """A grid serves ITK's resampling as a reference image of its geometry does (without the
    image: a CT's is 157 MB to allocate and zero), to the bit, grid and padding included."""
    from DeepRegisterLib.imaging.resampling import resample

    grid = oblique_grid(3, size=(9, 8, 7), spacing=(1.2, 0.9, 2.0))
    values = np.random.default_rng(4).integers(0, 900, grid.shape).astype(np.int16)
    moving = image_on(grid, values)
    transform = sitk.Euler3DTransform((0.0, 0.0, 0.0), 0.1, -0.05, 0.2, (1.5, -0.7, 0.3))
    on = oblique_grid(3, size=(6, 10, 5), spacing=(1.5, 1.0, 1.7))
    for interpolator, output_type in ((sitk.sitkLinear, sitk.sitkFloat32),
                                      (sitk.sitkNearestNeighbor, sitk.sitkInt16)):  # fmt: skip
        by_grid = resample(moving, on, transform, interpolator, output_type, padding=-7.0)
        by_image = resample(moving, on.reference_image(), transform, interpolator, output_type,
                            padding=-7.0)  # fmt: skip
        assert Grid.of(by_grid) == on
        assert by_grid.GetPixelID() == output_type
        np.testing.assert_array_equal(sitk.GetArrayFromImage(by_grid),
                                      sitk.GetArrayFromImage(by_image))  # fmt: skip
        assert (sitk.GetArrayViewFromImage(by_grid) == -7).any()  # part falls outside
