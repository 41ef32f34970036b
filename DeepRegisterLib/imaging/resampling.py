"""Smoothing and resampling whole volumes onto the network grid, interruptibly.

SimpleITK's one-call functions cannot be interrupted, and on a 512² × 600 CT one call runs for
many seconds. Filter objects, though, emit progress events many times a second and honour
``Abort()``, so :func:`resample` aborts from its progress callback when a cancel is requested.
The anti-aliasing Gaussian filters each line along one axis independently, so
:func:`antialiased` runs it (and the block means that come first where the grid is much coarser
than the voxels) over slabs cut across another axis, bit-identical to one whole-volume pass,
and checks for a cancel between slabs. Before a resampling, only the part
of a volume that the resampling can read is smoothed (:func:`smoothed_for_grid`): a skull-stripped
brain fills about a third of its 1 mm volume, and the network grid covers only that box.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import stop_if_cancelled
from .geometry import Grid

IsCancelled = Callable[[], bool]
SLAB_VOXELS = 2**17  # per Gaussian slab: its passes stay in a core's cache (2.2x faster than 4 M)
# An axis whose voxels are this many times finer than the target grid, or more, is first averaged
# over blocks of as many voxels as stay that much finer (a 0.78 mm CT onto a 2.86 mm grid: pairs
# of voxels in-plane); the Gaussian then adds only the blur the blocks lack, on a quarter of the
# voxels. A 1 mm brain onto its 2 mm grid has no blocks.
BLOCK_RATIO = 1.5


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
    reference: sitk.Image | Grid,
    transform: sitk.Transform,
    interpolator: int = sitk.sitkLinear,
    output_type: int = sitk.sitkFloat32,
    is_cancelled: IsCancelled = _never,
    padding: float = 0.0,
) -> sitk.Image:
    """``sitk.Resample`` (``padding`` outside) that a cancel request interrupts. A
    :class:`Grid` serves as reference without an image of its size (a CT's: 157 MB to zero)."""
    resampler = sitk.ResampleImageFilter()
    if isinstance(reference, Grid):
        resampler.SetSize(list(reference.size))
        resampler.SetOutputSpacing(reference.spacing)
        resampler.SetOutputOrigin(reference.origin)
        resampler.SetOutputDirection(reference.direction)
    else:
        resampler.SetReferenceImage(reference)
    resampler.SetTransform(transform)
    resampler.SetInterpolator(interpolator)
    resampler.SetDefaultPixelValue(padding)
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
    """A Gaussian of ``sigma`` mm along ITK ``axis`` of a (K, J, I) array, slab by slab."""
    array_axis = volume.ndim - 1 - axis
    across = 1 if array_axis == 0 else 0  # slabs are cut across another axis
    per_slab = max(1, SLAB_VOXELS * volume.shape[across] // volume.size)
    kernel = gaussian_half_kernel(sigma / spacing[axis])
    out = np.empty_like(volume)
    for start in range(0, volume.shape[across], per_slab):
        stop_if_cancelled(is_cancelled, "while smoothing the images")
        rows = (slice(None),) * across + (slice(start, start + per_slab),)
        out[rows] = _convolve_along(volume[rows], kernel, array_axis)
    return out


def gaussian_half_kernel(sigma_voxels: float) -> np.ndarray:
    """The centre tap and one side of a sampled Gaussian cut at 4 σ, normalised to sum 1.

    Sampled rather than ITK's recursive (IIR) approximation: at the sub-voxel widths used for
    anti-aliasing (0.7 voxel from 1 to 2 mm) it is 3 to 7 taps, three times faster.
    """
    radius = max(1, int(4.0 * sigma_voxels + 0.5))
    half = np.exp(-0.5 * (np.arange(radius + 1) / sigma_voxels) ** 2)
    return (half / (half[0] + 2.0 * half[1:].sum())).astype(np.float32)


def _convolve_along(volume: np.ndarray, half_kernel: np.ndarray, axis: int) -> np.ndarray:
    """``volume`` convolved along array ``axis`` with the symmetric kernel, border repeated."""
    radius = len(half_kernel) - 1
    lines = np.moveaxis(volume, axis, 0)
    n = lines.shape[0]
    edge = [np.repeat(lines[:1], radius, 0), lines, np.repeat(lines[-1:], radius, 0)]
    padded = np.concatenate(edge)
    out = padded[radius : radius + n] * half_kernel[0]
    pair = np.empty_like(out)
    for tap in range(1, radius + 1):  # the two taps at ±tap share a weight
        np.add(
            padded[radius - tap : radius - tap + n],
            padded[radius + tap : radius + tap + n],
            out=pair,
        )
        pair *= half_kernel[tap]
        out += pair
    return np.moveaxis(out, 0, axis)


def _antialiasing_sigmas(spacing: tuple[float, ...], target_mm: float) -> list[float]:
    """The Gaussian's sigma (mm) along each axis; 0 for axes already as coarse as the target."""
    sigmas = [0.4 * np.sqrt(max(target_mm**2 - s**2, 0.0)) for s in spacing]
    return [sigma if sigma > 0.1 * s else 0.0 for sigma, s in zip(sigmas, spacing, strict=True)]


def _blocks(spacing: tuple[float, ...], target_mm: float) -> list[int]:
    """Voxels averaged per block along each axis (1: none), BLOCK_RATIO finer than the target."""
    return [max(1, int(target_mm / (BLOCK_RATIO * s))) for s in spacing]


def _blurs(spacing: tuple[float, ...], target_mm: float) -> tuple[list[int], list[float]]:
    """The blocks along each axis, and the Gaussian's sigma (mm) on them: what the blocks'
    own blur (a variance of (n² − 1) / 12 voxels²) leaves of the anti-aliasing sigma."""
    blocks = _blocks(spacing, target_mm)
    sigmas = [
        float(np.sqrt(sigma**2 - (n**2 - 1) * s**2 / 12.0)) if sigma > 0 else 0.0
        for sigma, s, n in zip(
            _antialiasing_sigmas(spacing, target_mm), spacing, blocks, strict=True
        )
    ]
    return blocks, sigmas


def antialiased(
    image: sitk.Image, target_mm: float, is_cancelled: IsCancelled = _never
) -> sitk.Image:
    """Smoothed along each axis finer than ``target_mm``, before resampling onto it: averaged
    over blocks of voxels where the target is BLOCK_RATIO times coarser or more (the result is
    on the blocks' grid), then Gaussian-smoothed."""
    return _on_blocks(image, np.zeros(image.GetDimension(), dtype=int), target_mm, is_cancelled)


def _on_blocks(
    image: sitk.Image,
    lower: np.ndarray,
    target_mm: float,
    is_cancelled: IsCancelled,
    voxels: np.ndarray | None = None,
    upper: np.ndarray | None = None,
) -> sitk.Image:
    """:func:`antialiased` of the index box ``lower`` … ``upper`` (I, J, K; the whole image by
    default) of ``image``, whose array ``voxels`` may be given. ``lower`` must fall on a block
    boundary, so that a box gives the whole image's values."""
    spacing = image.GetSpacing()
    blocks, sigmas = _blurs(spacing, target_mm)
    volume = sitk.GetArrayViewFromImage(image) if voxels is None else voxels
    last = np.asarray(image.GetSize()) - 1
    upper = last if upper is None else upper
    # Whole blocks: the box's end grows to the next block boundary, padded past the image's end.
    ends = lower + -(-(upper - lower + 1) // blocks) * blocks
    crop = tuple(
        slice(a, min(b, n + 1)) for a, b, n in zip(lower[::-1], ends[::-1], last[::-1], strict=True)
    )
    volume = _block_means(volume[crop], blocks[::-1], (ends - lower)[::-1], is_cancelled)
    coarse = tuple(s * n for s, n in zip(spacing, blocks, strict=True))
    for axis in (axis for axis, sigma in enumerate(sigmas) if sigma > 0):
        volume = _gaussian_along(volume, coarse, sigmas[axis], axis, is_cancelled)
    smoothed = sitk.GetImageFromArray(volume)
    smoothed.SetSpacing(coarse)
    smoothed.SetDirection(image.GetDirection())
    centre = lower + (np.asarray(blocks) - 1) / 2.0  # a block's mean lies at its centre
    smoothed.SetOrigin(image.TransformContinuousIndexToPhysicalPoint(centre.tolist()))
    return smoothed


def _block_means(
    volume: np.ndarray, blocks: list[int], extent: np.ndarray, is_cancelled: IsCancelled
) -> np.ndarray:
    """float32 means of ``volume`` (K, J, I) over blocks of ``blocks`` voxels (K, J, I order),
    after repeating its last voxels out to ``extent``; slab by slab across the first axis, each
    block summed one strided view at a time (a reshaped mean over interleaved axes took as long
    as the Gaussian it saves)."""
    volume = volume.astype(np.float32, copy=False)
    if max(blocks) == 1:
        return volume
    counts = [int(e) // n for e, n in zip(extent, blocks, strict=True)]
    out = np.empty(counts, dtype=np.float32)
    per_slab = max(1, SLAB_VOXELS * 8 // (volume[0].size * blocks[0]))
    for start in range(0, counts[0], per_slab):
        stop_if_cancelled(is_cancelled, "while smoothing the images")
        slab = volume[start * blocks[0] : (start + per_slab) * blocks[0]]
        rows = min(per_slab, counts[0] - start) * blocks[0]
        pad = [(0, int(e - n)) for e, n in zip((rows, *extent[1:]), slab.shape, strict=True)]
        if any(after for _, after in pad):
            slab = np.pad(slab, pad, mode="edge")
        for axis, n in enumerate(blocks):
            if n > 1:
                views = [slab[(slice(None),) * axis + (slice(o, None, n),)] for o in range(n)]
                slab = views[0].copy()
                for view in views[1:]:
                    slab += view
        out[start : start + per_slab] = slab * np.float32(1.0 / np.prod(blocks))
    return out


def smoothed_for_grid(
    image: sitk.Image,
    target_mm: float,
    is_cancelled: IsCancelled = _never,
    reference: sitk.Image | None = None,
    voxels: np.ndarray | None = None,
) -> sitk.Image:
    """:func:`antialiased` where a resampling onto a ``target_mm`` grid can read it, and no more.

    That is the box of ``image``'s nonzero voxels (within ``reference``'s extent when the grid
    is known and resampled without a transform), grown by the kernel's reach and one voxel for
    the interpolation (on the blocks, where there are blocks), and out to whole blocks.
    Outside the box the smoothed image is zero, which is also what
    :func:`resample` reads outside an image, so resampling the result onto any grid gives what
    resampling the whole smoothed volume would give.

    ``voxels``: ``image``'s array, where the caller took the view (see
    :class:`~DeepRegisterLib.registration.preprocessing.Voxels`); taken here otherwise. The box
    is cut from it as a view, not copied.
    """
    spacing, dim = image.GetSpacing(), image.GetDimension()
    blocks, sigmas = _blurs(spacing, target_mm)
    # The kernel's radius (its length less the centre tap) and one voxel for the interpolation,
    # in blocks, and a block less one voxel: a box's edge may lie anywhere in its block.
    reach = [
        n * (len(gaussian_half_kernel(sigma / (s * n))) if sigma > 0 else 1) + n - 1
        for sigma, s, n in zip(sigmas, spacing, blocks, strict=True)
    ]
    stop_if_cancelled(is_cancelled, "while smoothing the images")
    volume = sitk.GetArrayViewFromImage(image) if voxels is None else voxels
    box = nonzero_box(volume != 0)
    lower, upper = box if box is not None else (np.zeros(dim), -np.ones(dim))
    if reference is not None:
        read_lower, read_upper = _box_read_by(reference, image)
        lower, upper = np.maximum(lower, read_lower), np.minimum(upper, read_upper)
    last = np.asarray(image.GetSize()) - 1
    if np.any(upper < lower):  # nothing nonzero is read: smooth a single voxel
        upper = lower = np.clip(lower, 0, last)
    lower = np.maximum(lower - reach, 0).astype(int) // blocks * blocks
    upper = np.minimum(upper + reach, last).astype(int)
    return _on_blocks(image, lower, target_mm, is_cancelled, volume, upper)


def nonzero_box(mask: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """First and last index (I, J, K order) where ``mask`` (an array in K, J, I order) is
    true; None when it is true nowhere."""
    if not mask.any():
        return None
    dim = mask.ndim
    rows = [
        np.flatnonzero(mask.any(axis=tuple(a for a in range(dim) if a != array_axis)))
        for array_axis in reversed(range(dim))
    ]
    return np.array([r[0] for r in rows]), np.array([r[-1] for r in rows])


def _box_read_by(reference: sitk.Image, image: sitk.Image) -> tuple[np.ndarray, np.ndarray]:
    """Index box of ``image`` that linear resampling onto ``reference`` (no transform) reads."""
    corners = itertools.product(*[(0.0, n - 1.0) for n in reference.GetSize()])
    indices = np.array(
        [
            image.TransformPhysicalPointToContinuousIndex(
                reference.TransformContinuousIndexToPhysicalPoint(corner)
            )
            for corner in corners
        ]
    )
    return np.floor(indices.min(axis=0)), np.ceil(indices.max(axis=0))


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
    moving_smooth = smoothed_for_grid(moving_norm, reference.GetSpacing()[0], is_cancelled)
    return (fixed_net, *moving_on_grid(moving_smooth, reference, affine, is_cancelled))


def fixed_on_grid(
    fixed_norm: sitk.Image,
    reference: sitk.Image,
    is_cancelled: IsCancelled = _never,
    voxels: np.ndarray | None = None,
) -> sitk.Image:
    """The fixed part of :func:`network_inputs` (``voxels`` as for :func:`smoothed_for_grid`)."""
    spacing = reference.GetSpacing()[0]
    smoothed = smoothed_for_grid(fixed_norm, spacing, is_cancelled, reference, voxels)
    return resample_linear(smoothed, reference, _identity(reference), is_cancelled)


def moving_on_grid(
    moving_smooth: sitk.Image,
    reference: sitk.Image,
    affine: sitk.Transform,
    is_cancelled: IsCancelled = _never,
) -> tuple[sitk.Image, sitk.Image]:
    """The moving part of :func:`network_inputs`, from the moving image already
    :func:`smoothed_for_grid`: through ``affine``, and as it lies."""
    return (
        resample_linear(moving_smooth, reference, affine, is_cancelled),
        resample_linear(moving_smooth, reference, _identity(reference), is_cancelled),
    )


def _identity(reference: sitk.Image) -> sitk.Transform:
    return sitk.Transform(reference.GetDimension(), sitk.sitkIdentity)
