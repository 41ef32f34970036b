"""A moving image that covers only part of the fixed one (a slab, a scan cut off at the neck),
or whose mask leaves part of it out (a lesion the fixed image lacks).

Beyond its field of view the moving image is padding, not tissue: the report's similarity
looks only where it has data, a note says how much of the fixed foreground it covers, and
the loss compares nothing there, nor outside the moving mask.
"""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import grid_centre, grid_points, make_phantom, oblique_grid

from DeepRegisterLib.registration.engine import register
from DeepRegisterLib.registration.grid_images import LOSS_REACH, _eroded


def _half_of(image: sitk.Image, axis: int) -> sitk.Image:
    """The first half of ``image`` along index ``axis``: its field of view ends mid-way."""
    size = list(image.GetSize())
    size[axis] //= 2
    return sitk.RegionOfInterest(image, size, [0] * image.GetDimension())


def _ncc_over_foreground(fixed: sitk.Image, warped: sitk.Image) -> float:
    """NCC over the fixed foreground, counting the padding where the moving image has no data."""
    a = sitk.GetArrayViewFromImage(fixed).astype(np.float64)
    b = sitk.GetArrayViewFromImage(warped).astype(np.float64)
    inside = a > 0.05 * np.percentile(a, 99)
    a, b = a[inside] - a[inside].mean(), b[inside] - b[inside].mean()
    return float((a * b).sum() / np.sqrt((a * a).sum() * (b * b).sum()))


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_a_moving_image_covering_half_the_fixed_one_is_scored_where_it_has_data(dim: int) -> None:
    grid = oblique_grid(dim, size=(40, 40, 40)[:dim], spacing=(1.2, 1.0, 1.1)[:dim])
    phantom = make_phantom(dim, grid_centre(grid))
    fixed = phantom.image(grid)
    common = dict(preset="fast", model=None, device="cpu", iterations=6, compute_jacobian=False)
    whole = register(fixed, fixed, **common)
    half = register(fixed, _half_of(fixed, axis=0), **common)

    notes = [note for note in half.report["notes"] if note.startswith("field of view")]
    assert len(notes) == 1, half.report["notes"]
    percent = int(notes[0].split("covers ")[1].split("%")[0])
    assert 35 <= percent <= 65, notes[0]
    assert not any(note.startswith("field of view") for note in whole.report["notes"])
    # An image registered to its own half matches where the half has data; over the whole
    # foreground, the padding would make the same result look like a failure.
    assert half.report["ncc_affine"] > 0.95
    assert half.report["ncc_after"] > 0.95
    assert _ncc_over_foreground(fixed, half.warped) < half.report["ncc_after"] - 0.2


@pytest.mark.parametrize("similarity", ["lncc", "mse", "mind"])
def test_an_image_registered_to_its_own_half_stays_where_it_is(similarity: str) -> None:
    """The truth is the identity. Beyond the half's field of view is padding: compared with
    the fixed anatomy there, every similarity pulled the half's content over the rest (local
    NCC 1.8 mm on average over the body, MSE 2.2, MIND 3.9; at most 4 to 11 mm)."""
    grid = oblique_grid(3, size=(40, 40, 40), spacing=(1.2, 1.0, 1.1))
    phantom = make_phantom(3, grid_centre(grid))
    fixed = phantom.image(grid)
    result = register(
        fixed, _half_of(fixed, axis=0), preset="fast", model=None, device="cpu",
        similarity=similarity, affine=False, compute_jacobian=False,
    )  # fmt: skip
    moved = np.linalg.norm(sitk.GetArrayViewFromImage(result.displacement), axis=-1)
    body = sitk.GetArrayViewFromImage(phantom.label_map(grid)) > 0
    print(f"\n{similarity}: displacement over the body mean {moved[body].mean():.2f} mm, "
          f"max {moved[body].max():.2f} mm")  # fmt: skip
    assert moved[body].mean() < 0.3
    assert moved[body].max() < 1.5


def test_what_the_moving_mask_leaves_out_pulls_on_nothing() -> None:
    """A bright blob in the moving image only (a lesion): without a mask the deformation
    bends around it; with a moving mask that leaves it out, a few millimetres wider than the
    blob as the local windows reach, the phantom stays where it is (the truth: the identity)."""
    grid = oblique_grid(3, size=(40, 40, 40), spacing=(1.2, 1.0, 1.1))
    centre = grid_centre(grid)
    fixed = make_phantom(3, centre).image(grid)
    r = np.linalg.norm(grid_points(grid) - (centre + np.array([5.0, 0.0, 0.0])), axis=-1)
    values = sitk.GetArrayFromImage(fixed)
    moving = sitk.GetImageFromArray(np.where(r < 6.0, 1.2 * values.max(), values))
    moving.CopyInformation(fixed)
    mask = sitk.GetImageFromArray((r >= 12.0).astype(np.uint8))
    mask.CopyInformation(fixed)
    common = dict(preset="fast", model=None, device="cpu", affine=False, compute_jacobian=False)

    def moved(**options) -> np.ndarray:
        result = register(fixed, moving, **common, **options)
        return np.linalg.norm(sitk.GetArrayViewFromImage(result.displacement), axis=-1)

    assert moved().max() > 3.0
    assert moved(moving_mask=mask).max() < 0.05


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_the_data_region_is_the_domain_less_its_edge(dim: int) -> None:
    """A voxel counts as data where no voxel outside the moving image's domain lies within
    LOSS_REACH of it along any axis (a cube's window); the grid's own border is no edge."""
    rng = np.random.default_rng(dim)
    shape = (9, 23, 17)[-dim:]
    domain = torch.from_numpy((rng.random(shape) > 0.02).astype(np.float32))[None, None]
    domain[(0, 0, *[slice(None)] * (dim - 1), slice(0, 5))] = 0  # a field of view's edge
    eroded = _eroded(domain, LOSS_REACH)
    outside = np.argwhere(domain[0, 0].numpy() == 0)
    for index in np.ndindex(*shape):
        near = np.abs(outside - np.asarray(index)).max(axis=1).min() <= LOSS_REACH
        assert eroded[(0, 0, *index)] == (0.0 if near else 1.0), index
    assert eroded.dtype == domain.dtype
    assert 0 < float(eroded.sum()) < float(domain.sum())
