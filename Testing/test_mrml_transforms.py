"""The MRML bridge's transforms against a real headless MRML scene (slicer-core): the pushed
grid transform, its references and QA nodes, outputs under the fixed volume's parent, warped
label maps, initial transforms read across parent transforms, and transform files shared with
SimpleITK."""

from __future__ import annotations

import json

import numpy as np
import pytest
import SimpleITK as sitk

mrml_scenes = pytest.importorskip("mrml_scenes")  # skips without slicer-core

import slicer  # noqa: E402
import torch  # noqa: E402
import vtk  # noqa: E402  (after the skip: vtk comes with slicer-core)
from conftest import grid_points, rotation_matrix  # noqa: E402
from mrml_scenes import (  # noqa: E402
    FIXED_SIZE,
    FLIP,
    OBLIQUE,
    _add_volume,
    _hand_made_result,
    _ijk_to_ras,
    _pair,
    _ras,
)

from DeepRegisterLib import mrml  # noqa: E402
from DeepRegisterLib.errors import InputError  # noqa: E402
from DeepRegisterLib.imaging import fileio  # noqa: E402
from DeepRegisterLib.imaging.geometry import Grid  # noqa: E402
from DeepRegisterLib.mrml.transforms import affineFromRAS  # noqa: E402
from DeepRegisterLib.registration.result import displacement_transform  # noqa: E402
from DeepRegisterLib.registration.warping import deformation_field  # noqa: E402

# The shared fixtures, bound here for pytest to find (imported, they would be flagged as
# redefined by the test functions' arguments).
app = mrml_scenes.app
scene = mrml_scenes.scene


# --- transforms ------------------------------------------------------------------------------


def test_the_grid_transform_maps_points_like_the_itk_field(scene):
    """The node holds ``A(x + v(x)) − x`` on v's 2 mm lattice, not the dense field: the same
    map under linear interpolation, between voxels and at every voxel of the fixed volume."""
    fixed, moving = _pair(scene)
    result = _hand_made_result(fixed, moving)

    nodes = mrml.pushResult(result, fixed, moving)

    transform = nodes.transformNode.GetTransformFromParent()
    assert nodes.transformNode.GetClassName() == "vtkMRMLTransformNode"
    assert transform.IsA("vtkOrientedGridTransform")
    assert transform.GetInterpolationMode() == 1  # linear, as ITK: VTK_LINEAR_INTERPOLATION
    itk = result.transform()
    rng = np.random.default_rng(0)
    index = rng.uniform(0, np.array(FIXED_SIZE) - 1, size=(25, 3))  # off-grid, inside
    for p in Grid.of(result.displacement).index_to_physical_points(index):
        expected = FLIP @ np.asarray(itk.TransformPoint(tuple(p)))
        assert np.allclose(transform.TransformPoint(tuple(FLIP @ p)), expected, atol=1e-5)
    points = grid_points(result.fixed_grid).reshape(-1, 3)
    mapped = np.array([transform.TransformPoint(tuple(FLIP @ p)) for p in points]) @ FLIP
    dense = sitk.GetArrayViewFromImage(result.displacement).reshape(-1, 3)
    np.testing.assert_allclose(mapped - points, dense, atol=1e-5)
    vectors = slicer.util.arrayFromGridTransform(nodes.transformNode)
    assert vectors.dtype == np.float32  # as the engine computes: half the memory of double
    assert transform.GetDisplacementGrid().GetSpacing() == (2.0, 2.0, 2.0)
    assert vectors.shape == (11, 11, 12, 3)  # nodes (K, J, I), for 18 × 20 × 22 voxels


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
    # [w, A⁻¹] as it is, not its dense field: A⁻¹ then w's grid, interpolated as ITK does.
    held = inverse.GetTransformFromParent()
    assert held.IsA("vtkGeneralTransform")
    held.Update()
    linear, grid = (held.GetConcatenatedTransform(i) for i in range(2))
    assert held.GetNumberOfConcatenatedTransforms() == 2
    assert linear.IsA("vtkLinearTransform")
    assert grid.IsA("vtkOrientedGridTransform")
    assert grid.GetInterpolationMode() == 1  # linear
    moving_grid = Grid.of(result.inverse_displacement)
    index = np.random.default_rng(1).uniform(0, np.array(moving_grid.size) - 1, (40, 3))
    itk = result.inverse_transform()
    for y in moving_grid.index_to_physical_points(index):
        expected = FLIP @ np.asarray(itk.TransformPoint(tuple(y)))
        assert np.allclose(held.TransformPoint(FLIP @ y), expected, atol=1e-9)
        assert abs(np.asarray(itk.TransformPoint(tuple(y))) - y).max() > 0.5  # not identity

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


def test_new_volumes_show_with_fixed_windows_their_sources_and_det_j_call_for(scene):
    fixed, moving = _pair(scene)
    moving_display = moving.GetDisplayNode()
    moving_display.SetAutoWindowLevel(False)
    moving_display.SetWindowLevel(0.7, 0.4)
    moving_display.SetAndObserveColorNodeID("vtkMRMLColorTableNodeRainbow")
    result = _hand_made_result(fixed, moving)
    automatic = []  # a new display node with an automatic window computes it from a histogram

    def record_automatic(display, event):
        automatic.append(display.GetAutoWindowLevel())

    @vtk.calldata_type(vtk.VTK_OBJECT)
    def watch(caller, event, node):
        if node.IsA("vtkMRMLScalarVolumeDisplayNode"):
            node.AddObserver(vtk.vtkCommand.ModifiedEvent, record_automatic)

    tag = scene.AddObserver(scene.NodeAddedEvent, watch)
    nodes = mrml.pushResult(result, fixed, moving, createOutputVolume=True)
    scene.RemoveObserver(tag)

    assert automatic
    assert not any(automatic)  # no window/level computed only to be replaced
    warped, jacobian = nodes.volumeNode.GetDisplayNode(), nodes.jacobianVolumeNode.GetDisplayNode()
    assert warped.IsA("vtkMRMLScalarVolumeDisplayNode")
    assert (warped.GetWindow(), warped.GetLevel()) == (0.7, 0.4)
    assert warped.GetColorNodeID() == "vtkMRMLColorTableNodeRainbow"
    assert (jacobian.GetWindow(), jacobian.GetLevel()) == (2.0, 1.0)  # centred on det J = 1
    assert not warped.GetAutoWindowLevel()
    assert not jacobian.GetAutoWindowLevel()
    assert nodes.volumeNode.GetNumberOfDisplayNodes() == 1


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
