"""A saved transform applied to more images, as ``register`` warps its own.

A user registers one scan and later needs others of the same subject (another sequence, a new
segmentation, a dose map) on the fixed grid. ITK's Resample applies our transforms exactly, but
it truncates integer images; here they are rounded, labels are sampled by nearest neighbour and
keep their type, and everything else comes back float32, as in ``register --warped``. ITK alone
does it (no torch): for a single 256³ image that is faster than loading the engine.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .geometry import Grid
from .resampling import resample


def check_applicable(image: sitk.Image, transform: sitk.Transform, grid: Grid, what: str) -> None:
    """Refuse, before any work, an image that ``transform`` cannot carry onto ``grid``."""
    if transform.GetDimension() != grid.dim:
        raise InputError(
            f"the transform is {transform.GetDimension()}D and the reference {grid.dim}D: give "
            "the transform and the reference (its fixed image) of one registration"
        )
    if image.GetDimension() != grid.dim:
        raise InputError(
            f"{what} is {image.GetDimension()}D and the reference {grid.dim}D: a transform "
            f"carries {grid.dim}D images onto its reference"
        )
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(
            f"{what} has {components} components per voxel; warp one grey-level image or label "
            "map at a time (convert a colour picture to grey levels; export a segmentation with "
            "overlapping layers from Slicer as label maps)"
        )


def apply_transform(
    image: sitk.Image, transform: sitk.Transform, reference: Grid | sitk.Image, labels: bool = False
) -> sitk.Image:
    """``image(T(x))`` at each voxel ``x`` of the reference grid (zero outside the image).

    ``transform`` maps the reference's points to ``image``'s (ITK's convention, and that of
    ``register --transform``; its ``--inverse-transform`` goes the other way, onto the moving
    grid). Intensities are sampled linearly: an integer image keeps its type, rounded to the
    nearest value (ties to even, as ``register`` does), anything else becomes float32. With
    ``labels``, nearest neighbour, type and values kept.
    """
    grid = reference if isinstance(reference, Grid) else Grid.of(reference)
    check_applicable(image, transform, grid, "the label map" if labels else "the image")
    on_grid = grid.reference_image()
    if labels:
        return resample(image, on_grid, transform, sitk.sitkNearestNeighbor, image.GetPixelID())
    warped = resample(image, on_grid, transform)  # linear, float32
    kept = sitk.GetArrayViewFromImage(image).dtype
    if not np.issubdtype(kept, np.integer):
        return warped
    # Linear interpolation stays between the image's values and the zero outside it, which the
    # type holds: rounding is all the cast needs.
    rounded = sitk.GetImageFromArray(np.rint(sitk.GetArrayViewFromImage(warped)).astype(kept))
    rounded.CopyInformation(warped)
    return rounded
