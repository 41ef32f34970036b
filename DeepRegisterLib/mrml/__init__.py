"""The bridge between DeepRegisterLib and a Slicer (MRML) scene; the only package importing
``slicer``.

It runs inside the Slicer application and headless with the ``slicer-core`` wheel alike: it uses
MRML and VTK only (no Qt, no ``slicer.app``, no ``slicer.mrmlScene`` global: the scene is always
the one the given nodes live in). Every volume is taken in its own (local) coordinates; the
outputs are placed under the fixed volume's parent transform, so they line up in world space
whatever transforms the inputs sit under.

- :mod:`.nodes`, :mod:`.segmentations`, :mod:`.transforms`: nodes ↔ images and transforms;
- :mod:`.inputs`: masks and label nodes read onto the right grids;
- :mod:`.api`: :func:`registerVolumes` (console), :func:`prepareRegistration`;
- :mod:`.runner`: the same job in a child process (the module's Apply), one started before it
  (:mod:`.child_process`);
- :mod:`.push`, :mod:`.scene_edit`: results into the scene, all or nothing;
- :mod:`.saved_scenes`: what Slicer forgets of them when it reads a saved scene;
- :mod:`.views`: checkerboard volume, slice compositing.
"""

from .api import RegistrationJob, prepareRegistration, registerVolumes
from .child_process import endStandby, startStandby
from .inputs import LabelNode, MaskNode
from .nodes import imageFromVolumeNode, updateVolumeNodeFromImage
from .push import (
    INVERSE_TRANSFORM_ROLE,
    JACOBIAN_VOLUME_ROLE,
    REPORT_ATTRIBUTE,
    REPORT_TABLE_ROLE,
    PushTargets,
    RegistrationNodes,
    checkOutputVolumeKind,
    pushResult,
)
from .runner import ProcessOutputs, RegistrationProcess, childPython
from .saved_scenes import restoreLinearInterpolation
from .segmentations import (
    SegmentInfo,
    SegmentLabels,
    segmentLabelsFromSegmentationNode,
    updateSegmentationNodeFromSegmentLabels,
)
from .transforms import gridTransformFromDisplacement
from .views import SliceCompositing, checkerboardImage, createCheckerboardVolume

__all__ = [
    "INVERSE_TRANSFORM_ROLE",
    "JACOBIAN_VOLUME_ROLE",
    "REPORT_ATTRIBUTE",
    "REPORT_TABLE_ROLE",
    "LabelNode",
    "MaskNode",
    "ProcessOutputs",
    "PushTargets",
    "RegistrationJob",
    "RegistrationNodes",
    "RegistrationProcess",
    "SegmentInfo",
    "SegmentLabels",
    "SliceCompositing",
    "checkOutputVolumeKind",
    "checkerboardImage",
    "childPython",
    "createCheckerboardVolume",
    "endStandby",
    "gridTransformFromDisplacement",
    "imageFromVolumeNode",
    "prepareRegistration",
    "pushResult",
    "registerVolumes",
    "restoreLinearInterpolation",
    "segmentLabelsFromSegmentationNode",
    "startStandby",
    "updateSegmentationNodeFromSegmentLabels",
    "updateVolumeNodeFromImage",
]
