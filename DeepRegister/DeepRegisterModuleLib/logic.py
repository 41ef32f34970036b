"""Registration of volume nodes for the GUI, the Python console and tests (no GUI code here)."""

import json
import logging
import sys

from slicer.i18n import tr as _
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleLogic

from .parameters import DeepRegisterParameterNode
from .pytorchSetup import setupPythonRequirements, torchIsUsable, torchVersionIsEnough


class DeepRegisterLogic(ScriptedLoadableModuleLogic):
    """Thin on purpose: the work is DeepRegisterLib.mrml's; this class adds the parameter node,
    the PyTorch set-up and the child process. DeepRegisterLib.mrml (and so torch) is imported
    only when a method needs it.
    """

    def __init__(self) -> None:
        """Called when the logic class is instantiated."""
        ScriptedLoadableModuleLogic.__init__(self)

    def getParameterNode(self):
        return DeepRegisterParameterNode(super().getParameterNode())

    def setupPythonRequirements(self) -> bool:
        """Make a usable PyTorch available (asking first); False if the user declined. Runs
        before any child starts, so that no run fails half-way for an old torch."""
        return setupPythonRequirements()

    def startStandbyChild(self) -> None:
        """Start the child process of the next run now, so that Apply does not wait for Python
        and PyTorch to load (a second or more, several on some systems); it waits for its job,
        using no CPU. Nothing happens until a PyTorch the library can use is installed."""
        if not torchIsUsable():
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
