"""Colour pictures through every door that reads files: the Python API and ``batch`` register
them on their luminance and warp the picture in colour, channel by channel, as ``apply`` warps
it through the written transform; on a white background, white stays outside."""

from __future__ import annotations

from pathlib import Path

import batch_jobs
import numpy as np
import pytest
import SimpleITK as sitk
from batch_jobs import write_csv

from DeepRegisterLib import apply_transform, register
from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.errors import InputError
from DeepRegisterLib.evaluation.evaluate import evaluate
from DeepRegisterLib.imaging.colour import LUMINANCE_NOTE, luminance
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

environment_kept = batch_jobs.environment_kept  # the shared fixture, bound for pytest


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> dict[str, Path]:
    """A 2D pair as photographs on white paper: RGB PNGs, the ink taking 1, 0.8 and 0.5 of
    red, green and blue."""
    folder = tmp_path_factory.mktemp("colour")
    pair = phantom_pair(demo_grid(2, 48), amplitude_mm=2.0)
    top = float(array(pair.fixed).max())
    paths = {}
    for key in ("fixed", "moving"):
        ink = array(getattr(pair, key)) / top  # 0 on the paper, 1 at the darkest ink
        channels = [np.rint(255.0 * (1.0 - tint * ink)).astype(np.uint8) for tint in (1, 0.8, 0.5)]
        picture = sitk.Compose([sitk.GetImageFromArray(c) for c in channels])
        picture.CopyInformation(getattr(pair, key))
        paths[key] = folder / f"{key}.png"
        sitk.WriteImage(picture, str(paths[key]))
    return paths


def ncc(a: sitk.Image, b: sitk.Image) -> float:
    x, y = (array(luminance(i)).astype(np.float64).ravel() for i in (a, b))
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def test_the_python_api_warps_a_colour_picture_in_colour(pictures) -> None:
    result = register(pictures["fixed"], pictures["moving"], preset="fast")

    fixed = sitk.ReadImage(str(pictures["fixed"]))
    moving = sitk.ReadImage(str(pictures["moving"]))
    assert result.warped.GetPixelID() == sitk.sitkVectorUInt8
    assert result.warped.GetNumberOfComponentsPerPixel() == 3
    alone = apply_transform(moving, result.transform(), fixed)
    assert np.abs(array(result.warped).astype(int) - array(alone)).max() <= 1
    notes = " ".join(result.report["notes"])
    assert LUMINANCE_NOTE in notes
    assert "bright background" in notes
    assert ncc(result.warped, fixed) > max(ncc(moving, fixed), 0.99)


def test_outside_a_colour_picture_on_white_is_white_in_every_channel(pictures) -> None:
    """The engine's own warp, with the transform a shift alone: where it leaves the page, the
    paper's white, not a black frame."""
    shifted = sitk.TranslationTransform(2, (40.0, 0.0))
    result = register(
        pictures["fixed"], pictures["moving"], preset="fast", model="none", iterations=0,
        affine=False, initial_transform=shifted,
    )  # fmt: skip
    grey = luminance(sitk.ReadImage(str(pictures["moving"])))
    fixed = sitk.ReadImage(str(pictures["fixed"]))
    beyond = array(sitk.Resample(grey, fixed, shifted, sitk.sitkLinear, -1.0)) == -1
    assert beyond.mean() > 0.2
    assert (array(result.warped)[beyond] == 255).all()


def test_batch_registers_colour_pictures(pictures, tmp_path) -> None:
    jobs = write_csv(
        tmp_path / "jobs.csv",
        [{"id": "photo", "fixed": str(pictures["fixed"]), "moving": str(pictures["moving"])}],
    )
    out = tmp_path / "out"
    argv = ["batch", "--jobs", str(jobs), "--out", str(out), "--workers", "1", "--quiet"]

    assert cli.main([*argv, "--model", "none", "--preset", "fast", "--device", "cpu"]) == 0

    warped = sitk.ReadImage(str(out / "photo" / "warped.nii.gz"))
    transform = sitk.ReadTransform(str(out / "photo" / "transform.h5"))
    fixed = sitk.ReadImage(str(pictures["fixed"]))
    alone = apply_transform(sitk.ReadImage(str(pictures["moving"])), transform, fixed)
    assert warped.GetNumberOfComponentsPerPixel() == 3
    assert np.abs(array(warped).astype(int) - array(alone)).max() <= 1


def test_evaluate_judges_colour_pictures_by_their_luminance(pictures) -> None:
    fixed, moving = (sitk.ReadImage(str(pictures[key])) for key in ("fixed", "moving"))
    shift = sitk.TranslationTransform(2, (0.5, -0.3))

    colour = evaluate(fixed, moving, shift)

    assert (
        colour["similarity"] == evaluate(luminance(fixed), luminance(moving), shift)["similarity"]
    )
    field = sitk.Image(fixed.GetSize(), sitk.sitkVectorFloat32, 2)
    with pytest.raises(InputError, match="grey-level or colour image, not a vector"):
        evaluate(fixed, field, shift)
