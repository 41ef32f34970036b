"""The contrast map that lets a same-contrast network seed a cross-contrast (MIND) run."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import Phantom, grid_centre, make_phantom, oblique_grid

from DeepRegisterLib.nn import models
from DeepRegisterLib.registration.contrast import learn_contrast_map
from DeepRegisterLib.registration.engine import register

# Label → intensity of a second contrast: not monotonic in the first (70, 250, 150, 200, 110, 20).
OTHER_CONTRAST = {1: 180.0, 2: 30.0, 3: 240.0, 4: 90.0, 5: 130.0, 6: 60.0}


def recoloured(phantom: Phantom) -> Phantom:
    """The same anatomy in another contrast: every tissue gets another grey level."""
    return replace(
        phantom,
        ellipsoids=tuple(replace(e, intensity=OTHER_CONTRAST[e.label]) for e in phantom.ellipsoids),
    )


def tissue_means(image: np.ndarray, labels: np.ndarray) -> np.ndarray:
    return np.array([image[labels == label].mean() for label in sorted(OTHER_CONTRAST)])


@pytest.fixture(scope="module")
def phantom_and_grid():
    """Sharp edges: a voxel that blends two tissues has a grey level of its own in each
    contrast, and wide blends around small blobs would blur the map (measured: a correlation
    with the fixed image of 0.87 with 1.5 mm edges, 0.98 with 0.3 mm)."""
    grid = oblique_grid(2, size=(96, 96))
    return replace(make_phantom(2, grid_centre(grid), scale_mm=30.0), edge_mm=0.3), grid


def test_an_aligned_pair_maps_every_tissue_to_its_grey_level_in_the_fixed_contrast(
    phantom_and_grid,
) -> None:
    phantom, grid = phantom_and_grid
    fixed = sitk.GetArrayFromImage(phantom.image(grid))
    moving = sitk.GetArrayFromImage(recoloured(phantom).image(grid))
    labels = sitk.GetArrayFromImage(phantom.label_map(grid))

    mapped = learn_contrast_map(moving, fixed)(moving)

    assert mapped.dtype == moving.dtype
    np.testing.assert_allclose(
        tissue_means(mapped, labels), tissue_means(fixed, labels), atol=0.1 * np.ptp(fixed)
    )
    assert np.corrcoef(mapped.ravel(), fixed.ravel())[0, 1] > 0.95


def test_a_misaligned_pair_still_puts_the_tissues_in_the_fixed_images_order(
    phantom_and_grid,
) -> None:
    """What the affine stage leaves is misalignment: the map must survive it."""
    phantom, grid = phantom_and_grid
    fixed = sitk.GetArrayFromImage(phantom.image(grid))
    shifted = recoloured(phantom).image(grid, through=lambda y: y + np.array([2.0, -1.5]))
    moving = sitk.GetArrayFromImage(shifted)
    moving_labels = sitk.GetArrayFromImage(
        phantom.label_map(grid, through=lambda y: y + np.array([2.0, -1.5]))
    )

    mapped = learn_contrast_map(moving, fixed)(moving)

    labels = sitk.GetArrayFromImage(phantom.label_map(grid))
    order = np.argsort(tissue_means(mapped, moving_labels))
    assert list(order) == list(np.argsort(tissue_means(fixed, labels)))


def test_a_dark_tissue_beside_a_black_background_is_not_mapped_to_background() -> None:
    """Bins of equal counts: with bins of equal width the dark tissue shared the background's
    bin and came out black, and the network then did worse than the affine alone."""
    rng = np.random.default_rng(0)
    labels = np.zeros((80, 80), dtype=int)
    labels[10:70, 10:70] = 1  # bright in the moving image, dark in the fixed
    labels[25:55, 25:55] = 2  # nearly black in the moving image, bright in the fixed
    moving = np.choose(labels, [0.0, 1.0, 0.01]) + rng.normal(0, 0.002, labels.shape)
    fixed = np.choose(labels, [0.0, 0.3, 0.9]) + rng.normal(0, 0.002, labels.shape)

    mapped = learn_contrast_map(moving.astype(np.float32), fixed)(moving.astype(np.float32))

    for label, expected in ((0, 0.0), (1, 0.3), (2, 0.9)):
        assert abs(float(np.median(mapped[labels == label])) - expected) < 0.05


def test_an_image_without_contrast_has_no_map() -> None:
    assert learn_contrast_map(np.full((8, 8), 3.0), np.arange(64.0).reshape(8, 8)) is None


def test_a_same_contrast_model_in_a_cross_contrast_run_sees_the_mapped_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Through the map, the shipped 2D model (same-contrast) deforms a pair in two contrasts
    much as it deforms the pair in one; the same weights declared "any" contrast get the image
    as it is, and do not."""
    shipped = models.find_model("slice2d")
    models.save_model(
        models.load_model(shipped), tmp_path, "any2d",
        extra_config={**shipped.config, "contrast": "any"},
    )  # fmt: skip
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(tmp_path))
    grid = oblique_grid(2, size=(64, 56))
    centre = grid_centre(grid)
    phantom = replace(make_phantom(2, centre, scale_mm=16.0), edge_mm=0.3)

    def bump(y: np.ndarray) -> np.ndarray:
        weight = np.exp(-((y - centre) ** 2).sum(-1, keepdims=True) / (2 * 8.0**2))
        return y + 5.0 * weight * np.array([1.0, 0.5])

    fixed = phantom.image(grid)
    other_contrast = recoloured(phantom).image(grid, through=bump)
    # The affine stage is left out: it differs between similarities, the network is compared.
    options = dict(preset="fast", iterations=0, affine=False, device="cpu")

    def field(result) -> np.ndarray:
        return sitk.GetArrayFromImage(result.displacement)

    same = register(fixed, phantom.image(grid, through=bump), model="slice2d", **options)
    mapped = register(fixed, other_contrast, model="slice2d", similarity="mind", **options)
    as_is = register(fixed, other_contrast, model="any2d", similarity="mind", **options)

    (note,) = mapped.report["notes"]
    assert "mapped into the fixed image's contrast" in note
    assert as_is.report["notes"] == []
    assert np.abs(field(same)).mean() > 0.2  # mm: the network moved something
    mapped_error = np.abs(field(mapped) - field(same)).mean()
    as_is_error = np.abs(field(as_is) - field(same)).mean()
    assert mapped_error < 0.5 * as_is_error
