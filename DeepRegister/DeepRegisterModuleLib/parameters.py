"""What the module registers and how: the parameter node, saved with the scene."""

from typing import Annotated, Union

from slicer import (
    vtkMRMLLabelMapVolumeNode,
    vtkMRMLScalarVolumeNode,
    vtkMRMLSegmentationNode,
    vtkMRMLTransformNode,
    vtkMRMLVectorVolumeNode,
)
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper

# Torch-free parts of the library: the parameter node offers the library's own choices.
from DeepRegisterLib.registration.presets import PRESETS
from DeepRegisterLib.registration.settings import DEVICES, SIMILARITIES

# parameterNodeWrapper recognises node unions written with typing.Union, None included.
MaskNode = Union[vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode, None]  # noqa: UP007
LabelsNode = Union[vtkMRMLLabelMapVolumeNode, vtkMRMLSegmentationNode, None]  # noqa: UP007
# Grey-level volumes, or colour ones (photographs, stained slides: registered on luminance).
VolumeNode = Union[vtkMRMLScalarVolumeNode, vtkMRMLVectorVolumeNode, None]  # noqa: UP007


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

    fixedVolume: VolumeNode
    movingVolume: VolumeNode
    fixedMask: MaskNode
    movingMask: MaskNode
    movingLabels: LabelsNode
    initialTransform: vtkMRMLTransformNode
    outputTransform: vtkMRMLTransformNode
    outputVolume: VolumeNode
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
