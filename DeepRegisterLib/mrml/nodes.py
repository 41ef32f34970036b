"""Volume nodes ↔ SimpleITK images with exact geometry.

MRML is RAS, SimpleITK and files are LPS (:mod:`DeepRegisterLib.imaging.geometry`), and both
store voxels as (K, J, I) arrays. A volume is always taken in its own (local) coordinates: its
parent transform is not applied.
"""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk
import slicer
import vtk
from vtk.util import numpy_support

from ..errors import InputError
from ..imaging.colour import is_colour
from ..imaging.geometry import LPS_TO_RAS, Grid
from ..imaging.resampling import resample


def arrayFromImageData(imageData: vtk.vtkImageData, what: str) -> np.ndarray:
    """A copy of the voxels as a (K, J, I) or (K, J, I, C) array."""
    scalars = imageData.GetPointData().GetScalars() if imageData is not None else None
    if scalars is None or scalars.GetNumberOfTuples() == 0:
        raise InputError(f"{what} has no voxels; load or create its image data first")
    components = scalars.GetNumberOfComponents()
    shape = tuple(reversed(imageData.GetDimensions())) + ((components,) if components > 1 else ())
    return numpy_support.vtk_to_numpy(scalars).reshape(shape).copy()


def imageDataFromArray(array: np.ndarray, imageData: vtk.vtkImageData | None = None):
    """Deep-copy a (K, J, I[, C]) array into (new) VTK image data with origin 0, spacing 1."""
    imageData = imageData if imageData is not None else vtk.vtkImageData()
    components = array.shape[3] if array.ndim == 4 else 1
    imageData.SetDimensions(array.shape[2], array.shape[1], array.shape[0])
    flat = np.ascontiguousarray(array).reshape(-1, components)
    imageData.GetPointData().SetScalars(numpy_support.numpy_to_vtk(flat, deep=True))
    return imageData


def rasGeometry(image: sitk.Image) -> tuple[np.ndarray, np.ndarray, tuple[float, ...]]:
    """(origin, 3×3 direction, spacing) of a 3D image in RAS; the flips are exact negations."""
    if image.GetDimension() != 3:
        raise InputError(f"MRML volumes are 3D; this image is {image.GetDimension()}D")
    grid = Grid.of(image)
    return LPS_TO_RAS @ np.asarray(grid.origin), LPS_TO_RAS @ grid.direction_matrix, grid.spacing


def setLPSGeometry(image: sitk.Image, origin, directions, spacing) -> sitk.Image:
    """Set an image's geometry from RAS origin and direction (columns = I, J, K axes)."""
    return _lpsGrid(image.GetSize(), origin, directions, spacing).apply_to(image)


def _lpsGrid(size, origin, directions, spacing) -> Grid:
    """The LPS grid of a RAS origin and direction (columns = I, J, K axes)."""
    return Grid(
        tuple(int(n) for n in size),
        tuple(float(s) for s in spacing),
        tuple(float(v) for v in LPS_TO_RAS @ np.asarray(origin, dtype=float)),
        tuple(float(v) for v in (LPS_TO_RAS @ np.asarray(directions)).ravel()),
    )


def embed3x3(matrix: np.ndarray) -> np.ndarray:
    out = np.eye(4)
    out[:3, :3] = matrix
    return out


def _directionsOf(volumeNode: slicer.vtkMRMLVolumeNode) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    volumeNode.GetIJKToRASDirectionMatrix(matrix)
    return slicer.util.arrayFromVTKMatrix(matrix)[:3, :3]


def sameGrid(a: sitk.Image | Grid, b: sitk.Image | Grid) -> bool:
    a, b = (grid if isinstance(grid, Grid) else Grid.of(grid) for grid in (a, b))
    return (
        a.size == b.size
        and np.allclose(a.spacing, b.spacing, rtol=1e-6, atol=0)
        and np.allclose(a.origin, b.origin, rtol=0, atol=1e-4)
        and np.allclose(a.direction, b.direction, rtol=0, atol=1e-6)
    )


def referenceGrid(volumeNode: slicer.vtkMRMLVolumeNode) -> Grid:
    """The volume's grid (LPS), to resample onto: its geometry alone, where an image of its
    size would take a CT's 157 MB and 0.08 s to zero."""
    if volumeNode.GetImageData() is None:
        raise InputError(f"volume '{volumeNode.GetName()}' has no image data")
    dimensions = volumeNode.GetImageData().GetDimensions()
    return _lpsGrid(
        dimensions, volumeNode.GetOrigin(), _directionsOf(volumeNode), volumeNode.GetSpacing()
    )


def onGrid(image: sitk.Image, reference: Grid, transform: sitk.Transform | None):
    """Labels (nearest neighbour) on the reference grid; returned as is if already there."""
    if transform is None and sameGrid(image, reference):
        return image
    through = transform if transform is not None else sitk.Transform()
    return resample(image, reference, through, sitk.sitkNearestNeighbor, image.GetPixelID())


def imageFromVolumeNode(
    volumeNode: slicer.vtkMRMLVolumeNode, allowColour: bool = False
) -> sitk.Image:
    """The voxels (copied) and exact geometry (LPS) of a scalar or label map volume node, or
    with ``allowColour`` of a colour (RGB/RGBA) vector volume: a photograph or a stained slide,
    which registration takes on its luminance.

    The volume's parent transform is not applied: the image is in the node's local coordinates.
    """
    if volumeNode is None:
        raise InputError("no volume was given")
    name = f"volume '{volumeNode.GetName()}'"
    array = arrayFromImageData(volumeNode.GetImageData(), name)
    image = sitk.GetImageFromArray(array, isVector=array.ndim == 4)
    if array.ndim != 3 and not (allowColour and is_colour(image)):
        wanted = "scalar and colour (RGB) volumes" if allowColour else "scalar volumes"
        raise InputError(f"{name} has {array.shape[-1]} components; only {wanted} are used")
    return setLPSGeometry(
        image, volumeNode.GetOrigin(), _directionsOf(volumeNode), volumeNode.GetSpacing()
    )


def updateVolumeNodeFromImage(volumeNode: slicer.vtkMRMLVolumeNode, image: sitk.Image) -> None:
    """Replace a volume node's voxels and geometry with a 3D image's (copied): scalar, or any
    number of components for a vector volume node."""
    vectors = volumeNode.IsA("vtkMRMLVectorVolumeNode")
    if (image.GetNumberOfComponentsPerPixel() != 1) != vectors:
        kind = "a vector" if vectors else "a scalar"
        raise InputError(f"'{volumeNode.GetName()}' is {kind} volume: it cannot hold this image")
    origin, directions, spacing = rasGeometry(image)
    imageData = imageDataFromArray(sitk.GetArrayViewFromImage(image))
    wasModifying = volumeNode.StartModify()
    volumeNode.SetOrigin(*origin)
    volumeNode.SetSpacing(*spacing)
    volumeNode.SetIJKToRASDirectionMatrix(slicer.util.vtkMatrixFromArray(embed3x3(directions)))
    volumeNode.SetAndObserveImageData(imageData)
    volumeNode.EndModify(wasModifying)


def showScalars(
    volumeNode: slicer.vtkMRMLScalarVolumeNode, colorID: str, window: float, level: float
) -> None:
    """Show a scalar volume with ``colorID`` and a fixed window/level. A new display node is
    made here, its window/level fixed before it sees the voxels: CreateDefaultDisplayNodes
    would compute an automatic one from their histogram, to be replaced at once (0.13 s of
    Slicer's main thread for a 1 mm brain, ten times that for a large CT)."""
    display = volumeNode.GetDisplayNode()
    isNew = display is None
    if isNew:
        display = volumeNode.GetScene().AddNewNodeByClass("vtkMRMLScalarVolumeDisplayNode")
    display.SetAutoWindowLevel(False)
    display.SetWindowLevel(window, level)
    display.SetAndObserveColorNodeID(colorID)
    if isNew:
        volumeNode.SetAndObserveDisplayNodeID(display.GetID())
