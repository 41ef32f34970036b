# Slicer self-tests are unittest.TestCase classes, written in unittest style:
# ruff: noqa: PT009, PT027

import importlib.metadata
import importlib.util
import json
import logging
import os
import re
import sys
import time
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

#: torch comes from the PyTorch extension. DeepRegisterLib catches torch.OutOfMemoryError (new in
#: torch 2.5); everything else it calls is older.
MINIMUM_TORCH_VERSION = "2.5"


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

# Torch-free parts of the library: the parameter node offers the library's own choices.
from DeepRegisterLib.registration.presets import PRESETS  # noqa: E402
from DeepRegisterLib.registration.settings import DEVICES, SIMILARITIES  # noqa: E402

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
<code>from DeepRegisterLib.mrml import registerVolumes</code>.
<br><br>Requires Slicer 5.10 or newer and PyTorch 2.5 or newer (PyTorch extension). Apply runs
the registration in a separate process, so Slicer stays responsive and Cancel stops it at once.
<br><br>Troubleshooting: the first run asks to install or upgrade PyTorch. When memory is short
the module runs on a coarser grid, or on the CPU if the GPU runs out, and says so in the log.
Registration cannot change the scene unless it succeeds.
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
        slicer.app.connect("startupCompleted()", _watchSceneLoads)


def _watchSceneLoads() -> None:
    """Slicer reads grid transforms back from a saved scene with cubic interpolation; ours are
    the registration only with linear interpolation, which every scene load sets back."""
    slicer.mrmlScene.AddObserver(slicer.mrmlScene.EndImportEvent, _onSceneLoaded)


def _onSceneLoaded(scene, event) -> None:
    if scene.GetNumberOfNodesByClass("vtkMRMLTransformNode"):
        from DeepRegisterLib.mrml import restoreLinearInterpolation  # 0.3 s, not at startup

        restoreLinearInterpolation(scene)


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
    preset: Annotated[str, Choice(list(PRESETS))] = "balanced"
    affine: bool = True
    model: str = "default"
    device: Annotated[str, Choice(list(DEVICES))] = "auto"
    similarity: Annotated[str, Choice(["default", *SIMILARITIES])] = "default"
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
        # The running registration (mrml.RegistrationProcess) and the last one's nodes
        # (mrml.RegistrationNodes).
        self._task = None
        self._results = None
        self._lastMessage = ""
        self._checkerboardNode = None
        self._sliceCompositing = None  # mrml.SliceCompositing, once there are results
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
        self.logic.endStandbyChild()
        self.removeObservers()

    def enter(self) -> None:
        """Called each time the user opens this module."""
        self.initializeParameterNode()
        self.logic.startStandbyChild()

    def exit(self) -> None:
        """Called each time the user opens a different module."""
        self.logic.endStandbyChild()
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
        if parameters.createOutputVolume and parameters.outputVolume == parameters.movingVolume:
            return _("The warped volume must not overwrite the moving volume.")
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
        """Start a registration in a child process, or cancel the running one."""
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
                self._log(
                    _("PyTorch {version} or newer is needed; the registration did not run.").format(
                        version=MINIMUM_TORCH_VERSION
                    )
                )
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
        """Show the child's progress; push its results into the scene once it has ended."""
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
        try:
            self._showOutcome(task)
        finally:
            # The next run's child loads PyTorch on a core of its own: started once the results
            # are in the scene, it does not slow reading and pushing them (a 1 mm brain's in a
            # slicer-core scene on two cores: 0.36 s, against 0.52 s beside a starting child).
            if self.parent.isEntered:
                self.logic.startStandbyChild()

    def _showOutcome(self, task) -> None:
        """Push an ended task's results into the scene and show them, or say why there are none."""
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
            self._restoreCompositing()
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
        """End a running registration's child process; its result is dropped."""
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
            self._restoreCompositing()
            slicer.util.setSliceViewerLayers(
                background=self._checkerboardNode, foreground=None, fit=True
            )

    def onShowDifference(self) -> None:
        """Fixed minus warped in the slice views: aligned structures cancel out."""
        with slicer.util.tryWithErrorDisplay(_("Failed to show the difference."), waitCursor=True):
            fixed, warped = self._resultVolumes()
            self._compositing().override(
                _compositeNodes(), slicer.vtkMRMLSliceCompositeNode.Subtract
            )
            slicer.util.setSliceViewerLayers(
                background=fixed, foreground=warped, foregroundOpacity=1.0, fit=True
            )

    def onShowJacobian(self) -> None:
        """det J over the fixed volume: blue compresses, red expands, at or below 0 folds."""
        with slicer.util.tryWithErrorDisplay(_("Failed to show the Jacobian."), waitCursor=True):
            fixed, _warped = self._resultVolumes()
            self._restoreCompositing()
            slicer.util.setSliceViewerLayers(
                background=fixed,
                foreground=self._resultNode(self._results.jacobianVolumeNode),
                foregroundOpacity=0.5,
                fit=True,
            )

    def _compositing(self):
        """The difference view's Subtract compositing, and what each view had before it."""
        if self._sliceCompositing is None:
            from DeepRegisterLib.mrml import SliceCompositing

            self._sliceCompositing = SliceCompositing()
        return self._sliceCompositing

    def _restoreCompositing(self) -> None:
        if self._sliceCompositing is not None:
            self._sliceCompositing.restore(_compositeNodes())


def _compositeNodes() -> list:
    return slicer.util.getNodesByClass("vtkMRMLSliceCompositeNode")


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

    Thin on purpose: the work is DeepRegisterLib.mrml's; this class adds the parameter node, the
    PyTorch set-up and the child process. DeepRegisterLib.mrml (and so torch) is imported only
    when a method needs it.
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepRegisterParameterNode(super().getParameterNode())

    def setupPythonRequirements(self) -> bool:
        """Make a torch the library can use available, asking the user before installing or
        upgrading it; False if they declined. Runs before any child starts, so that no run
        fails half-way for an old torch."""
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
        if torchLogic.torchInstalled() and torchVersionIsEnough(_installedTorchVersion()):
            return True
        torch = torchLogic.installTorch(
            askConfirmation=True, torchVersionRequirement=f">={MINIMUM_TORCH_VERSION}"
        )
        if torch is None:
            return False
        if not torchVersionIsEnough(_installedTorchVersion()):
            raise RuntimeError(
                _("PyTorch {installed} is installed; {minimum} or newer is needed.").format(
                    installed=_installedTorchVersion(), minimum=MINIMUM_TORCH_VERSION
                )
            )
        return True

    def startStandbyChild(self) -> None:
        """Start the child process of the next run now, so that Apply does not wait for Python
        and PyTorch to load (a second or more, several on some systems); it waits for its job,
        using no CPU. Nothing happens until a PyTorch the library can use is installed."""
        try:
            if not torchVersionIsEnough(_installedTorchVersion()):
                return
        except importlib.metadata.PackageNotFoundError:
            return
        from DeepRegisterLib import mrml

        mrml.startStandby(mrml.childPython())

    def endStandbyChild(self) -> None:
        """End the waiting child process, if any (it holds PyTorch's memory)."""
        from DeepRegisterLib import mrml

        mrml.endStandby()

    def settingsFromParameterNode(self, parameterNode):
        """The RegistrationSettings the parameter node describes; the GUI's placeholders
        ("default" similarity, 0 regularization or iterations, empty model: the preset's or the
        library's choice) are read here and nowhere else."""
        from DeepRegisterLib.registration.settings import RegistrationSettings

        optional = {}  # left out: the preset's (or the library's) value
        if parameterNode.similarity != "default":
            optional["similarity"] = parameterNode.similarity
        if parameterNode.regularization > 0:
            optional["regularization"] = parameterNode.regularization
        if parameterNode.iterations > 0:
            optional["iterations"] = parameterNode.iterations
        return RegistrationSettings(
            preset=parameterNode.preset,
            model=parameterNode.model.strip() or "default",
            affine=parameterNode.affine,
            compute_inverse=parameterNode.computeInverse,
            compute_jacobian=parameterNode.computeJacobian,
            device=parameterNode.device,
            **optional,
        )

    def registerVolumes(self, fixedVolumeNode, movingVolumeNode, settings=None, **keywords):
        """Register in this process (blocking) and put the results into the scene; for the
        console and tests. Arguments: DeepRegisterLib.mrml.registerVolumes'.

        Returns the created nodes (DeepRegisterLib.mrml.RegistrationNodes); raises ValueError for
        unusable inputs, and leaves the scene unchanged whenever it raises.
        """
        if not self.setupPythonRequirements():
            raise RuntimeError(_("PyTorch is needed to register volumes."))
        loaded = sys.modules.get("torch")
        if loaded is not None and not torchVersionIsEnough(loaded.__version__):
            raise RuntimeError(_("PyTorch was upgraded; restart Slicer to use it here."))
        from DeepRegisterLib import mrml

        return mrml.registerVolumes(fixedVolumeNode, movingVolumeNode, settings, **keywords)

    def startRegistration(self, parameterNode):
        """Read the inputs (here) and start the registration in a child process; poll the
        returned DeepRegisterLib.mrml.RegistrationProcess and call finishRegistration once it is
        no longer running, or cancel() it."""
        from DeepRegisterLib import mrml

        p = parameterNode
        job = mrml.prepareRegistration(
            p.fixedVolume,
            p.movingVolume,
            self.settingsFromParameterNode(p),
            outputTransformNode=p.outputTransform,
            outputVolumeNode=p.outputVolume if p.createOutputVolume else None,
            createOutputVolume=p.createOutputVolume,
            fixedMaskNode=p.fixedMask,
            movingMaskNode=p.movingMask,
            movingLabelNodes=[p.movingLabels] if p.movingLabels else [],
            initialTransformNode=p.initialTransform,
        )
        return mrml.RegistrationProcess(job).start()

    def finishRegistration(self, task):
        """Push an ended task's result into the scene (main thread); raises if it failed."""
        nodes = task.push()
        logging.info("DeepRegister report: " + json.dumps(nodes.report))
        return nodes

    def createCheckerboardVolume(self, fixedVolumeNode, warpedVolumeNode, outputVolumeNode=None):
        from DeepRegisterLib import mrml

        return mrml.createCheckerboardVolume(fixedVolumeNode, warpedVolumeNode, outputVolumeNode)


def _installedTorchVersion() -> str:
    return importlib.metadata.version("torch")


def torchVersionIsEnough(version: str) -> bool:
    """Whether a torch version string ("2.13.0+cpu") is at least MINIMUM_TORCH_VERSION."""

    def majorMinor(text: str) -> tuple[int, int]:
        match = re.match(r"(\d+)\.(\d+)", text)
        return (int(match[1]), int(match[2])) if match else (0, 0)

    return majorMinor(version) >= majorMinor(MINIMUM_TORCH_VERSION)


#
# DeepRegisterTest
#


class DeepRegisterTest(ScriptedLoadableModuleTest):
    """Registers SampleData's MRBrainTumor2 to MRBrainTumor1 (the pair Elastix and ANTs test on)
    with the fast preset on the CPU through the GUI (Apply, Cancel, Apply), waiting the way Slicer
    idles (the main thread in Qt's event loop, holding the GIL), so a starved run would show.
    """

    def setUp(self):
        """Do whatever is needed to reset the state - typically a scene clear will be enough."""
        slicer.mrmlScene.Clear()

    def runTest(self):
        """Run as few or as many tests as needed here."""
        self.setUp()
        self.test_badInputLeavesTheSceneUnchanged()
        self.setUp()
        self.test_applyCancelAndApplyInTheWidget()

    def _loadPair(self):
        import SampleData

        fixed = SampleData.downloadSample("MRBrainTumor1")
        moving = SampleData.downloadSample("MRBrainTumor2")
        return fixed, moving

    def test_badInputLeavesTheSceneUnchanged(self):
        fixed, moving = self._loadPair()
        nodesBefore = slicer.mrmlScene.GetNumberOfNodes()
        with self.assertRaises(ValueError):
            DeepRegisterLogic().registerVolumes(fixed, fixed, "fast", device="cpu")
        with self.assertRaises(ValueError):
            DeepRegisterLogic().registerVolumes(fixed, moving, "no such preset", device="cpu")
        with self.assertRaises(ValueError):
            DeepRegisterLogic().registerVolumes(fixed, moving, "fast", outputVolumeNode=moving)
        self.assertEqual(slicer.mrmlScene.GetNumberOfNodes(), nodesBefore)
        self.delayDisplay("Test passed")

    def _waitWhileRunning(self, widget, timeoutSeconds=600) -> float:
        """Wait in Qt's event loop (as Slicer idles) until the widget's run ended; seconds."""
        started = time.monotonic()
        while widget._task is not None:
            elapsed = time.monotonic() - started
            self.assertLess(elapsed, timeoutSeconds, "the registration did not finish in time")
            slicer.app.processEvents(qt.QEventLoop.WaitForMoreEvents)
        return time.monotonic() - started

    def test_applyCancelAndApplyInTheWidget(self):
        fixed, moving = self._loadPair()
        slicer.util.selectModule("DeepRegister")
        widget = slicer.modules.deepregister.widgetRepresentation().self()
        parameters = widget.logic.getParameterNode()
        parameters.fixedVolume = fixed
        parameters.movingVolume = moving
        parameters.createOutputVolume = True
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

        self.delayDisplay("Apply and let it finish (fast preset, CPU)")
        transformsBefore = slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTransformNode")
        widget.ui.applyButton.click()
        seconds = self._waitWhileRunning(widget)
        nodes = widget._results
        self.assertIsNotNone(nodes)
        # The child's own time plus its start: a starved run takes many times longer.
        self.assertLess(seconds, 2.0 * nodes.report["runtime_s"] + 30.0, "the run was starved")
        self._checkResults(nodes, fixed, moving)
        self.assertEqual(
            slicer.mrmlScene.GetNumberOfNodesByClass("vtkMRMLTransformNode"), transformsBefore + 1
        )
        self.assertEqual(parameters.outputTransform, nodes.transformNode)
        self.assertTrue(widget.ui.showCheckerboardButton.enabled)
        widget.onShowCheckerboard()
        widget.onShowJacobian()
        compositing = [n.GetCompositing() for n in _compositeNodes()]
        widget.onShowDifference()
        widget.onShowCheckerboard()
        self.assertEqual([n.GetCompositing() for n in _compositeNodes()], compositing)
        self.delayDisplay("Test passed")

    def _checkResults(self, nodes, fixed, moving):
        import numpy as np

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
