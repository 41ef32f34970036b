"""The MRML bridge against a real headless MRML scene (slicer-core): geometry, transforms, files,
scene round trips, atomic failure, views, and registration in this process end to end on a tiny
pair (the child-process path: test_process_runner.py)."""

from __future__ import annotations

import json
import math
import threading
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

import torch  # noqa: E402
import vtk  # noqa: E402  (after the skip: vtk comes with slicer-core)
from conftest import grid_points, rotation_matrix  # noqa: E402

from DeepRegisterLib import mrml  # noqa: E402
from DeepRegisterLib.errors import InputError, RegistrationCancelled  # noqa: E402
from DeepRegisterLib.imaging import fileio, metrics  # noqa: E402
from DeepRegisterLib.imaging.geometry import Grid  # noqa: E402
from DeepRegisterLib.mrml import push as mrml_push  # noqa: E402
from DeepRegisterLib.mrml.transforms import affineFromRAS  # noqa: E402
from DeepRegisterLib.registration.result import RegistrationResult, displacement_transform  # noqa: E402
from DeepRegisterLib.registration.settings import RegistrationSettings  # noqa: E402
from DeepRegisterLib.registration.warping import deformation_field  # noqa: E402

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


def _field(points_lps: np.ndarray) -> np.ndarray:
    """A known smooth displacement (LPS mm): small rotation + translation + a sine ripple."""
    angle = math.radians(4.0)
    rotation = np.array(
        [[math.cos(angle), -math.sin(angle), 0], [math.sin(angle), math.cos(angle), 0], [0, 0, 1]]
    )
    u = points_lps @ (rotation - np.eye(3)).T + [1.5, -1.0, 0.8]
    u[..., 2] += 0.7 * np.sin(points_lps[..., 0] / 4.0)
    return u


def _hand_made_result(fixed_node, moving_node, inverse: bool = False) -> RegistrationResult:
    """What the engine would return for the known field :func:`_field`."""
    fixed = mrml.imageFromVolumeNode(fixed_node)
    moving = mrml.imageFromVolumeNode(moving_node)
    grid = Grid.of(fixed)
    displacement = grid.apply_to(sitk.GetImageFromArray(_field(grid_points(grid)), isVector=True))
    warped = sitk.Resample(
        moving, fixed, displacement_transform(displacement), sitk.sitkLinear, 0.0, sitk.sitkFloat32
    )
    inverse_field = None
    if inverse:  # minus the field at the same points: any moving-grid field serves to test pushing
        moving_grid = Grid.of(moving)
        inverse_field = moving_grid.apply_to(
            sitk.GetImageFromArray(-_field(grid_points(moving_grid)), isVector=True)
        )
    jacobian = metrics.jacobian_determinant(displacement)
    return RegistrationResult(
        fixed_grid=grid,
        displacement=displacement,
        warped=warped,
        affine=sitk.AffineTransform(3),
        jacobian=jacobian,
        inverse_displacement=inverse_field,
        report={"runtime_s": 1.25, "device": "cpu", "folding_percent": 0.0, "timings": {"a": 1}},
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


# --- volumes ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("class_name", "dtype"),
    [("vtkMRMLScalarVolumeNode", np.float32), ("vtkMRMLLabelMapVolumeNode", np.uint16)],
)
def test_volume_round_trip_is_exact_on_an_oblique_anisotropic_grid(scene, class_name, dtype):
    rng = np.random.default_rng(1)
    array = rng.integers(0, 500, size=(5, 6, 7)).astype(dtype)
    origin, spacing = (10.5, -20.25, 33.0), (0.7, 1.3, 2.1)
    node = _add_volume(scene, array, origin, OBLIQUE, spacing, class_name=class_name)

    image = mrml.imageFromVolumeNode(node)

    assert image.GetSize() == (7, 6, 5)
    assert np.array_equal(sitk.GetArrayViewFromImage(image), array)
    assert sitk.GetArrayViewFromImage(image).dtype == dtype
    assert image.GetSpacing() == spacing
    assert image.GetOrigin() == (-10.5, 20.25, 33.0)
    assert np.array_equal(np.reshape(image.GetDirection(), (3, 3)), FLIP @ OBLIQUE)
    ijk = (3, 4, 2)
    ras = _ijk_to_ras(node) @ [*ijk, 1.0]
    assert np.allclose(image.TransformIndexToPhysicalPoint(ijk), FLIP @ ras[:3], atol=1e-12)

    copy = scene.AddNewNodeByClass(class_name, "copy")
    mrml.updateVolumeNodeFromImage(copy, image)
    assert np.array_equal(_ijk_to_ras(copy), _ijk_to_ras(node))
    assert np.array_equal(slicer.util.arrayFromVolume(copy), array)


def test_the_image_is_a_copy_of_the_voxels(scene):
    node = _add_volume(scene, np.zeros((4, 4, 4), np.float32))
    image = mrml.imageFromVolumeNode(node)
    slicer.util.arrayFromVolume(node)[:] = 7.0
    assert not sitk.GetArrayViewFromImage(image).any()


def test_unusable_volumes_are_refused(scene):
    empty = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "empty")
    with pytest.raises(InputError, match="no voxels"):
        mrml.imageFromVolumeNode(empty)
    vector = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "rgb")
    slicer.util.updateVolumeFromArray(vector, np.zeros((4, 4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="3 components"):
        mrml.imageFromVolumeNode(vector)
    with pytest.raises(InputError, match="3D"):
        mrml.updateVolumeNodeFromImage(empty, sitk.Image(4, 4, sitk.sitkFloat32))


# --- segmentations ---------------------------------------------------------------------------


def _three_segments(shape):
    a, b, c = (np.zeros(shape, np.uint8) for _ in range(3))
    a[1:4, 1:4, 1:4] = 1
    b[2:6, 2:6, 2:6] = 1  # overlaps a: goes to a second layer
    c[6:8, 0:2, 5:8] = 1
    return {"liver": a, "tumour": b, "vessel": c}


def test_segmentation_round_trip_keeps_ids_names_colours_and_overlaps(scene):
    volume = _add_volume(scene, np.zeros((9, 8, 10), np.float32), (5, 6, 7), OBLIQUE, (1, 2, 3))
    masks = _three_segments((9, 8, 10))
    colors = [(0.9, 0.1, 0.1), (0.1, 0.8, 0.2), (0.2, 0.3, 1.0)]
    segmentation = _add_segmentation(scene, volume, masks, colors)
    ids = segmentation.GetSegmentation().GetSegmentIDs()

    labels = mrml.segmentLabelsFromSegmentationNode(segmentation, volume)

    assert len(labels.layers) == 2
    assert [s.name for s in labels.segments] == list(masks)
    assert np.allclose([s.color for s in labels.segments], colors)
    for info, mask in zip(labels.segments, masks.values(), strict=True):
        assert np.array_equal(sitk.GetArrayFromImage(labels.binary(info.segmentId)), mask)

    copy = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "copy")
    mrml.updateSegmentationNodeFromSegmentLabels(copy, labels)
    assert copy.GetSegmentation().GetSegmentIDs() == ids
    assert copy.GetSegmentation().GetNumberOfLayers() == 2
    again = mrml.segmentLabelsFromSegmentationNode(copy, volume)
    for info, before in zip(again.segments, labels.segments, strict=True):
        assert (info.segmentId, info.name, info.color) == (
            before.segmentId,
            before.name,
            before.color,
        )
        assert np.array_equal(
            sitk.GetArrayFromImage(again.binary(info.segmentId)),
            sitk.GetArrayFromImage(labels.binary(info.segmentId)),
        )


def test_a_segmentation_under_a_transform_is_resampled_onto_the_reference(scene):
    volume = _add_volume(scene, np.zeros((6, 7, 8), np.float32), spacing=(1.0, 1.0, 1.0))
    mask = np.zeros((6, 7, 8), np.uint8)
    mask[2:4, 2:4, 2:4] = 1
    segmentation = _add_segmentation(scene, volume, {"cube": mask}, [(1, 0, 0)])
    shift = scene.AddNewNodeByClass("vtkMRMLTransformNode", "shift")
    matrix = vtk.vtkMatrix4x4()
    matrix.SetElement(0, 3, 2.0)  # the segmentation is shown 2 mm to the right (+I)
    shift.SetMatrixTransformToParent(matrix)
    segmentation.SetAndObserveTransformNodeID(shift.GetID())

    labels = mrml.segmentLabelsFromSegmentationNode(segmentation, volume)

    expected = np.zeros_like(mask)
    expected[2:4, 2:4, 4:6] = 1
    assert np.array_equal(
        sitk.GetArrayFromImage(labels.binary(labels.segments[0].segmentId)), expected
    )


def test_a_closed_surface_segmentation_is_converted_without_changing_the_node(scene):
    volume = _add_volume(scene, np.zeros((12, 12, 12), np.float32))
    mask = np.zeros((12, 12, 12), np.uint8)
    mask[3:9, 3:9, 3:9] = 1
    segmentation = _add_segmentation(scene, volume, {"box": mask}, [(0, 1, 0)])
    segmentation.CreateClosedSurfaceRepresentation()
    segmentation.GetSegmentation().SetSourceRepresentationName(
        slicer.vtkSegmentationConverter.GetClosedSurfaceRepresentationName()
    )
    segmentation.GetSegmentation().GetSegment(
        segmentation.GetSegmentation().GetNthSegmentID(0)
    ).RemoveRepresentation(BINARY)
    before = _snapshot(scene)

    labels = mrml.segmentLabelsFromSegmentationNode(segmentation, volume)

    box = sitk.GetArrayFromImage(labels.binary(labels.segments[0].segmentId))
    assert abs(int(box.sum()) - int(mask.sum())) < 0.3 * mask.sum()
    assert _snapshot(scene) == before


# --- transforms ------------------------------------------------------------------------------


def test_the_grid_transform_maps_points_like_the_itk_field(scene):
    fixed, moving = _pair(scene)
    result = _hand_made_result(fixed, moving)

    nodes = mrml.pushResult(result, fixed, moving)

    transform = nodes.transformNode.GetTransformFromParent()
    assert nodes.transformNode.GetClassName() == "vtkMRMLTransformNode"
    assert transform.IsA("vtkOrientedGridTransform")
    itk = result.transform()
    rng = np.random.default_rng(0)
    index = rng.uniform(1, np.array(FIXED_SIZE) - 2, size=(25, 3))  # off-grid, inside
    for p in Grid.of(result.displacement).index_to_physical_points(index):
        expected = FLIP @ np.asarray(itk.TransformPoint(tuple(p)))
        assert np.allclose(transform.TransformPoint(tuple(FLIP @ p)), expected, atol=1e-6)
    vectors = slicer.util.arrayFromGridTransform(nodes.transformNode)
    assert np.allclose(vectors, _ras(sitk.GetArrayViewFromImage(result.displacement)), atol=1e-12)


def test_pushing_creates_the_transform_with_references_and_qa(scene):
    fixed, moving = _pair(scene)
    result = _hand_made_result(fixed, moving, inverse=True)

    nodes = mrml.pushResult(result, fixed, moving)

    transform_node = nodes.transformNode
    fixed_role = slicer.vtkMRMLTransformNode.GetFixedNodeReferenceRole()
    moving_role = slicer.vtkMRMLTransformNode.GetMovingNodeReferenceRole()
    assert transform_node.GetNodeReference(fixed_role) is fixed
    assert transform_node.GetNodeReference(moving_role) is moving
    assert moving.GetTransformNodeID() == transform_node.GetID()  # no output volume chosen
    assert nodes.volumeNode is None
    assert json.loads(transform_node.GetAttribute(mrml.REPORT_ATTRIBUTE)) == result.report

    inverse = nodes.inverseTransformNode
    assert inverse.GetNodeReference(fixed_role) is moving
    assert inverse.GetNodeReference(moving_role) is fixed
    y = Grid.of(result.inverse_displacement).index_to_physical_points(np.array([4.0, 5.0, 6.0]))
    expected = FLIP @ (y - _field(y))
    assert np.allclose(inverse.GetTransformFromParent().TransformPoint(FLIP @ y), expected)

    jacobian = nodes.jacobianVolumeNode
    assert np.array_equal(_ijk_to_ras(jacobian), _ijk_to_ras(fixed))
    assert np.allclose(
        slicer.util.arrayFromVolume(jacobian), sitk.GetArrayViewFromImage(result.jacobian)
    )
    table = nodes.reportTableNode.GetTable()
    rows = {
        table.GetValue(r, 0).ToString(): table.GetValue(r, 1).ToString()
        for r in range(table.GetNumberOfRows())
    }
    assert rows == {"runtime_s": "1.25", "device": "cpu", "folding_percent": "0", "timings.a": "1"}


def test_running_into_the_same_transform_updates_its_qa_nodes(scene):
    fixed, moving = _pair(scene)
    first = mrml.pushResult(_hand_made_result(fixed, moving, inverse=True), fixed, moving)
    count = scene.GetNumberOfNodes()

    second = mrml.pushResult(
        _hand_made_result(fixed, moving, inverse=True), fixed, moving, first.transformNode
    )

    assert scene.GetNumberOfNodes() == count
    assert second.jacobianVolumeNode is first.jacobianVolumeNode
    assert second.inverseTransformNode is first.inverseTransformNode
    assert second.reportTableNode is first.reportTableNode


def test_outputs_follow_the_fixed_volumes_parent_transform(scene):
    fixed, moving = _pair(scene)
    parent = scene.AddNewNodeByClass("vtkMRMLTransformNode", "fixed parent")
    fixed.SetAndObserveTransformNodeID(parent.GetID())

    nodes = mrml.pushResult(
        _hand_made_result(fixed, moving), fixed, moving, createOutputVolume=True
    )

    assert nodes.transformNode.GetTransformNodeID() == parent.GetID()
    assert nodes.volumeNode.GetTransformNodeID() == parent.GetID()
    assert moving.GetTransformNodeID() is None
    with pytest.raises(InputError, match="parent transform of the fixed volume"):
        mrml.pushResult(_hand_made_result(fixed, moving), fixed, moving, parent)


def test_label_maps_come_back_as_label_maps_on_the_fixed_grid(scene):
    fixed, moving = _pair(scene)
    labels = (slicer.util.arrayFromVolume(moving) > 50).astype(np.int16) * 7
    label_map = _add_volume(scene, labels, name="labels", class_name="vtkMRMLLabelMapVolumeNode")
    label_map.CopyOrientation(moving)
    label_map.GetDisplayNode().SetAndObserveColorNodeID("vtkMRMLColorTableNodeLabels")
    result = _hand_made_result(fixed, moving)
    job = mrml.prepareRegistration(fixed, moving, movingLabelNodes=[label_map])
    assert list(job.labelImages) == [label_map.GetID()]
    result.warped_labels = {
        key: sitk.Resample(image, result.warped, result.transform(), sitk.sitkNearestNeighbor)
        for key, image in job.labelImages.items()
    }
    result.warped_labels["extra"] = result.warped_labels[label_map.GetID()]  # labels we don't know

    nodes = mrml.pushResult(result, fixed, moving, movingLabelNodes=[label_map])

    warped, extra = nodes.labelNodes
    assert warped.GetClassName() == "vtkMRMLLabelMapVolumeNode"
    assert warped.GetName() == "labels warped"
    assert extra.GetName() == "extra warped"
    assert np.array_equal(_ijk_to_ras(warped), _ijk_to_ras(fixed))
    assert warped.GetDisplayNode().GetColorNodeID() == "vtkMRMLColorTableNodeLabels"
    expected = sitk.GetArrayFromImage(result.warped_labels[label_map.GetID()])
    assert np.array_equal(slicer.util.arrayFromVolume(warped), expected)
    assert set(np.unique(expected)) == {0, 7}


def test_the_initial_transform_is_what_the_views_show(scene):
    fixed, moving = _pair(scene)
    initial = scene.AddNewNodeByClass("vtkMRMLTransformNode", "initial")
    to_parent = vtk.vtkMatrix4x4()
    to_parent.SetElement(0, 3, 5.0)  # the moving volume under it is shown 5 mm to the right
    initial.SetMatrixTransformToParent(to_parent)

    job = mrml.prepareRegistration(fixed, moving, initialTransformNode=initial)

    # A fixed point x shows the moving point 5 mm to its left: +5 along L in LPS.
    assert np.allclose(job.initialTransform.TransformPoint((1.0, 2.0, 3.0)), (6.0, 2.0, 3.0))
    grid = scene.AddNewNodeByClass("vtkMRMLTransformNode", "deformable")
    grid.SetAndObserveTransformFromParent(mrml.gridTransformFromDisplacement(
        _hand_made_result(fixed, moving).displacement
    ))  # fmt: skip
    with pytest.raises(InputError, match="must be linear"):
        mrml.prepareRegistration(fixed, moving, initialTransformNode=grid)


def _rigid(axis, degrees: float, translation) -> np.ndarray:
    matrix = np.eye(4)
    matrix[:3, :3] = rotation_matrix(axis, degrees)
    matrix[:3, 3] = translation
    return matrix


def _linear_transform_node(scene, name: str, to_parent: np.ndarray, parent=None):
    node = scene.AddNewNodeByClass("vtkMRMLTransformNode", name)
    node.SetMatrixTransformToParent(slicer.util.vtkMatrixFromArray(to_parent))
    node.SetAndObserveTransformNodeID(None if parent is None else parent.GetID())
    return node


def _resliced(moving_node, fixed_ijk_to_moving_ijk, size) -> np.ndarray:
    """The moving voxels sampled (VTK, linear) at the moving indices of each fixed index; the
    map is a VTK transform or a 4×4 matrix."""
    transform = fixed_ijk_to_moving_ijk
    if isinstance(transform, np.ndarray):
        transform = vtk.vtkTransform()
        transform.SetMatrix(slicer.util.vtkMatrixFromArray(fixed_ijk_to_moving_ijk))
    reslice = vtk.vtkImageReslice()
    reslice.SetInputData(moving_node.GetImageData())
    reslice.SetResliceTransform(transform)
    reslice.SetInterpolationModeToLinear()
    reslice.SetOutputExtent(0, size[0] - 1, 0, size[1] - 1, 0, size[2] - 1)
    reslice.SetOutputSpacing(1, 1, 1)
    reslice.SetOutputOrigin(0, 0, 0)
    reslice.Update()
    scalars = reslice.GetOutput().GetPointData().GetScalars()
    return vtk.util.numpy_support.vtk_to_numpy(scalars).reshape(tuple(reversed(size)))


def test_a_rotated_initial_transform_is_read_across_parent_transforms(scene):
    fixed, moving = _pair(scene)  # the fixed volume is oblique and anisotropic
    fixed_parent_matrix = _rigid((0.0, 0.0, 1.0), 10.0, (2.0, -3.0, 4.0))
    initial_matrix = _rigid((1.0, -2.0, 0.5), 30.0, (5.0, 1.0, -2.0))
    initial_parent_matrix = _rigid((0.3, 1.0, 0.0), -12.0, (-1.0, 0.5, 2.5))
    fixed_parent = _linear_transform_node(scene, "fixed parent", fixed_parent_matrix)
    initial_parent = _linear_transform_node(scene, "initial parent", initial_parent_matrix)
    initial = _linear_transform_node(scene, "initial", initial_matrix, initial_parent)
    fixed.SetAndObserveTransformNodeID(fixed_parent.GetID())

    job = mrml.prepareRegistration(fixed, moving, initialTransformNode=initial)

    # A fixed-local point x is at P x in the world, where the moving volume placed under the
    # initial transform shows its local point (Q I)⁻¹ P x. ITK wants that map in LPS.
    expected = np.linalg.inv(initial_parent_matrix @ initial_matrix) @ fixed_parent_matrix
    points = grid_points(Grid.of(job.fixed)).reshape(-1, 3)
    mapped = np.array([job.initialTransform.TransformPoint(tuple(p)) for p in points[::41]])
    assert np.allclose(mapped, _ras(_ras(points[::41]) @ expected[:3, :3].T + expected[:3, 3]))
    lps_matrix = (FLIP @ expected[:3, :3] @ FLIP).ravel()
    assert np.allclose(affineFromRAS(expected).GetMatrix(), lps_matrix)
    # The voxels: ITK resampling through it shows what VTK shows of the moving volume.
    resampled = sitk.Resample(job.moving, job.fixed, job.initialTransform, sitk.sitkLinear, 0.0)
    fixed_to_moving_ijk = np.linalg.inv(_ijk_to_ras(moving)) @ expected @ _ijk_to_ras(fixed)
    shown = _resliced(moving, fixed_to_moving_ijk, FIXED_SIZE)
    all_mapped = _ras(_ras(points) @ expected[:3, :3].T + expected[:3, 3])
    inside = _inside(job.moving, all_mapped, 1.0).reshape(shown.shape)
    assert inside.sum() > 1000
    difference = np.abs(sitk.GetArrayViewFromImage(resampled) - shown)[inside]
    assert difference.max() < 1e-3 * shown.max()


def test_settings_come_as_an_object_a_preset_name_or_their_field_names(scene):
    fixed, moving = _pair(scene)
    settings = RegistrationSettings(preset="fast", compute_inverse=True, device="cpu")

    by_name = mrml.prepareRegistration(fixed, moving, "fast", compute_inverse=True, device="cpu")
    by_object = mrml.prepareRegistration(fixed, moving, settings)
    overridden = mrml.prepareRegistration(fixed, moving, settings, compute_inverse=False)

    # No node receives a warped volume: none is made.
    assert by_name.settings == by_object.settings == settings.replace(compute_warped=False)
    assert overridden.settings == settings.replace(compute_inverse=False, compute_warped=False)
    wanted = mrml.prepareRegistration(fixed, moving, settings, createOutputVolume=True)
    assert wanted.settings == settings


def test_a_segmentation_mask_is_the_union_of_its_segments_on_the_volume_grid(scene):
    fixed, moving = _pair(scene)
    shape = slicer.util.arrayFromVolume(fixed).shape
    masks = _three_segments(shape)
    segmentation = _add_segmentation(scene, fixed, masks, [(1, 0, 0)] * 3)
    union = np.logical_or.reduce(list(masks.values())).astype(np.uint8)

    job = mrml.prepareRegistration(fixed, moving, fixedMaskNode=segmentation)

    assert np.array_equal(sitk.GetArrayFromImage(job.fixedMask), union)
    assert Grid.of(job.fixedMask) == Grid.of(job.fixed)


def _resliced_onto_fixed(moving_node, fixed_node) -> np.ndarray:
    """The moving voxels seen through their parent transform, sampled on the fixed grid (VTK)."""
    to_moving = vtk.vtkGeneralTransform()
    slicer.vtkMRMLTransformNode.GetTransformBetweenNodes(
        None, moving_node.GetParentTransformNode(), to_moving
    )
    fixed_to_world, world_to_moving_ijk = vtk.vtkMatrix4x4(), vtk.vtkMatrix4x4()
    fixed_node.GetIJKToRASMatrix(fixed_to_world)
    moving_node.GetRASToIJKMatrix(world_to_moving_ijk)
    reslice_transform = vtk.vtkGeneralTransform()
    reslice_transform.PostMultiply()
    reslice_transform.Concatenate(fixed_to_world)
    reslice_transform.Concatenate(to_moving)
    reslice_transform.Concatenate(world_to_moving_ijk)
    return _resliced(moving_node, reslice_transform, fixed_node.GetImageData().GetDimensions())


def _inside(image: sitk.Image, points: np.ndarray, margin: float) -> np.ndarray:
    """Which LPS points (…, 3) lie at least ``margin`` voxels inside the image's voxel centres."""
    a, b = Grid.of(image).physical_to_index_affine()
    index = points @ a.T + b
    return np.all((index >= margin) & (index <= np.array(image.GetSize()) - 1 - margin), axis=-1)


def test_the_moving_volume_under_our_transform_shows_our_warped_volume(app):
    fixed, moving = _pair(app.scene)
    result = _hand_made_result(fixed, moving)
    nodes = mrml.pushResult(result, fixed, moving)
    warped = sitk.GetArrayViewFromImage(result.warped)

    resliced = _resliced_onto_fixed(moving, fixed)  # keeps the fixed grid
    assert np.abs(resliced - warped).max() < 1e-3 * warped.max()

    moving_image = mrml.imageFromVolumeNode(moving)
    assert app.transform_logic.hardenTransform(moving)
    assert moving.GetTransformNodeID() is None
    assert nodes.transformNode.GetNodeReference("spatialRegistrationMoving") is moving
    hardened = mrml.imageFromVolumeNode(moving)  # re-gridded by Slicer to the transformed bounds
    expected = sitk.Resample(moving_image, hardened, result.transform(), sitk.sitkLinear, 0.0)
    # Compare where the field is defined (inside the fixed grid) and samples inside the moving
    # image: outside, ITK (zero displacement) and VTK (edge displacement) extend it differently.
    field = sitk.TransformToDisplacementField(
        result.transform(), sitk.sitkVectorFloat64, hardened.GetSize(), hardened.GetOrigin(),
        hardened.GetSpacing(), hardened.GetDirection(),
    )  # fmt: skip
    points = grid_points(Grid.of(hardened))
    mapped = points + sitk.GetArrayFromImage(field)
    inside = _inside(result.warped, points, 0.0) & _inside(moving_image, mapped, 1.0)
    difference = np.abs(sitk.GetArrayViewFromImage(hardened) - sitk.GetArrayViewFromImage(expected))
    assert inside.sum() > 2000
    assert difference[inside].max() < 1e-3 * warped.max()


def test_slicers_h5_file_is_read_by_simpleitk_and_maps_points_as_ours(scene, tmp_path):
    fixed, moving = _pair(scene)
    result = _hand_made_result(fixed, moving)
    transform_node = mrml.pushResult(result, fixed, moving).transformNode
    storage = slicer.vtkMRMLTransformStorageNode()
    storage.SetFileName(str(tmp_path / "field.h5"))
    assert storage.WriteData(transform_node)

    read_back = sitk.ReadTransform(str(tmp_path / "field.h5"))

    ours = result.transform()
    index = np.random.default_rng(3).uniform(1, np.array(FIXED_SIZE) - 2, size=(25, 3))
    for p in Grid.of(result.displacement).index_to_physical_points(index):
        assert np.allclose(
            read_back.TransformPoint(tuple(p)), ours.TransformPoint(tuple(p)), atol=1e-6
        )


def test_slicer_reads_our_composite_h5_and_maps_its_grid_nodes_as_we_do(scene, tmp_path):
    """``--transform t.h5`` is ``[A, v]`` with ``v`` on the network grid. Slicer loads it as a
    general transform; at the field's nodes it maps points as ITK does. (Between nodes Slicer
    interpolates a grid read from a file cubically, ITK and we linearly: the README says so.)"""
    grid = Grid((10, 9, 8), (2.0, 2.0, 2.0), (-9.0, -8.0, -7.0), tuple(OBLIQUE.ravel()))
    v = torch.randn((1, 3, *grid.shape), generator=torch.Generator().manual_seed(5))
    affine = sitk.AffineTransform(3)
    affine.SetMatrix(tuple((OBLIQUE @ np.diag([1.05, 0.97, 1.02])).ravel()))
    affine.SetTranslation((2.0, -1.0, 3.0))
    ours = sitk.CompositeTransform([affine, displacement_transform(deformation_field(v, grid))])
    fileio.write_transform(ours, tmp_path / "t.h5")

    node = scene.AddNewNodeByClass("vtkMRMLTransformNode")
    storage = scene.AddNewNodeByClass("vtkMRMLTransformStorageNode")
    storage.SetFileName(str(tmp_path / "t.h5"))
    assert storage.ReadData(node)
    from_parent = node.GetTransformFromParent()  # ITK's resampling direction: fixed → moving
    nodes = grid.index_to_physical_points(np.stack(np.meshgrid(*map(np.arange, grid.size)), -1))
    far = grid.index_to_physical_points(np.array([[-5.0, 3.0, 2.0], [14.0, 20.0, -6.0]]))
    for p in [*nodes.reshape(-1, 3)[::7], *far]:  # far: the affine alone, no field there
        expected = ours.TransformPoint(tuple(p))
        assert np.allclose(FLIP @ from_parent.TransformPoint(tuple(FLIP @ p)), expected, atol=1e-6)


# --- scenes on disk --------------------------------------------------------------------------


def _push_everything(scene):
    fixed, moving = _pair(scene)
    fixed_node = fixed
    masks = {"blob": np.zeros(slicer.util.arrayFromVolume(moving).shape, np.uint8)}
    masks["blob"][5:12, 6:14, 4:12] = 1
    segmentation = _add_segmentation(scene, moving, masks, [(0.2, 0.6, 0.9)])
    result = _hand_made_result(fixed_node, moving, inverse=True)
    job = mrml.prepareRegistration(fixed_node, moving, movingLabelNodes=[segmentation])
    result.warped_labels = {  # what the engine gives for the job's label images
        key: sitk.Resample(image, result.warped, result.transform(), sitk.sitkNearestNeighbor)
        for key, image in job.labelImages.items()
    }
    nodes = mrml.pushResult(result, fixed_node, moving, movingLabelNodes=[segmentation])
    return nodes, fixed_node, moving


def _save_as_mrml(scene, folder: Path) -> Path:
    for index in range(scene.GetNumberOfNodes()):
        node = scene.GetNthNode(index)
        if node.IsA("vtkMRMLStorableNode") and not node.IsA("vtkMRMLColorNode"):
            if node.GetStorageNode() is None:
                node.AddDefaultStorageNode()
            storage = node.GetStorageNode()
            extension = storage.GetDefaultWriteFileExtension()
            storage.SetFileName(str(folder / f"{node.GetID()}.{extension}"))
            assert storage.WriteData(node), node.GetName()
    scene.SetRootDirectory(str(folder))
    scene.SetURL(str(folder / "scene.mrml"))
    assert scene.Commit()
    return folder / "scene.mrml"


@pytest.mark.parametrize("kind", ["mrml", "mrb"])
def test_the_scene_saved_and_read_back_has_every_node_intact(app, tmp_path, kind):
    nodes, fixed, _ = _push_everything(app.scene)
    folder = tmp_path / "saved"
    folder.mkdir()
    if kind == "mrml":
        path = _save_as_mrml(app.scene, folder)
    else:
        path = folder / "scene.mrb"
        assert app.scene.WriteToMRB(str(path))

    other = _new_scene(tmp_path / "cache2").scene
    if kind == "mrml":
        other.SetURL(str(path))
        assert other.Import()
    else:
        assert other.ReadFromMRB(str(path))

    def named(name):
        found = other.GetFirstNodeByName(name)
        assert found is not None, name
        return found

    transform_node = named(nodes.transformNode.GetName())
    assert transform_node.GetNodeReference("spatialRegistrationFixed") is named("fixed")
    assert named("moving").GetTransformNodeID() == transform_node.GetID()
    assert np.allclose(
        slicer.util.arrayFromGridTransform(transform_node),
        slicer.util.arrayFromGridTransform(nodes.transformNode),
        atol=1e-9,
    )
    assert transform_node.GetAttribute(mrml.REPORT_ATTRIBUTE) == nodes.transformNode.GetAttribute(
        mrml.REPORT_ATTRIBUTE
    )
    for original in (nodes.jacobianVolumeNode, fixed):
        copy = named(original.GetName())
        assert np.allclose(_ijk_to_ras(copy), _ijk_to_ras(original), atol=1e-9)
        assert np.allclose(
            slicer.util.arrayFromVolume(copy), slicer.util.arrayFromVolume(original), atol=1e-5
        )
    inverse = named(nodes.inverseTransformNode.GetName())
    assert transform_node.GetNodeReference(mrml.INVERSE_TRANSFORM_ROLE) is inverse
    segmentation = named(nodes.labelNodes[0].GetName()).GetSegmentation()
    segment = segmentation.GetNthSegment(0)
    assert (segment.GetName(), tuple(np.round(segment.GetColor(), 3))) == ("blob", (0.2, 0.6, 0.9))
    table = named(nodes.reportTableNode.GetName()).GetTable()
    assert table.GetNumberOfRows() == nodes.reportTableNode.GetTable().GetNumberOfRows()


# --- atomicity -------------------------------------------------------------------------------


def test_bad_input_changes_nothing(scene):
    fixed, moving = _pair(scene)
    before = _snapshot(scene)
    with pytest.raises(InputError, match="different volumes"):
        mrml.registerVolumes(fixed, fixed)
    with pytest.raises(InputError, match="must not be the fixed volume"):
        mrml.registerVolumes(fixed, moving, outputVolumeNode=fixed)
    with pytest.raises(InputError, match="must not be the moving volume"):
        mrml.registerVolumes(fixed, moving, outputVolumeNode=moving)
    with pytest.raises(InputError, match="must not be the moving volume"):
        mrml.pushResult(_hand_made_result(fixed, moving), fixed, moving, None, moving)
    with pytest.raises(InputError, match="unknown setting"):
        mrml.registerVolumes(fixed, moving, "fast", computeInverse=True)
    with pytest.raises(InputError, match="unknown preset"):
        mrml.registerVolumes(fixed, moving, "quick")
    with pytest.raises(InputError, match="another grid"):
        mrml.pushResult(_hand_made_result(moving, fixed), fixed, moving)
    assert _snapshot(scene) == before


def test_failed_and_cancelled_runs_change_nothing(scene):
    fixed, moving = _pair(scene)
    constant = _add_volume(scene, np.full((8, 8, 8), 3.0, np.float32), name="constant")
    before = _snapshot(scene)

    with pytest.raises(InputError):
        mrml.registerVolumes(fixed, constant, "fast", createOutputVolume=True, device="cpu")
    cancel = threading.Event()
    cancel.set()
    with pytest.raises(RegistrationCancelled):
        mrml.registerVolumes(fixed, moving, "fast", cancel=cancel, device="cpu")

    assert _snapshot(scene) == before


def test_a_push_failing_half_way_puts_the_scene_back(scene, monkeypatch):
    fixed, moving = _pair(scene)
    output = _add_volume(scene, np.ones((3, 4, 5), np.float32), (1, 2, 3), name="previous output")
    output_transform = scene.AddNewNodeByClass("vtkMRMLTransformNode", "previous transform")
    before = _snapshot(scene)
    display = output.GetDisplayNode()
    output_before = (_ijk_to_ras(output), slicer.util.arrayFromVolume(output).copy())
    display_before = (display.GetWindow(), display.GetLevel(), display.GetColorNodeID())
    assert output_transform.IsLinear()

    def failing(*args):
        raise RuntimeError("disk full")

    monkeypatch.setattr(mrml_push, "_fillReportTable", failing)  # the last step of a push
    with pytest.raises(RuntimeError, match="disk full"):
        mrml.pushResult(
            _hand_made_result(fixed, moving, inverse=True), fixed, moving, output_transform, output
        )

    assert before.keys() == _snapshot(scene).keys()
    changed = (output.GetID(), display.GetID(), output_transform.GetID())  # restored, not untouched
    untouched = {i: v for i, v in before.items() if i not in changed}
    assert {i: _snapshot(scene)[i] for i in untouched} == untouched
    assert np.array_equal(_ijk_to_ras(output), output_before[0])
    assert np.array_equal(slicer.util.arrayFromVolume(output), output_before[1])
    assert (display.GetWindow(), display.GetLevel(), display.GetColorNodeID()) == display_before
    assert output_transform.IsLinear()
    assert output_transform.GetNodeReference(mrml.JACOBIAN_VOLUME_ROLE) is None


# --- registration end to end ------------------------------------------------------------------


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2.0 * np.count_nonzero(a & b) / (np.count_nonzero(a) + np.count_nonzero(b))


def _blob_segmentation(scene, volume):
    mask = slicer.util.arrayFromVolume(volume) > 50
    return _add_segmentation(scene, volume, {"blob": mask.astype(np.uint8)}, [(0.9, 0.5, 0.1)])


def test_register_volumes_end_to_end(scene):
    fixed, moving = _pair(scene)
    segmentation = _blob_segmentation(scene, moving)
    fixed_blob = slicer.util.arrayFromVolume(fixed) > 50

    itk_threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()

    nodes = mrml.registerVolumes(
        fixed, moving, "fast", createOutputVolume=True, movingLabelNodes=[segmentation],
        device="cpu",
    )  # fmt: skip

    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == itk_threads  # Slicer's own
    assert nodes.report["settings"]["preset"] == "fast"

    report = nodes.report
    assert report["ncc_after"] > report["ncc_before"]
    assert report["folding_percent"] == 0.0
    assert np.abs(slicer.util.arrayFromGridTransform(nodes.transformNode)).max() > 0.5
    assert np.array_equal(_ijk_to_ras(nodes.volumeNode), _ijk_to_ras(fixed))
    assert moving.GetTransformNodeID() is None  # a warped volume was made instead
    warped_segmentation = nodes.labelNodes[0]
    assert warped_segmentation.GetSegmentation().GetNthSegment(0).GetName() == "blob"
    labels = mrml.segmentLabelsFromSegmentationNode(warped_segmentation, fixed)
    warped_blob = sitk.GetArrayFromImage(labels.binary(labels.segments[0].segmentId)) > 0
    moving_blob = mrml.segmentLabelsFromSegmentationNode(segmentation, fixed)  # not registered
    before = sitk.GetArrayViewFromImage(moving_blob.layers[0]) > 0
    assert _dice(warped_blob, fixed_blob) > _dice(before, fixed_blob) + 0.05


def test_checkerboard_volume_alternates_fixed_and_warped_tiles(scene):
    fixed = _add_volume(scene, np.zeros((8, 8, 8), np.float32), name="fixed")
    warped = _add_volume(scene, np.arange(512, dtype=np.float32).reshape(8, 8, 8), name="warped")
    node = mrml.createCheckerboardVolume(fixed, warped, tiles=2)
    array = slicer.util.arrayFromVolume(node)
    assert not array[:4, :4, :4].any()
    assert array[:4, :4, 4:].any()
    assert np.array_equal(_ijk_to_ras(node), _ijk_to_ras(fixed))


def test_the_difference_view_puts_back_each_views_compositing(scene):
    composite = slicer.vtkMRMLSliceCompositeNode
    views = [scene.AddNewNodeByClass("vtkMRMLSliceCompositeNode") for _ in range(3)]
    modes = (composite.Alpha, composite.Add, composite.ReverseAlpha)
    for view, mode in zip(views, modes, strict=True):
        view.SetCompositing(mode)
    compositing = mrml.SliceCompositing()

    compositing.override(views, composite.Subtract)
    compositing.override(views, composite.Subtract)  # the difference shown twice
    assert {view.GetCompositing() for view in views} == {composite.Subtract}
    compositing.restore(views)
    compositing.restore(views)  # another view shown after that: nothing left to put back

    assert tuple(view.GetCompositing() for view in views) == modes
