"""Smoothing for a coarser grid is done in slabs a cancel request can interrupt, on blocks of
whole voxels where the grid is much coarser, and over only what a resampling reads: each gives
the whole volume's result."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk
from pieces import CancelOnCall, an_image

from DeepRegisterLib.errors import RegistrationCancelled
from DeepRegisterLib.imaging import resampling


def itk_antialiased(image: sitk.Image, target_mm: float) -> sitk.Image:
    """ITK's own anti-aliasing Gaussian (recursive) along each axis finer than the target."""
    image = sitk.Cast(image, sitk.sitkFloat32)
    for axis, spacing in enumerate(image.GetSpacing()):
        sigma = 0.4 * np.sqrt(max(target_mm**2 - spacing**2, 0.0))
        if sigma > 0.1 * spacing:
            image = sitk.RecursiveGaussian(image, sigma, direction=axis)
    return image


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((30, 41, 27), (0.7, 1.3, 2.5)), ((40, 33), (0.5, 1.1)), ((12, 10, 9), (5.0, 5.0, 5.0))],
    ids=["3d-anisotropic", "2d", "already-coarse"],
)
def test_slab_by_slab_smoothing_equals_the_whole_volume(monkeypatch, shape, spacing):
    image = an_image(shape, spacing)
    whole = resampling.antialiased(image, 4.0)  # one slab per axis at this size
    monkeypatch.setattr(resampling, "SLAB_VOXELS", 300)  # many slabs along every axis
    ours = resampling.antialiased(image, 4.0)
    np.testing.assert_array_equal(
        sitk.GetArrayViewFromImage(ours), sitk.GetArrayViewFromImage(whole)
    )
    assert ours.GetPixelID() == sitk.sitkFloat32
    assert (ours.GetOrigin(), ours.GetSpacing()) == (whole.GetOrigin(), whole.GetSpacing())
    # On the grid of its blocks: whole voxels each, with each block's mean at its centre.
    blocks = np.divide(ours.GetSpacing(), image.GetSpacing())
    np.testing.assert_allclose(blocks, np.round(blocks), rtol=1e-12)
    centre = image.TransformContinuousIndexToPhysicalPoint(((np.round(blocks) - 1) / 2).tolist())
    np.testing.assert_allclose(ours.GetOrigin(), centre, atol=1e-12)
    assert ours.GetDirection() == image.GetDirection()
    assert np.array_equal(ours.GetSize(), -(-np.array(image.GetSize()) // np.round(blocks)))


def test_smoothing_is_the_gaussian_itk_would_apply() -> None:
    """The sampled kernel has unit sum and the asked variance, and smooths a volume as ITK's
    recursive Gaussian does, to within its own approximation error."""
    for sigma in (0.3, 0.69, 1.6, 4.0):
        half = resampling.gaussian_half_kernel(sigma).astype(np.float64)
        kernel = np.concatenate([half[:0:-1], half])
        offsets = np.arange(len(kernel)) - (len(kernel) - 1) / 2
        assert kernel.sum() == pytest.approx(1.0, abs=1e-6)
        if sigma >= 0.5:  # below half a voxel a sampled Gaussian is mostly its centre tap
            assert (kernel * offsets**2).sum() == pytest.approx(sigma**2, rel=0.02)
    image = sitk.SmoothingRecursiveGaussian(an_image((40, 44, 36), (1.0, 1.0, 1.0)), 2.0)
    ours = sitk.GetArrayFromImage(resampling.antialiased(image, 2.0))
    itk = sitk.GetArrayFromImage(itk_antialiased(image, 2.0))
    inner = (slice(4, -4),) * 3  # the two treat the border differently
    spread = float(np.ptp(itk[inner]))
    assert float(np.abs(ours[inner] - itk[inner]).max()) < 0.01 * spread


def an_object_on_zeros(shape: tuple[int, ...], spacing: tuple[float, ...]) -> sitk.Image:
    """Noise inside an off-centre box, exact zeros around it: a skull-stripped brain's layout."""
    image = an_image(shape, spacing)
    array = sitk.GetArrayFromImage(image)
    keep = np.zeros(shape, dtype=bool)
    keep[tuple(slice(n // 5, n // 2 + 2) for n in shape)] = True
    out = sitk.GetImageFromArray(np.where(keep, array, 0).astype(np.float32))
    out.CopyInformation(image)
    return out


def a_grid_over(
    image: sitk.Image, spacing_mm: float, corner: tuple[float, ...], size: int = 9
) -> sitk.Image:
    """A coarser grid in ``image``'s orientation from continuous index ``corner``: like the
    network grid, which covers the fixed image's foreground box."""
    dim = image.GetDimension()
    reference = sitk.Image([size] * dim, sitk.sitkUInt8)
    reference.SetSpacing([spacing_mm] * dim)
    reference.SetDirection(image.GetDirection())
    reference.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(corner))
    return reference


@pytest.mark.parametrize(
    ("shape", "spacing"),
    [((40, 48, 36), (0.7, 1.0, 1.3)), ((50, 44), (0.6, 1.1)), ((40, 36, 30), (3.0, 3.0, 3.0))],
    ids=["3d-anisotropic", "2d", "already-coarse"],
)
def test_smoothing_only_what_a_resampling_reads_changes_nothing_it_reads(shape, spacing):
    """The moving image is smoothed over its nonzero box only; through any transform, the
    resampled result is exactly that of the whole smoothed volume."""
    image = an_object_on_zeros(shape, spacing)
    dim = len(shape)
    reference = a_grid_over(image, 2.5, tuple(n / 6 for n in reversed(shape)), size=24)
    transform = sitk.AffineTransform(dim)
    transform.SetMatrix(tuple((np.eye(dim) + 0.05 * np.roll(np.eye(dim), 1, axis=1)).ravel()))
    transform.SetTranslation(tuple([1.5] * dim))
    part = resampling.smoothed_for_grid(image, 2.5)
    assert np.prod(part.GetSize()) < 0.5 * np.prod(image.GetSize()), "nothing was cut away"
    whole = resampling.antialiased(image, 2.5)
    np.testing.assert_array_equal(
        sitk.GetArrayFromImage(resampling.resample_linear(part, reference, transform)),
        sitk.GetArrayFromImage(resampling.resample_linear(whole, reference, transform)),
    )


def test_the_fixed_image_is_smoothed_only_under_the_network_grid() -> None:
    image = an_image((60, 64, 56), (1.0, 0.8, 1.2))  # nonzero everywhere: the grid decides
    reference = a_grid_over(image, 2.0, (20.3, 11.0, 25.7))
    part = resampling.smoothed_for_grid(image, 2.0, reference=reference)
    assert np.prod(part.GetSize()) < 0.25 * np.prod(image.GetSize())
    ours = sitk.GetArrayFromImage(resampling.fixed_on_grid(image, reference))
    whole = resampling.resample_linear(
        resampling.antialiased(image, 2.0), reference, sitk.Transform(3, sitk.sitkIdentity)
    )
    # The crop's origin is computed anew, so a grid point's index may differ in its last bit.
    np.testing.assert_allclose(ours, sitk.GetArrayFromImage(whole), rtol=0, atol=1e-4)


def test_an_all_zero_image_smooths_to_zeros_on_any_grid() -> None:
    image = sitk.Image([30, 20, 10], sitk.sitkFloat32)
    part = resampling.smoothed_for_grid(image, 2.0, reference=a_grid_over(image, 2.0, (0, 0, 0)))
    assert part.GetNumberOfPixels() < image.GetNumberOfPixels()
    resampled = resampling.resample_linear(
        part, a_grid_over(image, 2.0, (3, 2, 1)), sitk.Transform(3, sitk.sitkIdentity)
    )
    assert not sitk.GetArrayViewFromImage(resampled).any()


def test_smoothing_stops_between_slabs(monkeypatch) -> None:
    image = an_image((30, 41, 27), (0.7, 1.3, 2.5))
    monkeypatch.setattr(resampling, "SLAB_VOXELS", 300)
    count = CancelOnCall(None)
    resampling.antialiased(image, 4.0, count)
    assert count.calls > 20, "too few checks to interrupt a big volume"
    cancel = CancelOnCall(count.calls // 2)
    with pytest.raises(RegistrationCancelled, match="smoothing"):
        resampling.antialiased(image, 4.0, cancel)
    assert cancel.calls == count.calls // 2, "work went on after the request"


@pytest.mark.parametrize(
    ("spacing", "target_mm"), [((0.78, 0.78, 1.0), 2.86), ((0.5, 0.5), 2.0), ((0.7, 1.0, 1.3), 2.5)]
)
def test_blocks_then_the_gaussian_resample_as_the_gaussian_alone(
    monkeypatch, spacing, target_mm
) -> None:
    """Averaging fine axes over blocks first (on a CT, pairs of voxels in-plane) and blurring
    the rest on them gives the network grid nearly what the Gaussian alone on every voxel gave
    (on structure at the grid's own scale, the hardest case), from a quarter of the voxels or
    fewer."""
    dim = len(spacing)
    rng = np.random.default_rng(3)
    shape = tuple(round(60 / s) for s in reversed(spacing))  # 60 mm across
    noise = sitk.GetImageFromArray(rng.normal(size=shape).astype(np.float32))
    noise.SetSpacing(spacing)
    image = sitk.SmoothingRecursiveGaussian(noise, 2.0)  # structure at the grid's scale
    reference = a_grid_over(image, target_mm, tuple(n / 5 for n in reversed(shape)), size=16)
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    blocked = resampling.antialiased(image, target_mm)
    assert np.prod(blocked.GetSize()) <= np.prod(image.GetSize()) / 2
    ours = sitk.GetArrayFromImage(resampling.resample_linear(blocked, reference, identity))
    monkeypatch.setattr(resampling, "BLOCK_RATIO", np.inf)
    alone = resampling.antialiased(image, target_mm)
    assert alone.GetSpacing() == image.GetSpacing()
    gaussian = sitk.GetArrayFromImage(resampling.resample_linear(alone, reference, identity))
    # Measured: at most 1.5–2.7 % of the range, 0.25–0.56 % on average (the interpolation
    # between blocks blurs a little more than between voxels).
    spread = float(np.ptp(gaussian))
    assert float(np.abs(ours - gaussian).max()) < 0.04 * spread
    assert float(np.abs(ours - gaussian).mean()) < 0.008 * spread


def test_a_brain_onto_its_2_mm_grid_is_smoothed_on_its_own_voxels() -> None:
    image = an_image((20, 22, 18), (1.0, 1.0, 1.0))
    smoothed = resampling.antialiased(image, 2.0)
    assert (smoothed.GetSize(), smoothed.GetSpacing(), smoothed.GetOrigin()) == (
        image.GetSize(), image.GetSpacing(), image.GetOrigin(),
    )  # fmt: skip
