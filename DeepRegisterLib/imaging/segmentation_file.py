"""A Slicer segmentation file's (``.seg.nrrd``) segments carried onto the grid it is warped to.

Slicer writes each segment's name, colour, terminology, layer and label value into the NRRD
header, and ITK reads them as the image's metadata; without them a warped segmentation opens in
Slicer as anonymous labels. Three fields describe the old grid and are rewritten for the new
one: each segment's extent, the file's offset within its reference geometry, and the reference
geometry Slicer converts surfaces on (in ``Segmentation_ConversionParameters``).
"""

from __future__ import annotations

import re

import numpy as np
import SimpleITK as sitk

_SEGMENT_KEY = re.compile(r"^Segment(\d+_|ation_)")
_EXTENT_KEY = re.compile(r"^Segment\d+_Extent$")
_OFFSET_KEY = "Segmentation_ReferenceImageExtentOffset"
_PARAMETERS_KEY = "Segmentation_ConversionParameters"
_GEOMETRY_PARAMETER = "Reference image geometry"
_LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


def is_slicer_segmentation(image: sitk.Image | sitk.ImageFileReader) -> bool:
    """Whether ``image`` (or a file's header) is a Slicer segmentation's (its metadata says so)."""
    return image.GetDimension() == 3 and image.HasMetaDataKey("Segmentation_MasterRepresentation")


def carry_segments(source: sitk.Image | sitk.ImageFileReader, warped: sitk.Image) -> None:
    """Give ``warped`` (``source``'s layers on a new 3D grid) the segments of ``source`` (an
    image, or a file's header), with their extents and reference geometry made the new grid's."""
    whole = " ".join(f"0 {size - 1}" for size in warped.GetSize())
    for key in source.GetMetaDataKeys():
        if _SEGMENT_KEY.match(key):
            value = whole if _EXTENT_KEY.match(key) else source.GetMetaData(key)
            warped.SetMetaData(key, value)
    warped.SetMetaData(_OFFSET_KEY, "0 0 0")
    if warped.HasMetaDataKey(_PARAMETERS_KEY):
        parameters = warped.GetMetaData(_PARAMETERS_KEY)
        warped.SetMetaData(_PARAMETERS_KEY, _with_geometry(parameters, _geometry(warped)))


def _geometry(image: sitk.Image) -> str:
    """Slicer's serialised image geometry: the 4×4 voxel-to-RAS matrix row by row, then the
    extent, each value followed by ';'."""
    direction = np.reshape(image.GetDirection(), (3, 3))
    matrix = np.eye(4)
    matrix[:3, :3] = _LPS_TO_RAS @ direction @ np.diag(image.GetSpacing())
    matrix[:3, 3] = _LPS_TO_RAS @ np.asarray(image.GetOrigin())
    extent = [bound for size in image.GetSize() for bound in (0, size - 1)]
    return "".join(f"{value!r};" for value in [*matrix.ravel().tolist(), *extent])


def _with_geometry(parameters: str, geometry: str) -> str:
    """``parameters`` ('name|value|description&…') with the reference geometry's value replaced."""
    entries = parameters.split("&")
    for index, entry in enumerate(entries):
        name, _, rest = entry.partition("|")
        if name == _GEOMETRY_PARAMETER:
            entries[index] = f"{name}|{geometry}|{rest.partition('|')[2]}"
    return "&".join(entries)
