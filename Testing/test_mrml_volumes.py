"""The MRML bridge's volumes and segmentations against a real headless MRML scene
(slicer-core): exact round trips on oblique anisotropic grids, refused volumes, segment ids,
names, colours and overlaps, segmentations under transforms or held as closed surfaces, and a
segmentation as a registration mask."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

mrml_scenes = pytest.importorskip("mrml_scenes")  # skips without slicer-core

import slicer  # noqa: E402
import vtk  # noqa: E402  (after the skip: vtk comes with slicer-core)
from mrml_scenes import (  # noqa: E402
    BINARY,
    FLIP,
    OBLIQUE,
    _add_segmentation,
    _add_volume,
    _ijk_to_ras,
    _pair,
    _snapshot,
)

from DeepRegisterLib import mrml  # noqa: E402
from DeepRegisterLib.errors import InputError  # noqa: E402
from DeepRegisterLib.imaging.geometry import Grid  # noqa: E402

# The shared fixtures, bound here for pytest to find (imported, they would be flagged as
# redefined by the test functions' arguments).
app = mrml_scenes.app
scene = mrml_scenes.scene


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


def test_a_segmentation_mask_is_the_union_of_its_segments_on_the_volume_grid(scene):
    fixed, moving = _pair(scene)
    shape = slicer.util.arrayFromVolume(fixed).shape
    masks = _three_segments(shape)
    segmentation = _add_segmentation(scene, fixed, masks, [(1, 0, 0)] * 3)
    union = np.logical_or.reduce(list(masks.values())).astype(np.uint8)

    job = mrml.prepareRegistration(fixed, moving, fixedMaskNode=segmentation)

    assert np.array_equal(sitk.GetArrayFromImage(job.fixedMask), union)
    assert Grid.of(job.fixedMask) == Grid.of(job.fixed)
