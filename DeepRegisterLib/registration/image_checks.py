"""Checks of the images, masks and label maps a run is given: bad input fails before any work,
with a message that says what to do. No torch here: the checks run before it is loaded."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

MIN_SIZE = 4
INTEGER_PIXEL_TYPES = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
}  # fmt: skip
COMPLEX_PIXEL_TYPES = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}
#: Voxels checked for NaN at a time: a mask of 16 MB, where one of a CT's would take 157 MB.
NOT_FINITE_ROWS = 1 << 24


def check_geometry(image: sitk.Image, what: str) -> None:
    dim = image.GetDimension()
    if dim == 4 or (dim > 3):
        raise InputError(
            f"{what} is {dim}D; DeepRegister registers 2D or 3D images. For a time series, "
            "extract one volume (e.g. with SimpleITK's Extract), register that, then warp the "
            "whole series with 'deepregister apply'."
        )
    if dim not in (2, 3):
        raise InputError(f"{what} is {dim}D; only 2D and 3D images can be registered")
    size = image.GetSize()
    if min(size) < MIN_SIZE:
        hint = (
            " A single-slice 3D image should be saved as a 2D image."
            if dim == 3 and min(size) == 1
            else ""
        )
        raise InputError(
            f"{what} is too small ({'×'.join(map(str, size))} voxels); each axis needs at "
            f"least {MIN_SIZE} voxels.{hint}"
        )
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(
            f"{what} has invalid voxel spacing {tuple(spacing)}: spacing must be positive. "
            "Fix the file header (e.g. in Slicer's Volumes module) and try again."
        )
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(
            f"{what} has a singular or invalid direction matrix {tuple(direction.ravel())}; "
            "its axes must be independent. Fix the file header and try again."
        )
    subnormal = (direction != 0) & (np.abs(direction) < np.finfo(np.float64).tiny)
    if subnormal.any():
        # ITK's SVD of such a matrix fails, and its resampling then returns zeros silently.
        raise InputError(
            f"{what} has direction cosines too small for ITK to handle "
            f"({direction[subnormal][0]:.3g}, a subnormal number; it means 0). Round the "
            "direction matrix, e.g. image.SetDirection(numpy.round(image.GetDirection(), 12)), "
            "and try again."
        )
    if not np.all(np.isfinite(image.GetOrigin())):
        raise InputError(f"{what} has a non-finite origin {image.GetOrigin()}")


def check_intensity_image(image: sitk.Image, what: str) -> None:
    """A registrable image: scalar, real, finite, not constant."""
    if image.GetPixelID() in COMPLEX_PIXEL_TYPES:
        raise InputError(
            f"{what} has complex pixels; register the magnitude image instead "
            "(SimpleITK's ComplexToModulus)."
        )
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        raise InputError(
            f"{what} is a {components}-component vector image; DeepRegister registers a "
            "grey-level or colour (RGB) image. Register a grey-level version or one component, "
            "then warp the image itself with 'deepregister apply', which warps every component."
        )
    check_geometry(image, what)
    if bad := not_finite_voxels(image):
        raise InputError(
            f"{what} contains {bad} NaN or infinite voxels; replace them (e.g. with 0) first."
        )
    array = sitk.GetArrayViewFromImage(image)
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(
            f"{what} is constant (every voxel is {low}); it has no structure to register."
        )


def not_finite_voxels(image: sitk.Image) -> int:
    """How many voxels hold a NaN or infinite value (in any component): none in an integer
    image. Counted NOT_FINITE_ROWS voxels at a time, so the mask stays small."""
    array = sitk.GetArrayViewFromImage(image)
    if not np.issubdtype(array.dtype, np.floating):
        return 0
    voxels = array.reshape(-1, image.GetNumberOfComponentsPerPixel())
    return sum(
        int(np.count_nonzero(~np.isfinite(voxels[row : row + NOT_FINITE_ROWS]).all(axis=1)))
        for row in range(0, len(voxels), NOT_FINITE_ROWS)
    )


def check_same_dimension(fixed: sitk.Image, moving: sitk.Image) -> None:
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(
            f"the fixed image is {fixed.GetDimension()}D but the moving image is "
            f"{moving.GetDimension()}D; both must be 2D or both 3D."
        )


def mask_on_grid(mask: sitk.Image, reference: sitk.Image, what: str) -> sitk.Image:
    """The mask resampled (nearest) onto the reference grid, as uint8 0/1; refuses empty masks."""
    check_geometry(mask, what)
    if mask.GetDimension() != reference.GetDimension():
        raise InputError(f"{what} is {mask.GetDimension()}D but its image is not")
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a scalar (binary) image")
    binary = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(binary)):
        raise InputError(f"{what} has no voxels set; draw the region of interest or omit the mask")
    on_grid = sitk.Resample(binary, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    if not np.any(sitk.GetArrayViewFromImage(on_grid)):
        raise InputError(
            f"{what} does not overlap its image: none of its voxels fall inside the image. "
            "Check that the mask belongs to this image."
        )
    return on_grid


def check_label_map(labels: sitk.Image, what: str) -> sitk.Image:
    """Integer label map (float maps with integer values are accepted and cast)."""
    check_geometry(labels, what)
    if labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(
            f"{what} must be a scalar label map, not a vector image (a Slicer segmentation "
            "with overlapping segments holds one layer per overlap); register without it, "
            "then warp it with 'deepregister apply --labels', which keeps layers and segments"
        )
    if labels.GetPixelID() in INTEGER_PIXEL_TYPES:
        return labels
    array = sitk.GetArrayViewFromImage(labels)
    if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
        raise InputError(
            f"{what} has non-integer values; a label map must hold whole-number labels "
            "(did you pass an intensity image as labels?)"
        )
    if array.min() < 0 or array.max() > np.iinfo(np.int32).max:
        raise InputError(f"{what} has labels outside 0…2³¹−1")
    return sitk.Cast(labels, sitk.sitkInt32)
