"""The affine stage: moments initialisation, then multi-resolution rigid → affine optimisation.

Written on SimpleITK's registration framework rather than by hand: it is mature, threaded,
handles masks and any geometry, and its Mattes mutual information works across contrasts.
Subjects in different native spaces (like fs-dev) start aligned only after this stage.
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import SimpleITK as sitk

from ..errors import stop_if_cancelled
from ..imaging.geometry import affine_parameters
from ..imaging.resampling import run_filter
from .preprocessing import normalised_for_registration

ProgressCallback = Callable[[float, str], None]
WORKING_SPACING_MM = 2.0
MAX_WORKING_VOXELS = 2**22
MIN_METRIC_SAMPLES = 20_000
_ITK_THREADS_LOCK = threading.Lock()


def to_affine(transform: sitk.Transform, dim: int) -> sitk.AffineTransform:
    """Flatten any linear transform (composites included) into one AffineTransform."""
    matrix, translation = affine_parameters(transform, dim)
    affine = sitk.AffineTransform(dim)
    affine.SetMatrix(tuple(matrix.ravel()))
    affine.SetTranslation(tuple(translation))
    return affine


def working_spacing(image: sitk.Image) -> float:
    """2 mm, or coarser where 2 mm would exceed MAX_WORKING_VOXELS (a 40 cm CT field of view:
    about 3 mm). An affine gains nothing from more voxels, and ITK's registration pyramid,
    which a cancel request cannot interrupt, costs in proportion to them."""
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    coarsest = float(np.prod(extent) / MAX_WORKING_VOXELS) ** (1.0 / image.GetDimension())
    return max(WORKING_SPACING_MM, coarsest)


def working_copy(
    image: sitk.Image,
    spacing_mm: float,
    mask: bool = False,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> sitk.Image:
    """Averaged down to about ``spacing_mm``: the pyramid would otherwise smooth
    full-resolution volumes at every level."""
    factors = [max(1, round(spacing_mm / s)) for s in image.GetSpacing()]
    if max(factors) == 1:
        return image
    shrink = sitk.BinShrinkImageFilter()
    shrink.SetShrinkFactors(factors)
    if mask:
        return (
            run_filter(shrink, sitk.Cast(image > 0, sitk.sitkUInt8), is_cancelled=is_cancelled) > 0
        )
    return run_filter(shrink, image, is_cancelled=is_cancelled)


def _initial_transform(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    dim = fixed.GetDimension()
    rigid = sitk.Euler3DTransform() if dim == 3 else sitk.Euler2DTransform()
    return sitk.CenteredTransformInitializer(
        fixed, moving, rigid, sitk.CenteredTransformInitializerFilter.MOMENTS
    )


def _sampling_fraction(fixed: sitk.Image) -> float:
    """5% of the voxels, but never fewer than MIN_METRIC_SAMPLES (all of a small image):
    a few dozen random samples give Mattes MI too noisy a gradient to find even a shift."""
    voxels = max(int(np.prod(fixed.GetSize())), 1)
    return min(1.0, max(0.05, MIN_METRIC_SAMPLES / voxels))


@contextlib.contextmanager
def _single_threaded_itk() -> Iterator[None]:
    """Run ITK with one thread: its Mattes MI adds the threads' contributions in scheduling
    order, so with several threads the same inputs and seed differ in the last bits (and the
    whole registration after them). The design promises determinism for a given seed."""
    with _ITK_THREADS_LOCK:
        previous = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)
        try:
            yield
        finally:
            sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(previous)


@_single_threaded_itk()
def _run_stage(
    fixed: sitk.Image,
    moving: sitk.Image,
    transform: sitk.Transform,
    shrink: list[int],
    iterations: int,
    fixed_mask: sitk.Image | None,
    moving_mask: sitk.Image | None,
    seed: int,
    should_stop: Callable[[], bool],
) -> sitk.Transform:
    method = sitk.ImageRegistrationMethod()
    method.SetMetricAsMattesMutualInformation(numberOfHistogramBins=32)
    method.SetMetricSamplingStrategy(method.RANDOM)
    # SimpleITK reads seed 0 as sitkWallClock (a new random sample every run): shift by one
    # so that every seed, 0 included, gives a fixed, reproducible sample.
    method.SetMetricSamplingPercentage(_sampling_fraction(fixed), seed % (2**32 - 1) + 1)
    method.SetInterpolator(sitk.sitkLinear)
    if fixed_mask is not None:
        method.SetMetricFixedMask(fixed_mask)
    if moving_mask is not None:
        method.SetMetricMovingMask(moving_mask)
    method.SetOptimizerAsRegularStepGradientDescent(
        learningRate=1.0,
        minStep=1e-4,
        numberOfIterations=iterations,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    method.SetOptimizerScalesFromPhysicalShift()
    method.SetShrinkFactorsPerLevel(shrink)
    method.SetSmoothingSigmasPerLevel([s / 2.0 for s in shrink])
    method.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    method.SetInitialTransform(transform, inPlace=False)
    method.AddCommand(
        sitk.sitkIterationEvent, lambda: method.StopRegistration() if should_stop() else None
    )
    return method.Execute(fixed, moving)


def register_affine(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    is_cancelled: Callable[[], bool] = lambda: False,
    **options: Any,
) -> sitk.AffineTransform:
    """Affine transform mapping fixed → moving points (ITK resampling convention).

    Normalises both images, then :func:`register_normalised` with the same ``options``.
    """
    return register_normalised(
        normalised_for_registration(fixed, is_cancelled),
        normalised_for_registration(moving, is_cancelled),
        is_cancelled=is_cancelled,
        **options,
    )


def register_normalised(
    fixed: sitk.Image,
    moving: sitk.Image,
    *,
    fixed_mask: sitk.Image | None = None,
    moving_mask: sitk.Image | None = None,
    initial_transform: sitk.Transform | None = None,
    iterations: int = 100,
    finest_mm: float = WORKING_SPACING_MM,
    seed: int = 0,
    progress: ProgressCallback | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> sitk.AffineTransform:
    """:func:`register_affine` of images already through :func:`normalised_for_registration`,
    which callers that need them normalised anyway (the engine, training) do only once.

    ``finest_mm`` is the resolution of the last affine level (2 mm or coarser).

    ``initial_transform`` (linear) replaces the moments initialisation when given.
    """
    dim = fixed.GetDimension()

    def check_cancelled() -> None:
        stop_if_cancelled(is_cancelled, "during the affine stage")

    fixed_mm, moving_mm = working_spacing(fixed), working_spacing(moving)
    coarser, rigid_shrink, affine_shrink = _levels(fixed, fixed_mm, finest_mm)
    fixed_mm, moving_mm = coarser * fixed_mm, coarser * moving_mm
    fixed_n = working_copy(fixed, fixed_mm, is_cancelled=is_cancelled)
    moving_n = working_copy(moving, moving_mm, is_cancelled=is_cancelled)
    fixed_mask = (
        None if fixed_mask is None
        else working_copy(fixed_mask, fixed_mm, mask=True, is_cancelled=is_cancelled)
    )  # fmt: skip
    moving_mask = (
        None if moving_mask is None
        else working_copy(moving_mask, moving_mm, mask=True, is_cancelled=is_cancelled)
    )  # fmt: skip
    total = 2 * iterations * 2
    done = 0

    def tick() -> bool:
        nonlocal done
        done += 1
        if progress is not None:
            progress(min(done / total, 1.0), "affine")
        return is_cancelled()

    if initial_transform is None:
        start: sitk.Transform = _initial_transform(fixed_n, moving_n)
    else:
        rigid = sitk.Euler3DTransform() if dim == 3 else sitk.Euler2DTransform()
        start = sitk.CompositeTransform([to_affine(initial_transform, dim), rigid])
        start = to_affine(start, dim)
    check_cancelled()
    if initial_transform is None:
        start = _run_stage(
            fixed_n, moving_n, start, rigid_shrink, iterations, fixed_mask, moving_mask,
            seed, tick,
        )  # fmt: skip
        check_cancelled()
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2.0 for s in fixed.GetSize()])
    affine = _recentred(to_affine(start, dim), centre)
    result = _run_stage(
        fixed_n, moving_n, affine, affine_shrink, iterations, fixed_mask, moving_mask,
        seed, tick,
    )  # fmt: skip
    check_cancelled()
    return to_affine(result, dim)


def _levels(
    fixed: sitk.Image, fixed_mm: float, finest_mm: float
) -> tuple[int, list[int], list[int]]:
    """How much coarser than ``fixed_mm`` to make the working copies, and the rigid and affine
    stages' shrink factors on them.

    The levels are 4 and 2 working voxels (rigid), then 2f and f (affine, f = finest_mm over the
    working spacing); a small image gets 2 and 1 for both. When no level is as fine as the
    working spacing, the working copies are made coarser instead: ITK's pyramid smooths both
    whole copies at every level on one thread, at 2 mm two thirds of `fast`'s affine stage.
    """
    extent_mm = np.asarray(fixed.GetSize()) * np.asarray(fixed.GetSpacing())
    if min(extent_mm) / fixed_mm < 48:
        return 1, [2, 1], [2, 1]
    finest = max(1, round(finest_mm / fixed_mm))
    rigid, affine = [4, 2], [2 * finest, finest]
    coarser = math.gcd(*rigid, *affine)
    return coarser, [s // coarser for s in rigid], [s // coarser for s in affine]


def _recentred(affine: sitk.AffineTransform, centre) -> sitk.AffineTransform:
    """Same mapping, rotation centre moved to ``centre`` so the optimiser's scales make sense."""
    dim = affine.GetDimension()
    matrix = np.asarray(affine.GetMatrix()).reshape(dim, dim)
    translation = np.asarray(affine.GetTranslation())
    c = np.asarray(centre)
    out = sitk.AffineTransform(dim)
    out.SetCenter(tuple(c))
    out.SetMatrix(tuple(matrix.ravel()))
    # x ↦ M x + t  ==  M (x − c) + c + t'  with  t' = t + M c − c
    out.SetTranslation(tuple(translation + matrix @ c - c))
    return out
