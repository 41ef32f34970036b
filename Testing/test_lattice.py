"""The transform ``[A, v]`` as one displacement on v's lattice (what Slicer's grid transform
node holds): under linear interpolation, the same map as ITK's composite at every voxel of the
fixed image."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import image_on, rotation_matrix

from DeepRegisterLib.errors import InputError
from DeepRegisterLib.evaluation.evaluate import displacement_on_grid
from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.registration.lattice import displacement_on_lattice
from DeepRegisterLib.registration.result import displacement_transform


def _affine(dim: int) -> sitk.AffineTransform:
    affine = sitk.AffineTransform(dim)
    rng = np.random.default_rng(1)
    affine.SetMatrix(tuple((np.eye(dim) + rng.uniform(-0.08, 0.08, (dim, dim))).ravel()))
    affine.SetTranslation(tuple(rng.uniform(-4, 4, dim)))
    affine.SetCenter(tuple(rng.uniform(-10, 10, dim)))
    return affine


def _deformation(grid: Grid, offset_voxels, size) -> sitk.Image:
    """Rough random ``v`` (mm) on a 2 mm lattice with ``grid``'s directions, zero on its
    outermost nodes as the engine hands it back (ITK holds a field's edge half a voxel out)."""
    dim = grid.dim
    origin = grid.index_to_physical_points(np.asarray(offset_voxels, dtype=float))
    lattice = Grid(tuple(size), (2.0,) * dim, tuple(origin), grid.direction)
    v = np.zeros((*lattice.shape, dim))
    inner = (slice(1, -1),) * dim
    v[inner] = np.random.default_rng(2).normal(0, 1.5, v[inner].shape)
    return image_on(lattice, v, vector=True)


def _dense(transform: sitk.Transform, grid: Grid) -> np.ndarray:
    return sitk.GetArrayFromImage(displacement_on_grid(transform, grid.reference_image()))


def _as_composite_and_lattice(grid: Grid, deformation: sitk.Image):
    affine = _affine(grid.dim)
    composite = sitk.CompositeTransform([affine, displacement_transform(deformation)])
    lattice = displacement_on_lattice(affine, deformation, grid)
    return composite, lattice


OBLIQUE = rotation_matrix((1.0, 2.0, 3.0), 25.0)
FIXED = Grid((23, 19, 17), (0.9, 1.0, 1.3), (3.0, -7.0, 2.0), tuple(OBLIQUE.ravel()))


@pytest.mark.parametrize(
    ("offset", "size", "where"),
    [
        ((3.3, 2.6, 4.1), (8, 7, 6), "inside the fixed image"),
        ((-4.7, -3.2, -2.5), (16, 14, 15), "past it on every side"),
        ((40.0, 0.0, 0.0), (5, 5, 5), "beside it: the affine alone"),
    ],
)
def test_the_lattice_field_is_the_composite_at_every_voxel(offset, size, where):
    deformation = _deformation(FIXED, offset, size)
    composite, lattice = _as_composite_and_lattice(FIXED, deformation)

    assert lattice.GetPixelID() == sitk.sitkVectorFloat32
    assert lattice.GetSpacing() == deformation.GetSpacing()
    assert lattice.GetDirection() == deformation.GetDirection()
    linear = sitk.DisplacementFieldTransform(sitk.Cast(lattice, sitk.sitkVectorFloat64))
    linear.SetInterpolator(sitk.sitkLinear)
    expected = _dense(composite, FIXED)
    assert np.abs(expected).max() > 1.0, where  # not the identity
    np.testing.assert_allclose(_dense(linear, FIXED), expected, atol=2e-5, err_msg=where)


def test_the_lattice_covers_the_fixed_image_and_no_more_than_a_node_beyond():
    deformation = _deformation(FIXED, (3.3, 2.6, 4.1), (8, 7, 6))
    _, lattice = _as_composite_and_lattice(FIXED, deformation)

    to_index, offset = Grid.of(lattice).physical_to_index_affine()
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in FIXED.size])).reshape(3, -1).T
    index = FIXED.index_to_physical_points(corners.astype(float)) @ to_index.T + offset
    assert index.min() >= -1e-6
    assert np.all(index.max(axis=0) <= np.array(lattice.GetSize()) - 1 + 1e-6)
    assert np.all(index.min(axis=0) < 1)  # no spare layer of nodes below…
    assert np.all(index.max(axis=0) > np.array(lattice.GetSize()) - 2)  # …or above


def test_a_2d_lattice_field_is_the_composite_too():
    grid = Grid((31, 27), (0.8, 1.1), (-5.0, 4.0), tuple(rotation_matrix((0.0, 0.0), 20.0).ravel()))
    deformation = _deformation(grid, (2.4, 3.7), (10, 9))
    composite, lattice = _as_composite_and_lattice(grid, deformation)

    linear = sitk.DisplacementFieldTransform(sitk.Cast(lattice, sitk.sitkVectorFloat64))
    np.testing.assert_allclose(_dense(linear, grid), _dense(composite, grid), atol=2e-5)


def test_a_deformation_turned_against_the_fixed_image_is_refused():
    deformation = _deformation(FIXED, (0.0, 0.0, 0.0), (5, 5, 5))
    deformation.SetDirection(tuple(np.eye(3).ravel()))
    with pytest.raises(InputError, match="axis directions"):
        displacement_on_lattice(_affine(3), deformation, FIXED)
