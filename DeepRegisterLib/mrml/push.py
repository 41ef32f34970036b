"""Pushing a registration's outcome into the scene, all or nothing, on the scene's thread."""

# Slicer's camelCase also for fields (they mirror the module's parameter node):
# ruff: noqa: N815

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import SimpleITK as sitk
import slicer
import vtk

from ..errors import InputError
from ..imaging.geometry import Grid
from ..registration.lattice import displacement_on_lattice
from .inputs import LabelNode, LabelSource, labelSourceLayout
from .nodes import referenceGrid, sameGrid, showScalars, updateVolumeNodeFromImage
from .scene_edit import SceneEdit
from .segmentations import SegmentLabels, updateSegmentationNodeFromSegmentLabels
from .transforms import (
    gridTransformFromDisplacement,
    inverseTransformFromDeformation,
    setRegistrationTransform,
)

#: Node reference roles from an output transform to the QA nodes of its last run, so that running
#: again into the same transform updates those nodes instead of piling up new ones.
INVERSE_TRANSFORM_ROLE = "DeepRegisterInverseTransform"
JACOBIAN_VOLUME_ROLE = "DeepRegisterJacobian"
REPORT_TABLE_ROLE = "DeepRegisterReport"
#: Attribute of the output transform holding the run's report as JSON.
REPORT_ATTRIBUTE = "DeepRegister.Report"


class PushableResult(Protocol):
    """What a push reads of a result: a RegistrationResult, or the outputs of a child process."""

    fixed_grid: Grid
    affine: sitk.Transform
    deformation: sitk.Image | None  # v; None (a result built by hand) is refused
    warped: sitk.Image | None
    warped_labels: dict[str, sitk.Image]
    jacobian: sitk.Image | None
    inverse_deformation: sitk.Image | None  # w = exp(−v); None: no inverse was asked for
    report: dict[str, Any]


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


@dataclass
class PushTargets:
    """Where a result goes: the registration's volumes, the outputs chosen, the label nodes."""

    fixedNode: slicer.vtkMRMLScalarVolumeNode
    movingNode: slicer.vtkMRMLScalarVolumeNode
    outputTransformNode: slicer.vtkMRMLTransformNode | None = None
    outputVolumeNode: slicer.vtkMRMLScalarVolumeNode | None = None
    createOutputVolume: bool = False
    labelSources: Sequence[LabelSource] = ()
    createReportTable: bool = True

    @property
    def wantsWarpedVolume(self) -> bool:
        return self.outputVolumeNode is not None or self.createOutputVolume

    def checkedScene(self) -> slicer.vtkMRMLScene:
        """The scene, once every target is still in it and the outputs are acceptable."""
        scene = self.fixedNode.GetScene()
        if scene is None:
            raise InputError(
                f"the fixed volume '{self.fixedNode.GetName()}' is not in a scene (any more)"
            )
        others = (self.movingNode, self.outputTransformNode, self.outputVolumeNode)
        for node in (*others, *(s.node for s in self.labelSources)):
            if node is not None and (node.GetScene() is not scene or not scene.IsNodePresent(node)):
                raise InputError(f"'{node.GetName()}' is not in the fixed volume's scene any more")
        checkOutputs(self.fixedNode, self.movingNode, *others[1:])
        return scene


def checkOutputs(fixedNode, movingNode, outputTransformNode, outputVolumeNode) -> None:
    """Refuse outputs that would overwrite an input or sit above the fixed volume."""
    if outputVolumeNode is not None:
        if outputVolumeNode is fixedNode:
            raise InputError("the output volume must not be the fixed volume")
        if outputVolumeNode is movingNode:
            raise InputError(
                "the output volume must not be the moving volume: the warped copy would "
                "overwrite it; choose another volume or create a new one"
            )
        checkOutputVolumeKind(movingNode, outputVolumeNode)
    ancestor = None if outputTransformNode is None else fixedNode.GetParentTransformNode()
    while ancestor is not None:
        if ancestor is outputTransformNode:
            raise InputError(
                f"the output transform '{outputTransformNode.GetName()}' is a parent "
                "transform of the fixed volume; choose another output transform"
            )
        ancestor = ancestor.GetParentTransformNode()


def checkOutputVolumeKind(movingNode, outputVolumeNode) -> None:
    """The warped copy of a colour volume is a colour (vector) volume; of any other, a scalar
    one. (The module asks this too, to keep Apply disabled with the reason shown.)"""
    name = outputVolumeNode.GetName()
    if movingNode.IsA("vtkMRMLVectorVolumeNode"):
        if not outputVolumeNode.IsA("vtkMRMLVectorVolumeNode"):
            raise InputError(
                f"the moving volume is in colour, so its warped copy is too: output volume "
                f"'{name}' must be a vector volume; choose one, or none for a new one (the "
                "module's 'Create new volume')"
            )
    elif (
        outputVolumeNode.IsA("vtkMRMLLabelMapVolumeNode")
        or not outputVolumeNode.IsA("vtkMRMLScalarVolumeNode")
        or outputVolumeNode.IsA("vtkMRMLVectorVolumeNode")
    ):
        raise InputError(f"output volume '{name}' must be a scalar volume")


def pushResult(
    result: PushableResult,
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
    sources = [labelSourceLayout(node) for node in movingLabelNodes]
    targets = PushTargets(
        fixedNode, movingNode, outputTransformNode, outputVolumeNode, createOutputVolume,
        sources, createReportTable,
    )  # fmt: skip
    return push(result, targets)


def push(result: PushableResult, targets: PushTargets) -> RegistrationNodes:
    """:func:`pushResult` for targets already read; everything that can fail is checked or
    converted before the scene is touched, and a failure part-way undoes the push."""
    scene = targets.checkedScene()
    fixedNode, movingNode = targets.fixedNode, targets.movingNode
    _checkResultFits(result, fixedNode)
    consumed = {key for source in targets.labelSources for key in source.keys}
    missing = consumed - result.warped_labels.keys()
    if missing:
        raise InputError(f"the result has no warped labels for {', '.join(sorted(missing))}")
    lattice = displacement_on_lattice(result.affine, result.deformation, result.fixed_grid)
    gridTransform = gridTransformFromDisplacement(lattice)
    inverse = result.inverse_deformation
    inverseTransform = (
        None if inverse is None else inverseTransformFromDeformation(result.affine, inverse)
    )
    fixedParentID = fixedNode.GetTransformNodeID()
    # The inverse lives in the moving volume's frame: the one it was in before any registration.
    movingParent = movingNode.GetParentTransformNode()
    ranBefore = movingParent is not None and movingParent is targets.outputTransformNode
    movingParentID = fixedParentID if ranBefore else movingNode.GetTransformNodeID()

    with SceneEdit(scene) as edit:
        transformNode = (
            edit.change(targets.outputTransformNode)
            if targets.outputTransformNode is not None
            else edit.newNode(
                "vtkMRMLTransformNode", f"{movingNode.GetName()} to {fixedNode.GetName()}"
            )
        )
        setRegistrationTransform(transformNode, gridTransform, fixedNode, movingNode)
        transformNode.SetAndObserveTransformNodeID(fixedParentID)
        transformNode.SetAttribute(REPORT_ATTRIBUTE, json.dumps(result.report))
        nodes = RegistrationNodes(transformNode, report=dict(result.report))
        nodes.volumeNode = _pushWarpedVolume(edit, targets, result)
        if inverseTransform is not None:
            inverseNode = _pushInverse(edit, targets, transformNode, inverseTransform)
            inverseNode.SetAndObserveTransformNodeID(movingParentID)
            nodes.inverseTransformNode = inverseNode
        if result.jacobian is not None:
            nodes.jacobianVolumeNode = _pushJacobian(edit, transformNode, result.jacobian)
        nodes.labelNodes = [_pushLabels(edit, s, result, fixedNode) for s in targets.labelSources]
        for key in sorted(result.warped_labels.keys() - consumed):
            labelNode = edit.newNode("vtkMRMLLabelMapVolumeNode", f"{key} warped")
            updateVolumeNodeFromImage(labelNode, result.warped_labels[key])
            labelNode.CreateDefaultDisplayNodes()
            nodes.labelNodes.append(labelNode)
        if targets.createReportTable:
            nodes.reportTableNode = _pushReportTable(edit, transformNode, result.report)
        for node in (nodes.volumeNode, nodes.jacobianVolumeNode, *nodes.labelNodes):
            if node is not None:
                node.SetAndObserveTransformNodeID(fixedParentID)
        if nodes.volumeNode is None:
            edit.change(movingNode).SetAndObserveTransformNodeID(transformNode.GetID())
    return nodes


def _pushWarpedVolume(edit: SceneEdit, targets: PushTargets, result: PushableResult):
    """The warped volume's node (new or updated), or None when none was asked for."""
    outputVolumeNode = targets.outputVolumeNode
    if targets.wantsWarpedVolume and result.warped is None:
        raise InputError("this result has no warped volume: register with compute_warped=True")
    if outputVolumeNode is None and targets.createOutputVolume:
        name = f"{targets.movingNode.GetName()} warped"
        colour = result.warped.GetNumberOfComponentsPerPixel() > 1
        kind = "vtkMRMLVectorVolumeNode" if colour else "vtkMRMLScalarVolumeNode"
        outputVolumeNode = edit.newNode(kind, name)
        updateVolumeNodeFromImage(outputVolumeNode, result.warped)
        _copyVolumeDisplay(targets.movingNode, outputVolumeNode)
    elif outputVolumeNode is not None:
        updateVolumeNodeFromImage(edit.change(outputVolumeNode), result.warped)
        outputVolumeNode.CreateDefaultDisplayNodes()
    return outputVolumeNode


def _pushInverse(edit: SceneEdit, targets: PushTargets, transformNode, inverseTransform):
    fixedNode, movingNode = targets.fixedNode, targets.movingNode
    inverseNode = edit.reuseOrNew(
        transformNode,
        INVERSE_TRANSFORM_ROLE,
        "vtkMRMLTransformNode",
        f"{fixedNode.GetName()} to {movingNode.GetName()}",
    )
    setRegistrationTransform(inverseNode, inverseTransform, movingNode, fixedNode)
    transformNode.SetNodeReferenceID(INVERSE_TRANSFORM_ROLE, inverseNode.GetID())
    return inverseNode


def _pushJacobian(edit: SceneEdit, transformNode, jacobian: sitk.Image):
    jacobianNode = edit.reuseOrNew(
        transformNode,
        JACOBIAN_VOLUME_ROLE,
        "vtkMRMLScalarVolumeNode",
        f"{transformNode.GetName()} Jacobian",
    )
    updateVolumeNodeFromImage(jacobianNode, jacobian)
    _showJacobian(jacobianNode)
    transformNode.SetNodeReferenceID(JACOBIAN_VOLUME_ROLE, jacobianNode.GetID())
    return jacobianNode


def _pushReportTable(edit: SceneEdit, transformNode, report: Mapping[str, Any]):
    tableNode = edit.reuseOrNew(
        transformNode, REPORT_TABLE_ROLE, "vtkMRMLTableNode", f"{transformNode.GetName()} QA"
    )
    _fillReportTable(tableNode, report)
    transformNode.SetNodeReferenceID(REPORT_TABLE_ROLE, tableNode.GetID())
    return tableNode


def _pushLabels(edit: SceneEdit, source: LabelSource, result, fixedNode) -> LabelNode:
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


def _checkResultFits(result: PushableResult, fixedNode) -> None:
    fixed = referenceGrid(fixedNode)
    if not sameGrid(result.fixed_grid, fixed):
        raise InputError(
            f"the result was computed on another grid than the fixed volume "
            f"'{fixedNode.GetName()}' (size {result.fixed_grid.size} vs {fixed.size}); push "
            "it with the fixed volume it was registered to"
        )
    if result.deformation is None:
        raise InputError(
            "this result has no deformation (v), which the grid transform node is made from: "
            "push what DeepRegisterLib.register returned"
        )


def _copyVolumeDisplay(source: slicer.vtkMRMLVolumeNode, target: slicer.vtkMRMLVolumeNode):
    """Show the target like the source: its colour table and, for scalar volumes, its
    window/level, fixed."""
    sourceDisplay = source.GetDisplayNode()
    if sourceDisplay is not None and sourceDisplay.IsA("vtkMRMLScalarVolumeDisplayNode"):
        window, level = sourceDisplay.GetWindow(), sourceDisplay.GetLevel()
        showScalars(target, sourceDisplay.GetColorNodeID(), window, level)
        return
    target.CreateDefaultDisplayNodes()
    if sourceDisplay is not None and target.GetDisplayNode() is not None:
        target.GetDisplayNode().SetAndObserveColorNodeID(sourceDisplay.GetColorNodeID())


def _showJacobian(volumeNode: slicer.vtkMRMLScalarVolumeNode) -> None:
    """Diverging colours centred on det J = 1 (blue: compression, red: expansion)."""
    colorID = "vtkMRMLColorTableNodeFileDivergingBlueRed.txt"
    if volumeNode.GetScene().GetNodeByID(colorID) is None:
        colorID = "vtkMRMLColorTableNodeGrey"
    showScalars(volumeNode, colorID, 2.0, 1.0)


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
