"""Smoothing and resampling whole volumes onto the network grid, interruptibly.

SimpleITK's one-call functions cannot be interrupted, and on a 512² × 600 CT one call runs for
many seconds. Filter objects, though, emit progress events many times a second and honour
``Abort()``, so :func:`resample` aborts from its progress callback when a cancel is requested.
``RecursiveGaussianImageFilter`` reports progress only at its start and end; it filters each line
along one axis independently, so :func:`antialiased` runs it over slabs cut across the other axes
(bit-identical to one whole-volume call) and checks for a cancel between slabs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import stop_if_cancelled

IsCancelled = Callable[[], bool]
SLAB_VOXELS = 4_000_000  # per Gaussian slab: a few tens of milliseconds of work


def _never() -> bool:
    return False


def run_filter(
    image_filter: sitk.ProcessObject, *inputs: sitk.Image, is_cancelled: IsCancelled = _never
) -> sitk.Image:
    """``image_filter.Execute(*inputs)``, aborted within one progress event of a cancel."""
    stop_if_cancelled(is_cancelled, "while preparing the images")

    def abort_if_cancelled() -> None:
        if is_cancelled():
            image_filter.Abort()

    image_filter.AddCommand(sitk.sitkProgressEvent, abort_if_cancelled)
    try:
        return image_filter.Execute(*inputs)
    except RuntimeError:
        stop_if_cancelled(is_cancelled, "while preparing the images")
        raise
    finally:
        image_filter.RemoveAllCommands()


def resample(
    image: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform,
    interpolator: int = sitk.sitkLinear,
    output_type: int = sitk.sitkFloat32,
    is_cancelled: IsCancelled = _never,
) -> sitk.Image:
    """``sitk.Resample`` (zero outside) that a cancel request interrupts."""
    resampler = sitk.ResampleImageFilter()
    resampler.SetReferenceImage(reference)
    resampler.SetTransform(transform)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(0.0)
    resampler.SetOutputPixelType(output_type)
    return run_filter(resampler, image, is_cancelled=is_cancelled)


def resample_linear(
    image: sitk.Image,
    reference: sitk.Image,
    transform: sitk.Transform,
    is_cancelled: IsCancelled = _never,
) -> sitk.Image:
    """Linear resampling to float32, zero outside: how network inputs are made."""
    return resample(image, reference, transform, is_cancelled=is_cancelled)


def _gaussian_along(
    volume: np.ndarray, spacing: tuple[float, ...], sigma: float, axis: int, is_cancelled
) -> np.ndarray:
    """ITK's recursive Gaussian along ITK ``axis`` of a (K, J, I) array, slab by slab."""
    array_axis = volume.ndim - 1 - axis
    across = 1 if array_axis == 0 else 0  # slabs are cut across another axis
    per_slab = max(1, SLAB_VOXELS * volume.shape[across] // volume.size)
    out = np.empty_like(volume)
    gaussian = sitk.RecursiveGaussianImageFilter()
    gaussian.SetSigma(sigma)
    gaussian.SetDirection(axis)
    for start in range(0, volume.shape[across], per_slab):
        stop_if_cancelled(is_cancelled, "while smoothing the images")
        rows = (slice(None),) * across + (slice(start, start + per_slab),)
        slab = sitk.GetImageFromArray(np.ascontiguousarray(volume[rows]))
        slab.SetSpacing(spacing)
        smoothed = gaussian.Execute(slab)  # held: the array view does not keep it alive
        out[rows] = sitk.GetArrayViewFromImage(smoothed)
    return out


def antialiased(
    image: sitk.Image, target_mm: float, is_cancelled: IsCancelled = _never
) -> sitk.Image:
    """Gaussian-smoothed along each axis finer than ``target_mm``, before resampling onto it."""
    spacing = image.GetSpacing()
    sigmas = [0.4 * np.sqrt(max(target_mm**2 - s**2, 0.0)) for s in spacing]
    # Axes already as coarse as the target stay untouched.
    axes = [axis for axis, sigma in enumerate(sigmas) if sigma > 0.1 * spacing[axis]]
    if not axes:
        return sitk.Cast(image, sitk.sitkFloat32)
    volume = sitk.GetArrayViewFromImage(image)
    for axis in axes:
        volume = _gaussian_along(
            volume.astype(np.float32, copy=False), spacing, sigmas[axis], axis, is_cancelled
        )
    smoothed = sitk.GetImageFromArray(volume)
    smoothed.CopyInformation(image)
    return smoothed


def network_inputs(
    fixed_norm: sitk.Image,
    moving_norm: sitk.Image,
    reference: sitk.Image,
    affine: sitk.Transform,
    is_cancelled: IsCancelled = _never,
) -> tuple[sitk.Image, sitk.Image, sitk.Image]:
    """Fixed, moving through ``affine``, and moving as it lies, on the network grid ``reference``.

    Both images come normalised on their own full grids, then are smoothed and resampled alike,
    so an image registered to itself gives identical inputs. Training prepares real pairs with
    this same function, so that a model is validated on what the engine will feed it; the
    engine calls its parts itself, smoothing while the affine stage runs.
    """
    fixed_net = fixed_on_grid(fixed_norm, reference, is_cancelled)
    moving_smooth = antialiased(moving_norm, reference.GetSpacing()[0], is_cancelled)
    return (fixed_net, *moving_on_grid(moving_smooth, reference, affine, is_cancelled))


def fixed_on_grid(
    fixed_norm: sitk.Image, reference: sitk.Image, is_cancelled: IsCancelled = _never
) -> sitk.Image:
    """The fixed part of :func:`network_inputs`."""
    smoothed = antialiased(fixed_norm, reference.GetSpacing()[0], is_cancelled)
    return resample_linear(smoothed, reference, _identity(reference), is_cancelled)


def moving_on_grid(
    moving_smooth: sitk.Image,
    reference: sitk.Image,
    affine: sitk.Transform,
    is_cancelled: IsCancelled = _never,
) -> tuple[sitk.Image, sitk.Image]:
    """The moving part of :func:`network_inputs`, from the moving image already
    ``antialiased`` for the grid: through ``affine``, and as it lies."""
    return (
        resample_linear(moving_smooth, reference, affine, is_cancelled),
        resample_linear(moving_smooth, reference, _identity(reference), is_cancelled),
    )


def _identity(reference: sitk.Image) -> sitk.Transform:
    return sitk.Transform(reference.GetDimension(), sitk.sitkIdentity)
