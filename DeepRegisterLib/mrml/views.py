"""Views for judging a registration: a checkerboard volume, and slice compositing that the
difference view changes and every other view puts back."""

from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import SimpleITK as sitk
import slicer

from ..errors import InputError
from ..imaging.colour import luminance
from .nodes import imageFromVolumeNode, sameGrid, showScalars, updateVolumeNodeFromImage
from .scene_edit import SceneEdit


def checkerboardImage(fixed: sitk.Image, warped: sitk.Image, tiles: int = 8) -> sitk.Image:
    """Alternating tiles of the fixed and warped images, each scaled to its 1st–99th percentile,
    so that edges crossing tile borders show the alignment whatever the two intensity ranges."""

    def normalised(image: sitk.Image) -> sitk.Image:
        array = sitk.GetArrayViewFromImage(image).astype(np.float32)
        low, high = np.percentile(array, [1.0, 99.0])
        scaled = np.clip((array - low) / max(high - low, 1e-12), 0.0, 1.0)
        out = sitk.GetImageFromArray(scaled.astype(np.float32))
        out.CopyInformation(image)
        return out

    if not sameGrid(fixed, warped):
        raise InputError("the checkerboard needs the two images on the same grid")
    return sitk.CheckerBoard(normalised(fixed), normalised(warped), [tiles] * fixed.GetDimension())


def createCheckerboardVolume(
    fixedNode: slicer.vtkMRMLScalarVolumeNode,
    warpedNode: slicer.vtkMRMLScalarVolumeNode,
    outputNode: slicer.vtkMRMLScalarVolumeNode | None = None,
    tiles: int = 8,
) -> slicer.vtkMRMLScalarVolumeNode:
    """A volume alternating fixed and warped tiles, for judging the alignment at a glance."""
    fixed, warped = (
        luminance(imageFromVolumeNode(node, allowColour=True)) for node in (fixedNode, warpedNode)
    )  # pictures by their luminance, as they were registered
    image = checkerboardImage(fixed, warped, tiles)
    with SceneEdit(fixedNode.GetScene()) as edit:
        if outputNode is None:
            outputNode = edit.newNode(
                "vtkMRMLScalarVolumeNode", f"{fixedNode.GetName()} checkerboard"
            )
        updateVolumeNodeFromImage(edit.change(outputNode), image)
        outputNode.SetAndObserveTransformNodeID(fixedNode.GetTransformNodeID())
        showScalars(outputNode, "vtkMRMLColorTableNodeGrey", 1.0, 0.5)
    return outputNode


class SliceCompositing:
    """Sets slice views' compositing for one view (the difference: Subtract) and puts back what
    each view had before when another view is shown, instead of leaving Subtract behind."""

    def __init__(self) -> None:
        self._previous: dict[str, int] = {}

    def override(self, compositeNodes: Iterable, mode: int) -> None:
        """Use ``mode``, remembering each view's own compositing the first time."""
        for node in compositeNodes:
            self._previous.setdefault(node.GetID(), node.GetCompositing())
            node.SetCompositing(mode)

    def restore(self, compositeNodes: Iterable) -> None:
        """Put back what :meth:`override` changed; views it did not change are left alone."""
        for node in compositeNodes:
            previous = self._previous.pop(node.GetID(), None)
            if previous is not None:
                node.SetCompositing(previous)
        self._previous.clear()
