"""2D pictures (photographs, fundus images, slices) out of ``deepregister register``: PNG and
TIFF in the input's 8 or 16 bits, labels as pictures, and the rescaling note when a float image
must fit 16 bits; labels no picture holds are refused before the run."""

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
