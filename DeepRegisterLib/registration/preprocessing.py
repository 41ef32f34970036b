"""What the images go through before any registration stage sees them.

Robust intensity scaling (so CT and MR behave alike, with the background dark even where it
is bright in the image) and the fixed foreground's box (so the deformable stages spend their
voxels on anatomy, not air). Training uses the same functions, so a network sees at training
time what the engine feeds it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk

from ..imaging.intensity_window import IntensityWindow
from ..imaging.resampling import nonzero_box, run_filter

# The fixed image's foreground: above this on the [0, 1] of ``normalised_for_registration``.
FOREGROUND = 0.05


def normalised_for_registration(
    image: sitk.Image,
    is_cancelled: Callable[[], bool] = lambda: False,
    window: IntensityWindow | None = None,
    inverted: bool = False,
) -> sitk.Image:
    """Float image with intensities mapped to [0, 1] between the 1st and 99th percentiles
    (``window``, found here when not given), or to [1, 0] when ``inverted``.

    Moments and metrics then behave the same for CT (−1024…3071) and MR (arbitrary units).
    Each whole-volume operation takes up to a second on a 512² × 600 CT, so each is an ITK
    filter that a cancel request aborts.
    """
    window = window or IntensityWindow.of(image)
    if image.GetPixelID() != sitk.sitkFloat32:
        cast = sitk.CastImageFilter()
        cast.SetOutputPixelType(sitk.sitkFloat32)
        image = run_filter(cast, image, is_cancelled=is_cancelled)
    # One pass for (x − low) / (high − low) clamped to [0, 1]: subtracting, dividing and
    # clamping one after the other took twice as long (0.25 s for a 256³ brain).
    windowing = sitk.IntensityWindowingImageFilter()
    windowing.SetWindowMinimum(window.low)
    windowing.SetWindowMaximum(window.high)
    windowing.SetOutputMinimum(1.0 if inverted else 0.0)
    windowing.SetOutputMaximum(0.0 if inverted else 1.0)
    return run_filter(windowing, image, is_cancelled=is_cancelled)


def normalised_pair(
    fixed: sitk.Image,
    moving: sitk.Image,
    windows: tuple[IntensityWindow, IntensityWindow],
    one_contrast: bool,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> tuple[sitk.Image, sitk.Image, str | None]:
    """Both images normalised, a bright background inverted to 0 (the value every stage pads
    with outside an image), and a note saying so.

    Where the metric compares one contrast (``one_contrast``: LNCC, MSE), both are inverted
    or neither: inverting one would turn the pair's likeness into its opposite, and one
    bright background beside a dark one more likely means a scan cropped to bright tissue
    than a negative. MIND and mutual information are blind to the inversion of either.
    """
    bright = [window.bright_background for window in windows]
    if one_contrast and not all(bright):
        bright = [False, False]
    fixed_norm, moving_norm = (
        normalised_for_registration(image, is_cancelled, window, invert)
        for image, window, invert in zip((fixed, moving), windows, bright, strict=True)
    )
    if not any(bright):
        return fixed_norm, moving_norm, None
    which = (
        "both images'" if all(bright) else ("the fixed" if bright[0] else "the moving") + " image's"
    )
    note = (
        f"bright background: {which} intensities were inverted while registering, so that "
        "the background is dark as outside the image; the outputs keep the intensities"
    )
    return fixed_norm, moving_norm, note


class Voxels(NamedTuple):
    """The normalised pair's voxels, and the fixed mask's, as views for a worker thread.

    Taken where the images were made, before any filter reads them: SimpleITK copies an image's
    whole buffer for a view taken while a filter holds the image (``MakeUnique``), and the
    worker that plans a run met the affine stage's filters that way (0.6 GB and about a second
    an image for a 512² × 600 CT). The views are valid while the images live, unwritten.
    """

    fixed: np.ndarray
    moving: np.ndarray
    fixed_mask: np.ndarray | None

    @classmethod
    def of(cls, fixed: sitk.Image, moving: sitk.Image, fixed_mask: sitk.Image | None) -> Voxels:
        view = sitk.GetArrayViewFromImage
        return cls(view(fixed), view(moving), None if fixed_mask is None else view(fixed_mask))


def foreground_box(
    image: sitk.Image, foreground: np.ndarray, margin_mm: float, above: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """Index box (I, J, K order) of the voxels of ``foreground`` (an array on ``image``'s grid)
    above ``above``, ``margin_mm`` wider on every side, clipped to the image. The threshold is
    taken on the array: as a SimpleITK image filter on a 1 mm brain it took 0.15 s."""
    size = np.asarray(image.GetSize())
    box = nonzero_box(foreground > above)
    if box is None:
        return np.zeros(len(size)), size - 1.0
    margin = margin_mm / np.asarray(image.GetSpacing())
    return np.maximum(box[0] - margin, 0), np.minimum(box[1] + margin, size - 1)
