import importlib
import importlib.util
import logging
import os
import sys

import qt
import slicer
import vtk
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.ScriptedLoadableModule import ScriptedLoadableModule, ScriptedLoadableModuleWidget
from slicer.util import VTKObservationMixin


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

# The module's other parts live in DeepRegisterModuleLib, beside this file. DeepRegisterTest is
# imported here because Slicer's "Reload and Test" and ctest look for it in this module.
from DeepRegisterModuleLib.logic import DeepRegisterLogic  # noqa: E402
from DeepRegisterModuleLib.parameters import DeepRegisterParameterNode  # noqa: E402
from DeepRegisterModuleLib.pytorchSetup import MINIMUM_TORCH_VERSION  # noqa: E402
from DeepRegisterModuleLib.resultViews import ResultViews, reportSummary  # noqa: E402
from DeepRegisterModuleLib.selfTest import DeepRegisterTest  # noqa: E402, F401

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
        self._task = None  # the running registration (mrml.RegistrationProcess)
        self.resultViews = None  # the last one's nodes, and the views that show them
        self._lastMessage = ""
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
        self.resultViews = ResultViews(self.logic)

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

    def onReload(self) -> None:
        """Developer mode's Reload: the module's other files first, each after those it imports."""
        for name in ("pytorchSetup", "parameters", "logic", "resultViews", "selfTest"):
            importlib.reload(sys.modules[f"DeepRegisterModuleLib.{name}"])
        ScriptedLoadableModuleWidget.onReload(self)

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
        if parameters.createOutputVolume and parameters.outputVolume:
            # A colour moving volume warps into a colour output: the library's own rule.
            from DeepRegisterLib.mrml import checkOutputVolumeKind

            try:
                checkOutputVolumeKind(parameters.movingVolume, parameters.outputVolume)
            except ValueError as error:  # InputError: says which kind to choose
                return str(error)
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
            self.resultViews.showOutcome(nodes)

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
        self.resultViews.nodes = nodes
        self.ui.resultsLabel.text = reportSummary(nodes.report) if nodes else _("No results yet.")
        hasWarped = bool(nodes and nodes.volumeNode)
        self.ui.showCheckerboardButton.enabled = hasWarped
        self.ui.showDifferenceButton.enabled = bool(nodes)
        self.ui.showJacobianButton.enabled = bool(nodes and nodes.jacobianVolumeNode)

    def onShowCheckerboard(self) -> None:
        with slicer.util.tryWithErrorDisplay(
            _("Failed to show the checkerboard."), waitCursor=True
        ):
            self.resultViews.showCheckerboard()

    def onShowDifference(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to show the difference."), waitCursor=True):
            self.resultViews.showDifference()

    def onShowJacobian(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to show the Jacobian."), waitCursor=True):
            self.resultViews.showJacobian()
