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

PICTURE_TYPES = {sitk.sitkUInt8: 255, sitk.sitkUInt16: 65535}
_EIGHT_BIT = (sitk.sitkUInt8, sitk.sitkInt8)
_INTEGER = (
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
)  # fmt: skip


def _range(array: np.ndarray) -> tuple[float, float]:
    return float(array.min()), float(array.max())


def as_picture(image: sitk.Image, input_type: int, name: Path) -> tuple[sitk.Image, str | None]:
    """``image`` as 8 or 16 bits, and a note when its intensities had to be rescaled.

    An integer input whose values the result keeps (interpolation stays within them) comes back
    in its own width, rounded: 8 bits for an 8-bit input, else 16. Anything else — floating
    point, negative values (CT), more than 16 bits — is mapped linearly onto 0…65535.
    """
    low, high = _range(sitk.GetArrayViewFromImage(image))
    if input_type in _INTEGER and low >= 0:
        target = sitk.sitkUInt8 if input_type in _EIGHT_BIT else sitk.sitkUInt16
        if high <= PICTURE_TYPES[target] + 0.5:
            rounded = sitk.Round(image) if image.GetPixelID() not in _INTEGER else image
            return sitk.Cast(rounded, target), None
    scale = 65535.0 / (high - low) if high > low else 0.0
    array = np.rint((sitk.GetArrayViewFromImage(image) - low) * scale).astype(np.uint16)
    picture = sitk.GetImageFromArray(array)
    picture.CopyInformation(image)
    note = (
        f"{name.name}: intensities {low:g}…{high:g} rescaled linearly to 0…65535 (16 bits) to "
        f"fit {name.suffix}; write .nii.gz, .nrrd or .mha to keep them as they are"
    )
    return picture, note


def label_picture_type(labels: sitk.Image, name: Path) -> int:
    """The 8- or 16-bit type that holds every label of ``labels``; labels are never rescaled."""
    array = sitk.GetArrayViewFromImage(labels)
    low, high = _range(array)
    fractional = labels.GetPixelID() not in _INTEGER and bool(np.any(array % 1))
    if low < 0 or high > 65535 or fractional:
        raise InputError(
            f"cannot write the label map {name} as {name.suffix}: its labels ({low:g}…{high:g}) "
            "do not fit 0…65535; write .nii.gz, .nrrd or .mha"
        )
    return sitk.sitkUInt8 if high <= 255 else sitk.sitkUInt16
