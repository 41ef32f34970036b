"""The affine stage's geometry: working copies, levels, the moments start.

Without torch, as the whole stage is (affine_search.py): in a fresh process it runs while
torch's import (about a second of one core) holds the other core. Subjects in different native
spaces (like fs-dev) start aligned only after this stage.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import stop_if_cancelled
from ..imaging.geometry import affine_parameters, rotation_degrees
from ..imaging.resampling import run_filter

WORKING_SPACING_MM = 2.0
MAX_WORKING_VOXELS = 2**22
# Fewer working voxels than this across the fixed image: its levels are 2 and 1 of its own
# unit, finer than the working spacing where its coarser level would have fewer than
# MIN_COARSE_VOXELS voxels, but not finer than its own voxels. At 4 and 2 mm a 32² pair (1 mm
# voxels) had 64 voxels at its coarser level, and affines of synthetic pairs ended 1.0 and
# 2.4 mm off; at 2 and 1 mm, 0.10 and 0.14 mm (40²: 0.43, 0.53 → 0.16, 0.12; 24³: 0.99, 0.24
# → 0.26, 0.14).
SMALL_IMAGE_VOXELS = 48
MIN_COARSE_VOXELS = 4096
# Between the fs-dev subjects' brains (and whole heads, slabs, T2-like images) as their headers
# place them, the affine stage turns 5–16°; a turn beyond this is noted (turned_note).
TURNED_NOTE_DEGREES = 30.0


def turned_note(affine: sitk.AffineTransform) -> str | None:
    """A note when the affine turns a moving volume further than scans of one body part lying
    alike are turned (``TURNED_NOTE_DEGREES``), which more likely means a header's
    orientation is wrong; None otherwise, and always in 2D, where a slide or a photograph
    turned on its scanner is no error."""
    if affine.GetDimension() != 3:
        return None
    matrix, _ = affine_parameters(affine, 3)
    degrees = rotation_degrees(matrix)
    if degrees <= TURNED_NOTE_DEGREES:
        return None
    return (
        f"orientation: the affine stage turned the moving image {degrees:.0f}° onto the fixed "
        "one, as their headers place them; if both were scanned lying the same way, one "
        "header's orientation may be wrong: check the warped image, or give an initial "
        "transform"
    )


def to_affine(transform: sitk.Transform, dim: int) -> sitk.AffineTransform:
    """Flatten any linear transform (composites included) into one AffineTransform."""
    matrix, translation = affine_parameters(transform, dim)
    affine = sitk.AffineTransform(dim)
    affine.SetMatrix(tuple(matrix.ravel()))
    affine.SetTranslation(tuple(translation))
    return affine


def working_spacing(image: sitk.Image) -> float:
    """2 mm, or coarser where 2 mm would exceed MAX_WORKING_VOXELS (a 40 cm CT field of view:
    about 3 mm): the finest spacing the affine search works at. An affine gains nothing from
    more voxels."""
    extent = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    coarsest = float(np.prod(extent) / MAX_WORKING_VOXELS) ** (1.0 / image.GetDimension())
    return max(WORKING_SPACING_MM, coarsest)


def working_copy(
    image: sitk.Image,
    spacing_mm: float,
    mask: bool = False,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> sitk.Image:
    """Averaged down to about ``spacing_mm`` over blocks of whole voxels: one pass, and the
    block mean keeps a coarse level from aliasing. A mask's copy is every block it touches."""
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


class WorkingCopies:
    """A pair (and its masks) block-averaged to each of the search's level spacings, made when
    first asked for, and the moments start from the finest affine level's copies."""

    def __init__(
        self,
        images: tuple[sitk.Image, sitk.Image],
        masks: tuple[sitk.Image | None, sitk.Image | None],
        finest_mm: float,
        is_cancelled: Callable[[], bool] = lambda: False,
    ):
        self.images, self.rigid_mm, self.affine_mm = images, *level_spacings(images[0], finest_mm)
        self._masks, self._is_cancelled = masks, is_cancelled
        self._copies: dict[float, tuple[sitk.Image, sitk.Image]] = {}
        self._mask_copies: dict[float, tuple[sitk.Image | None, sitk.Image | None]] = {}
        self._moments: sitk.Transform | None = None

    def at(self, spacing_mm: float) -> tuple[sitk.Image, sitk.Image]:
        """The fixed and moving images at about ``spacing_mm``."""
        if spacing_mm not in self._copies:
            stop_if_cancelled(self._is_cancelled, "during the affine stage")
            self._copies[spacing_mm] = tuple(
                working_copy(image, spacing_mm, is_cancelled=self._is_cancelled)
                for image in self.images
            )
        return self._copies[spacing_mm]

    def masks_at(self, spacing_mm: float) -> tuple[sitk.Image | None, sitk.Image | None]:
        """The fixed and moving masks (None where not given) at about ``spacing_mm``."""
        if spacing_mm not in self._mask_copies:
            self._mask_copies[spacing_mm] = tuple(
                None
                if mask is None
                else working_copy(mask, spacing_mm, mask=True, is_cancelled=self._is_cancelled)
                for mask in self._masks
            )
        return self._mask_copies[spacing_mm]

    def moments(self) -> sitk.Transform:
        """The rigid start (:func:`moments_transform`) at the finest affine level."""
        if self._moments is None:
            self._moments = moments_transform(*self.at(self.affine_mm[-1]))
        return self._moments


def moments_transform(fixed: sitk.Image, moving: sitk.Image) -> sitk.Transform:
    """The rigid start: centres of mass matched, principal axes left alone."""
    dim = fixed.GetDimension()
    rigid = sitk.Euler3DTransform() if dim == 3 else sitk.Euler2DTransform()
    return sitk.CenteredTransformInitializer(
        fixed, moving, rigid, sitk.CenteredTransformInitializerFilter.MOMENTS
    )


def is_small(image: sitk.Image) -> bool:
    """Under SMALL_IMAGE_VOXELS working voxels across: its levels are finer, and too few
    voxels for the turned starts to judge between distant poses (on a 44 mm phantom a pose
    turned 40° and shifted 26 mm scored a higher mutual information than the right one)."""
    extent_mm = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    return bool(min(extent_mm) / working_spacing(image) < SMALL_IMAGE_VOXELS)


def small_image_unit(image: sitk.Image) -> float:
    """A small image's finer level spacing: the working spacing, or finer where the coarser
    level (twice it) would hold under MIN_COARSE_VOXELS voxels, down to the image's own
    voxels."""
    extent_mm = np.asarray(image.GetSize()) * np.asarray(image.GetSpacing())
    coarse = float(np.prod(extent_mm) / MIN_COARSE_VOXELS) ** (1.0 / image.GetDimension())
    return min(working_spacing(image), max(min(image.GetSpacing()), coarse / 2.0))


def level_spacings(fixed: sitk.Image, finest_mm: float) -> tuple[list[float], list[float]]:
    """The rigid and the affine search's level spacings, coarse to fine, in mm.

    Rigid at 4 and 2 working spacings, affine at 2f and f, where f is ``finest_mm`` rounded to
    a multiple of the working spacing; a small image (under SMALL_IMAGE_VOXELS working voxels
    across) gets 2 and 1 of :func:`small_image_unit` for both, keeping enough voxels to sample.
    """
    working = working_spacing(fixed)
    if is_small(fixed):
        unit = small_image_unit(fixed)
        return [2 * unit, unit], [2 * unit, unit]
    finest = max(1, round(finest_mm / working)) * working
    return [4 * working, 2 * working], [2 * finest, finest]


def recentred(affine: sitk.AffineTransform, centre) -> sitk.AffineTransform:
    """Same mapping, rotation centre moved to ``centre``, where rotations and scalings move
    points least and the search's parameters are best balanced."""
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
