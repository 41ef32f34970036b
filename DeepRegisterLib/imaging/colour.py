"""Colour images (photographs, fundus images, cryosections) registered on their luminance.

The engine registers one grey level per voxel; a colour picture's brightness carries its
structure. Its warped image keeps the colours: the picture itself goes through the transform
(``apply_transform``), channel by channel.
"""

from __future__ import annotations

import SimpleITK as sitk

#: Rec. 601 luma, as photographs are usually turned grey.
_WEIGHTS = (0.299, 0.587, 0.114)
LUMINANCE_NOTE = (
    "colour images were registered on their luminance (0.299 R + 0.587 G + 0.114 B); the "
    "warped image keeps the moving image's colours"
)


def is_colour(image: sitk.Image) -> bool:
    """RGB or RGBA: three or four components a voxel, of 8 or 16 unsigned bits as pictures
    hold them (a displacement field's floats or a DWI's directions are not colours)."""
    return image.GetNumberOfComponentsPerPixel() in (3, 4) and image.GetPixelID() in (
        sitk.sitkVectorUInt8, sitk.sitkVectorUInt16,
    )  # fmt: skip


def luminance(image: sitk.Image) -> sitk.Image:
    """A colour image's luminance as float32 (alpha ignored); any other image as it is."""
    if not is_colour(image):
        return image
    channels = (sitk.VectorIndexSelectionCast(image, c, sitk.sitkFloat32) for c in range(3))
    red, green, blue = (
        weight * channel for weight, channel in zip(_WEIGHTS, channels, strict=True)
    )
    return red + green + blue
