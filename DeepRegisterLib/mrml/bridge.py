"""Bridge between DeepRegisterLib and a Slicer (MRML) scene; the only module importing ``slicer``.

It runs inside the Slicer application and headless with the ``slicer-core`` wheel alike, because
it uses MRML and VTK only (no Qt, no ``slicer.app``, no ``slicer.mrmlScene`` global: the scene is
always the one the given nodes live in).

Conventions (see :mod:`DeepRegisterLib.imaging.geometry`): MRML is RAS, SimpleITK and files are
LPS, and both store voxels as (K, J, I) arrays. Every volume is taken in its own (local)
coordinates; the
outputs are placed under the fixed volume's parent transform, so they line up in world space
whatever transforms the inputs sit under.

A registration has three steps so that the slow one can run in a worker thread:
:func:`prepareRegistration` reads the scene (main thread), :meth:`RegistrationJob.run` runs the
engine without touching MRML (any thread), :meth:`RegistrationJob.push` writes the results
(main thread). Nothing in the scene changes until the engine has succeeded, and a push that fails
part-way undoes itself, so a failed or cancelled registration leaves the scene as it was.
"""

# Slicer's camelCase also for fields (they mirror the module's parameter node):
# ruff: noqa: N815

from __future__ import annotations

import json
import queue
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import InputError
from ..imaging.geometry import LPS_TO_RAS, Grid
from ..registration.engine import CancelToken, ProgressCallback, register
from ..registration.result import RegistrationResult

LabelNode = slicer.vtkMRMLLabelMapVolumeNode | slicer.vtkMRMLSegmentationNode
MaskNode = slicer.vtkMRMLScalarVolumeNode | slicer.vtkMRMLSegmentationNode

#: Node reference roles from an output transform to the QA nodes of its last run, so that running
#: again into the same transform updates those nodes instead of piling up new ones.
INVERSE_TRANSFORM_ROLE = "DeepRegisterInverseTransform"
JACOBIAN_VOLUME_ROLE = "DeepRegisterJacobian"
REPORT_TABLE_ROLE = "DeepRegisterReport"
#: Attribute of the output transform holding the run's report as JSON.
REPORT_ATTRIBUTE = "DeepRegister.Report"

_BINARY_LABELMAP = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()
_RAS_TO_LPS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])


# --- arrays, matrices and geometry ----------------------------------------------------------


def _arrayFromImageData(imageData: vtk.vtkImageData, what: str) -> np.ndarray:
    """A copy of the voxels as a (K, J, I) or (K, J, I, C) array."""
    scalars = imageData.GetPointData().GetScalars() if imageData is not None else None
    if scalars is None or scalars.GetNumberOfTuples() == 0:
        raise InputError(f"{what} has no voxels; load or create its image data first")
    components = scalars.GetNumberOfComponents()
    shape = tuple(reversed(imageData.GetDimensions())) + ((components,) if components > 1 else ())
    return numpy_support.vtk_to_numpy(scalars).reshape(shape).copy()


def _imageDataFromArray(array: np.ndarray, imageData: vtk.vtkImageData | None = None):
    """Deep-copy a (K, J, I[, C]) array into (new) VTK image data with origin 0, spacing 1."""
    imageData = imageData if imageData is not None else vtk.vtkImageData()
    components = array.shape[3] if array.ndim == 4 else 1
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    flat = np.ascontiguousarray(array).reshape(-1, components)
    imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    return imageData


def _rasGeometry(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(origin, 3×3 direction, spacing) of a 3D image in RAS; the flips are exact negations."""
    if image.GetDimension() != 3:
        raise InputError(f"MRML volumes are 3D; this image is {image.GetDimension()}D")
    grid = Grid.of(image)
    return LPS_TO_RAS @ np.asarray(grid.origin), LPS_TO_RAS @ grid.direction_matrix, grid.spacing


def _setLPSGeometry(image: sitk.Image, origin, directions, spacing) -> sitk.Image:
    """Set an image's geometry from RAS origin and direction (columns = I, J, K axes)."""
    image.SetOrigin(tuple(float(v) for v in LPS_TO_RAS @ np.asarray(origin, dtype=float)))
    image.SetDirection(tuple(float(v) for v in (LPS_TO_RAS @ np.asarray(directions)).ravel()))
    image.SetSpacing(tuple(float(s) for s in spacing))
    return image


def _directionsOf(volumeNode: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)[:3, :3]


def _sameGrid(a: sitk.Image, b: sitk.Image) -> bool:
    return (
        a.GetSize() == b.GetSize()
        and np.allclose(a.GetSpacing(), b.GetSpacing(), rtol=1e-6, atol=0)
        and np.allclose(a.GetOrigin(), b.GetOrigin(), rtol=0, atol=1e-4)
        and np.allclose(a.GetDirection(), b.GetDirection(), rtol=0, atol=1e-6)
    )


def _referenceImage(volumeNode: slicer.vtkMRMLVolumeNode) -> sitk.Image:
    """An empty image with the volume's geometry (no voxels copied), to resample onto."""
    if volumeNode.GetImageData() is None:
        raise InputError(f"volume '{volumeNode.GetName()}' has no image data")
    dimensions = volumeNode.GetImageData().GetDimensions()
    image = sitk.Image([int(d) for d in dimensions], sitk.sitkUInt8)
    return _setLPSGeometry(
        image, volumeNode.GetOrigin(), _directionsOf(volumeNode), volumeNode.GetSpacing()
    )


def _frameTransform(referenceNode, node) -> sitk.Transform | None:
    """Linear LPS transform from ``referenceNode``'s local coordinates to ``node``'s, or None.

    This is the resampling transform that brings ``node``'s voxels onto ``referenceNode``'s grid
    when the two sit under different parent transforms.
    """
    source, target = referenceNode.GetParentTransformNode(), node.GetParentTransformNode()
    if source is target:
        return None
    ras = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(source, target, ras):
        raise InputError(
            f"'{node.GetName()}' and '{referenceNode.GetName()}' are under different transforms "
            "and at least one is not linear; harden the transforms first"
        )
    matrix = slicer.util.arrayFromVTKMatrix(ras)
    if np.allclose(matrix, np.eye(4), atol=1e-9):
        return None
    return _affineFromRAS(matrix)


def _affineFromRAS(matrix: np.ndarray) -> sitk.AffineTransform:
    lps = _RAS_TO_LPS_4 @ matrix @ _RAS_TO_LPS_4
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in lps[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in lps[:3, 3]))
    return transform


def _onGrid(image: sitk.Image, reference: sitk.Image, transform: sitk.Transform | None):
    """Labels (nearest neighbour) on the reference grid; returned as is if already there."""
    if transform is None and _sameGrid(image, reference):
        return image
    return sitk.Resample(
        image,
        reference,
        transform if transform is not None else sitk.Transform(),
        sitk.sitkNearestNeighbor,
        0,
        image.GetPixelID(),
    )


# --- volumes --------------------------------------------------------------------------------


def imageFromVolumeNode(volumeNode: slicer.vtkMRMLVolumeNode) -> sitk.Image:
    """The voxels (copied) and exact geometry (LPS) of a scalar or label map volume node.

    The volume's parent transform is not applied: the image is in the node's local coordinates.
    """
    if volumeNode is None:
        raise InputError("no volume was given")
    name = f"volume '{volumeNode.GetName()}'"
    array = _arrayFromImageData(volumeNode.GetImageData(), name)
    if array.ndim != 3:
        raise InputError(f"{name} has {array.shape[-1]} components; only scalar volumes are used")
    image = sitk.GetImageFromArray(array)
    return _setLPSGeometry(
        image, volumeNode.GetOrigin(), _directionsOf(volumeNode), volumeNode.GetSpacing()
    )


def updateVolumeNodeFromImage(volumeNode: slicer.vtkMRMLVolumeNode, image: sitk.Image) -> None:
    """Replace a volume node's voxels and geometry with a 3D scalar image's (copied)."""
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError("only scalar images can be put into a volume node")
    origin, directions, spacing = _rasGeometry(image)
    imageData = _imageDataFromArray(sitk.GetArrayViewFromImage(image))
    wasModifying = volumeNode.StartModify()
    volumeNode.SetOrigin(*origin)
    volumeNode.SetSpacing(*spacing)
    volumeNode.SetIJKToRASDirectionMatrix(slicer.util.vtkMatrixFromArray(_embed3x3(directions)))
    volumeNode.SetAndObserveImageData(imageData)
    volumeNode.EndModify(wasModifying)


def _embed3x3(matrix: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = matrix
    return out


# --- segmentations --------------------------------------------------------------------------


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
    array = _arrayFromImageData(imageData, what)
    directions = vtk.vtkMatrix4x4()
    imageData.GetDirectionMatrix(directions)
    imageToWorld = vtk.vtkMatrix4x4()
    imageData.GetImageToWorldMatrix(imageToWorld)
    extent = imageData.GetExtent()
    start = slicer.util.arrayFromVTKMatrix(imageToWorld) @ np.array(
        [extent[0], extent[2], extent[4], 1.0]
    )
    image = sitk.GetImageFromArray(array)
    return _setLPSGeometry(
        image, start[:3], slicer.util.arrayFromVTKMatrix(directions)[:3, :3], imageData.GetSpacing()
    )


def _labelmapSegmentation(segmentationNode: slicer.vtkMRMLSegmentationNode):
    """The node's segmentation if it has labelmaps, else a converted copy (node untouched)."""
    segmentation = segmentationNode.GetSegmentation()
    if segmentation.GetNumberOfSegments() == 0:
        raise InputError(f"segmentation '{segmentationNode.GetName()}' has no segments")
    if segmentation.ContainsRepresentation(_BINARY_LABELMAP):
        return segmentation
    copy = slicer.vtkSegmentation()
    copy.DeepCopy(segmentation)
    if not copy.CreateRepresentation(_BINARY_LABELMAP):
        raise InputError(
            f"segmentation '{segmentationNode.GetName()}' cannot be converted to a labelmap; "
            "create its binary labelmap representation in the Segmentations module"
        )
    return copy


def _segmentLayout(segmentation) -> tuple[list[SegmentInfo], list[int]]:
    """Segment metadata in segment order, and the segmentation layers they use (in first use)."""
    layers: list[int] = []
    segments = []
    for segmentId in segmentation.GetSegmentIDs():
        segment = segmentation.GetSegment(segmentId)
        layer = segmentation.GetLayerIndex(segmentId, _BINARY_LABELMAP)
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
    segmentation = _labelmapSegmentation(segmentationNode)
    reference = _referenceImage(referenceVolumeNode)
    toSegmentation = _frameTransform(referenceVolumeNode, segmentationNode)
    segments, layerIndices = _segmentLayout(segmentation)
    layers = []
    for layer in layerIndices:
        imageData = segmentation.GetLayerDataObject(layer, _BINARY_LABELMAP)
        if _hasVoxels(imageData):
            what = f"segmentation '{segmentationNode.GetName()}'"
            image = _onGrid(_imageFromOrientedImageData(imageData, what), reference, toSegmentation)
        else:
            image = sitk.Image(reference.GetSize(), sitk.sitkUInt8)
            image.CopyInformation(reference)
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
        origin, directions, spacing = _rasGeometry(image)
        oriented = _imageDataFromArray(
            _vtkFriendlyLabels(sitk.GetArrayViewFromImage(image)), slicer.vtkOrientedImageData()
        )
        oriented.SetOrigin(*origin)
        oriented.SetSpacing(*spacing)
        oriented.SetDirectionMatrix(slicer.util.vtkMatrixFromArray(_embed3x3(directions)))
        layerImages.append(oriented)
    segmentation = segmentationNode.GetSegmentation()
    wasModifying = segmentationNode.StartModify()
    segmentation.RemoveAllSegments()
    segmentation.SetSourceRepresentationName(_BINARY_LABELMAP)
    for info in labels.segments:
        segment = slicer.vtkSegment()
        segment.DeepCopyMetadata(info.metadata)
        segment.SetLabelValue(info.labelValue)
        segment.AddRepresentation(_BINARY_LABELMAP, layerImages[info.layer])
        segmentation.AddSegment(segment, info.segmentId)
    segmentationNode.EndModify(wasModifying)


def _vtkFriendlyLabels(array: np.ndarray) -> np.ndarray:
    """64-bit labels as int32: Slicer does not display 'long long' volumes correctly."""
    if array.dtype.itemsize == 8 and np.issubdtype(array.dtype, np.integer):
        return array.astype(np.int32)
    return array


def _maskImage(maskNode, referenceVolumeNode: slicer.vtkMRMLVolumeNode) -> sitk.Image:
    """A 0/1 uint8 mask on the reference grid from a volume (non-zero) or a segmentation (union)."""
    reference = _referenceImage(referenceVolumeNode)
    if maskNode.IsA("vtkMRMLSegmentationNode"):
        labels = segmentLabelsFromSegmentationNode(maskNode, referenceVolumeNode)
        union = np.zeros(tuple(reversed(reference.GetSize())), dtype=bool)
        for layer in labels.layers:
            union |= sitk.GetArrayViewFromImage(layer) != 0
        mask = sitk.GetImageFromArray(union.astype(np.uint8))
        mask.CopyInformation(reference)
        return mask
    if not maskNode.IsA("vtkMRMLScalarVolumeNode"):
        raise InputError(f"mask '{maskNode.GetName()}' must be a volume or a segmentation")
    image = sitk.Cast(sitk.NotEqual(imageFromVolumeNode(maskNode), 0), sitk.sitkUInt8)
    return _onGrid(image, reference, _frameTransform(referenceVolumeNode, maskNode))


# --- transforms -----------------------------------------------------------------------------


def gridTransformFromDisplacement(displacement: sitk.Image) -> slicer.vtkOrientedGridTransform:
    """A Slicer grid transform (RAS vectors, linear interpolation) equal to an ITK field (LPS).

    Both are resampling transforms (``x ↦ x + u(x)``, fixed → moving): set the result with
    ``SetAndObserveTransformFromParent``.
    """
    if displacement.GetDimension() != 3 or displacement.GetNumberOfComponentsPerPixel() != 3:
        raise InputError("a displacement field for MRML must be a 3D image of 3D vectors")
    origin, directions, spacing = _rasGeometry(displacement)
    vectors = np.array(sitk.GetArrayViewFromImage(displacement), dtype=np.float64)
    vectors[..., :2] *= -1.0  # LPS → RAS
    grid = _imageDataFromArray(vectors)
    grid.SetOrigin(*origin)
    grid.SetSpacing(*spacing)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(slicer.util.vtkMatrixFromArray(_embed3x3(directions)))
    transform.SetInterpolationModeToLinear()
    return transform


def _initialTransform(fixedNode, initialTransformNode) -> sitk.Transform | None:
    """The fixed → moving (resampling) transform that placing the moving volume under
    ``initialTransformNode`` shows, in the fixed volume's local LPS coordinates."""
    if initialTransformNode is None:
        return None
    ras = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        fixedNode.GetParentTransformNode(), initialTransformNode, ras
    ):
        raise InputError(
            f"initial transform '{initialTransformNode.GetName()}' must be linear (rigid or "
            "affine); harden a deformable initial transform onto the moving volume instead"
        )
    return _affineFromRAS(slicer.util.arrayFromVTKMatrix(ras))


# --- pushing results ------------------------------------------------------------------------


@dataclass
class RegistrationNodes:
    """The nodes one registration created or updated, and its report."""

    transformNode: slicer.vtkMRMLTransformNode
    volumeNode: slicer.vtkMRMLScalarVolumeNode | None = None
    inverseTransformNode: slicer.vtkMRMLTransformNode | None = None
    jacobianVolumeNode: slicer.vtkMRMLScalarVolumeNode | None = None
    labelNodes: list[LabelNode] = field(default_factory=list)
    reportTableNode: slicer.vtkMRMLTableNode | None = None
    report: dict[str, Any] = field(default_factory=dict)


class _SceneEdit:
    """Adds and changes nodes so that an exception part-way puts the scene back as it was.

    New nodes (with their display nodes) are removed; existing nodes are restored from a copy
    taken just before their first change.
    """

    def __init__(self, scene: slicer.vtkMRMLScene):
        self.scene = scene
        self._before: set[str] = set()
        self._backups: list[tuple[Any, Any]] = []

    def __enter__(self) -> _SceneEdit:
        self._before = set(_nodeIDs(self.scene))
        self.scene.StartState(slicer.vtkMRMLScene.BatchProcessState)
        return self

    def __exit__(self, excType, exc, traceback) -> None:
        try:
            if excType is not None:
                for node, backup in reversed(self._backups):
                    node.Copy(backup)
                for nodeID in reversed(list(_nodeIDs(self.scene))):
                    node = self.scene.GetNodeByID(nodeID)  # None if removed with its owner
                    if nodeID not in self._before and node is not None:
                        self.scene.RemoveNode(node)
        finally:
            self.scene.EndState(slicer.vtkMRMLScene.BatchProcessState)

    def newNode(self, className: str, name: str):
        return self.scene.AddNewNodeByClass(className, self.scene.GenerateUniqueName(name))

    def change(self, node):
        """Call before the first change of a node that may already exist; returns the node."""
        if node.GetID() in self._before and all(n is not node for n, _ in self._backups):
            backup = node.CreateNodeInstance()
            backup.Copy(node)
            self._backups.append((node, backup))
        return node

    def reuseOrNew(self, owner, role: str, className: str, name: str):
        """The node ``owner`` references under ``role`` if it is a ``className``, else a new one."""
        node = owner.GetNodeReference(role)
        if node is not None and node.IsA(className):
            return self.change(node)
        return self.newNode(className, name)


def _nodeIDs(scene: slicer.vtkMRMLScene) -> Iterator[str]:
    for index in range(scene.GetNumberOfNodes()):
        yield scene.GetNthNode(index).GetID()


def _copyVolumeDisplay(source: slicer.vtkMRMLVolumeNode, target: slicer.vtkMRMLVolumeNode):
    """Show the target like the source (colour table, window/level)."""
    target.CreateDefaultDisplayNodes()
    sourceDisplay, targetDisplay = source.GetDisplayNode(), target.GetDisplayNode()
    if sourceDisplay is None or targetDisplay is None:
        return
    targetDisplay.SetAndObserveColorNodeID(sourceDisplay.GetColorNodeID())
    if sourceDisplay.IsA("vtkMRMLScalarVolumeDisplayNode"):
        targetDisplay.SetAutoWindowLevel(sourceDisplay.GetAutoWindowLevel())
        targetDisplay.SetWindowLevel(sourceDisplay.GetWindow(), sourceDisplay.GetLevel())


def _showJacobian(volumeNode: slicer.vtkMRMLScalarVolumeNode) -> None:
    """Diverging colours centred on det J = 1 (blue: compression, red: expansion)."""
    volumeNode.CreateDefaultDisplayNodes()
    display = volumeNode.GetDisplayNode()
    colorID = "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"
    if volumeNode.GetScene().GetNodeByID(colorID) is not None:
        display.SetAndObserveColorNodeID(colorID)
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(2.0, 1.0)


def _reportRows(report: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, str]]:
    """Flatten nested report entries into (dotted name, text) rows."""
    for key, value in report.items():
        if isinstance(value, Mapping):
            yield from _reportRows(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            yield f"{prefix}{key}", f"{value:.6g}"
        else:
            yield f"{prefix}{key}", value if isinstance(value, str) else json.dumps(value)


def _fillReportTable(tableNode: slicer.vtkMRMLTableNode, report: Mapping[str, Any]) -> None:
    names, values = vtk.vtkStringArray(), vtk.vtkStringArray()
    names.SetName("Measure")
    values.SetName("Value")
    for name, value in _reportRows(report):
        names.InsertNextValue(name)
        values.InsertNextValue(value)
    table = vtk.vtkTable()
    table.AddColumn(names)
    table.AddColumn(values)
    tableNode.SetAndObserveTable(table)


@dataclass(frozen=True)
class _LabelSource:
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


def _layerKeys(node: slicer.vtkMRMLSegmentationNode, count: int) -> list[str]:
    return [f"{node.GetID()}:{layer}" for layer in range(count)]


def _checkLabelNode(node) -> None:
    if not node.IsA("vtkMRMLSegmentationNode") and not node.IsA("vtkMRMLLabelMapVolumeNode"):
        raise InputError(f"'{node.GetName()}' is neither a label map nor a segmentation")


def _labelSources(
    labelNodes: Sequence[LabelNode], movingNode: slicer.vtkMRMLScalarVolumeNode
) -> tuple[list[_LabelSource], dict[str, sitk.Image]]:
    """The label images for the engine, on the moving grid, and where each came from."""
    sources, images = [], {}
    moving = _referenceImage(movingNode)
    for node in labelNodes:
        _checkLabelNode(node)
        if node.IsA("vtkMRMLSegmentationNode"):
            labels = segmentLabelsFromSegmentationNode(node, movingNode)
            source = _LabelSource(node, _layerKeys(node, len(labels.layers)), labels.segments)
            images.update(zip(source.keys, labels.layers, strict=True))
        else:
            source = _LabelSource(node, [node.GetID()])
            images[node.GetID()] = _onGrid(
                imageFromVolumeNode(node), moving, _frameTransform(movingNode, node)
            )
        sources.append(source)
    return sources, images


def _labelSourceLayout(node: LabelNode) -> _LabelSource:
    """:func:`_labelSources`' bookkeeping for one node, without reading its voxels."""
    _checkLabelNode(node)
    if node.IsA("vtkMRMLLabelMapVolumeNode"):
        return _LabelSource(node, [node.GetID()])
    segments, layers = _segmentLayout(_labelmapSegmentation(node))
    return _LabelSource(node, _layerKeys(node, len(layers)), segments)


def pushResult(
    result: RegistrationResult,
    fixedNode: slicer.vtkMRMLScalarVolumeNode,
    movingNode: slicer.vtkMRMLScalarVolumeNode,
    outputTransformNode: slicer.vtkMRMLTransformNode | None = None,
    outputVolumeNode: slicer.vtkMRMLScalarVolumeNode | None = None,
    *,
    createOutputVolume: bool = False,
    movingLabelNodes: Sequence[LabelNode] = (),
    createReportTable: bool = True,
) -> RegistrationNodes:
    """Put a registration result into the scene of ``fixedNode``.

    Creates (or updates) the transform node holding the fixed → moving grid transform, with fixed
    and moving node references; the warped volume (into ``outputVolumeNode``, a new node if
    ``createOutputVolume``, otherwise the moving volume is placed under the transform); the inverse
    transform and Jacobian volume if the result has them; warped label maps / segmentations for
    ``movingLabelNodes`` (matched by the keys :func:`prepareRegistration` gives them; other warped
    labels become label map volumes); the report as an attribute and a table.

    If anything fails, the scene is left as it was and the error is raised.
    """
    sources = [_labelSourceLayout(node) for node in movingLabelNodes]
    return _push(
        result,
        fixedNode,
        movingNode,
        outputTransformNode,
        outputVolumeNode,
        createOutputVolume,
        sources,
        createReportTable,
    )


def _checkResultFits(result: RegistrationResult, fixedNode) -> None:
    fixed = _referenceImage(fixedNode)
    if not _sameGrid(result.fixed_grid.reference_image(), fixed):
        raise InputError(
            f"the result was computed on another grid than the fixed volume "
            f"'{fixedNode.GetName()}' (size {result.fixed_grid.size} vs {fixed.GetSize()}); push "
            "it with the fixed volume it was registered to"
        )
    if not _sameGrid(result.displacement, fixed):
        raise InputError("the result's displacement field is not on its fixed grid")


def _checkOutputs(fixedNode, outputTransformNode, outputVolumeNode) -> None:
    if outputVolumeNode is not None:
        if outputVolumeNode is fixedNode:
            raise InputError("the output volume must not be the fixed volume")
        if outputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode") or not outputVolumeNode.IsA(
            "vtkMRMLScalarVolumeNode"
        ):
            raise InputError(
                f"output volume '{outputVolumeNode.GetName()}' must be a scalar volume"
            )
    if outputTransformNode is not None:
        ancestor = fixedNode.GetParentTransformNode()
        while ancestor is not None:
            if ancestor is outputTransformNode:
                raise InputError(
                    f"the output transform '{outputTransformNode.GetName()}' is a parent "
                    "transform of the fixed volume; choose another output transform"
                )
            ancestor = ancestor.GetParentTransformNode()


def _push(
    result: RegistrationResult,
    fixedNode,
    movingNode,
    outputTransformNode,
    outputVolumeNode,
    createOutputVolume: bool,
    sources: Sequence[_LabelSource],
    createReportTable: bool,
) -> RegistrationNodes:
    scene = fixedNode.GetScene()
    if scene is None:
        raise InputError(f"the fixed volume '{fixedNode.GetName()}' is not in a scene (any more)")
    for node in (movingNode, outputTransformNode, outputVolumeNode, *(s.node for s in sources)):
        if node is not None and (node.GetScene() is not scene or not scene.IsNodePresent(node)):
            raise InputError(f"'{node.GetName()}' is not in the fixed volume's scene (any more)")
    _checkOutputs(fixedNode, outputTransformNode, outputVolumeNode)
    _checkResultFits(result, fixedNode)
    consumed = {key for source in sources for key in source.keys}
    missing = consumed - result.warped_labels.keys()
    if missing:
        raise InputError(f"the result has no warped labels for {', '.join(sorted(missing))}")

    # Conversions that can fail happen before the scene is touched.
    gridTransform = gridTransformFromDisplacement(result.displacement)
    inverseTransform = (
        None
        if result.inverse_displacement is None
        else gridTransformFromDisplacement(result.inverse_displacement)
    )
    fixedParentID = fixedNode.GetTransformNodeID()
    # The inverse lives in the moving volume's frame: the one it was in before any registration.
    movingParent = movingNode.GetParentTransformNode()
    movingParentID = (
        fixedParentID
        if movingParent is not None and movingParent is outputTransformNode
        else movingNode.GetTransformNodeID()
    )

    with _SceneEdit(scene) as edit:
        transformNode = (
            edit.change(outputTransformNode)
            if outputTransformNode is not None
            else edit.newNode(
                "vtkMRMLTransformNode", f"{movingNode.GetName()} to {fixedNode.GetName()}"
            )
        )
        _setRegistrationTransform(transformNode, gridTransform, fixedNode, movingNode)
        transformNode.SetAndObserveTransformNodeID(fixedParentID)
        transformNode.SetAttribute(REPORT_ATTRIBUTE, json.dumps(result.report))
        nodes = RegistrationNodes(transformNode, report=dict(result.report))

        if outputVolumeNode is None and createOutputVolume:
            outputVolumeNode = edit.newNode(
                "vtkMRMLScalarVolumeNode", f"{movingNode.GetName()} warped"
            )
            updateVolumeNodeFromImage(outputVolumeNode, result.warped)
            _copyVolumeDisplay(movingNode, outputVolumeNode)
        elif outputVolumeNode is not None:
            updateVolumeNodeFromImage(edit.change(outputVolumeNode), result.warped)
            outputVolumeNode.CreateDefaultDisplayNodes()
        if outputVolumeNode is not None:
            outputVolumeNode.SetAndObserveTransformNodeID(fixedParentID)
            nodes.volumeNode = outputVolumeNode

        if inverseTransform is not None:
            inverseNode = edit.reuseOrNew(
                transformNode,
                INVERSE_TRANSFORM_ROLE,
                "vtkMRMLTransformNode",
                f"{fixedNode.GetName()} to {movingNode.GetName()}",
            )
            _setRegistrationTransform(inverseNode, inverseTransform, movingNode, fixedNode)
            inverseNode.SetAndObserveTransformNodeID(movingParentID)
            transformNode.SetNodeReferenceID(INVERSE_TRANSFORM_ROLE, inverseNode.GetID())
            nodes.inverseTransformNode = inverseNode

        if result.jacobian is not None:
            jacobianNode = edit.reuseOrNew(
                transformNode,
                JACOBIAN_VOLUME_ROLE,
                "vtkMRMLScalarVolumeNode",
                f"{transformNode.GetName()} Jacobian",
            )
            updateVolumeNodeFromImage(jacobianNode, result.jacobian)
            jacobianNode.SetAndObserveTransformNodeID(fixedParentID)
            _showJacobian(jacobianNode)
            transformNode.SetNodeReferenceID(JACOBIAN_VOLUME_ROLE, jacobianNode.GetID())
            nodes.jacobianVolumeNode = jacobianNode

        for source in sources:
            nodes.labelNodes.append(_pushLabels(edit, source, result, fixedNode))
        for key in sorted(result.warped_labels.keys() - consumed):
            labelNode = edit.newNode("vtkMRMLLabelMapVolumeNode", f"{key} warped")
            updateVolumeNodeFromImage(labelNode, result.warped_labels[key])
            labelNode.CreateDefaultDisplayNodes()
            nodes.labelNodes.append(labelNode)
        for labelNode in nodes.labelNodes:
            labelNode.SetAndObserveTransformNodeID(fixedParentID)

        if createReportTable:
            tableNode = edit.reuseOrNew(
                transformNode,
                REPORT_TABLE_ROLE,
                "vtkMRMLTableNode",
                f"{transformNode.GetName()} QA",
            )
            _fillReportTable(tableNode, result.report)
            transformNode.SetNodeReferenceID(REPORT_TABLE_ROLE, tableNode.GetID())
            nodes.reportTableNode = tableNode

        if nodes.volumeNode is None:
            edit.change(movingNode).SetAndObserveTransformNodeID(transformNode.GetID())
    return nodes


def _setRegistrationTransform(transformNode, gridTransform, fixedNode, movingNode) -> None:
    """Hold ``gridTransform`` as the resampling (FromParent) transform, with the registration's
    fixed and moving volumes as references (as Slicer's registration modules do)."""
    transformNode.SetAndObserveTransformFromParent(gridTransform)
    transformNode.SetNodeReferenceID(
        slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), fixedNode.GetID()
    )
    transformNode.SetNodeReferenceID(
        slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), movingNode.GetID()
    )


def _pushLabels(edit: _SceneEdit, source: _LabelSource, result, fixedNode) -> LabelNode:
    name = f"{source.node.GetName()} warped"
    if source.isSegmentation:
        node = edit.newNode("vtkMRMLSegmentationNode", name)
        node.CreateDefaultDisplayNodes()
        node.SetReferenceImageGeometryParameterFromVolumeNode(fixedNode)
        layers = [result.warped_labels[key] for key in source.keys]
        updateSegmentationNodeFromSegmentLabels(node, SegmentLabels(layers, source.segments))
    else:
        node = edit.newNode("vtkMRMLLabelMapVolumeNode", name)
        updateVolumeNodeFromImage(node, result.warped_labels[source.node.GetID()])
        _copyVolumeDisplay(source.node, node)
    return node


# --- registering nodes ----------------------------------------------------------------------


@dataclass
class RegistrationJob:
    """A registration read out of the scene.

    :meth:`run` touches no MRML, so it may run in a worker thread; :meth:`push` must run on the
    thread that owns the scene (Slicer's main thread).
    """

    fixedNode: slicer.vtkMRMLScalarVolumeNode
    movingNode: slicer.vtkMRMLScalarVolumeNode
    outputTransformNode: slicer.vtkMRMLTransformNode | None
    outputVolumeNode: slicer.vtkMRMLScalarVolumeNode | None
    createOutputVolume: bool
    createReportTable: bool
    fixed: sitk.Image
    moving: sitk.Image
    fixedMask: sitk.Image | None
    movingMask: sitk.Image | None
    initialTransform: sitk.Transform | None
    labelImages: dict[str, sitk.Image]
    labelSources: list[_LabelSource]
    options: dict[str, Any]

    def run(
        self,
        progress: ProgressCallback | None = None,
        cancel: CancelToken | None = None,
    ) -> RegistrationResult:
        """Run the engine; raises InputError on unusable input, RegistrationCancelled on cancel."""
        return register(
            self.fixed,
            self.moving,
            fixed_mask=self.fixedMask,
            moving_mask=self.movingMask,
            moving_labels=self.labelImages or None,
            initial_transform=self.initialTransform,
            progress=progress,
            cancel=cancel,
            **self.options,
        )

    def push(self, result: RegistrationResult) -> RegistrationNodes:
        """Write the result into the scene (all or nothing)."""
        return _push(
            result,
            self.fixedNode,
            self.movingNode,
            self.outputTransformNode,
            self.outputVolumeNode,
            self.createOutputVolume,
            self.labelSources,
            self.createReportTable,
        )

    def start(self) -> RegistrationThread:
        """Run in a worker thread; poll the returned object from the main thread."""
        thread = RegistrationThread(self)
        thread.start()
        return thread


def prepareRegistration(
    fixedNode: slicer.vtkMRMLScalarVolumeNode,
    movingNode: slicer.vtkMRMLScalarVolumeNode,
    preset: str = "balanced",
    *,
    outputTransformNode: slicer.vtkMRMLTransformNode | None = None,
    outputVolumeNode: slicer.vtkMRMLScalarVolumeNode | None = None,
    createOutputVolume: bool = False,
    fixedMaskNode: MaskNode | None = None,
    movingMaskNode: MaskNode | None = None,
    movingLabelNodes: Sequence[LabelNode] = (),
    initialTransformNode: slicer.vtkMRMLTransformNode | None = None,
    affine: bool = True,
    model: str | None = "default",
    similarity: str | None = None,
    regularization: float | None = None,
    iterations: int | None = None,
    computeInverse: bool = False,
    computeJacobian: bool = True,
    device: str = "auto",
    seed: int = 0,
    createReportTable: bool = True,
) -> RegistrationJob:
    """Check the nodes and read their voxels; see :func:`registerVolumes` for the arguments."""
    if fixedNode is None or movingNode is None:
        raise InputError("select both a fixed and a moving volume")
    if fixedNode is movingNode:
        raise InputError("the fixed and moving volumes must be different volumes")
    for node in (fixedNode, movingNode):
        if not node.IsA("vtkMRMLScalarVolumeNode"):
            raise InputError(f"'{node.GetName()}' is not a scalar volume")
    scene = fixedNode.GetScene()
    if scene is None or movingNode.GetScene() is not scene:
        raise InputError("the fixed and moving volumes must be in the same scene")
    _checkOutputs(fixedNode, outputTransformNode, outputVolumeNode)
    fixedMask = None if fixedMaskNode is None else _maskImage(fixedMaskNode, fixedNode)
    movingMask = None if movingMaskNode is None else _maskImage(movingMaskNode, movingNode)
    fixed = imageFromVolumeNode(fixedNode)
    moving = imageFromVolumeNode(movingNode)
    labelSources, labelImages = _labelSources(movingLabelNodes, movingNode)
    return RegistrationJob(
        fixedNode=fixedNode,
        movingNode=movingNode,
        outputTransformNode=outputTransformNode,
        outputVolumeNode=outputVolumeNode,
        createOutputVolume=createOutputVolume,
        createReportTable=createReportTable,
        fixed=fixed,
        moving=moving,
        fixedMask=fixedMask,
        movingMask=movingMask,
        initialTransform=_initialTransform(fixedNode, initialTransformNode),
        labelImages=labelImages,
        labelSources=labelSources,
        options={
            "affine": affine,
            "preset": preset,
            "model": model,
            "similarity": similarity or "lncc",
            "regularization": regularization,
            "iterations": iterations,
            "compute_inverse": computeInverse,
            "compute_jacobian": computeJacobian,
            "device": device,
            "seed": seed,
        },
    )


def registerVolumes(
    fixedNode: slicer.vtkMRMLScalarVolumeNode,
    movingNode: slicer.vtkMRMLScalarVolumeNode,
    preset: str = "balanced",
    *,
    outputTransformNode: slicer.vtkMRMLTransformNode | None = None,
    outputVolumeNode: slicer.vtkMRMLScalarVolumeNode | None = None,
    createOutputVolume: bool = False,
    fixedMaskNode: MaskNode | None = None,
    movingMaskNode: MaskNode | None = None,
    movingLabelNodes: Sequence[LabelNode] = (),
    initialTransformNode: slicer.vtkMRMLTransformNode | None = None,
    affine: bool = True,
    model: str | None = "default",
    similarity: str | None = None,
    regularization: float | None = None,
    iterations: int | None = None,
    computeInverse: bool = False,
    computeJacobian: bool = True,
    device: str = "auto",
    seed: int = 0,
    createReportTable: bool = True,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> RegistrationNodes:
    """Register two volume nodes and put the results into their scene; for the Python console.

    - ``preset``: "fast", "balanced" or "accurate".
    - ``outputTransformNode``: receives the fixed → moving grid transform (default: a new node).
    - ``outputVolumeNode``: receives the warped moving volume on the fixed grid; a new node if
      ``createOutputVolume``; with neither, the moving volume is placed under the transform.
    - ``fixedMaskNode``, ``movingMaskNode``: volumes (non-zero inside) or segmentations (union).
    - ``movingLabelNodes``: label maps or segmentations to warp; segments keep names and colours.
    - ``initialTransformNode``: a linear transform that aligns the moving volume when the moving
      volume is placed under it; it seeds the affine stage (or replaces it if ``affine=False``).
    - ``model``, ``similarity`` ("lncc", "mse", "mind"), ``regularization``, ``iterations``:
      None means the preset's choice. ``device``: "auto", "cpu" or "cuda".
    - ``computeInverse``, ``computeJacobian``: also output the moving → fixed transform and the
      Jacobian determinant volume. ``createReportTable``: the QA figures as a table node.
    - ``progress(fraction, message)`` and ``cancel`` (has ``is_set()``) as in the engine.

    Example::

        from DeepRegisterLib import registerVolumes
        nodes = registerVolumes(getNode("MRBrainTumor1"), getNode("MRBrainTumor2"), "fast",
                                createOutputVolume=True)
        print(nodes.report["ncc_before"], nodes.report["ncc_after"])

    Raises InputError for unusable input and RegistrationCancelled when cancelled; either way
    the scene is left as it was.
    """
    job = prepareRegistration(
        fixedNode,
        movingNode,
        preset,
        outputTransformNode=outputTransformNode,
        outputVolumeNode=outputVolumeNode,
        createOutputVolume=createOutputVolume,
        fixedMaskNode=fixedMaskNode,
        movingMaskNode=movingMaskNode,
        movingLabelNodes=movingLabelNodes,
        initialTransformNode=initialTransformNode,
        affine=affine,
        model=model,
        similarity=similarity,
        regularization=regularization,
        iterations=iterations,
        computeInverse=computeInverse,
        computeJacobian=computeJacobian,
        device=device,
        seed=seed,
        createReportTable=createReportTable,
    )
    return job.push(job.run(progress, cancel))


class RegistrationParameters(Protocol):
    """What :func:`registerVolumesUsingParameters` reads: the module's parameter node has it.

    Node fields may be None. ``similarity`` "default", ``regularization`` ≤ 0 and ``iterations``
    ≤ 0 mean "the preset's value".
    """

    fixedVolume: slicer.vtkMRMLScalarVolumeNode | None
    movingVolume: slicer.vtkMRMLScalarVolumeNode | None
    fixedMask: MaskNode | None
    movingMask: MaskNode | None
    movingLabels: LabelNode | None
    initialTransform: slicer.vtkMRMLTransformNode | None
    outputTransform: slicer.vtkMRMLTransformNode | None
    outputVolume: slicer.vtkMRMLScalarVolumeNode | None
    createOutputVolume: bool
    preset: str
    affine: bool
    model: str
    device: str
    similarity: str
    regularization: float
    iterations: int
    computeInverse: bool
    computeJacobian: bool


def prepareRegistrationUsingParameters(parameters: RegistrationParameters) -> RegistrationJob:
    """:func:`prepareRegistration` with the arguments read from a parameter node."""
    return prepareRegistration(
        parameters.fixedVolume,
        parameters.movingVolume,
        parameters.preset,
        outputTransformNode=parameters.outputTransform,
        outputVolumeNode=parameters.outputVolume if parameters.createOutputVolume else None,
        createOutputVolume=parameters.createOutputVolume,
        fixedMaskNode=parameters.fixedMask,
        movingMaskNode=parameters.movingMask,
        movingLabelNodes=[parameters.movingLabels] if parameters.movingLabels else [],
        initialTransformNode=parameters.initialTransform,
        affine=parameters.affine,
        model=parameters.model.strip() or "default",
        similarity=None if parameters.similarity == "default" else parameters.similarity,
        regularization=parameters.regularization if parameters.regularization > 0 else None,
        iterations=parameters.iterations if parameters.iterations > 0 else None,
        computeInverse=parameters.computeInverse,
        computeJacobian=parameters.computeJacobian,
        device=parameters.device,
    )


def registerVolumesUsingParameters(
    parameters: RegistrationParameters,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
) -> RegistrationNodes:
    """:func:`registerVolumes` with the arguments read from a parameter node."""
    job = prepareRegistrationUsingParameters(parameters)
    return job.push(job.run(progress, cancel))


class RegistrationThread:
    """Runs a job's engine step in a daemon thread; the owner polls it from the main thread.

    Progress arrives in :meth:`poll` as (fraction, message) pairs.
    """

    def __init__(self, job: RegistrationJob):
        self.job = job
        self.result: RegistrationResult | None = None
        self.error: BaseException | None = None
        self._messages: queue.SimpleQueue[tuple[float, str]] = queue.SimpleQueue()
        self._cancel = threading.Event()
        self._thread = threading.Thread(target=self._run, name="DeepRegister", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def cancel(self) -> None:
        self._cancel.set()

    @property
    def cancelRequested(self) -> bool:
        return self._cancel.is_set()

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def poll(self) -> list[tuple[float, str]]:
        """The messages that arrived since the last call."""
        messages = []
        while True:
            try:
                messages.append(self._messages.get_nowait())
            except queue.Empty:
                return messages

    def push(self) -> RegistrationNodes:
        """After the thread ended: the pushed nodes, or the run's error raised here."""
        if self.running:
            raise RuntimeError("the registration is still running")
        if self.error is not None:
            raise self.error
        return self.job.push(self.result)

    def _run(self) -> None:
        try:
            self.result = self.job.run(lambda f, m: self._messages.put((f, m)), self._cancel)
        except BaseException as error:  # handed to the main thread by push()
            self.error = error


# --- views ----------------------------------------------------------------------------------


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

    if not _sameGrid(fixed, warped):
        raise InputError("the checkerboard needs the two images on the same grid")
    return sitk.CheckerBoard(normalised(fixed), normalised(warped), [tiles] * fixed.GetDimension())


def createCheckerboardVolume(
    fixedNode: slicer.vtkMRMLScalarVolumeNode,
    warpedNode: slicer.vtkMRMLScalarVolumeNode,
    outputNode: slicer.vtkMRMLScalarVolumeNode | None = None,
    tiles: int = 8,
) -> slicer.vtkMRMLScalarVolumeNode:
    """A volume alternating fixed and warped tiles, for judging the alignment at a glance."""
    image = checkerboardImage(
        imageFromVolumeNode(fixedNode), imageFromVolumeNode(warpedNode), tiles
    )
    with _SceneEdit(fixedNode.GetScene()) as edit:
        if outputNode is None:
            outputNode = edit.newNode(
                "vtkMRMLScalarVolumeNode", f"{fixedNode.GetName()} checkerboard"
            )
        updateVolumeNodeFromImage(edit.change(outputNode), image)
        outputNode.SetAndObserveTransformNodeID(fixedNode.GetTransformNodeID())
        outputNode.CreateDefaultDisplayNodes()
        display = outputNode.GetDisplayNode()
        display.SetAutoWindowLevel(False)
        display.SetWindowLevel(1.0, 0.5)
    return outputNode
