"""Segmentation nodes ↔ label images: shared labelmap layers with their segments' metadata."""

# Slicer's camelCase also for fields:
# ruff: noqa: N815

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import slicer
import vtk

from ..errors import InputError
from .nodes import (
    arrayFromImageData,
    embed3x3,
    imageDataFromArray,
    onGrid,
    rasGeometry,
    referenceGrid,
    setLPSGeometry,
)
from .transforms import frameTransform

BINARY_LABELMAP = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


@dataclass(frozen=True)
class SegmentInfo:
    """One segment: where its voxels are (``layer`` image == ``labelValue``) and its metadata.

    ``metadata`` is a detached copy of the segment (name, colour, terminology tags) without voxels.
    """

    segmentId: str
    layer: int
    labelValue: int
    metadata: slicer.vtkSegment

    @property
    def name(self) -> str:
        return self.metadata.GetName()

    @property
    def color(self) -> tuple[float, float, float]:
        return tuple(self.metadata.GetColor())


@dataclass
class SegmentLabels:
    """A segmentation as label images: segments that do not overlap share one layer image.

    This is how Slicer stores segmentations (shared labelmaps), so overlapping segments survive and
    a typical segmentation costs one label image however many segments it has.
    """

    layers: list[sitk.Image]
    segments: list[SegmentInfo]

    def binary(self, segmentId: str) -> sitk.Image:
        """The segment as a 0/1 uint8 image."""
        info = next((s for s in self.segments if s.segmentId == segmentId), None)
        if info is None:
            raise KeyError(segmentId)
        return sitk.Cast(sitk.Equal(self.layers[info.layer], info.labelValue), sitk.sitkUInt8)


def _imageFromOrientedImageData(imageData, what: str) -> sitk.Image:
    """A vtkOrientedImageData (possibly with an extent not starting at 0) as an LPS image."""
    array = arrayFromImageData(imageData, what)
    directions = vtk.vtkMatrix4x4()
    imageData.GetDirectionMatrix(directions)
    imageToWorld = vtk.vtkMatrix4x4()
    imageData.GetImageToWorldMatrix(imageToWorld)
    extent = imageData.GetExtent()
    start = slicer.util.arrayFromVTKMatrix(imageToWorld) @ np.array(
        [extent[0], extent[2], extent[4], 1.0]
    )
    image = sitk.GetImageFromArray(array)
    return setLPSGeometry(
        image, start[:3], slicer.util.arrayFromVTKMatrix(directions)[:3, :3], imageData.GetSpacing()
    )


def labelmapSegmentation(segmentationNode: slicer.vtkMRMLSegmentationNode):
    """The node's segmentation if it has labelmaps, else a converted copy (node untouched)."""
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' has no segments")
    if segmentation.ContainsRepresentation(BINARY_LABELMAP):
        return segmentation
    copy = slicer.vtkSegmentation()
    copy.DeepCopy(segmentation)
    if not copy.CreateRepresentation(BINARY_LABELMAP):
        raise InputError(
            f"segmentation '{segmentationNode.GetName()}' cannot be converted to a labelmap; "
            "create its binary labelmap representation in the Segmentations module"
        )
    return copy


def segmentLayout(segmentation) -> tuple[list[SegmentInfo], list[int]]:
    """Segment metadata in segment order, and the segmentation layers they use (in first use)."""
    layers: list[int] = []
    segments = []
    for segmentId in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segmentId)
        layer = segmentation.GetLayerIndex(segmentId, BINARY_LABELMAP)
        if layer not in layers:
            layers.append(layer)
        metadata = slicer.vtkSegment()
        metadata.DeepCopyMetadata(segment)
        segments.append(
            SegmentInfo(segmentId, layers.index(layer), segment.GetLabelValue(), metadata)
        )
    return segments, layers


def segmentLabelsFromSegmentationNode(
    segmentationNode: slicer.vtkMRMLSegmentationNode,
    referenceVolumeNode: slicer.vtkMRMLVolumeNode,
) -> SegmentLabels:
    """The segments as label images on the reference volume's grid (names and colours kept).

    Layers are resampled (nearest neighbour) onto the reference grid, across the two nodes'
    parent transforms if these differ.
    """
    segmentation = labelmapSegmentation(segmentationNode)
    reference = referenceGrid(referenceVolumeNode)
    toSegmentation = frameTransform(referenceVolumeNode, segmentationNode)
    segments, layerIndices = segmentLayout(segmentation)
    layers = []
    for layer in layerIndices:
        imageData = segmentation.GetLayerDataObject(layer, BINARY_LABELMAP)
        if _hasVoxels(imageData):
            what = f"segmentation '{segmentationNode.GetName()}'"
            image = onGrid(_imageFromOrientedImageData(imageData, what), reference, toSegmentation)
        else:
            image = reference.reference_image()  # an empty layer: zeros on the grid
        layers.append(image)
    return SegmentLabels(layers, segments)


def _hasVoxels(imageData) -> bool:
    extent = imageData.GetExtent()
    return extent[1] >= extent[0] and extent[3] >= extent[2] and extent[5] >= extent[4]


def updateSegmentationNodeFromSegmentLabels(
    segmentationNode: slicer.vtkMRMLSegmentationNode, labels: SegmentLabels
) -> None:
    """Replace the node's segments with ``labels`` (IDs, names, colours, tags, layers kept)."""
    layerImages = []
    for image in labels.layers:
        origin, directions, spacing = rasGeometry(image)
        oriented = imageDataFromArray(
            _vtkFriendlyLabels(sitk.GetArrayViewFromImage(image)), slicer.vtkOrientedImageData()
        )
        oriented.SetOrigin(*origin)
        oriented.SetSpacing(*spacing)
        oriented.SetDirectionMatrix(slicer.util.vtkMatrixFromArray(embed3x3(directions)))
        layerImages.append(oriented)
    segmentation = segmentationNode.GetSegmentation()
    wasModifying = segmentationNode.StartModify()
    segmentation.RemoveAllSegments()
    segmentation.SetSourceRepresentationName(BINARY_LABELMAP)
    for info in labels.segments:
        segment = slicer.vtkSegment()
        segment.DeepCopyMetadata(info.metadata)
        segment.SetLabelValue(info.labelValue)
        segment.AddRepresentation(BINARY_LABELMAP, layerImages[info.layer])
        segmentation.AddSegment(segment, info.segmentId)
    segmentationNode.EndModify(wasModifying)


def _vtkFriendlyLabels(array: np.ndarray) -> np.ndarray:
    """64-bit labels as int32: Slicer does not display 'long long' volumes correctly."""
    if array.dtype.itemsize == 8 and np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int32)
    return array
