"""The module's self-test, run by Slicer's "Reload and Test" and by ctest (DeepRegister.py
imports it, where Slicer looks for DeepRegisterTest)."""

# Slicer self-tests are unittest.TestCase classes, written in unittest style:
# ruff: noqa: PT009, PT027

import time

import qt
import slicer
import vtk
from slicer import vtkMRMLTransformNode
from slicer.ScriptedLoadableModule import ScriptedLoadableModuleTest

from .logic import DeepRegisterLogic
from .resultViews import compositeNodes


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
        nodes = widget.resultViews.nodes
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
        compositing = [n.GetCompositing() for n in compositeNodes()]
        widget.onShowDifference()
        widget.onShowCheckerboard()
        self.assertEqual([n.GetCompositing() for n in compositeNodes()], compositing)
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
