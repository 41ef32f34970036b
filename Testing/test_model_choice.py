"""Which model a registration uses: a saved one by name or path, reported with its checksum;
the default only where it was trained to work and where it lowers the loss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import grid_centre, make_phantom, oblique_grid
from small_networks import SMALL, save_tiny_3d_model

from DeepRegisterLib.errors import ModelError
from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.nn import models
from DeepRegisterLib.nn.networks import NetworkConfig, VxmDense
from DeepRegisterLib.registration.engine import register
from DeepRegisterLib.registration.preprocessing import foreground_box, normalised_for_registration
from DeepRegisterLib.registration.presets import get_preset


@pytest.fixture
def a_saved_3d_model(tmp_path: Path) -> models.ModelInfo:
    return save_tiny_3d_model(tmp_path / "models")


def a_shifted_3d_pair() -> tuple[sitk.Image, sitk.Image]:
    grid = oblique_grid(3, size=(28, 26, 24))
    phantom = make_phantom(3, grid_centre(grid), scale_mm=10.0)
    shift = np.array([1.5, -1.0, 1.0])
    return phantom.image(grid), phantom.image(grid, through=lambda y: y - shift)


def test_register_with_a_saved_model_reports_its_name_and_checksum(
    a_saved_3d_model: models.ModelInfo,
) -> None:
    fixed, moving = a_shifted_3d_pair()

    result = register(
        fixed,
        moving,
        model=str(a_saved_3d_model.weights),
        preset="fast",
        iterations=5,
        device="cpu",
    )

    assert result.report["model"] == "tiny3d"
    assert result.report["model_sha256"] == models.sha256_of(a_saved_3d_model.weights)
    # The network grid honours the model's spacing (3 mm, or finer when the field of view is
    # too small for 16 network voxels across it) and covers the fixed foreground box, not
    # grown to the network's size multiple: the network pads its own input.
    smallest_extent = min(n * s for n, s in zip(fixed.GetSize(), fixed.GetSpacing(), strict=True))
    expected_spacing = min(3.0, smallest_extent / 16)
    assert result.report["network_grid"]["spacing_mm"] == pytest.approx(expected_spacing)
    normalised = normalised_for_registration(fixed)  # alive while viewed
    box = Grid.of(fixed).with_spacing_cropped_to(
        result.report["network_grid"]["spacing_mm"],
        *foreground_box(
            fixed,
            sitk.GetArrayViewFromImage(normalised),
            get_preset("fast").foreground_margin_mm,
            above=0.05,
        ),
        multiple=1,
    )
    assert tuple(result.report["network_grid"]["size"]) == box.size
    assert any(n % a_saved_3d_model.network.multiple for n in box.size)  # not by chance
    assert result.report["folding_percent"] < 0.01


@pytest.mark.parametrize(
    ("dim", "preset", "forward_passes"),
    [(3, "fast", 1), (3, "balanced", 1), (3, "accurate", 2), (2, "fast", 2)],
    ids=["3d-fast-one-sided", "3d-balanced-one-sided", "3d-accurate-both", "2d-fast-both"],
)
def test_the_preset_says_whether_a_pass_takes_one_order_or_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dim: int, preset: str, forward_passes: int
) -> None:
    torch.manual_seed(0)
    extra = {"input_spacing_mm": 3.0}
    info = models.save_model(VxmDense(NetworkConfig(dim=dim, **SMALL)), tmp_path, "m", extra)
    calls = []
    real_velocity = VxmDense.velocity

    def counted(self, fixed, moving):
        calls.append(1)
        return real_velocity(self, fixed, moving)

    monkeypatch.setattr(VxmDense, "velocity", counted)
    if dim == 3:
        fixed, moving = a_shifted_3d_pair()
    else:
        grid = oblique_grid(2, size=(40, 36))
        phantom = make_phantom(2, grid_centre(grid), scale_mm=10.0)
        fixed, moving = phantom.image(grid), phantom.image(grid, through=lambda y: y - 1.5)
    options = dict(preset=preset, iterations=1, device="cpu")
    assert register(fixed, moving, model=str(info.weights), **options).report["model"] == "m"
    assert len(calls) == forward_passes


def a_locally_deformed_2d_pair() -> tuple[sitk.Image, sitk.Image]:
    """A bump of 3 mm that the affine stage cannot undo: something for a network to do."""
    grid = oblique_grid(2, size=(48, 40))
    centre = grid_centre(grid)
    phantom = make_phantom(2, centre, scale_mm=12.0)

    def bump(y: np.ndarray) -> np.ndarray:
        weight = np.exp(-((y - centre) ** 2).sum(-1, keepdims=True) / (2 * 8.0**2))
        return y + 3.0 * weight * np.array([1.0, 0.5])

    return phantom.image(grid), phantom.image(grid, through=bump)


def test_cross_contrast_runs_prefer_a_default_model_trained_for_any_contrast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Defaults are tried in order: a same-contrast model seeds NCC runs, and a MIND run
    takes one whose JSON says ``"contrast": "any"`` before it (and without a contrast map)."""
    shipped = models.find_model("slice2d")  # it lowers the loss here, so the guard keeps it
    network = models.load_model(shipped)
    models.save_model(network, tmp_path, "same2d", extra_config=shipped.config)
    models.save_model(
        network, tmp_path, "any2d", extra_config={**shipped.config, "contrast": "any"}
    )
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(tmp_path))
    monkeypatch.setitem(models.DEFAULT_MODELS, 2, ("absent2d", "same2d", "any2d"))
    fixed, moving = a_locally_deformed_2d_pair()
    options = dict(model="default", preset="fast", iterations=2, device="cpu")

    assert register(fixed, moving, **options).report["model"] == "same2d"
    cross = register(fixed, moving, similarity="mind", **options)
    assert cross.report["model"] == "any2d"
    assert cross.report["notes"] == []

    (tmp_path / "any2d.json").write_text(
        (tmp_path / "any2d.json").read_text().replace('"any"', '"all"')
    )
    with pytest.raises(ModelError, match="contrast must be one of same, any, got 'all'"):
        register(fixed, moving, similarity="mind", **options)


def test_a_default_model_that_makes_the_loss_worse_is_not_used_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Images unlike a model's training data can mislead it; a model the user did not name
    must then not make the result worse than running without it."""
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=2, **SMALL)).eval()
    for parameter in network.parameters():  # a large random flow
        torch.nn.init.normal_(parameter, std=0.3)
    models.save_model(network, tmp_path / "mine", "misled2d")
    for parameter in network.parameters():  # the same network, predicting no flow at all
        torch.nn.init.zeros_(parameter)
    models.save_model(network, tmp_path / "mine", "still2d")
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(tmp_path / "mine"))
    monkeypatch.setitem(models.DEFAULT_MODELS, 2, ("misled2d",))
    fixed, moving = a_locally_deformed_2d_pair()
    options = dict(preset="fast", iterations=3, device="cpu")

    default = register(fixed, moving, model="default", **options)
    (note,) = default.report["notes"]
    assert "default model 'misled2d' made the lncc loss worse than the affine alone" in note
    assert default.report["model"] is None
    unused = register(fixed, moving, model="still2d", **options)  # same grid, zero flow
    assert np.array_equal(
        sitk.GetArrayFromImage(default.displacement), sitk.GetArrayFromImage(unused.displacement)
    )

    named = register(fixed, moving, model="misled2d", **options)  # the user's explicit choice
    assert named.report["model"] == "misled2d"
    assert named.report["notes"] == []


def test_the_default_model_is_left_out_beyond_the_field_of_view_it_was_trained_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A brain model must not seed a body CT: its JSON's ``max_extent_mm`` bounds the fixed
    foreground it is used on by default."""
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=3, **SMALL))
    extra = {"input_spacing_mm": 3.0, "max_extent_mm": 20.0}
    models.save_model(network, tmp_path / "mine", "small3d", extra_config=extra)
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(tmp_path / "mine"))
    monkeypatch.setitem(models.DEFAULT_MODELS, 3, ("small3d",))
    fixed, moving = a_shifted_3d_pair()
    options = dict(preset="fast", iterations=2, device="cpu")

    default = register(fixed, moving, model="default", **options)
    assert default.report["model"] is None
    assert any("is for fields of view up to 20 mm" in note for note in default.report["notes"])

    named = register(fixed, moving, model="small3d", **options)
    assert named.report["model"] == "small3d"
    assert named.report["notes"] == []


@pytest.mark.parametrize("value", ["wide", -5, 0])
def test_a_default_model_with_an_invalid_field_of_view_is_refused(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, value
) -> None:
    network = VxmDense(NetworkConfig(dim=3, **SMALL))
    models.save_model(network, tmp_path, "odd3d", extra_config={"max_extent_mm": value})
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(tmp_path))
    monkeypatch.setitem(models.DEFAULT_MODELS, 3, ("odd3d",))
    grid = oblique_grid(3, size=(20, 20, 20))
    image = make_phantom(3, grid_centre(grid), scale_mm=8.0).image(grid)
    with pytest.raises(ModelError, match="max_extent_mm must be a positive number"):
        register(image, image, model="default", preset="fast", iterations=1, device="cpu")
