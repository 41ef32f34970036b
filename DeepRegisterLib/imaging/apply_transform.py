"""A saved transform applied to more images, as ``register`` warps its own.

A user registers one scan and later needs others of the same subject (another sequence, a new
segmentation, a dose map) on the fixed grid. ITK's Resample applies our transforms exactly, but
it truncates integer images; here they are rounded, labels are sampled by nearest neighbour and
keep their type, and everything else comes back float32, as in ``register --warped``. ITK alone
does it (no torch): for a single 256³ image that is faster than loading the engine. A 4D series
is warped volume by volume (ITK resamples only with a transform of the image's own dimension),
colour pictures and the layers of a Slicer segmentation component by component.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .geometry import Grid
from .resampling import resample
from .segmentation_file import carry_segments, is_slicer_segmentation

#: A 4D series' volumes keep the 3D block of its direction matrix.
_SUBMATRIX = sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX


def check_applicable(image: sitk.Image, transform: sitk.Transform, grid: Grid, what: str) -> None:
    """Refuse, before any work, an image that ``transform`` cannot carry onto ``grid``."""
    if transform.GetDimension() != grid.dim:
        raise InputError(
            f"the transform is {transform.GetDimension()}D and the reference {grid.dim}D: give "
            "the transform and the reference (its fixed image) of one registration"
        )
    if image.GetDimension() != grid.dim and not is_series(image, grid):
        series = " and 4D series of 3D volumes" if grid.dim == 3 else ""
        raise InputError(
            f"{what} is {image.GetDimension()}D and the reference {grid.dim}D: a transform "
            f"carries {grid.dim}D images{series} onto its reference"
        )


def is_series(image: sitk.Image, grid: Grid) -> bool:
    """A 4D image (fMRI, DWI, perfusion, 4D CT) to warp volume by volume onto a 3D grid."""
    return grid.dim == 3 and image.GetDimension() == 4


def warped_bytes(image: sitk.Image, grid: Grid, labels: bool = False) -> int:
    """The size of ``apply_transform``'s result: ``image``'s type for labels and integers,
    float32 otherwise, on ``grid``, for each component and volume."""
    per_value = image.GetSizeOfPixelComponent()
    if not labels and not np.issubdtype(sitk.GetArrayViewFromImage(image).dtype, np.integer):
        per_value = 4
    volumes = image.GetSize()[3] if is_series(image, grid) else 1
    return int(np.prod(grid.size)) * volumes * image.GetNumberOfComponentsPerPixel() * per_value


def apply_transform(
    image: sitk.Image, transform: sitk.Transform, reference: Grid | sitk.Image, labels: bool = False
) -> sitk.Image:
    """``image(T(x))`` at each voxel ``x`` of the reference grid (zero outside the image).

        ``transform`` maps the reference's points to ``image``'s (ITK's convention, and that of
        ``register --transform``; its ``--inverse-transform`` goes the other way, onto the moving
        grid). Intensities are sampled linearly: an integer image keeps its type, rounded to the
        nearest value (ties to even, as ``register`` does), anything else becomes float32. With
        ``labels``, nearest neighbour, type and values kept. Each component of a multi-component
        image (a colour picture, the layers of a Slicer segmentation) and each volume of a 4D
        series is warped alike; a Slicer segmentation keeps its segments (names, colours, layers);
    directions stored in an image (DWI gradients) are not rotated.
    """
    grid = reference if isinstance(reference, Grid) else Grid.of(reference)
    check_applicable(image, transform, grid, "the label map" if labels else "the image")
    on_grid = grid.reference_image()
    if not is_series(image, grid):
        warped = _warp_components(image, transform, on_grid, labels)
        if labels and is_slicer_segmentation(image):
            carry_segments(image, warped)
        return warped
    size = list(image.GetSize())
    volumes = [
        _warp_components(
            sitk.Extract(image, [*size[:3], 0], [0, 0, 0, t], _SUBMATRIX),
            transform,
            on_grid,
            labels,
        )
        for t in range(size[3])
    ]
    return sitk.JoinSeries(volumes, image.GetOrigin()[3], image.GetSpacing()[3])


def _warp_components(
    image: sitk.Image, transform: sitk.Transform, on_grid: sitk.Image, labels: bool
) -> sitk.Image:
    components = image.GetNumberOfComponentsPerPixel()
    if components == 1:
        return _warp(image, transform, on_grid, labels)
    return sitk.Compose(
        [
            _warp(sitk.VectorIndexSelectionCast(image, c), transform, on_grid, labels)
            for c in range(components)
        ]
    )


def _warp(image: sitk.Image, transform: sitk.Transform, on_grid: sitk.Image, labels: bool):
    """One scalar image onto the grid."""
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
