"""2D pictures (photographs, fundus images, slices) out of ``deepregister register``: PNG and
TIFF in the input's 8 or 16 bits, labels as pictures, the rescaling note when a float image
must fit 16 bits, colour pictures registered on their luminance and warped in colour; labels
no picture holds are refused before the run."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from test_outputs import array, refused, register

from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair


@pytest.fixture(scope="module")
def pair_2d(tmp_path_factory) -> dict[str, Path]:
    """A 2D pair as photographs come: 8-bit PNG pictures, and a float copy of the moving."""
    folder = tmp_path_factory.mktemp("pair2d")
    pair = phantom_pair(demo_grid(2, 32), amplitude_mm=2.0)
    top = float(array(pair.fixed).max())
    paths = {}
    for key in ("fixed", "moving"):
        scaled = sitk.Cast(sitk.Round(getattr(pair, key) * (255.0 / top)), sitk.sitkUInt8)
        paths[key] = folder / f"{key}.png"
        sitk.WriteImage(scaled, str(paths[key]))
    paths["moving_float"] = folder / "moving_float.nrrd"
    sitk.WriteImage(sitk.Cast(pair.moving, sitk.sitkFloat32), str(paths["moving_float"]))
    paths["moving_labels"] = folder / "moving_labels.nii.gz"
    sitk.WriteImage(pair.moving_labels, str(paths["moving_labels"]))
    negative = sitk.Cast(pair.moving_labels, sitk.sitkInt16) - 1
    paths["negative_labels"] = folder / "negative_labels.nii.gz"
    sitk.WriteImage(negative, str(paths["negative_labels"]))
    return paths


def test_2d_pictures_come_back_as_pictures_of_the_inputs_type(pair_2d, tmp_path):
    out = {
        "png": tmp_path / "warped.png",
        "labels": tmp_path / "labels.png",
        "labels_nii": tmp_path / "labels.nii.gz",
        "report": tmp_path / "report.json",
    }
    code = register(
        pair_2d, "--warped", out["png"], "--labels", pair_2d["moving_labels"],
        pair_2d["moving_labels"], "--warped-labels", out["labels"], out["labels_nii"],
        "--report", out["report"],
    )  # fmt: skip
    assert code == cli.EXIT_OK
    warped = sitk.ReadImage(str(out["png"]))
    assert warped.GetPixelID() == sitk.sitkUInt8
    assert warped.GetSize() == sitk.ReadImage(str(pair_2d["fixed"])).GetSize()
    assert array(warped).max() > 100  # intensities kept, not squeezed
    labels = sitk.ReadImage(str(out["labels"]))
    assert labels.GetPixelID() == sitk.sitkUInt8
    np.testing.assert_array_equal(array(labels), array(sitk.ReadImage(str(out["labels_nii"]))))
    assert json.loads(out["report"].read_text())["notes"] == []


def test_a_float_image_as_16_bit_tiff_is_rescaled_with_a_note(pair_2d, tmp_path, capsys):
    tiff, report = tmp_path / "warped.tif", tmp_path / "report.json"
    code = register(pair_2d, "--warped", tiff, "--report", report, moving="moving_float")
    assert code == cli.EXIT_OK
    picture = sitk.ReadImage(str(tiff))
    assert picture.GetPixelID() == sitk.sitkUInt16
    assert array(picture).max() == 65535
    assert "rescaled" in capsys.readouterr().out
    assert any("rescaled" in note for note in json.loads(report.read_text())["notes"])


def test_labels_that_no_picture_holds_are_refused_before_the_run(pair_2d, tmp_path, capsys):
    labels = tmp_path / "labels.png"
    message = refused(
        pair_2d, capsys, "--labels", pair_2d["negative_labels"], "--warped-labels", labels
    )
    assert "do not fit 0…65535" in message
    assert list(tmp_path.iterdir()) == []


def test_colour_pictures_are_registered_on_luminance_and_warped_in_colour(pair_2d, tmp_path):
    """RGB photographs: the transform is found on their luminance, and the warped picture is
    the colour moving picture through it, every channel as ``apply_transform`` warps it."""
    from DeepRegisterLib import apply_transform
    from DeepRegisterLib.imaging.colour import luminance

    colour = {}
    for key in ("fixed", "moving"):
        grey = sitk.ReadImage(str(pair_2d[key]))
        channels = [
            grey,
            sitk.Cast(grey * 0.8, sitk.sitkUInt8),
            sitk.Cast(grey / 2, sitk.sitkUInt8),
        ]
        colour[key] = tmp_path / f"{key}_rgb.png"
        sitk.WriteImage(sitk.Compose(channels), str(colour[key]))
    out = {"warped": tmp_path / "warped.png", "transform": tmp_path / "t.h5",
           "report": tmp_path / "report.json"}  # fmt: skip

    code = register(colour, "--warped", out["warped"], "--transform", out["transform"],
                    "--report", out["report"])  # fmt: skip

    assert code == cli.EXIT_OK
    warped = sitk.ReadImage(str(out["warped"]))
    assert warped.GetPixelID() == sitk.sitkVectorUInt8
    moving = sitk.ReadImage(str(colour["moving"]))
    fixed = sitk.ReadImage(str(colour["fixed"]))
    alone = apply_transform(moving, sitk.ReadTransform(str(out["transform"])), fixed)
    np.testing.assert_array_equal(array(warped), array(alone))
    report = json.loads(out["report"].read_text())
    assert any("registered on their luminance" in note for note in report["notes"])

    def distance(image: sitk.Image) -> float:
        return float(np.abs(array(luminance(image)) - array(luminance(fixed))).mean())

    assert distance(warped) < 0.7 * distance(moving)
