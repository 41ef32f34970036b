# Slicer self-tests are unittest.TestCase classes, written in unittest style:
# ruff: noqa: PT009, PT027

import importlib.util
import json
import logging
import os
import sys
from typing import Annotated, Union

import qt
import slicer
import vtk
from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTransformNode,
)
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

#: torch comes from the PyTorch extension; DeepRegisterLib needs at least this version.
MINIMUM_TORCH_VERSION = "2.1"


def _addLibraryToPath() -> None:
    """Make ``import DeepRegisterLib`` work when the module runs from the source tree.

    A built extension installs DeepRegisterLib beside this file (already on ``sys.path``); in the
    source tree it sits one folder up, next to the module folder.
    """
    if importlib.util.find_spec("DeepRegisterLib") is not None:
        return
    repositoryRoot = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if os.path.isfile(os.path.join(repositoryRoot, "DeepRegisterLib", "__init__.py")):
        sys.path.append(repositoryRoot)


_addLibraryToPath()


#
# DeepRegister
#


class DeepRegister(ScriptedLoadableModule):
    """Uses ScriptedLoadableModule base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("Deep Register")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Registration")]
        self.parent.dependencies = []
        self.parent.contributors = ["DeepRegister developers (DeepRegister project)"]
        self.parent.helpText = _("""
Deformable registration of a moving volume to a fixed volume with a deep-learning model
(VoxelMorph family) refined on the pair. Outputs: a grid transform (fixed to moving, with the
fixed and moving volumes as references), the warped volume, optionally the inverse transform,
warped segmentations, and quality figures: Jacobian determinant, percentage of folded voxels and
similarity before and after.
See the <a href="https://github.com/DeepRegister/SlicerDeepRegister#readme">module
documentation</a>. From the Python console:
<code>from DeepRegisterLib import registerVolumes</code>.
<br><br>Troubleshooting: the first run asks to install PyTorch (PyTorch extension). When memory
is short the module runs on a coarser grid, or on the CPU if the GPU runs out, and says so in
the log. Registration cannot change the scene unless it succeeds.
""")
        self.parent.acknowledgementText = _("""
DeepRegister builds on published methods and open-source software. Please cite:
<ul>
<li>G. Balakrishnan, A. Zhao, M. R. Sabuncu, J. Guttag, A. V. Dalca. VoxelMorph: A Learning
Framework for Deformable Medical Image Registration. IEEE TMI 38(8):1788-1800, 2019.</li>
<li>A. V. Dalca, G. Balakrishnan, J. Guttag, M. R. Sabuncu. Unsupervised learning of
probabilistic diffeomorphic registration for images and surfaces. Medical Image Analysis 57:226-236,
2019.</li>
<li>M. Hoffmann, B. Billot, D. N. Greve, J. E. Iglesias, B. Fischl, A. V. Dalca. SynthMorph:
learning contrast-invariant registration without acquired images. IEEE TMI 41(3):543-558, 2022.</li>
<li>M. P. Heinrich, M. Jenkinson, M. Bhushan, T. Matin, F. V. Gleeson, M. Brady, J. A. Schnabel.
MIND: Modality independent neighbourhood descriptor for multi-modal deformable registration.
Medical Image Analysis 16(7):1423-1435, 2012.</li>
<li>A. Guimond, A. Roche, N. Ayache, J. Meunier. Three-dimensional multimodal brain warping using
the demons algorithm and adaptive intensity corrections. IEEE TMI 20(1):58-69, 2001.</li>
<li>ITK (itk.org) and SimpleITK: Z. Yaniv, B. C. Lowekamp, H. J. Johnson, R. Beare.
SimpleITK Image-Analysis Notebooks: a Collaborative Environment for Education and Reproducible
Research. J Digit Imaging 31(3):290-303, 2018.</li>
</ul>
Deep learning runs on PyTorch, installed through the SlicerPyTorch extension.
""")


#
# DeepRegisterParameterNode
#

# parameterNodeWrapper recognises node unions written with typing.Union, None included.
MaskNode = Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, None]  # noqa: UP007
LabelsNode = Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]  # noqa: UP007


@parameterNodeWrapper
class DeepRegisterParameterNode:
    """What to register and how; saved with the scene.

    fixedVolume, movingVolume - the pair; the moving volume is aligned to the fixed one.
    fixedMask, movingMask - optional regions (volume, non-zero inside, or segmentation).
    movingLabels - optional label map or segmentation carried along with the moving volume.
    initialTransform - optional linear transform that roughly aligns the moving volume.
    outputTransform - receives the transform; None: a new transform node.
    createOutputVolume, outputVolume - make the warped volume (None: a new node); unchecked, the
        moving volume is placed under the output transform instead.
    computeInverse, computeJacobian - also output the inverse transform / QA (Jacobian volume).
    preset, affine, model, device, similarity - the engine's settings ("default": preset's).
    regularization, iterations - 0 means the preset's value.
    """

    fixedVolume: vtkMRMLScalarVolumeNode
    movingVolume: vtkMRMLScalarVolumeNode
    fixedMask: MaskNode
    movingMask: MaskNode
    movingLabels: LabelsNode
    initialTransform: vtkMRMLTransformNode
    outputTransform: vtkMRMLTransformNode
    outputVolume: vtkMRMLScalarVolumeNode
    createOutputVolume: bool = True
    computeInverse: bool = False
    computeJacobian: bool = True
    preset: Annotated[str, Choice(["fast", "balanced", "accurate"])] = "balanced"
    affine: bool = True
    model: str = "default"
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    similarity: Annotated[str, Choice(["default", "lncc", "mse", "mind"])] = "default"
    regularization: Annotated[float, WithinRange(0.0, 100.0)] = 0.0
    iterations: Annotated[int, WithinRange(0, 2000)] = 0


#
# DeepRegisterWidget
#


class DeepRegisterWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    """Uses ScriptedLoadableModuleWidget base class, available at:
    https://github.com/Slicer/Slicer/blob/main/Base/Python/slicer/ScriptedLoadableModule.py
    """

    def __init__(self, parent=None) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)  # needed for parameter node observation
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        # The running registration (mrml.RegistrationThread) and the last one's nodes
        # (mrml.RegistrationNodes).
        self._task = None
        self._results = None
        self._lastMessage = ""
        self._checkerboardNode = None
        self._pollTimer = qt.QTimer()
        self._pollTimer.setInterval(100)

    def setup(self) -> None:
        """Called when the user opens the module the first time and the widget is initialized."""
        ScriptedLoadableModuleWidget.setup(self)

        uiWidget = slicer.util.loadUI(self.resourcePath("UI/DeepRegister.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)

        self.logic = DeepRegisterLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)

        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.showCheckerboardButton.connect("clicked(bool)", self.onShowCheckerboard)
        self.ui.showDifferenceButton.connect("clicked(bool)", self.onShowDifference)
        self.ui.showJacobianButton.connect("clicked(bool)", self.onShowJacobian)
        self._pollTimer.connect("timeout()", self._onPollTimer)

        self.ui.progressBar.visible = False
        self._showResults(None)
        self.initializeParameterNode()

    def cleanup(self) -> None:
        """Called when the application closes and the module widget is destroyed."""
        self._abandonTask()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply
            )

    def onSceneStartClose(self, caller, event) -> None:
        """Called just before the scene is closed."""
        self._abandonTask()
        self._showResults(None)
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        """Called just after the scene is closed."""
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        """Ensure parameter node exists and observed."""
        self.setParameterNode(self.logic.getParameterNode())

    def setParameterNode(self, inputParameterNode: DeepRegisterParameterNode | None) -> None:
        """Set and observe the parameter node, so that the GUI follows it immediately."""
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(
                self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply
            )
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            # Widgets in the .ui carry a "SlicerParameterName" property naming their parameter.
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self._checkCanApply)
        self._checkCanApply()

    def _whyCannotApply(self) -> str:
        """The reason Apply is disabled, or "" when the inputs can be registered."""
        parameters = self._parameterNode
        if not parameters:
            return _("The module has no parameter node.")
        if not parameters.fixedVolume or not parameters.movingVolume:
            return _("Select the fixed and the moving volume.")
        if parameters.fixedVolume == parameters.movingVolume:
            return _("The fixed and moving volumes must be different volumes.")
        if parameters.createOutputVolume and parameters.outputVolume == parameters.fixedVolume:
            return _("The warped volume must not overwrite the fixed volume.")
        return ""

    def _checkCanApply(self, caller=None, event=None) -> None:
        if self._task is not None:
            self.ui.applyButton.enabled = not self._task.cancelRequested
            self.ui.applyButton.toolTip = _("Stop the registration; the scene stays as it was.")
            return
        reason = self._whyCannotApply()
        self.ui.applyButton.enabled = not reason
        self.ui.applyButton.toolTip = reason or _("Register the moving volume to the fixed volume.")
        self.ui.applyStatusLabel.text = reason
        if self._parameterNode:
            self.ui.outputVolumeSelector.enabled = self._parameterNode.createOutputVolume

    def onApplyButton(self) -> None:
        """Start a registration in a worker thread, or cancel the running one."""
        if self._task is not None:
            self._task.cancel()
            self.ui.applyButton.text = _("Cancelling...")
            self._log(_("Cancelling..."))
            self._checkCanApply()
            return
        with slicer.util.tryWithErrorDisplay(
            _("Failed to start the registration."), waitCursor=True
        ):
            if not self.logic.setupPythonRequirements():
                self._log(_("PyTorch is not installed; the registration did not run."))
                return
            self.ui.logTextEdit.clear()
            self._lastMessage = ""
            parameters = self._parameterNode
            self._log(
                _("Registering '{moving}' to '{fixed}' (preset {preset}, device {device}).").format(
                    moving=parameters.movingVolume.GetName(),
                    fixed=parameters.fixedVolume.GetName(),
                    preset=parameters.preset,
                    device=parameters.device,
                )
            )
            self._task = self.logic.startRegistration(parameters)
            self._setRunning(True)
            self._pollTimer.start()

    def _onPollTimer(self) -> None:
        """Show the worker's progress; push its results into the scene once it has finished."""
        if self._task is None:
            self._pollTimer.stop()
            return
        for fraction, message in self._task.poll():
            self.ui.progressBar.value = round(100 * fraction)
            if message != self._lastMessage:
                self._lastMessage = message
                self._log(message)
        if self._task.running:
            return
        task = self._task
        self._task = None
        self._pollTimer.stop()
        self._setRunning(False)
        if task.cancelRequested:
            self._log(_("Cancelled; the scene is unchanged."))
            return
        with slicer.util.tryWithErrorDisplay(_("Registration failed; the scene is unchanged.")):
            try:
                nodes = self.logic.finishRegistration(task)
            except Exception as error:
                self._log(_("Failed: {error}").format(error=error))
                raise
            parameters = self._parameterNode
            if parameters:  # show what was created; running again updates these nodes
                parameters.outputTransform = nodes.transformNode
                if nodes.volumeNode:
                    parameters.outputVolume = nodes.volumeNode
            self._showResults(nodes)
            self._log(reportSummary(nodes.report))
            _setCompositing(slicer.vtkMRMLSliceCompositeNode.Alpha)
            slicer.util.setSliceViewerLayers(
                background=nodes.transformNode.GetNodeReference(
                    vtkMRMLTransformNode.GetFixedNodeReferenceRole()
                ),
                foreground=nodes.volumeNode
                or nodes.transformNode.GetNodeReference(
                    vtkMRMLTransformNode.GetMovingNodeReferenceRole()
                ),
                foregroundOpacity=0.5,
            )

    def _abandonTask(self) -> None:
        """Stop waiting for a running registration; it is cancelled and its result dropped."""
        self._pollTimer.stop()
        if self._task is not None:
            self._task.cancel()
            self._task = None
            self._setRunning(False)

    def _setRunning(self, running: bool) -> None:
        self.ui.applyButton.text = _("Cancel") if running else _("Apply")
        self.ui.progressBar.value = 0
        self.ui.progressBar.visible = running
        for section in (
            self.ui.inputsCollapsibleButton,
            self.ui.outputsCollapsibleButton,
            self.ui.advancedCollapsibleButton,
            self.ui.resultsCollapsibleButton,
        ):
            section.enabled = not running
        self._checkCanApply()

    def _log(self, text: str) -> None:
        logging.info(text)
        self.ui.logTextEdit.appendPlainText(text)

    def _showResults(self, nodes) -> None:
        self._results = nodes
        self.ui.resultsLabel.text = reportSummary(nodes.report) if nodes else _("No results yet.")
        hasWarped = bool(nodes and nodes.volumeNode)
        self.ui.showCheckerboardButton.enabled = hasWarped
        self.ui.showDifferenceButton.enabled = bool(nodes)
        self.ui.showJacobianButton.enabled = bool(nodes and nodes.jacobianVolumeNode)

    def _resultNode(self, node):
        """A result node if it is still in the scene (the user may have deleted it)."""
        if node is None or not slicer.mrmlScene.IsNodePresent(node):
            raise ValueError(_("The result node was removed from the scene; register again."))
        return node

    def _resultVolumes(self):
        """(fixed, warped) of the last registration; warped is the moving volume under the
        transform when no warped volume was made."""
        transformNode = self._resultNode(self._results.transformNode)
        fixed = transformNode.GetNodeReference(vtkMRMLTransformNode.GetFixedNodeReferenceRole())
        warped = self._results.volumeNode or transformNode.GetNodeReference(
            vtkMRMLTransformNode.GetMovingNodeReferenceRole()
        )
        return self._resultNode(fixed), self._resultNode(warped)

    def onShowCheckerboard(self) -> None:
        """Alternate fixed and warped tiles: misaligned edges break at the tile borders."""
        with slicer.util.tryWithErrorDisplay(
            _("Failed to show the checkerboard."), waitCursor=True
        ):
            fixed, warped = self._resultVolumes()
            if self._checkerboardNode and not slicer.mrmlScene.IsNodePresent(
                self._checkerboardNode
            ):
                self._checkerboardNode = None
            self._checkerboardNode = self.logic.createCheckerboardVolume(
                fixed, warped, self._checkerboardNode
            )
            _setCompositing(slicer.vtkMRMLSliceCompositeNode.Alpha)
            slicer.util.setSliceViewerLayers(
                background=self._checkerboardNode, foreground=None, fit=True
            )

    def onShowDifference(self) -> None:
        """Fixed minus warped in the slice views: aligned structures cancel out."""
        with slicer.util.tryWithErrorDisplay(_("Failed to show the difference."), waitCursor=True):
            fixed, warped = self._resultVolumes()
            _setCompositing(slicer.vtkMRMLSliceCompositeNode.Subtract)
            slicer.util.setSliceViewerLayers(
                background=fixed, foreground=warped, foregroundOpacity=1.0, fit=True
            )

    def onShowJacobian(self) -> None:
        """det J over the fixed volume: blue compresses, red expands, at or below 0 folds."""
        with slicer.util.tryWithErrorDisplay(_("Failed to show the Jacobian."), waitCursor=True):
            fixed, _warped = self._resultVolumes()
            _setCompositing(slicer.vtkMRMLSliceCompositeNode.Alpha)
            slicer.util.setSliceViewerLayers(
                background=fixed,
                foreground=self._resultNode(self._results.jacobianVolumeNode),
                foregroundOpacity=0.5,
                fit=True,
            )


def _setCompositing(mode: int) -> None:
    """How every slice view blends its foreground onto its background."""
    for compositeNode in slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode"):
        compositeNode.SetCompositing(mode)


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


#
# DeepRegisterLogic
#


class DeepRegisterLogic(ScriptedLoadableModuleLogic):
    """Registration of volume nodes for the GUI, the Python console and tests (no GUI code here).

    Thin on purpose: the work is DeepRegisterLib.mrml's; this class adds the parameter node and
    the PyTorch set-up. DeepRegisterLib (and so torch) is imported only when a method needs it.
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepRegisterParameterNode(super().getParameterNode())

    def setupPythonRequirements(self) -> bool:
        """Make torch importable, asking the user before installing it; False if they declined."""
        try:
            import PyTorchUtils
        except ModuleNotFoundError as error:
            raise RuntimeError(
                _(
                    "This module needs the PyTorch extension. Install it in the Extensions Manager "
                    "and restart Slicer."
                )
            ) from error
        torchLogic = PyTorchUtils.PyTorchUtilsLogic()
        if torchLogic.torchInstalled():
            return True
        torch = torchLogic.installTorch(
            askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}"
        )
        return torch is not None

    def registerVolumes(
        self, fixedVolumeNode, movingVolumeNode, preset: str = "balanced", **options
    ):
        """Register and put the results into the scene (options: mrml.registerVolumes').

        Returns the created nodes (DeepRegisterLib.mrml.RegistrationNodes); raises ValueError for
        unusable inputs, and leaves the scene unchanged whenever it raises.
        """
        if not self.setupPythonRequirements():
            raise RuntimeError(_("PyTorch is needed to register volumes."))
        from DeepRegisterLib.mrml import bridge as mrml

        return mrml.registerVolumes(fixedVolumeNode, movingVolumeNode, preset, **options)

    def registerVolumesUsingParameterNode(self, parameterNode, progress=None, cancel=None):
        """registerVolumes with every argument from the parameter node, in this thread."""
        if not self.setupPythonRequirements():
            raise RuntimeError(_("PyTorch is needed to register volumes."))
        from DeepRegisterLib.mrml import bridge as mrml

        return mrml.registerVolumesUsingParameters(parameterNode, progress, cancel)

    def startRegistration(self, parameterNode):
        """Read the inputs (here) and run the engine in a worker thread; poll the returned task and
        call finishRegistration once it is no longer running."""
        from DeepRegisterLib.mrml import bridge as mrml

        return mrml.prepareRegistrationUsingParameters(parameterNode).start()

    def finishRegistration(self, task):
        """Push a finished task's result into the scene (main thread); raises if it failed."""
        nodes = task.push()
        logging.info("DeepRegister report: " + json.dumps(nodes.report))
        return nodes

    def createCheckerboardVolume(self, fixedVolumeNode, warpedVolumeNode, outputVolumeNode=None):
        from DeepRegisterLib.mrml import bridge as mrml

        return mrml.createCheckerboardVolume(fixedVolumeNode, warpedVolumeNode, outputVolumeNode)


#
# DeepRegisterTest
#


class DeepRegisterTest(ScriptedLoadableModuleTest):
    """Registers SampleData's MRBrainTumor2 to MRBrainTumor1 (the pair Elastix and ANTs test on)
    with the fast preset on the CPU, from the logic and through the GUI (Apply and Cancel).
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_registerVolumes()
        self.setUp()
        self.test_badInputLeavesTheSceneUnchanged()
        self.setUp()
        self.test_applyAndCancelInTheWidget()

    def _loadPair(self):
        import SampleData

        fixed = SampleData.downloadSample("MRBrainTumor1")
        moving = SampleData.downloadSample("MRBrainTumor2")
        return fixed, moving

    def test_registerVolumes(self):
        import numpy as np

        self.delayDisplay("Registering MRBrainTumor2 to MRBrainTumor1 (fast preset, CPU)")
        fixed, moving = self._loadPair()
        transformsBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTransformNode")

        nodes = DeepRegisterLogic().registerVolumes(
            fixed, moving, "fast", device="cpu", createOutputVolume=True
        )

        displacement = slicer.util.arrayFromGridTransform(nodes.transformNode)
        self.assertGreater(np.abs(displacement).max(), 1.0)  # mm: not the identity
        fixedMatrix, warpedMatrix = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
        fixed.GetIJKToRASMatrix(fixedMatrix)
        nodes.volumeNode.GetIJKToRASMatrix(warpedMatrix)
        self.assertTrue(
            np.allclose(
                slicer.util.arrayFromVTKMatrix(warpedMatrix),
                slicer.util.arrayFromVTKMatrix(fixedMatrix),
            )
        )
        self.assertEqual(
            nodes.volumeNode.GetImageData().GetDimensions(), fixed.GetImageData().GetDimensions()
        )
        self.assertGreater(nodes.report["ncc_after"], nodes.report["ncc_before"])
        self.assertLess(nodes.report["folding_percent"], 0.01)  # % of voxels with det J <= 0
        self.assertIs(
            nodes.transformNode.GetNodeReference(vtkMRMLTransformNode.GetFixedNodeReferenceRole()),
            fixed,
        )
        self.assertIs(
            nodes.transformNode.GetNodeReference(vtkMRMLTransformNode.GetMovingNodeReferenceRole()),
            moving,
        )
        self.assertIsNone(moving.GetTransformNodeID())  # a warped volume was made instead
        self.assertIsNotNone(nodes.jacobianVolumeNode)
        self.assertIsNotNone(nodes.reportTableNode)
        self.assertEqual(
            slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTransformNode"), transformsBefore + 1
        )
        self.delayDisplay("Test passed")

    def test_badInputLeavesTheSceneUnchanged(self):
        fixed, moving = self._loadPair()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(ValueError):
            DeepRegisterLogic().registerVolumes(fixed, fixed, "fast", device="cpu")
        with self.assertRaises(ValueError):
            DeepRegisterLogic().registerVolumes(fixed, moving, "no such preset", device="cpu")
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")

    def _waitWhileRunning(self, widget, timeoutSeconds=600):
        import time

        deadline = time.monotonic() + timeoutSeconds
        while widget._task is not None:
            self.assertLess(time.monotonic(), deadline, "the registration did not finish in time")
            slicer.app.processEvents()
            time.sleep(0.05)

    def test_applyAndCancelInTheWidget(self):
        fixed, moving = self._loadPair()
        slicer.util.selectModule("DeepRegister")
        widget = slicer.modules.deepregister.widgetRepresentation().self()
        parameters = widget.logic.getParameterNode()
        parameters.fixedVolume = fixed
        parameters.movingVolume = moving
        parameters.preset = "fast"
        parameters.device = "cpu"
        self.assertTrue(widget.ui.applyButton.enabled)

        self.delayDisplay("Apply, then Cancel: nothing may be added to the scene")
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        widget.ui.applyButton.click()
        self.assertIsNotNone(widget._task)
        widget.ui.applyButton.click()
        self._waitWhileRunning(widget)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)

        self.delayDisplay("Apply and let it finish")
        widget.ui.applyButton.click()
        self._waitWhileRunning(widget)
        self.assertIsNotNone(widget._results)
        self.assertEqual(parameters.outputTransform, widget._results.transformNode)
        self.assertTrue(widget.ui.showCheckerboardButton.enabled)
        widget.onShowCheckerboard()
        widget.onShowJacobian()
        widget.onShowDifference()
        self.delayDisplay("Test passed")
