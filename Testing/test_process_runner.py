"""The Slicer module's path: a registration in a child process (mrml.RegistrationProcess) against
a real headless scene and real child processes. The scene gets what the in-process path gives it,
bit for bit, from a child started for the run or before it (mrml.startStandby); cancel, a killed
child and a refused input leave the scene and the disk as before."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

mrml_scenes = pytest.importorskip("mrml_scenes")  # skips without slicer-core
import slicer  # noqa: E402
from vtk.util.numpy_support import vtk_to_numpy  # noqa: E402

from DeepRegisterLib import mrml  # noqa: E402
from DeepRegisterLib.errors import DeepRegisterError, InputError, RegistrationCancelled  # noqa: E402
from DeepRegisterLib.imaging.geometry import Grid  # noqa: E402
from DeepRegisterLib.mrml.child_process import ChildProcess  # noqa: E402
from DeepRegisterLib.registration.settings import RegistrationSettings  # noqa: E402

SETTINGS = RegistrationSettings(preset="fast", model="none", device="cpu", compute_inverse=True)
#: Enough optimisation steps that a cancel or a kill lands while the child is optimising.
LONG = SETTINGS.replace(iterations=2000)
LATENCY_LIMIT_S = 1.0


@pytest.fixture
def temporary_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Where tempfile puts the runner's private folders, to check that none is left behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    yield folder
    mrml.endStandby()  # a waiting child a test left is not handed to the next test


def _scene(folder: Path):
    scene = mrml_scenes._new_scene(folder).scene
    fixed, moving = mrml_scenes._pair(scene)
    segmentation = mrml_scenes._blob_segmentation(scene, moving)
    return scene, fixed, moving, segmentation


def _wait(process: mrml.RegistrationProcess, timeout_s: float = 300.0):
    """Poll like the module's timer; the (fraction, message) pairs in the order they came."""
    messages, deadline = [], time.monotonic() + timeout_s
    while process.running:
        assert time.monotonic() < deadline, "the child did not finish in time"
        messages += process.poll()
        time.sleep(0.02)
    return messages + process.poll()


def _inverse_parts(nodes) -> tuple[np.ndarray, np.ndarray]:
    """The inverse node's ``A⁻¹`` (RAS 4×4) and ``w``'s grid (RAS vectors)."""
    held = nodes.inverseTransformNode.GetTransformFromParent()
    held.Update()
    linear, grid = (held.GetConcatenatedTransform(i) for i in range(2))
    matrix = slicer.util.arrayFromVTKMatrix(linear.GetMatrix())
    vectors = grid.GetDisplacementGrid().GetPointData().GetScalars()
    return matrix, vtk_to_numpy(vectors).copy()


def _assert_inverse_undoes_forward(nodes, fixed) -> None:
    """The inverse node maps the forward node's image of a fixed point back to that point, to
    the accuracy of integrating ``w = exp(−v)``: as test_inverse_transform allows, half the
    finest fixed voxel at most and a tenth of it on average."""
    forward = nodes.transformNode.GetTransformFromParent()
    inverse = nodes.inverseTransformNode.GetTransformFromParent()
    grid = Grid.of(mrml.imageFromVolumeNode(fixed))
    index = np.random.default_rng(2).uniform(2, np.array(grid.size) - 3, (60, 3))
    points = grid.index_to_physical_points(index) @ np.diag([-1.0, -1.0, 1.0])  # RAS
    there = np.array([forward.TransformPoint(point) for point in points])
    back = np.array([inverse.TransformPoint(point) for point in there])
    error = np.linalg.norm(back - points, axis=1)
    assert np.abs(there - points).max() > 0.5  # the forward transform moved the points
    assert error.max() <= 0.5 * min(grid.spacing)
    assert error.mean() <= 0.1 * min(grid.spacing)


def _wait_for_optimisation(process: mrml.RegistrationProcess) -> None:
    deadline = time.monotonic() + 120.0
    while not any(message.startswith("optimising") for _, message in process.poll()):
        assert process.running, "the child ended before optimising"
        assert time.monotonic() < deadline
        time.sleep(0.01)


def _node_summary(scene) -> list[tuple[str, str]]:
    nodes = (scene.GetNthNode(i) for i in range(scene.GetNumberOfNodes()))
    return sorted((node.GetClassName(), node.GetName()) for node in nodes)


@pytest.mark.parametrize("started_before", [False, True], ids=["started-for-the-run", "waiting"])
def test_the_child_gives_the_scene_what_registering_in_process_gives(
    tmp_path, temporary_folder, started_before
):
    scene, fixed, moving, segmentation = _scene(tmp_path / "in-process")
    expected = mrml.registerVolumes(
        fixed, moving, SETTINGS, createOutputVolume=True, movingLabelNodes=[segmentation]
    )
    child_scene, fixed, moving, segmentation = _scene(tmp_path / "child")
    job = mrml.prepareRegistration(
        fixed, moving, SETTINGS, createOutputVolume=True, movingLabelNodes=[segmentation]
    )
    before = mrml_scenes._snapshot(child_scene)

    waiting = mrml.startStandby(mrml.childPython()) if started_before else None
    process = mrml.RegistrationProcess(job).start()
    if waiting is not None:
        assert process.pid == waiting.process.pid
    messages = _wait(process)
    assert mrml_scenes._snapshot(child_scene) == before  # nothing pushed before the main thread
    nodes = process.push()

    fractions = [fraction for fraction, _ in messages]
    assert fractions == sorted(fractions)
    assert fractions[-1] == 1.0
    assert messages[0][1] == "checking inputs"
    assert messages[-1][1] == "done"
    assert _node_summary(child_scene) == _node_summary(scene)
    grid = slicer.util.arrayFromGridTransform
    assert np.array_equal(grid(nodes.transformNode), grid(expected.transformNode))  # bit for bit
    for got, want in zip(*map(_inverse_parts, (nodes, expected)), strict=True):
        assert np.array_equal(got, want)
    _assert_inverse_undoes_forward(nodes, fixed)
    for got, want in ((nodes.volumeNode, expected.volumeNode),
                      (nodes.jacobianVolumeNode, expected.jacobianVolumeNode)):  # fmt: skip
        assert np.array_equal(slicer.util.arrayFromVolume(got), slicer.util.arrayFromVolume(want))
        assert np.array_equal(mrml_scenes._ijk_to_ras(got), mrml_scenes._ijk_to_ras(want))
    labels = [mrml.segmentLabelsFromSegmentationNode(n.labelNodes[0], n.volumeNode)
              for n in (nodes, expected)]  # fmt: skip
    assert np.array_equal(*(sitk.GetArrayViewFromImage(label.layers[0]) for label in labels))
    assert labels[0].segments[0].name == "blob"
    timing = {"runtime_s", "timings"}
    assert {k: v for k, v in nodes.report.items() if k not in timing} == {
        k: v for k, v in expected.report.items() if k not in timing
    }
    assert not list(temporary_folder.iterdir())


def test_a_cancel_while_optimising_ends_the_child_at_once_and_changes_nothing(
    tmp_path, temporary_folder
):
    scene, fixed, moving, _ = _scene(tmp_path)
    before = mrml_scenes._snapshot(scene)
    process = mrml.RegistrationProcess(mrml.prepareRegistration(fixed, moving, LONG)).start()
    _wait_for_optimisation(process)

    asked = time.perf_counter()
    process.cancel()
    latency = time.perf_counter() - asked

    assert latency < LATENCY_LIMIT_S
    assert not process.running
    with pytest.raises(RegistrationCancelled):
        process.push()
    assert mrml_scenes._snapshot(scene) == before
    assert not list(temporary_folder.iterdir())


@pytest.mark.skipif(not hasattr(signal, "SIGKILL"), reason="kill -9 is POSIX")
def test_a_killed_child_is_a_clear_error_and_changes_nothing(tmp_path, temporary_folder):
    scene, fixed, moving, _ = _scene(tmp_path)
    before = mrml_scenes._snapshot(scene)
    process = mrml.RegistrationProcess(mrml.prepareRegistration(fixed, moving, LONG)).start()
    _wait_for_optimisation(process)

    os.kill(process.pid, signal.SIGKILL)
    _wait(process, timeout_s=10.0)

    with pytest.raises(DeepRegisterError, match="killed by signal 9; the scene is unchanged"):
        process.push()
    assert mrml_scenes._snapshot(scene) == before
    assert not list(temporary_folder.iterdir())


def test_an_input_the_child_refuses_is_an_input_error_with_its_message(tmp_path, temporary_folder):
    scene, fixed, _, _ = _scene(tmp_path)
    constant = mrml_scenes._add_volume(scene, np.full((8, 8, 8), 3.0, np.float32), name="constant")
    before = mrml_scenes._snapshot(scene)
    process = mrml.RegistrationProcess(mrml.prepareRegistration(fixed, constant, SETTINGS))

    _wait(process.start())

    with pytest.raises(InputError, match="constant") as refused:
        process.push()
    assert "deepregister" not in str(refused.value)  # the message, not the command's prefix
    assert mrml_scenes._snapshot(scene) == before
    assert not list(temporary_folder.iterdir())


def test_one_child_waits_per_interpreter_and_ending_it_leaves_nothing(temporary_folder):
    python = mrml.childPython()
    waiting = mrml.startStandby(python)
    assert mrml.startStandby(python) is waiting  # asked again (the module entered again)
    assert waiting.waiting
    assert [path.name for path in temporary_folder.iterdir()] == [waiting.folder.name]

    mrml.endStandby()

    assert waiting.process.poll() is not None
    assert not list(temporary_folder.iterdir())


def test_a_waiting_child_let_go_ends_by_itself(temporary_folder):
    child = ChildProcess(mrml.childPython())
    child.process.stdin.close()  # as when Slicer ends without ending it
    assert child.process.wait(timeout=120) == 0
    child.end()
    assert not list(temporary_folder.iterdir())


def test_a_waiting_child_that_died_is_replaced_by_a_new_one(tmp_path, temporary_folder):
    scene, fixed, moving, _ = _scene(tmp_path)  # the scene kept: the nodes live in it
    waiting = mrml.startStandby(mrml.childPython())
    waiting.process.kill()
    waiting.process.wait()

    process = mrml.RegistrationProcess(mrml.prepareRegistration(fixed, moving, SETTINGS)).start()

    assert process.pid != waiting.process.pid
    _wait(process)
    assert process.push().transformNode.GetScene() is scene
    assert not list(temporary_folder.iterdir())


def test_the_childs_files_are_read_side_by_side_without_an_hdf5_race(tmp_path):
    """The transform (HDF5) is read while the images are. ITK asking its HDF5 reader about
    each image beside that read failed or corrupted memory: a crash, so in a fresh process."""
    field = sitk.Image([40, 40, 40], sitk.sitkVectorFloat64, 3)
    composite = sitk.CompositeTransform(
        [sitk.AffineTransform(3), sitk.DisplacementFieldTransform(field)]
    )
    sitk.WriteTransform(composite, str(tmp_path / "transform.h5"))
    names = ["warped.mha", "jacobian.mha", "labels0.mha"]
    for name in names:
        sitk.WriteImage(sitk.Image([64, 64, 64], sitk.sitkFloat32), str(tmp_path / name))
    code = (
        "from pathlib import Path\n"
        "from DeepRegisterLib.mrml.runner import readChildFiles\n"
        f"for _ in range(150): readChildFiles(Path({str(tmp_path)!r}), {names!r})\n"
    )
    run = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=False
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "H5" not in run.stderr  # HDF5's error stack, printed even where it recovers
