"""Reading a registration's masks and label nodes out of the scene, onto the right grids."""

# Slicer's camelCase also for fields:

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk
import slicer

from ..errors import InputError
from .nodes import imageFromVolumeNode, onGrid, referenceGrid
from .segmentations import (
    SegmentInfo,
    labelmapSegmentation,
    segmentLabelsFromSegmentationNode,
    segmentLayout,
)
from .transforms import frameTransform

LabelNode = slicer.vtkMRMLLabelMapVolumeNode | slicer.vtkMRMLSegmentationNode
MaskNode = slicer.vtkMRMLScalarVolumeNode | slicer.vtkMRMLSegmentationNode


def maskImage(maskNode, referenceVolumeNode: slicer.vtkMRMLVolumeNode) -> sitk.Image:
    """A 0/1 uint8 mask on the reference grid from a volume (non-zero) or a segmentation (union)."""
    reference = referenceGrid(referenceVolumeNode)
    if maskNode.IsA("vtkMRMLSegmentationNode"):
        labels = segmentLabelsFromSegmentationNode(maskNode, referenceVolumeNode)
        union = np.zeros(reference.shape, dtype=bool)
        for layer in labels.layers:
            union |= sitk.GetArrayViewFromImage(layer) != 0
        return reference.apply_to(sitk.GetImageFromArray(union.astype(np.uint8)))
    if not maskNode.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"mask '{maskNode.GetName()}' must be a volume or a segmentation")
    image = sitk.Cast(sitk.NotEqual(imageFromVolumeNode(maskNode), 0), sitk.sitkUInt8)
    return onGrid(image, reference, frameTransform(referenceVolumeNode, maskNode))


@dataclass(frozen=True)
class LabelSource:
    """A moving label map or segmentation given to the engine, and how to rebuild its output.

    ``keys`` name its images in ``moving_labels`` / ``warped_labels``: the node ID for a label
    map, "<node ID>:<layer>" for each layer of a segmentation.
    """

    node: LabelNode
    keys: list[str]
    segments: list[SegmentInfo] = field(default_factory=list)

    @property
    def isSegmentation(self) -> bool:
        return self.node.IsA("vtkMRMLSegmentationNode")


def layerKeys(node: slicer.vtkMRMLSegmentationNode, count: int) -> list[str]:
    return [f"{node.GetID()}:{layer}" for layer in range(count)]


def checkLabelNode(node) -> None:
    if not node.IsA("vtkMRMLSegmentationNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{node.GetName()}' is neither a label map nor a segmentation")


def labelSources(
    labelNodes: Sequence[LabelNode], movingNode: slicer.vtkMRMLScalarVolumeNode
) -> tuple[list[LabelSource], dict[str, sitk.Image]]:
    """The label images for the engine, on the moving grid, and where each came from."""
    sources, images = [], {}
    moving = referenceGrid(movingNode)
    for node in labelNodes:
        checkLabelNode(node)
        if node.IsA("vtkMRMLSegmentationNode"):
            labels = segmentLabelsFromSegmentationNode(node, movingNode)
            source = LabelSource(node, layerKeys(node, len(labels.layers)), labels.segments)
            images.update(zip(source.keys, labels.layers, strict=True))
        else:
            source = LabelSource(node, [node.GetID()])
            images[node.GetID()] = onGrid(
                imageFromVolumeNode(node), moving, frameTransform(movingNode, node)
            )
        sources.append(source)
    return sources, images


def labelSourceLayout(node: LabelNode) -> LabelSource:
    """:func:`labelSources`' bookkeeping for one node, without reading its voxels."""
    checkLabelNode(node)
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return LabelSource(node, [node.GetID()])
    segments, layers = segmentLayout(labelmapSegmentation(node))
    return LabelSource(node, layerKeys(node, len(layers)), segments)
