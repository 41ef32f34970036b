"""A headless MRML scene like the application's, and the volumes, segmentations and known
registration results the MRML bridge tests put in it, for every test of the bridge. Importing
it skips the importing test module when `slicer` is not slicer-core: use
``pytest.importorskip("mrml_scenes")``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

slicer = pytest.importorskip("slicer", reason="slicer-core (the headless MRML scene) is needed")
if not hasattr(slicer, "vtkMRMLScene"):
    pytest.skip(
        "`import slicer` is not slicer-core (the unrelated PyPI package 'slicer' shadows it); "
        "reinstall slicer-core==5.13.31053.0",
        allow_module_level=True,
    )

import vtk  # noqa: E402  (after the skip: vtk comes with slicer-core)
from conftest import grid_points, rotation_matrix  # noqa: E402

from DeepRegisterLib import mrml  # noqa: E402
from DeepRegisterLib.evaluation.evaluate import displacement_on_grid  # noqa: E402
from DeepRegisterLib.imaging import metrics  # noqa: E402
from DeepRegisterLib.imaging.geometry import Grid  # noqa: E402
from DeepRegisterLib.registration.result import (  # noqa: E402
    RegistrationResult,
    displacement_transform,
)

FLIP = np.diag([-1.0, -1.0, 1.0])
OBLIQUE = rotation_matrix((1.0, 2.0, 3.0), 25.0)  # no voxel axis along R, A or S
BINARY = slicer.vtkSegmentationConverter.GetBinaryLabelmapRepresentationName()


# --- a scene like the application's -------------------------------------------------------


@dataclass
class Slicerish:
    """A headless scene with the logics Slicer's application would attach to it."""

    scene: slicer.vtkMRMLScene
    app_logic: slicer.vtkSlicerApplicationLogic
    transform_logic: slicer.vtkSlicerTransformLogic


def _register_segmentation_converters() -> None:
    """What the Segmentations module does at startup; needed to copy or convert segmentations."""
    factory = slicer.vtkSegmentationConverterFactory.GetInstance()
    if not factory.GetConverterRules():
        factory.RegisterConverterRule(slicer.vtkBinaryLabelmapToClosedSurfaceConversionRule())
        factory.RegisterConverterRule(slicer.vtkClosedSurfaceToBinaryLabelmapConversionRule())


def _new_scene(cache_directory: Path) -> Slicerish:
    scene = slicer.vtkMRMLScene()
    cache = slicer.vtkCacheManager()
    cache.SetRemoteCacheDirectory(str(cache_directory))
    data_io = slicer.vtkDataIOManager()
    data_io.SetCacheManager(cache)
    scene.SetCacheManager(cache)
    scene.SetDataIOManager(data_io)
    app_logic = slicer.vtkSlicerApplicationLogic()
    app_logic.SetMRMLScene(scene)
    color_logic = app_logic.GetColorLogic()
    color_logic.SetMRMLScene(scene)
    color_logic.AddDefaultColorNodes()
    app_logic.SetModuleLogic("Colors", color_logic)
    transform_logic = slicer.vtkSlicerTransformLogic()
    transform_logic.SetMRMLScene(scene)
    transform_logic.SetMRMLApplicationLogic(app_logic)
    _register_segmentation_converters()
    return Slicerish(scene, app_logic, transform_logic)


@pytest.fixture
def app(tmp_path: Path) -> Slicerish:
    return _new_scene(tmp_path / "cache")


@pytest.fixture
def scene(app: Slicerish) -> slicer.vtkMRMLScene:
    return app.scene


def _add_volume(
    scene,
    array: np.ndarray,
    origin=(0.0, 0.0, 0.0),
    directions=None,
    spacing=(1.0, 1.0, 1.0),
    name: str = "volume",
    class_name: str = "vtkMRMLScalarVolumeNode",
):
    """A volume node built with Slicer's own API (not ours), geometry in RAS."""
    node = scene.AddNewNodeByClass(class_name, name)
    slicer.util.updateVolumeFromArray(node, array)
    node.SetOrigin(*origin)
    node.SetSpacing(*spacing)
    matrix = vtk.vtkMatrix4x4()
    for r in range(3):
        for c in range(3):
            matrix.SetElement(r, c, (np.eye(3) if directions is None else directions)[r, c])
    node.SetIJKToRASDirectionMatrix(matrix)
    node.CreateDefaultDisplayNodes()
    return node


def _ijk_to_ras(node) -> np.ndarray:
    matrix = vtk.vtkMatrix4x4()
    node.GetIJKToRASMatrix(matrix)
    return np.array([[matrix.GetElement(r, c) for c in range(4)] for r in range(4)])


def _snapshot(scene) -> dict[str, tuple[str, int]]:
    """Every node's class and modification time: equal snapshots mean nothing was touched."""
    nodes = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
    return {n.GetID(): (n.GetClassName(), n.GetMTime()) for n in nodes}


def _ras(lps: np.ndarray) -> np.ndarray:
    return lps @ FLIP.T


def _blobs(points_lps: np.ndarray, centre_lps: np.ndarray) -> np.ndarray:
    """Two Gaussian blobs (a big one and an off-centre small one), smooth and asymmetric."""
    d = points_lps - centre_lps
    big = np.exp(-np.sum((d / [5.0, 4.0, 3.5]) ** 2, axis=-1))
    small = np.exp(-np.sum(((d - [4.0, -3.0, 1.0]) / 1.8) ** 2, axis=-1))
    return (100.0 * big + 40.0 * small).astype(np.float32)


FIXED_SIZE, FIXED_SPACING = (22, 20, 18), (0.9, 1.0, 1.1)
MOVING_SIZE, MOVING_SPACING = (30, 30, 30), (1.0, 1.1, 1.05)


def _pair(scene, shift_lps=(1.5, -1.0, 0.8)):
    """Oblique anisotropic fixed and axis-aligned moving volumes of the same blobs, moved by
    ``shift_lps``; the moving field of view holds the fixed one."""
    fixed_grid = Grid(FIXED_SIZE, FIXED_SPACING, (3.0, -7.0, 2.0), tuple(OBLIQUE.ravel()))
    centre = fixed_grid.index_to_physical_points((np.array(FIXED_SIZE) - 1) / 2.0)
    moving_origin = centre - (np.array(MOVING_SIZE) - 1) / 2.0 * np.array(MOVING_SPACING)
    moving_grid = Grid(MOVING_SIZE, MOVING_SPACING, tuple(moving_origin), tuple(np.eye(3).ravel()))
    fixed_array = _blobs(grid_points(fixed_grid), centre)
    moving_array = _blobs(grid_points(moving_grid), centre + np.asarray(shift_lps))
    fixed = _add_volume(scene, fixed_array, *_ras_geometry(fixed_grid), name="fixed")
    moving = _add_volume(scene, moving_array, *_ras_geometry(moving_grid), name="moving")
    return fixed, moving


def _ras_geometry(grid: Grid):
    return FLIP @ np.asarray(grid.origin), FLIP @ grid.direction_matrix, grid.spacing


_ROTATION = rotation_matrix((0.0, 0.0, 1.0), 4.0)
_SHIFT = (1.5, -1.0, 0.8)


def _ripple_on_lattice(grid: Grid, sign: float = 1.0) -> sitk.Image:
    """``v`` (or, ``sign`` −1, a stand-in for ``w``): a sine ripple ``sign · 0.7 sin(x / 4)``
    mm along S on a 2 mm lattice with ``grid``'s directions, as the engine hands it back (zero
    on its outermost nodes). The lattice covers only the middle of ``grid``, and no voxel of
    ``grid`` sits on one of its nodes."""
    origin = grid.index_to_physical_points(np.array([2.3, 1.7, 2.9]))
    lattice = Grid((9, 9, 8), (2.0, 2.0, 2.0), tuple(origin), grid.direction)
    ripple = np.zeros((*lattice.shape, 3))
    points = grid_points(lattice)[1:-1, 1:-1, 1:-1]
    ripple[1:-1, 1:-1, 1:-1, 2] = sign * 0.7 * np.sin(points[..., 0] / 4.0)
    return lattice.apply_to(sitk.GetImageFromArray(ripple, isVector=True))


def _hand_made_result(fixed_node, moving_node, inverse: bool = False) -> RegistrationResult:
    """What the engine would return for a small rotation and shift (the affine) and a ripple
    (``v``, :func:`_ripple_on_lattice`): the dense field in float32 as the engine computes it;
    and, asked for, an inverse ``[w, A⁻¹]`` with the opposite ripple as ``w`` (not the exact
    inverse: any will do to test pushing) and its dense field on the moving grid, float64."""
    fixed = mrml.imageFromVolumeNode(fixed_node)
    moving = mrml.imageFromVolumeNode(moving_node)
    grid = Grid.of(fixed)
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple(_ROTATION.ravel()))
    affine.SetTranslation(_SHIFT)
    deformation = _ripple_on_lattice(grid)
    transform = sitk.CompositeTransform([affine, displacement_transform(deformation)])
    displacement = sitk.Cast(
        displacement_on_grid(transform, grid.reference_image()), sitk.sitkVectorFloat32
    )
    warped = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    inverse_deformation = inverse_field = None
    if inverse:
        inverse_deformation = _ripple_on_lattice(grid, -1.0)
        undo = [displacement_transform(inverse_deformation), affine.GetInverse()]
        inverse_field = displacement_on_grid(sitk.CompositeTransform(undo), moving)  # float64
    return RegistrationResult(
        fixed_grid=grid,
        displacement=displacement,
        warped=warped,
        affine=affine,
        jacobian=metrics.jacobian_determinant(displacement),
        inverse_displacement=inverse_field,
        report={"runtime_s": 1.25, "device": "cpu", "folding_percent": 0.0, "timings": {"a": 1}},
        deformation=deformation,
        inverse_deformation=inverse_deformation,
    )


def _add_segmentation(scene, reference_node, masks: dict[str, np.ndarray], colors):
    """A segmentation built with Slicer's API from (K, J, I) masks on the reference's grid."""
    node = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "segmentation")
    node.CreateDefaultDisplayNodes()
    node.SetReferenceImageGeometryParameterFromVolumeNode(reference_node)
    ijk_to_ras = vtk.vtkMatrix4x4()
    reference_node.GetIJKToRASMatrix(ijk_to_ras)
    for (name, mask), color in zip(masks.items(), colors, strict=True):
        image = slicer.vtkOrientedImageData()
        image.SetDimensions(*reversed(mask.shape))
        image.AllocateScalars(vtk.VTK_UNSIGNED_CHAR, 1)
        vtk.util.numpy_support.vtk_to_numpy(image.GetPointData().GetScalars())[:] = mask.ravel()
        image.SetImageToWorldMatrix(ijk_to_ras)
        node.AddSegmentFromBinaryLabelmapRepresentation(image, name, color)
    node.GetSegmentation().CollapseBinaryLabelmaps(False)
    return node


def _blob_segmentation(scene, volume):
    mask = slicer.util.arrayFromVolume(volume) > 50
    return _add_segmentation(scene, volume, {"blob": mask.astype(np.uint8)}, [(0.9, 0.5, 0.1)])
