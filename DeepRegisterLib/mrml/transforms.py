"""Transforms between MRML (RAS, VTK) and ITK (LPS): linear ones across parent transforms, and
grid transforms from displacement fields."""

from __future__ import annotations

import itertools
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import InputError
from ..imaging.geometry import affine_parameters
from .nodes import embed3x3, rasGeometry

_RAS_TO_LPS_4 = np.diag([-1.0, -1.0, 1.0, 1.0])
_LPS_TO_RAS_VECTOR = np.array([-1.0, -1.0, 1.0])


def affineFromRAS(matrix: np.ndarray) -> sitk.AffineTransform:
    """The ITK (LPS) affine transform equal to a 4×4 RAS matrix."""
    lps = _RAS_TO_LPS_4 @ matrix @ _RAS_TO_LPS_4
    transform = sitk.AffineTransform(3)
    transform.SetMatrix(tuple(float(v) for v in lps[:3, :3].ravel()))
    transform.SetTranslation(tuple(float(v) for v in lps[:3, 3]))
    return transform


def frameTransform(referenceNode, node) -> sitk.Transform | None:
    """Linear LPS transform from ``referenceNode``'s local coordinates to ``node``'s, or None.

    This is the resampling transform that brings ``node``'s voxels onto ``referenceNode``'s grid
    when the two sit under different parent transforms.
    """
    source, target = referenceNode.GetParentTransformNode(), node.GetParentTransformNode()
    if source is target:
        return None
    ras = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(source, target, ras):
        raise InputError(
            f"'{node.GetName()}' and '{referenceNode.GetName()}' are under different transforms "
            "and at least one is not linear; harden the transforms first"
        )
    matrix = slicer.util.arrayFromVTKMatrix(ras)
    if np.allclose(matrix, np.eye(4), atol=1e-9):
        return None
    return affineFromRAS(matrix)


def initialTransform(fixedNode, initialTransformNode) -> sitk.Transform | None:
    """The fixed → moving (resampling) transform that placing the moving volume under
    ``initialTransformNode`` shows, in the fixed volume's local LPS coordinates."""
    if initialTransformNode is None:
        return None
    ras = vtk.vtkMatrix4x4()
    if not slicer.vtkMRMLTransformNode.GetMatrixTransformBetweenNodes(
        fixedNode.GetParentTransformNode(), initialTransformNode, ras
    ):
        raise InputError(
            f"initial transform '{initialTransformNode.GetName()}' must be linear (rigid or "
            "affine); harden a deformable initial transform onto the moving volume instead"
        )
    return affineFromRAS(slicer.util.arrayFromVTKMatrix(ras))


def gridTransformFromDisplacement(displacement: sitk.Image) -> slicer.vtkOrientedGridTransform:
    """A Slicer grid transform (RAS vectors, linear interpolation) equal to an ITK field (LPS).

    Both are resampling transforms (``x ↦ x + u(x)``, fixed → moving): set the result with
    ``SetAndObserveTransformFromParent``.
    """
    if displacement.GetDimension() != 3 or displacement.GetNumberOfComponentsPerPixel() != 3:
        raise InputError("a displacement field for MRML must be a 3D image of 3D vectors")
    origin, directions, spacing = rasGeometry(displacement)
    grid = _rasVectorGrid(sitk.GetArrayViewFromImage(displacement))
    grid.SetOrigin(*origin)
    grid.SetSpacing(*spacing)
    transform = slicer.vtkOrientedGridTransform()
    transform.SetDisplacementGridData(grid)
    transform.SetGridDirectionMatrix(slicer.util.vtkMatrixFromArray(embed3x3(directions)))
    transform.SetInterpolationModeToLinear()
    return transform


def inverseTransformFromDeformation(
    affine: sitk.Transform, inverseDeformation: sitk.Image
) -> vtk.vtkGeneralTransform:
    """The registration's inverse (moving → fixed, a resampling transform) as Slicer holds it
    exactly: ``A⁻¹`` then the grid transform of ``w = exp(−v)``, ITK's ``[w, A⁻¹]`` (a few
    MB, where the dense field on a 1 mm moving grid takes 200)."""
    matrix, translation = affine_parameters(affine.GetInverse(), 3)
    lps = np.eye(4)
    lps[:3, :3], lps[:3, 3] = matrix, translation
    linear = vtk.vtkTransform()
    linear.SetMatrix(slicer.util.vtkMatrixFromArray(_RAS_TO_LPS_4 @ lps @ _RAS_TO_LPS_4))
    inverse = vtk.vtkGeneralTransform()
    inverse.PostMultiply()  # each transform concatenated is applied after the ones before it
    inverse.Concatenate(linear)
    inverse.Concatenate(gridTransformFromDisplacement(inverseDeformation))
    return inverse


def _rasVectorGrid(lps: np.ndarray) -> vtk.vtkImageData:
    """VTK image data of vectors, the (K, J, I, 3) LPS ``lps`` flipped to RAS as they are
    written into it: one pass, not a copy flipped and then copied again. A float32 field stays
    float32 (200 MB for a 1 mm brain, not 400), which VTK's grid transforms interpolate and
    Slicer saves as they do double.

    The pass runs in slabs on all cores (numpy releases the GIL): it runs on Slicer's main
    thread, 0.17 s for a 1 mm brain on one core, 0.09 s on two.
    """
    vectors = vtk.vtkFloatArray() if lps.dtype == np.float32 else vtk.vtkDoubleArray()
    vectors.SetNumberOfComponents(3)
    vectors.SetNumberOfTuples(int(np.prod(lps.shape[:3])))
    ras = numpy_support.vtk_to_numpy(vectors).reshape(lps.shape)
    signs = _LPS_TO_RAS_VECTOR.astype(lps.dtype)  # exact: signs only, in the field's own type
    bounds = np.linspace(0, len(lps), min(len(lps), os.cpu_count() or 1) + 1).astype(int)
    slabs = [slice(start, stop) for start, stop in itertools.pairwise(bounds)]
    with ThreadPoolExecutor(len(slabs)) as pool:
        list(pool.map(lambda slab: np.multiply(lps[slab], signs, out=ras[slab]), slabs))
    grid = vtk.vtkImageData()
    grid.SetDimensions(lps.shape[2], lps.shape[1], lps.shape[0])
    grid.GetPointData().SetScalars(vectors)
    return grid


def setRegistrationTransform(transformNode, gridTransform, fixedNode, movingNode) -> None:
    """Hold ``gridTransform`` as the resampling (FromParent) transform, with the registration's
    fixed and moving volumes as references (as Slicer's registration modules do)."""
    transformNode.SetAndObserveTransformFromParent(gridTransform)
    transformNode.SetNodeReferenceID(
        slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole(), fixedNode.GetID()
    )
    transformNode.SetNodeReferenceID(
        slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole(), movingNode.GetID()
    )
