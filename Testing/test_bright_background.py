"""Images on a bright background (photographs and slides on white): registered as well as on a
dark one, and warped with their background, not zero, outside them."""

from __future__ import annotations

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib import register
from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.imaging.apply_transform import apply_transform
from DeepRegisterLib.imaging.intensity_window import IntensityWindow
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

NOTE = "bright background"


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def eight_bit(image: sitk.Image, top: float, bright: bool) -> sitk.Image:
    scaled = sitk.Round(image * (255.0 / top))
    return sitk.Cast(255.0 - scaled if bright else scaled, sitk.sitkUInt8)


@pytest.fixture(scope="module")
def pairs() -> dict[str, dict]:
    """The 3D phantom pair as 8-bit images, dark and as its negative (white background)."""
    pair = phantom_pair(demo_grid(3, 40), amplitude_mm=3.0)
    top = float(array(pair.fixed).max())
    return {
        tone: {
            "fixed": eight_bit(pair.fixed, top, tone == "bright"),
            "moving": eight_bit(pair.moving, top, tone == "bright"),
            "labels": pair.moving_labels,
            "fixed_labels": pair.fixed_labels,
        }
        for tone in ("dark", "bright")
    }


@pytest.fixture(scope="module")
def results(pairs) -> dict[str, object]:
    return {
        tone: register(
            images["fixed"], images["moving"], preset="fast", moving_labels={"l": images["labels"]}
        )
        for tone, images in pairs.items()
    }


def mean_dice(a: sitk.Image, b: sitk.Image) -> float:
    x, y = array(a), array(b)
    labels = [v for v in np.unique(y) if v]
    return float(np.mean([2 * ((x == v) & (y == v)).sum() / ((x == v).sum() + (y == v).sum())
                          for v in labels]))  # fmt: skip


def ncc(a: sitk.Image, b: sitk.Image) -> float:
    x, y = (array(i).astype(np.float64).ravel() for i in (a, b))
    x, y = x - x.mean(), y - y.mean()
    return float((x * y).sum() / np.sqrt((x * x).sum() * (y * y).sum()))


def test_the_window_tells_a_bright_background_from_a_dark_one(pairs) -> None:
    dark = IntensityWindow.of(pairs["dark"]["fixed"])
    bright = IntensityWindow.of(pairs["bright"]["fixed"])
    assert (dark.bright_background, dark.padding) == (False, 0.0)
    assert (bright.bright_background, bright.padding) == (True, 255.0)


def test_a_ct_with_air_and_the_scanners_circle_is_not_bright() -> None:
    """A CT slab: −3024 outside the scanner's circle, air around the body, bone inside. Its
    faces' median (air) sits at half its window: zero padding stays, as every tool pads."""
    _, y, x = np.mgrid[0:24, 0:96, 0:96]
    radius = np.hypot(y - 47.5, x - 47.5)
    ct = np.full(radius.shape, -1024.0)
    ct[radius > 48] = -3024.0
    ct[radius < 30] = 40.0
    ct[radius < 8] = 1200.0
    window = IntensityWindow.of(sitk.GetImageFromArray(ct.astype(np.int16)))
    assert (window.border, window.low) == (-1024.0, -3024.0)
    assert (window.bright_background, window.padding) == (False, 0.0)


def test_a_negative_pair_registers_as_well_as_the_positive(pairs, results) -> None:
    """Before the background was inverted to 0, the negative pair ended with an NCC of 0.88
    (against 0.998): every shift drew a dark edge into the view, which the stages aligned."""
    dark, bright = results["dark"], results["bright"]
    assert NOTE in " ".join(bright.report["notes"])
    assert NOTE not in " ".join(dark.report["notes"])
    assert bright.report["ncc_after"] == pytest.approx(dark.report["ncc_after"], abs=1e-3)
    np.testing.assert_allclose(array(bright.displacement), array(dark.displacement), atol=0.01)
    fixed = pairs["bright"]["fixed"]
    before = ncc(pairs["bright"]["moving"], fixed)
    assert ncc(bright.warped, fixed) > max(before, 0.99)
    truth = pairs["bright"]["fixed_labels"]
    assert mean_dice(bright.warped_labels["l"], truth) == pytest.approx(
        mean_dice(dark.warped_labels["l"], truth), abs=0.005
    )


def test_the_warped_negative_is_padded_with_white_as_apply_pads_it(pairs, results) -> None:
    """``register --warped`` and ``apply`` through the saved transform pad alike: with the
    image's own white outside it, where zero would frame the picture in black."""
    bright = results["bright"]
    moving, fixed = pairs["bright"]["moving"], pairs["bright"]["fixed"]
    assert bright.warped.GetPixelID() == sitk.sitkUInt8
    alone = apply_transform(moving, bright.transform(), fixed)
    assert np.abs(array(bright.warped).astype(int) - array(alone)).max() <= 1
    shifted = sitk.TranslationTransform(3, (30.0, 0.0, 0.0))  # half the picture off the image
    outside = array(apply_transform(moving, shifted, fixed)) == 255
    zero_padded = array(sitk.Resample(moving, fixed, shifted, sitk.sitkLinear, 0.0)) == 0
    assert outside.mean() > 0.2
    assert outside[zero_padded].all()


def test_colour_and_series_are_padded_per_channel_from_the_first_volume(pairs) -> None:
    moving = pairs["bright"]["moving"]
    half = sitk.Cast(sitk.Cast(moving, sitk.sitkFloat32) * 0.5, sitk.sitkUInt8)  # white: 127
    colour = sitk.Compose([moving, half, moving])
    series = sitk.JoinSeries([sitk.Cast(moving, sitk.sitkInt16)] * 2)
    shifted = sitk.TranslationTransform(3, (30.0, 0.0, 0.0))
    beyond = array(sitk.Resample(moving, moving, shifted, sitk.sitkLinear, 0.0)) == 0
    warped = array(apply_transform(colour, shifted, moving))
    np.testing.assert_array_equal(warped[beyond], np.tile([255, 127, 255], (beyond.sum(), 1)))
    volumes = array(apply_transform(series, shifted, moving))
    assert (volumes[:, beyond] == 255).all()


@pytest.mark.parametrize(("similarity", "inverted"), [("lncc", False), ("mind", True)])
def test_one_bright_image_is_inverted_only_where_the_metric_allows(
    pairs, similarity: str, inverted: bool
) -> None:
    """LNCC compares one contrast: inverting the moving image alone would make its likeness to
    the fixed one an opposite. MIND reads structure, not intensities: it may."""
    result = register(
        pairs["dark"]["fixed"], pairs["bright"]["moving"], preset="fast", iterations=0,
        similarity=similarity, model=None,
    )  # fmt: skip
    notes = " ".join(result.report["notes"])
    assert (NOTE in notes) is inverted
    if inverted:
        assert "the moving image's" in notes


def test_a_picture_sent_off_the_grid_is_refused_though_its_padding_is_white(pairs, tmp_path):
    """``apply`` refuses an output that is nothing but padding (files from two spaces): for a
    picture on white that padding is white, not the zero it used to look for."""
    paths = {name: tmp_path / f"{name}.nrrd" for name in ("moving", "reference", "warped")}
    sitk.WriteImage(pairs["bright"]["moving"], str(paths["moving"]))
    sitk.WriteImage(pairs["bright"]["fixed"], str(paths["reference"]))
    far = tmp_path / "far.tfm"
    sitk.WriteTransform(sitk.TranslationTransform(3, (500.0, 0.0, 0.0)), str(far))

    code = cli.main(["apply", "--transform", str(far), "--reference", str(paths["reference"]),
                     "--image", str(paths["moving"]), str(paths["warped"])])  # fmt: skip

    assert code == cli.EXIT_INPUT
    assert not paths["warped"].exists()
