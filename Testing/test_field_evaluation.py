"""The displacement evaluated where it is read (warping, det J): a voxel's value does not depend
on the block, the rows evaluated together, the row order or the thread that read it; where a point
lands outside the moving image the warp gives ITK's zero, even beside a NaN. The moving voxels
become the sampler's tensor with NumPy's values."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import image_on, oblique_grid

from DeepRegisterLib.errors import RegistrationCancelled
from DeepRegisterLib.registration import image_warping, warping
from DeepRegisterLib.registration.image_warping import warp_image
from DeepRegisterLib.registration.warping import Displacement


def _displacement(dim: int) -> Displacement:
    """``T(x) = A(x + v(x))`` with a random ``v`` on a 2 mm grid inside an oblique fixed grid."""
    fixed = oblique_grid(dim, size=(23, 19, 17)[:dim])
    network = fixed.with_spacing_cropped_to(
        2.0, np.full(dim, 3), np.asarray(fixed.size) - 4, multiple=1
    )
    flow = torch.randn((1, dim, *network.shape), generator=torch.Generator().manual_seed(dim))
    affine = sitk.AffineTransform(dim)
    affine.SetMatrix((np.eye(dim) + 0.03 * np.arange(dim * dim).reshape(dim, dim)).ravel())
    affine.SetTranslation((1.5, -2.0, 0.7)[:dim])
    return Displacement(affine, flow, network, fixed)


@pytest.mark.parametrize("shared", [True, False])  # a brain's slices, a CT's
@pytest.mark.parametrize("dim", [2, 3])
def test_each_voxel_has_one_value_whatever_block_holds_it(
    dim: int, shared: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    if not shared:
        monkeypatch.setattr(warping, "SHARED_SLICES_BYTES", 0)
    field = _displacement(dim)
    shape = field.grid.shape
    whole = tuple(slice(0, n) for n in shape)
    linear = np.linspace(0.5, 1.5, dim * dim).reshape(dim, dim)
    constant = np.linspace(-1.0, 1.0, dim)

    def evaluated(block):
        return field.tensor(block), field.mapped(linear, constant, block), field.deformation(block)

    expected = evaluated(whole)
    monkeypatch.setattr(warping, "CACHE_VOXELS", 7)  # a row at a time
    rng = np.random.default_rng(dim)
    for _ in range(6):
        starts = [int(rng.integers(0, n - 2)) for n in shape]
        block = tuple(
            slice(start, int(rng.integers(start + 1, n + 1)))
            for start, n in zip(starts, shape, strict=True)
        )
        got = evaluated(block)
        assert torch.equal(got[0], expected[0][block])
        assert torch.equal(got[1], expected[1][block])
        assert torch.equal(got[2], expected[2][(slice(None), *block)])


def test_two_threads_reading_the_field_at_once_get_its_values(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Warping and det J read a CT's field on two threads, each keeping its own last slices:
    one reading rows forwards and one backwards (every slice made again) get the values that
    slices made once for both give."""
    shared = _displacement(3)
    rows = shared.grid.shape[0]
    across = tuple(slice(0, n) for n in shared.grid.shape[1:])
    expected = shared.deformation((slice(0, rows), *across))
    monkeypatch.setattr(warping, "SHARED_SLICES_BYTES", 0)
    monkeypatch.setattr(warping, "KEPT_SLICES", 2)
    field = _displacement(3)
    results: dict[str, torch.Tensor] = {}

    def read(name: str, order: range) -> None:
        parts = {row: field.deformation((slice(row, row + 1), *across)) for row in order}
        results[name] = torch.cat([parts[row] for row in range(rows)], dim=1)

    threads = [
        threading.Thread(target=read, args=("forwards", range(rows))),
        threading.Thread(target=read, args=("backwards", range(rows - 1, -1, -1))),
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert torch.equal(results["forwards"], expected)
    assert torch.equal(results["backwards"], expected)


def test_a_point_beyond_a_nan_on_the_border_is_zero_as_in_itk() -> None:
    """Linear sampling clamps a point beyond the border to the border's voxel; ITK gives zero
    there. A NaN on the border must not leak out to it (NaN × 0 is NaN)."""
    grid = oblique_grid(2, size=(12, 10))
    scan = np.linspace(1.0, 2.0, 120, dtype=np.float32).reshape(grid.shape)
    scan[:, -1] = np.nan  # the last column
    moving = image_on(grid, scan)
    shift = np.asarray(grid.index_to_physical)[:, 0] * 2.5  # 2.5 voxels along I
    field = np.broadcast_to(shift, (*grid.shape, 2)).astype(np.float32)

    ours = sitk.GetArrayFromImage(warp_image(moving, field, grid))

    transform = sitk.DisplacementFieldTransform(image_on(grid, field.astype(np.float64), True))
    itk = sitk.GetArrayFromImage(sitk.Resample(moving, moving, transform, sitk.sitkLinear, 0.0))
    assert np.array_equal(np.isnan(ours), np.isnan(itk))
    assert np.isnan(ours).any()  # the points that read the NaN column
    outside = ours[:, -2:]  # 2.5 voxels past the last column: beyond half a voxel
    assert np.array_equal(outside, np.zeros_like(outside))
    finite = ~np.isnan(itk)
    np.testing.assert_allclose(ours[finite], itk[finite], rtol=0, atol=1e-5)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, np.uint16, np.int32, np.uint64, np.float64])
def test_an_image_becomes_a_float_tensor_as_numpy_converts_it(dtype) -> None:
    """The moving scan's voxels reach the linear sampler through torch's threads, the values
    NumPy gives; a cancel request stops the conversion."""
    rng = np.random.default_rng(0)
    top = {np.uint64: 2**40, np.float64: 1e9}.get(dtype) or np.iinfo(dtype).max
    array = rng.uniform(0, top, size=(9, 8, 7)).astype(dtype)
    image = sitk.GetImageFromArray(array)
    tensor = image_warping._as_tensor(image, lambda: False)
    assert tensor.dtype == torch.float32
    assert np.array_equal(tensor.numpy(), array.astype(np.float32))
    with pytest.raises(RegistrationCancelled):
        image_warping._as_tensor(image, lambda: True)
