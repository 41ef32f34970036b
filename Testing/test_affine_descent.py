"""The affine search's compiled descent (affine_descent.c): its mutual information and gradient
are those of the PyTorch search an install without it runs (autograd), its gradient is the
derivative of its own information, and its steps are those of the PyTorch descent."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import EVERY_CMAKE_BUILD, built_by_cmake

from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.imaging.phantoms import phantom
from DeepRegisterLib.registration import affine, affine_descent, affine_levels, affine_torch
from DeepRegisterLib.registration.affine_levels import Pose, Steps
from DeepRegisterLib.registration.preprocessing import normalised_for_registration

pytestmark = pytest.mark.skipif(
    not affine_descent.available(), reason="the compiled descent was not built (no C compiler)"
)


def _level(dim: int, masked: bool, centre: tuple[float, ...] = (0.0,) * 3) -> affine_levels.Level:
    """The 4 mm level of a phantom and its copy turned and shifted (a moving mask leaving out
    a slab, where ``masked``), poses turning about ``centre``."""
    grid = Grid((64,) * dim, (2.0,) * dim, (-64.0,) * dim, tuple(np.eye(dim).ravel()))
    fixed = normalised_for_registration(phantom(grid)[0])
    turn = sitk.Euler3DTransform() if dim == 3 else sitk.Euler2DTransform()
    turn.SetCenter((0.0,) * dim)
    turn.SetTranslation((3.0, -2.0, 1.0)[:dim])
    turn.SetParameters((0.1, -0.05, 0.2, 3.0, -2.0, 1.0) if dim == 3 else (0.15, 3.0, -2.0))
    moving = sitk.Resample(fixed, fixed, turn, sitk.sitkLinear, 0.0)
    mask = None
    if masked:
        mask = sitk.Cast(sitk.Image(moving.GetSize(), sitk.sitkUInt8) + 1, sitk.sitkUInt8)
        mask.CopyInformation(moving)
        mask[(slice(40, None),) + (slice(None),) * (dim - 1)] = 0
    copies = affine.WorkingCopies((fixed, moving), (None, mask), finest_mm=4.0)
    return affine_levels.Levels(copies, np.asarray(centre[:dim]), seed=0).at(4.0)


def _poses(dim: int) -> Pose:
    """Three poses near the identity, turned, scaled, shifted: off the voxel lattice, where
    trilinear sampling has no one derivative."""
    rng = np.random.default_rng(1)
    spread = np.array([0.01, 0.06, 0.06])[:, None, None]
    matrices = np.eye(dim) + spread * rng.standard_normal((3, dim, dim))
    shifts = 50 * spread[:, 0] * rng.standard_normal((3, dim))
    return Pose(matrices, shifts)


@pytest.mark.parametrize(("dim", "masked"), [(3, False), (3, True), (2, False)])
def test_the_information_and_its_gradient_are_pytorchs(dim: int, masked: bool) -> None:
    """PyTorch's sampler and coordinates are float32, the compiled code's float64: the same
    to a few parts in 10⁴."""
    level, poses = _level(dim, masked), _poses(dim)
    ours = affine_descent.information(level, poses)
    theirs = affine_torch.information(level, poses)
    np.testing.assert_allclose(ours[0], theirs[0], rtol=2e-4)
    for got, expected in zip(ours[1:], theirs[1:], strict=True):
        for pose in range(len(poses)):
            scale = np.abs(expected[pose]).max()
            np.testing.assert_allclose(got[pose], expected[pose], atol=2e-3 * scale)


def test_the_gradient_is_the_derivative_of_the_information() -> None:
    """Central differences of the compiled information, steps of 10⁻⁵ in a matrix entry and
    10⁻³ mm in a shift: above the map's single precision, below where trilinear sampling's
    kinks between voxels show."""
    level = _level(3, masked=True)
    pose = _poses(3).picked([1])
    _, d_matrix, d_shift = affine_descent.information(level, pose)
    for which, entries, step in (
        ("matrix", np.ndindex(3, 3), 1e-5),
        ("shift", np.ndindex(3), 1e-3),
    ):
        for entry in entries:
            moved = [Pose(pose.matrix.copy(), pose.shift.copy()) for _ in range(2)]
            for sign, p in zip((1.0, -1.0), moved, strict=True):
                getattr(p, which)[(0, *entry)] += sign * step
            ahead, behind = (affine_descent.similarity(level, p)[0] for p in moved)
            analytic = (d_matrix if which == "matrix" else d_shift)[(0, *entry)]
            numeric = (ahead - behind) / (2 * step)
            assert analytic == pytest.approx(numeric, rel=1e-2, abs=1e-4)


@pytest.mark.parametrize("rigid", [True, False])
@pytest.mark.parametrize("dim", [3, 2])
def test_a_step_is_the_pytorch_descents_step(rigid: bool, dim: int) -> None:
    """From each pose and its parameters as a level before left them, two steps end where
    PyTorch's descent ends, over angles or matrix entries alike."""
    level, poses = _level(dim, masked=False), _poses(dim)
    steps = Steps(2, first=4.0, radius_mm=40.0, relaxation=0.6, min_step=1e-4)
    count = affine_levels.parameter_count(dim, rigid)
    changes = np.random.default_rng(2).uniform(-1.0, 1.0, (len(poses), count))  # from a level
    ours_changes, theirs_changes = changes.copy(), changes.copy()
    ours = affine_descent.descend(level, poses, ours_changes, rigid, steps)
    theirs = affine_torch.descend(level, poses, theirs_changes, rigid, steps)
    np.testing.assert_allclose(ours.matrix, theirs.matrix, atol=1e-4)
    np.testing.assert_allclose(ours.shift, theirs.shift, atol=2e-3)
    np.testing.assert_allclose(ours_changes, theirs_changes, atol=2e-3)
    assert not np.allclose(ours_changes, changes, atol=0.5)  # they did move


def test_the_same_level_and_poses_give_the_same_bits_and_a_higher_information() -> None:
    level, poses = _level(3, masked=True), _poses(3)
    steps = Steps(30, first=4.0, radius_mm=40.0, relaxation=0.6, min_step=1e-4)
    first, again = (
        affine_descent.descend(level, poses, np.zeros((3, 12)), False, steps) for _ in range(2)
    )
    assert np.array_equal(first.matrix, again.matrix)
    assert np.array_equal(first.shift, again.shift)
    before, after = affine_descent.similarity(level, poses), affine_descent.similarity(level, first)
    assert (after > before).all()


@pytest.mark.skipif(shutil.which("cmake") is None, reason="no cmake to build with")
@EVERY_CMAKE_BUILD
def test_slicers_build_gives_the_same_affine(tmp_path: Path, monkeypatch, flags: str) -> None:
    """affine_descent.cmake, as the extension's CMakeLists.txt calls it, builds a library
    without Python that measures what pip's module measures, to the bit: with flags for this
    very CPU (no multiply-add fused), at -O2 (where GCC 12's basic-block vectoriser, left on,
    dropped two of the map's roundings to single precision: 1e-9 apart), and unoptimised,
    where the machine does what the C says. A centre off single precision's values: the
    map's constant part then changes when rounded."""
    built = built_by_cmake(
        tmp_path, "DeepRegisterLib/registration/affine_descent.cmake",
        "deepregister_add_affine_descent", "_affine_descent", flags,
    )  # fmt: skip
    level, poses = _level(3, masked=True, centre=(0.3, -1.1, 2.7)), _poses(3)
    pips = affine_descent.information(level, poses)
    monkeypatch.setattr(affine_descent, "_library", lambda: affine_descent.loaded(str(built)))
    slicers = affine_descent.information(level, poses)
    for ours, theirs in zip(pips, slicers, strict=True):
        np.testing.assert_array_equal(ours, theirs)
