"""The inverse transform undoes the forward one between DIFFERENT grids, with a real affine part.

The moving image is the phantom seen through a 12° rotation, anisotropic scaling (1.08, 0.93,
1.05), a translation of several mm and a smooth 2 mm sinusoid, sampled on a grid of its own
(another size, spacing, origin and oblique direction): ``moving(y) = f(P(y))`` with
``P(y) = z + w(z)``, ``z = M⁻¹(y − b)``. The forward transform ``T`` maps fixed points to moving
points and the inverse maps them back; ``T⁻¹(T(x))`` must be ``x`` for the API's ITK transforms
and for the files the command line writes, read back by SimpleITK.

Tolerance: the inverse is ``exp(−v)`` of the same velocity, integrated and sampled on its own
grid (the moving image's), so ``T⁻¹ ∘ T`` differs from the identity by the integration and linear
interpolation errors only: a fraction of a voxel. We allow at most half the fixed grid's finest
voxel anywhere and a tenth of it on average (measured, 0.9 mm voxels: 0.25 mm max and
0.075 mm mean in 3D, 0.18 and 0.044 mm in 2D).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import grid_centre, grid_points, make_phantom, oblique_grid, rotation_matrix

from DeepRegisterLib import register
from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.registration.result import RegistrationResult

DEGREES = 12.0
SCALING = (1.08, 0.93, 1.05)
SHIFT_MM = (3.0, -2.5, 2.0)
WAVE_MM, WAVELENGTH_MM = 2.0, 30.0
SETTINGS = dict(preset="fast", model=None, device="cpu", iterations=16)


@dataclass
class Case:
    fixed_grid: Grid
    moving_grid: Grid
    points: np.ndarray  # fixed foreground points (LPS mm), a few hundred
    pull: object  # P: moving → phantom coordinates
    result: RegistrationResult
    files: dict[str, Path]


@pytest.fixture(scope="module", params=[2, 3], ids=["2d", "3d"])
def a_case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    dim = request.param
    fixed_grid = oblique_grid(dim, size=(36, 40, 30)[:dim], spacing=(1.3, 0.9, 1.7)[:dim])
    centre = grid_centre(fixed_grid)
    phantom = make_phantom(dim, centre, scale_mm=14.0)
    matrix = rotation_matrix((0.4, -0.3, 1.0)[:dim], DEGREES) @ np.diag(SCALING[:dim])
    offset = centre - matrix @ centre + np.array(SHIFT_MM[:dim])
    moving_grid = oblique_grid(
        dim, size=(44, 34, 38)[:dim], spacing=(1.1, 1.4, 1.2)[:dim], degrees=-25.0,
        axis=(-1.0, 0.5, 2.0), centre=matrix @ centre + offset,
    )  # fmt: skip
    inverse_matrix = np.linalg.inv(matrix)

    def pull(y: np.ndarray) -> np.ndarray:
        z = (y - offset) @ inverse_matrix.T
        r = z - centre
        wave = [np.sin(2 * np.pi * r[..., (a + 1) % dim] / WAVELENGTH_MM) for a in range(dim)]
        return z + WAVE_MM * np.stack(wave, axis=-1)

    fixed, moving = phantom.image(fixed_grid), phantom.image(moving_grid, through=pull)
    inside = grid_points(fixed_grid)[phantom.ellipsoids[0].radius_at(grid_points(fixed_grid)) < 0.9]
    folder = tmp_path_factory.mktemp(f"inverse{dim}d")
    files = {"fixed": folder / "fixed.mha", "moving": folder / "moving.nrrd"}
    sitk.WriteImage(fixed, str(files["fixed"]))
    sitk.WriteImage(moving, str(files["moving"]))
    result = register(
        fixed, moving, compute_inverse=True, compute_inverse_displacement=True,
        compute_jacobian=False, **SETTINGS,
    )  # fmt: skip
    return Case(fixed_grid, moving_grid, inside[:: max(1, len(inside) // 300)], pull,
                result, files)  # fmt: skip


def transform_points(transform: sitk.Transform, points: np.ndarray) -> np.ndarray:
    return np.array([transform.TransformPoint(tuple(float(c) for c in p)) for p in points])


def round_trip_error(case: Case, forward: sitk.Transform, inverse: sitk.Transform) -> np.ndarray:
    """|T⁻¹(T(x)) − x| (mm) at the fixed foreground points."""
    there = transform_points(forward, case.points)
    return np.linalg.norm(transform_points(inverse, there) - case.points, axis=-1)


def assert_inverts(case: Case, forward: sitk.Transform, inverse: sitk.Transform) -> None:
    error = round_trip_error(case, forward, inverse)
    voxel = min(case.fixed_grid.spacing)
    print(f"\n{case.fixed_grid.dim}D |T⁻¹(T(x)) − x|: mean {error.mean():.3f}, "
          f"max {error.max():.3f} mm (voxel {voxel} mm, {len(error)} points)")  # fmt: skip
    assert error.max() <= 0.5 * voxel
    assert error.mean() <= 0.1 * voxel


def test_the_case_has_a_real_rotation_scaling_and_deformation(a_case: Case) -> None:
    """Otherwise the round trip below could pass with a near-identity transform."""
    assert a_case.fixed_grid.size != a_case.moving_grid.size
    assert a_case.fixed_grid.spacing != a_case.moving_grid.spacing
    assert a_case.fixed_grid.direction != a_case.moving_grid.direction
    assert a_case.fixed_grid.origin != a_case.moving_grid.origin
    result, points = a_case.result, a_case.points
    there = transform_points(result.transform(), points)
    affine_only = transform_points(result.affine, points)
    assert np.linalg.norm(there - affine_only, axis=-1).max() > 1.0  # a deformable part too

    def residual(mapped: np.ndarray) -> float:
        """Mean |P(T(x)) − x| (mm): 0 where T recovers P⁻¹."""
        return float(np.linalg.norm(a_case.pull(mapped) - points, axis=-1).mean())

    print(f"\n{points.shape[1]}D mean |P(T(x)) − x|: identity {residual(points):.2f}, affine "
          f"{residual(affine_only):.2f}, total {residual(there):.2f} mm")  # fmt: skip
    assert residual(points) > 3.5  # mm: several voxels to undo
    assert residual(there) < 0.5 * residual(points)
    assert residual(there) < 0.8 * residual(affine_only)


def test_the_api_inverse_undoes_the_forward_transform(a_case: Case) -> None:
    inverse = a_case.result.inverse_transform()
    assert inverse is not None
    # The inverse lives on the moving grid (where its inputs are), the forward on the fixed.
    displacement = a_case.result.inverse_displacement
    assert displacement.GetSize() == a_case.moving_grid.size
    np.testing.assert_allclose(displacement.GetDirection(), a_case.moving_grid.direction)
    assert_inverts(a_case, a_case.result.transform(), inverse)


def test_the_transform_files_written_by_the_command_line_invert_each_other(
    a_case: Case, tmp_path: Path
) -> None:
    out = {"forward": tmp_path / "t.h5", "inverse": tmp_path / "i.h5"}
    code = cli.main([
        "register", "--fixed", str(a_case.files["fixed"]), "--moving", str(a_case.files["moving"]),
        "--transform", str(out["forward"]), "--inverse-transform", str(out["inverse"]),
        "--model", "none", "--preset", SETTINGS["preset"], "--device", SETTINGS["device"],
        "--iterations", str(SETTINGS["iterations"]), "--quiet",
    ])  # fmt: skip
    assert code == cli.EXIT_OK
    forward = sitk.ReadTransform(str(out["forward"]))
    inverse = sitk.ReadTransform(str(out["inverse"]))
    assert_inverts(a_case, forward, inverse)
    # The files hold the run's transform, not merely some pair of mutual inverses: the same
    # inputs and seed give the API's transform.
    np.testing.assert_allclose(
        transform_points(forward, a_case.points),
        transform_points(a_case.result.transform(), a_case.points),
        atol=0.05,
    )
