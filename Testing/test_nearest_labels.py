"""Label maps are warped by gathering their own integers at the nearest voxel: the values
PyTorch's nearest grid sampler gives, and SimpleITK's nearest-neighbour resampling, for every
integer pixel type, with no float copy of the labels."""

from __future__ import annotations

import math

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from conftest import image_on, oblique_grid

from DeepRegisterLib.registration import image_warping
from DeepRegisterLib.registration.image_warping import nearest_values, warp_image


def _coordinates(sizes: tuple[int, ...], dtype: torch.dtype, nan: bool) -> torch.Tensor:
    """Random points in and beyond [−1, 1] (x, y[, z]), points exactly halfway between two
    voxels (rounded to even, as the sampler does), and ±inf (and NaN) in every component."""
    generator = torch.Generator().manual_seed(0)
    dim = len(sizes)
    spread = torch.rand(50_000, dim, dtype=dtype, generator=generator) * 2.6 - 1.3
    halves = [torch.randint(0, 2 * n - 1, (2000,), generator=generator) for n in sizes]
    ties = torch.stack([h.to(dtype) / (n - 1) - 1 for h, n in zip(halves, sizes, strict=True)], -1)
    specials = [math.inf, -math.inf, 1.0, -1.0] + ([math.nan] if nan else [])
    edges = torch.tensor([[value] * dim for value in specials], dtype=dtype)
    return torch.cat([spread, ties, edges])


@pytest.mark.parametrize("int32_below", [image_warping.INT32_INDEX_VOXELS, 0])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_nearest_values_are_the_nearest_grid_samples(
    dim: int, dtype: torch.dtype, int32_below: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NaN only in 3D: the 2D sampler's vectorised kernel leaves it elsewhere than its scalar
    3D one. The warp never reads a NaN point's value: it counts as outside (ITK's 0). Flat
    indices in int32, and in int64 as volumes of 2**31 voxels or more take them."""
    monkeypatch.setattr(image_warping, "INT32_INDEX_VOXELS", int32_below)
    shape = (7, 5, 6)[:dim] if dim == 3 else (9, 4)
    volume = torch.randint(-1000, 1000, shape, dtype=torch.int32)
    points = _coordinates(shape[::-1], dtype, nan=dim == 3)
    grid = points.view(1, *[1] * (dim - 1), -1, dim)
    sampled = F.grid_sample(
        volume.to(dtype)[None, None], grid, mode="nearest", padding_mode="border",
        align_corners=True,
    ).view(-1)  # fmt: skip
    gathered = nearest_values(volume, points)
    assert gathered.dtype == torch.int32
    assert torch.equal(gathered.to(dtype), sampled)


@pytest.mark.parametrize(
    ("dtype", "low", "high"),
    [
        (np.uint8, 0, 255),
        (np.int8, -128, 127),
        (np.uint16, 0, 65535),
        (np.int16, -32768, 32767),
        (np.uint32, 0, 2**32 - 1),
        (np.int32, -(2**31), 2**31 - 1),
        (np.uint64, 0, 2**40),  # above 2**24: its points in float64
        (np.int64, -(2**40), 2**40),
    ],
)
def test_labels_of_every_integer_type_are_warped_as_itk_does(
    dtype, low: int, high: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    grid = oblique_grid(3, size=(10, 9, 8))
    rng = np.random.default_rng(0)
    labels = rng.integers(low, high, size=grid.shape, endpoint=True).astype(dtype)
    labels[0], labels[-1] = high, low  # the type's extremes, where a cast would wrap them
    moving = image_on(grid, labels)
    points = np.stack(np.meshgrid(*[np.arange(n) for n in grid.shape], indexing="ij"), -1)
    field = (1.3 * np.sin(points / 2.7) + 0.4).astype(np.float32)[..., ::-1].copy()

    def no_float_copy(*args, **kwargs):
        raise AssertionError("labels converted to a float tensor")

    monkeypatch.setattr(image_warping, "_as_tensor", no_float_copy)
    if np.dtype(dtype).itemsize <= 2:  # float32 holds every such label: no pass to find out

        def no_scan(*args, **kwargs):
            raise AssertionError("an 8- or 16-bit label map's range measured")

        monkeypatch.setattr(sitk, "MinimumMaximumImageFilter", no_scan)
    ours = warp_image(moving, field, grid, nearest=True)
    transform = sitk.DisplacementFieldTransform(image_on(grid, field.astype(np.float64), True))
    itk = sitk.Resample(moving, moving, transform, sitk.sitkNearestNeighbor, 0)
    assert ours.GetPixelID() == moving.GetPixelID()
    ours_array, itk_array = sitk.GetArrayFromImage(ours), sitk.GetArrayFromImage(itk)
    assert np.count_nonzero(itk_array) > 0.5 * itk_array.size  # most points land inside
    np.testing.assert_array_equal(ours_array, itk_array)
