"""The MRML bridge's scenes against a real headless MRML scene (slicer-core): scene round
trips (.mrml and .mrb), registration settings, atomic failure, views, and registration in this
process end to end on a tiny pair (the child-process path: test_process_runner.py). Volumes and
segmentations: test_mrml_volumes.py; transforms: test_mrml_transforms.py."""

from __future__ import annotations

import dataclasses
import threading
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

mrml_scenes = pytest.importorskip("mrml_scenes")  # skips without slicer-core

import slicer  # noqa: E402
import vtk  # noqa: E402
from mrml_scenes import (  # noqa: E402
    FLIP,
    _add_segmentation,
    _add_volume,
    _blob_segmentation,
    _hand_made_result,
    _ijk_to_ras,
    _new_scene,
    _pair,
    _snapshot,
)

from DeepRegisterLib import mrml  # noqa: E402
from DeepRegisterLib.errors import InputError, RegistrationCancelled  # noqa: E402
from DeepRegisterLib.imaging.geometry import Grid  # noqa: E402
from DeepRegisterLib.mrml import push as mrml_push  # noqa: E402
from DeepRegisterLib.registration.settings import RegistrationSettings  # noqa: E402

# The shared fixtures, bound here for pytest to find (imported, they would be flagged as
# redefined by the test functions' arguments).
app = mrml_scenes.app
scene = mrml_scenes.scene


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
    # Slicer reads a grid transform back cubic; ours is the registration only linear.
    read_back, pushed = (n.GetTransformFromParent() for n in (transform_node, nodes.transformNode))
    assert read_back.GetInterpolationMode() == vtk.VTK_CUBIC_INTERPOLATION
    assert mrml.restoreLinearInterpolation(other) == 2  # the transform and its inverse
    assert mrml.restoreLinearInterpolation(other) == 0
    fixed_grid = Grid.of(mrml.imageFromVolumeNode(fixed))
    index = np.random.default_rng(4).uniform(0, np.array(fixed_grid.size) - 1, (50, 3))
    for point in fixed_grid.index_to_physical_points(index) @ FLIP:  # RAS
        assert np.allclose(read_back.TransformPoint(point), pushed.TransformPoint(point), atol=1e-5)
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


# --- settings ------------------------------------------------------------------------------


def test_settings_come_as_an_object_a_preset_name_or_their_field_names(scene):
    fixed, moving = _pair(scene)
    settings = RegistrationSettings(preset="fast", compute_inverse=True, device="cpu")

    by_name = mrml.prepareRegistration(fixed, moving, "fast", compute_inverse=True, device="cpu")
    by_object = mrml.prepareRegistration(fixed, moving, settings)
    overridden = mrml.prepareRegistration(fixed, moving, settings, compute_inverse=False)

    # No node receives a warped volume: none is made. Nor the dense field: the grid transform
    # node is made from the affine and v.
    unasked = settings.replace(compute_warped=False, compute_displacement=False)
    assert by_name.settings == by_object.settings == unasked
    assert overridden.settings == unasked.replace(compute_inverse=False)
    wanted = mrml.prepareRegistration(fixed, moving, settings, createOutputVolume=True)
    assert wanted.settings == settings.replace(compute_displacement=False)


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
    without_v = dataclasses.replace(_hand_made_result(fixed, moving), deformation=None)
    with pytest.raises(InputError, match="no deformation"):
        mrml.pushResult(without_v, fixed, moving)
    axis_aligned = sitk.Image([4, 4, 4], sitk.sitkVectorFloat64, 3)  # the fixed is oblique
    turned = dataclasses.replace(_hand_made_result(fixed, moving), deformation=axis_aligned)
    with pytest.raises(InputError, match="axis directions"):
        mrml.pushResult(turned, fixed, moving)
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
