"""2D pictures (PNG, TIFF) as outputs, in the 8 or 16 bits per pixel those formats hold.

People who register photographs, fundus images or slices expect their pictures back in the
format they came with. The registration works in floating point; these functions bring a result
back to the input's integer type when its values fit, and otherwise rescale it to 16 bits and
say so, because a picture that silently changed its intensities would mislead.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk

from ..errors import InputError

_EIGHT_BIT = (sitk.sitkUInt8, sitk.sitkInt8)
_INTEGER = (
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
)  # fmt: skip
#: A colour picture's type per channel: a vector type's scalar one.
_SCALAR = {
    sitk.sitkVectorUInt8: sitk.sitkUInt8, sitk.sitkVectorInt8: sitk.sitkInt8,
    sitk.sitkVectorUInt16: sitk.sitkUInt16, sitk.sitkVectorInt16: sitk.sitkInt16,
    sitk.sitkVectorUInt32: sitk.sitkUInt32, sitk.sitkVectorInt32: sitk.sitkInt32,
    sitk.sitkVectorUInt64: sitk.sitkUInt64, sitk.sitkVectorInt64: sitk.sitkInt64,
}  # fmt: skip
_VECTOR = {sitk.sitkUInt8: sitk.sitkVectorUInt8, sitk.sitkUInt16: sitk.sitkVectorUInt16}


def _range(array: np.ndarray) -> tuple[float, float]:
    return float(array.min()), float(array.max())


def _picture(array: np.ndarray, like: sitk.Image) -> sitk.Image:
    """``array`` on ``like``'s grid, one channel per component of ``like``."""
    picture = sitk.GetImageFromArray(array, isVector=like.GetNumberOfComponentsPerPixel() > 1)
    picture.CopyInformation(like)
    return picture


def as_picture(image: sitk.Image, input_type: int, name: Path) -> tuple[sitk.Image, str | None]:
    """``image`` as 8 or 16 bits (per channel for colour), and a note when its intensities had
    to be rescaled.

    An integer input whose values the result keeps (interpolation stays within them) comes back
    in its own width, rounded: 8 bits for an 8-bit input, else 16. Anything else — floating
    point, negative values (CT), more than 16 bits — is mapped linearly onto 0…65535, every
    channel alike so that colours keep their balance.
    """
    array = sitk.GetArrayViewFromImage(image)
    low, high = _range(array)
    input_type = _SCALAR.get(input_type, input_type)
    if input_type in _INTEGER and low >= 0:
        target = np.uint8 if input_type in _EIGHT_BIT else np.uint16
        if high <= np.iinfo(target).max + 0.5:
            return _picture(np.rint(array).astype(target), image), None
    scale = 65535.0 / (high - low) if high > low else 0.0
    picture = _picture(np.rint((array - low) * scale).astype(np.uint16), image)
    note = (
        f"{name.name}: intensities {low:g}…{high:g} rescaled linearly to 0…65535 (16 bits) to "
        f"fit {name.suffix}; write .nii.gz, .nrrd or .mha to keep them as they are"
    )
    return picture, note


def label_picture_type(labels: sitk.Image, name: Path) -> int:
    """The 8- or 16-bit type (per layer for several) that holds every label of ``labels``;
    labels are never rescaled."""
    array = sitk.GetArrayViewFromImage(labels)
    low, high = _range(array)
    per_channel = _SCALAR.get(labels.GetPixelID(), labels.GetPixelID())
    fractional = per_channel not in _INTEGER and bool(np.any(array % 1))
    if low < 0 or high > 65535 or fractional:
        raise InputError(
            f"cannot write the label map {name} as {name.suffix}: its labels ({low:g}…{high:g}) "
            "do not fit 0…65535; write .nii.gz, .nrrd or .mha"
        )
    scalar = sitk.sitkUInt8 if high <= 255 else sitk.sitkUInt16
    return _VECTOR[scalar] if labels.GetNumberOfComponentsPerPixel() > 1 else scalar
