"""The last registration's results: a summary to read and three ways to look at them in the
slice views (checkerboard, difference, det J)."""

import slicer
from slicer import vtkMRMLTransformNode
from slicer.i18n import tr as _


def reportSummary(report: dict) -> str:
    """A few lines to judge the registration by (figures the report lacks are left out)."""
    lines = [
        _("Time: {seconds:.1f} s on {device}, preset {preset}.").format(
            seconds=report.get("runtime_s", float("nan")),
            device=report.get("device", "?"),
            preset=report.get("preset", "?"),
        )
    ]
    if "folding_percent" in report:
        lines.append(
            _("Folded voxels (det J <= 0): {folded:.3f} %; SD of log det J: {sdlogj:.3f}.").format(
                folded=report["folding_percent"], sdlogj=report.get("sdlogj", float("nan"))
            )
        )
    if "ncc_before" in report and "ncc_after" in report:
        lines.append(
            _(
                "Similarity (global NCC): {before:.3f} before, {affine:.3f} after affine, "
                "{after:.3f} after."
            ).format(
                before=report["ncc_before"],
                affine=report.get("ncc_affine", float("nan")),
                after=report["ncc_after"],
            )
        )
    if report.get("mean_dice") is not None:
        lines.append(_("Mean Dice: {dice:.3f}.").format(dice=report["mean_dice"]))
    lines += [_("Note: {note}.").format(note=note) for note in report.get("notes", [])]
    return "\n".join(lines)


def compositeNodes() -> list:
    return slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")


class ResultViews:
    """Shows the last registration's nodes (mrml.RegistrationNodes) in the slice views. Only the
    difference view changes the views' compositing (to Subtract); every other view puts back
    what each view had before it."""

    def __init__(self, logic) -> None:
        self.logic = logic
        self.nodes = None
        self._checkerboardNode = None
        self._sliceCompositing = None  # mrml.SliceCompositing, once the difference was shown

    def showOutcome(self, nodes) -> None:
        """The fixed volume under the warped one (or the moving one under the transform)."""
        self.nodes = nodes
        self._restoreCompositing()
        transformNode = nodes.transformNode
        slicer.util.setSliceViewerLayers(
            background=transformNode.GetNodeReference(
                vtkMRMLTransformNode.GetFixedNodeReferenceRole()
            ),
            foreground=nodes.volumeNode
            or transformNode.GetNodeReference(vtkMRMLTransformNode.GetMovingNodeReferenceRole()),
            foregroundOpacity=0.5,
        )

    def showCheckerboard(self) -> None:
        """Alternate fixed and warped tiles: misaligned edges break at the tile borders."""
        fixed, warped = self._volumes()
        if self._checkerboardNode and not slicer.mrmlScene.IsNodePresent(self._checkerboardNode):
            self._checkerboardNode = None
        self._checkerboardNode = self.logic.createCheckerboardVolume(
            fixed, warped, self._checkerboardNode
        )
        self._restoreCompositing()
        slicer.util.setSliceViewerLayers(
            background=self._checkerboardNode, foreground=None, fit=True
        )

    def showDifference(self) -> None:
        """Fixed minus warped: aligned structures cancel out."""
        fixed, warped = self._volumes()
        if self._sliceCompositing is None:
            from DeepRegisterLib.mrml import SliceCompositing

            self._sliceCompositing = SliceCompositing()
        self._sliceCompositing.override(compositeNodes(), slicer.vtkMRMLSliceCompositeNode.Subtract)
        slicer.util.setSliceViewerLayers(
            background=fixed, foreground=warped, foregroundOpacity=1.0, fit=True
        )

    def showJacobian(self) -> None:
        """det J over the fixed volume: blue compresses, red expands, at or below 0 folds."""
        fixed, _warped = self._volumes()
        self._restoreCompositing()
        slicer.util.setSliceViewerLayers(
            background=fixed,
            foreground=self._present(self.nodes.jacobianVolumeNode),
            foregroundOpacity=0.5,
            fit=True,
        )

    def _present(self, node):
        """A result node if it is still in the scene (the user may have deleted it)."""
        if node is None or not slicer.mrmlScene.IsNodePresent(node):
            raise ValueError(_("The result node was removed from the scene; register again."))
        return node

    def _volumes(self):
        """(fixed, warped); warped is the moving volume under the transform when no warped
        volume was made."""
        transformNode = self._present(self.nodes.transformNode)
        fixed = transformNode.GetNodeReference(vtkMRMLTransformNode.GetFixedNodeReferenceRole())
        warped = self.nodes.volumeNode or transformNode.GetNodeReference(
            vtkMRMLTransformNode.GetMovingNodeReferenceRole()
        )
        return self._present(fixed), self._present(warped)

    def _restoreCompositing(self) -> None:
        if self._sliceCompositing is not None:
            self._sliceCompositing.restore(compositeNodes())
