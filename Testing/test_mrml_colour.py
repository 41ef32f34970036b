"""Colour volumes (photographs, stained slides) through the MRML bridge and the Slicer module's
child process, on a real headless scene (slicer-core): read as colour images, registered on
their luminance, warped into a new colour (vector) volume; output nodes of the wrong kind
refused before any work."""

from __future__ import annotations

import time

import numpy as np
import pytest
import SimpleITK as sitk

mrml_scenes = pytest.importorskip("mrml_scenes")  # skips without slicer-core

import slicer  # noqa: E402
from mrml_scenes import OBLIQUE, _add_volume, _ijk_to_ras, _pair, _snapshot  # noqa: E402

from DeepRegisterLib import mrml, register  # noqa: E402
from DeepRegisterLib.errors import InputError  # noqa: E402
from DeepRegisterLib.imaging.colour import LUMINANCE_NOTE  # noqa: E402
from DeepRegisterLib.registration.settings import RegistrationSettings  # noqa: E402

app = mrml_scenes.app  # the shared fixtures, bound for pytest
scene = mrml_scenes.scene
SETTINGS = RegistrationSettings(preset="fast", model="none", device="cpu")


def _tinted(node) -> np.ndarray:
    """The blobs of a grey volume as a stain on white: (K, J, I, 3) uint8."""
    grey = slicer.util.arrayFromVolume(node) / 140.0
    return np.stack([np.rint(255 * (1 - t * grey)) for t in (0.9, 0.6, 0.3)], -1).astype(np.uint8)


def _colour_pair(scene):
    """The module's test pair (oblique fixed, moved blobs) as colour volumes."""
    grey_fixed, grey_moving = _pair(scene)
    nodes = []
    for grey in (grey_fixed, grey_moving):
        node = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", f"{grey.GetName()} colour")
        slicer.util.updateVolumeFromArray(node, _tinted(grey))
        node.CopyOrientation(grey)
        nodes.append(node)
    return nodes


def test_a_colour_volume_round_trips_and_goes_only_into_a_vector_volume(scene):
    rgb = np.random.default_rng(0).integers(0, 256, (5, 6, 7, 3), dtype=np.uint8)
    node = _add_volume(scene, rgb, (4, 5, 6), OBLIQUE, (1, 2, 3), "rgb", "vtkMRMLVectorVolumeNode")

    image = mrml.imageFromVolumeNode(node, allowColour=True)

    assert image.GetPixelID() == sitk.sitkVectorUInt8
    np.testing.assert_array_equal(sitk.GetArrayViewFromImage(image), rgb)
    copy = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "copy")
    mrml.updateVolumeNodeFromImage(copy, image)
    np.testing.assert_array_equal(slicer.util.arrayFromVolume(copy), rgb)
    assert np.array_equal(_ijk_to_ras(copy), _ijk_to_ras(node))
    grey = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "grey")
    with pytest.raises(InputError, match="scalar volume"):
        mrml.updateVolumeNodeFromImage(grey, image)
    with pytest.raises(InputError, match="vector volume"):
        mrml.updateVolumeNodeFromImage(copy, sitk.VectorIndexSelectionCast(image, 0))
    floats = _add_volume(scene, rgb.astype(np.float32), name="floats",
                         class_name="vtkMRMLVectorVolumeNode")  # fmt: skip
    with pytest.raises(InputError, match="only scalar and colour"):
        mrml.imageFromVolumeNode(floats, allowColour=True)


def test_a_colour_pair_registers_into_a_new_colour_volume(scene):
    fixed, moving = _colour_pair(scene)

    nodes = mrml.registerVolumes(fixed, moving, SETTINGS, createOutputVolume=True)

    assert nodes.volumeNode.IsA("vtkMRMLVectorVolumeNode")
    assert np.array_equal(_ijk_to_ras(nodes.volumeNode), _ijk_to_ras(fixed))
    assert LUMINANCE_NOTE in nodes.report["notes"]
    images = [mrml.imageFromVolumeNode(node, allowColour=True) for node in (fixed, moving)]
    alone = register(*images, SETTINGS).warped
    np.testing.assert_array_equal(
        slicer.util.arrayFromVolume(nodes.volumeNode), sitk.GetArrayViewFromImage(alone)
    )
    board = mrml.createCheckerboardVolume(fixed, nodes.volumeNode, tiles=2)
    assert slicer.util.arrayFromVolume(board).ndim == 3  # by luminance


def test_an_output_volume_of_the_wrong_kind_is_refused_before_any_work(scene):
    fixed, moving = _colour_pair(scene)
    grey_output = scene.AddNewNodeByClass("vtkMRMLScalarVolumeNode", "grey output")
    colour_output = scene.AddNewNodeByClass("vtkMRMLVectorVolumeNode", "colour output")
    grey_fixed, grey_moving = (scene.GetFirstNodeByName(name) for name in ("fixed", "moving"))
    before = _snapshot(scene)

    with pytest.raises(InputError, match=r"moving volume is in colour.*vector volume"):
        mrml.registerVolumes(fixed, moving, SETTINGS, outputVolumeNode=grey_output)
    with pytest.raises(InputError, match="must be a scalar volume"):
        mrml.registerVolumes(grey_fixed, grey_moving, SETTINGS, outputVolumeNode=colour_output)

    assert _snapshot(scene) == before


def test_the_modules_child_process_registers_a_colour_pair(scene):
    fixed, moving = _colour_pair(scene)
    expected = mrml.registerVolumes(fixed, moving, SETTINGS, createOutputVolume=True)
    job = mrml.prepareRegistration(fixed, moving, SETTINGS, createOutputVolume=True)

    try:
        process = mrml.RegistrationProcess(job).start()
        while process.running:
            process.poll()
            time.sleep(0.02)
        nodes = process.push()
    finally:
        mrml.endStandby()  # no waiting child is left to the next test

    assert nodes.volumeNode.IsA("vtkMRMLVectorVolumeNode")
    np.testing.assert_array_equal(
        slicer.util.arrayFromVolume(nodes.volumeNode),
        slicer.util.arrayFromVolume(expected.volumeNode),
    )
