"""Registering volume nodes: read the scene, run the engine, push the results.

A registration has three steps so that the slow one can run away from the scene:
:func:`prepareRegistration` reads the scene (main thread), :meth:`RegistrationJob.run` runs the
engine without touching MRML (here, or in a child process: :mod:`.runner`), and
:meth:`RegistrationJob.push` writes the results (main thread). Nothing in the scene changes until
the engine has succeeded, and a push that fails part-way undoes itself, so a failed or cancelled
registration leaves the scene as it was.
"""

# Slicer's camelCase also for fields (they mirror the module's parameter node):
# ruff: noqa: N815

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import SimpleITK as sitk
import slicer

from ..errors import InputError
from ..registration.settings import RegistrationSettings
from .inputs import LabelNode, MaskNode, labelSources, maskImage
from .nodes import imageFromVolumeNode
from .push import PushableResult, PushTargets, RegistrationNodes, checkOutputs, push
from .transforms import initialTransform


@dataclass
class RegistrationJob:
    """A registration read out of the scene: the engine's inputs, its settings, and where the
    results go. :meth:`run` touches no MRML; :meth:`push` must run on the scene's thread."""

    targets: PushTargets
    settings: RegistrationSettings
    fixed: sitk.Image
    moving: sitk.Image
    fixedMask: sitk.Image | None
    movingMask: sitk.Image | None
    initialTransform: sitk.Transform | None
    labelImages: dict[str, sitk.Image]

    def run(self, progress=None, cancel=None):
        """Run the engine in this process; raises InputError on unusable input and
        RegistrationCancelled on cancel. ``progress(fraction, message)``; ``cancel.is_set()``."""
        from ..registration.engine import register  # torch: only when registering here

        return register(
            self.fixed,
            self.moving,
            self.settings,
            fixed_mask=self.fixedMask,
            moving_mask=self.movingMask,
            moving_labels=self.labelImages or None,
            initial_transform=self.initialTransform,
            progress=progress,
            cancel=cancel,
        )

    def push(self, result: PushableResult) -> RegistrationNodes:
        """Write the result into the scene (all or nothing)."""
        return push(result, self.targets)


def settingsFrom(settings: RegistrationSettings | str | None, **keywords: Any):
    """Settings from an object, a preset name (console: ``"fast"``) or None, then keywords (the
    settings' field names)."""
    if isinstance(settings, str):
        settings = RegistrationSettings(preset=settings)
    return (settings or RegistrationSettings()).replace(**keywords)


def prepareRegistration(
    fixedNode: slicer.vtkMRMLScalarVolumeNode,
    movingNode: slicer.vtkMRMLScalarVolumeNode,
    settings: RegistrationSettings | str | None = None,
    *,
    outputTransformNode: slicer.vtkMRMLTransformNode | None = None,
    outputVolumeNode: slicer.vtkMRMLScalarVolumeNode | None = None,
    createOutputVolume: bool = False,
    fixedMaskNode: MaskNode | None = None,
    movingMaskNode: MaskNode | None = None,
    movingLabelNodes: Sequence[LabelNode] = (),
    initialTransformNode: slicer.vtkMRMLTransformNode | None = None,
    createReportTable: bool = True,
    **settingsKeywords: Any,
) -> RegistrationJob:
    """Check the nodes and read their voxels; see :func:`registerVolumes` for the arguments."""
    settings = settingsFrom(settings, **settingsKeywords)
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
    checkOutputs(fixedNode, movingNode, outputTransformNode, outputVolumeNode)
    fixedMask = None if fixedMaskNode is None else maskImage(fixedMaskNode, fixedNode)
    movingMask = None if movingMaskNode is None else maskImage(movingMaskNode, movingNode)
    sources, labelImages = labelSources(movingLabelNodes, movingNode)
    targets = PushTargets(
        fixedNode, movingNode, outputTransformNode, outputVolumeNode, createOutputVolume,
        sources, createReportTable,
    )  # fmt: skip
    return RegistrationJob(
        targets=targets,
        # The warped volume is made only for a node that receives it. The grid transform node
        # is made from the affine and v (registration/lattice.py), not from the dense field.
        settings=settings.replace(
            compute_warped=targets.wantsWarpedVolume, compute_displacement=False
        ),
        fixed=imageFromVolumeNode(fixedNode, allowColour=True),
        moving=imageFromVolumeNode(movingNode, allowColour=True),
        fixedMask=fixedMask,
        movingMask=movingMask,
        initialTransform=initialTransform(fixedNode, initialTransformNode),
        labelImages=labelImages,
    )


def registerVolumes(
    fixedNode: slicer.vtkMRMLScalarVolumeNode,
    movingNode: slicer.vtkMRMLScalarVolumeNode,
    settings: RegistrationSettings | str | None = None,
    *,
    progress=None,
    cancel=None,
    **arguments: Any,
) -> RegistrationNodes:
    """Register two volume nodes in this process and put the results into their scene; for the
    Python console (it blocks until done; the module runs a child process instead).

    ``arguments`` are :func:`prepareRegistration`'s keywords (the nodes, and settings fields):

    - ``settings``: a RegistrationSettings, a preset name ("fast", "balanced", "accurate"), or
      None; keywords named like its fields override it (``compute_inverse=True``,
      ``device="cpu"``, ``similarity="mind"``, ``model="none"``...).
    - ``outputTransformNode``: receives the fixed → moving grid transform (default: a new node).
    - ``outputVolumeNode``: receives the warped moving volume on the fixed grid; a new node if
      ``createOutputVolume``; with neither, the moving volume is placed under the transform.
    - ``fixedMaskNode``, ``movingMaskNode``: volumes (non-zero inside) or segmentations (union).
    - ``movingLabelNodes``: label maps or segmentations to warp; segments keep names and colours.
    - ``initialTransformNode``: a linear transform that aligns the moving volume when the moving
      volume is placed under it; it seeds the affine stage (or replaces it if ``affine=False``).
    - ``createReportTable``: the QA figures as a table node.
    - ``progress(fraction, message)`` and ``cancel`` (has ``is_set()``) as in the engine.

    Example::

        from DeepRegisterLib.mrml import registerVolumes
        nodes = registerVolumes(getNode("MRBrainTumor1"), getNode("MRBrainTumor2"), "fast",
                                createOutputVolume=True)
        print(nodes.report["ncc_before"], nodes.report["ncc_after"])

    Raises InputError for unusable input and RegistrationCancelled when cancelled; either way
    the scene is left as it was.
    """
    job = prepareRegistration(fixedNode, movingNode, settings, **arguments)
    return job.push(job.run(progress, cancel))
