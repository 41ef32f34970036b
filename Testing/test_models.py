"""Models: saved, found by path and by name, verified, loaded without unpickling, and used."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import grid_centre, image_on, make_phantom, oblique_grid

from DeepRegisterLib.errors import ModelError
from DeepRegisterLib.imaging import metrics
from DeepRegisterLib.imaging.geometry import Grid, flow_voxels_to_mm
from DeepRegisterLib.nn import models
from DeepRegisterLib.nn.networks import NetworkConfig, VxmDense, integrate_velocity
from DeepRegisterLib.registration.engine import register
from DeepRegisterLib.registration.preprocessing import foreground_box
from DeepRegisterLib.registration.presets import get_preset

SMALL = dict(encoder=(8, 8, 8), decoder=(8, 8, 8, 8))


@pytest.fixture
def a_saved_3d_model(tmp_path: Path) -> models.ModelInfo:
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=3, **SMALL))
    return models.save_model(
        network, tmp_path / "models", "tiny3d", extra_config={"input_spacing_mm": 3.0}
    )


def random_pair(dim: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 1, *[size] * dim)
    return torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)


def test_a_saved_model_is_found_by_path_and_by_name_and_loads_identically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=3, **SMALL)).eval()
    for parameter in network.parameters():  # make the flow head non-trivial
        torch.nn.init.normal_(parameter, std=0.1)
    saved = models.save_model(network, tmp_path / "mine", "brainish")
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(tmp_path / "mine"))

    by_path = models.find_model(saved.weights)
    by_name = models.find_model("brainish")
    by_folder = models.find_model(tmp_path / "mine")
    assert by_path.weights == by_name.weights == by_folder.weights == saved.weights
    assert "brainish" in models.available_models()
    assert by_name.sha256 == models.sha256_of(saved.weights)

    loaded = models.load_model(by_name)
    fixed, moving = random_pair(3)
    with torch.inference_mode():
        expected = network(fixed, moving)
        actual = loaded(fixed, moving)
    for a, b in zip(expected, actual, strict=True):
        assert torch.equal(a, b)
    assert expected[1].abs().max() > 1e-3  # the outputs compared are not all zero


def test_a_3d_model_runs_channels_last_on_the_cpu_with_the_same_velocity(tmp_path: Path) -> None:
    """oneDNN's faster layout for 3D convolutions; what the engine gets back is unchanged."""
    torch.manual_seed(1)
    plain = VxmDense(NetworkConfig(dim=3, **SMALL)).eval()
    for parameter in plain.parameters():  # a flow head far from zero
        torch.nn.init.normal_(parameter, std=0.1)
    loaded = models.load_model(models.save_model(plain, tmp_path, "layout"))
    for parameter in plain.parameters():
        assert parameter.is_contiguous()
    weights = loaded.unet.encoder[0][0].weight
    assert weights.is_contiguous(memory_format=torch.channels_last_3d)
    assert not weights.is_contiguous()
    fixed, moving = random_pair(3, size=24, seed=2)
    with torch.inference_mode():
        expected, actual = plain.velocity(fixed, moving), loaded.velocity(fixed, moving)
    assert actual.is_contiguous()
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


def test_a_name_on_the_model_path_shadows_the_shipped_and_home_folders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    models.save_model(VxmDense(NetworkConfig(dim=2, **SMALL)), first, "same")
    models.save_model(VxmDense(NetworkConfig(dim=3, **SMALL)), second, "same")
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", os.pathsep.join([str(first), str(second)]))
    assert models.find_model("same").network.dim == 2  # earlier folders win


def test_weights_are_loaded_with_weights_only(
    a_saved_3d_model: models.ModelInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    models.load_model(a_saved_3d_model)
    assert calls
    assert all(call.get("weights_only") is True for call in calls)


class Payload:
    """Unpickling this touches a file: proof that arbitrary code ran."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_a_pickled_object_in_the_weights_is_refused_without_running_it(
    a_saved_3d_model: models.ModelInfo, tmp_path: Path
) -> None:
    marker = tmp_path / "code-ran"
    state = torch.load(a_saved_3d_model.weights, weights_only=True)
    torch.save({**state, "x": Payload(marker)}, a_saved_3d_model.weights)
    # A consistent checksum: the file is "trusted" by hash, and still must not unpickle code.
    a_saved_3d_model.weights.with_suffix(".sha256").write_text(
        f"{models.sha256_of(a_saved_3d_model.weights)}  tiny3d.pt\n"
    )
    with pytest.raises(ModelError, match="cannot read weights"):
        models.load_model(models.find_model(a_saved_3d_model.weights))
    assert not marker.exists()


@pytest.mark.parametrize(
    "config",
    [
        NetworkConfig(dim=2),
        NetworkConfig(dim=3),
        NetworkConfig(dim=3, **SMALL),
        NetworkConfig(dim=2, encoder=(4, 8), decoder=(8, 4, 4)),
        NetworkConfig(dim=3, encoder=(16, 32, 32, 32), decoder=(32, 32, 32, 32, 32, 16, 16)),
    ],
    ids=["2d-default", "3d-default", "3d-small", "2d-short", "3d-vxm1"],
)
def test_the_parameter_count_from_the_config_equals_the_real_count(config: NetworkConfig):
    network = VxmDense(config)
    assert config.parameter_count() == sum(p.numel() for p in network.parameters())


@pytest.mark.parametrize("dim", [2, 3])
def test_an_untrained_network_predicts_a_near_zero_flow(dim: int) -> None:
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=dim)).eval()
    fixed, moving = random_pair(dim, size=32)
    with torch.inference_mode():
        warped, flow, _ = network(fixed, moving)
    assert flow.abs().max() < 1e-2  # voxels
    assert (warped - moving).abs().max() < 0.05


@pytest.mark.parametrize("dim", [2, 3])
def test_symmetric_inference_swaps_to_the_inverse_field(dim: int) -> None:
    """Swapping fixed and moving negates the velocity, so exp(−v) is exactly the inverse map
    the other order asks for; one pass alone has no such guarantee."""
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=dim, **SMALL)).eval()
    for parameter in network.flow.parameters():  # an untrained head predicts ~0: scale it up
        parameter.data.normal_(std=0.1)
    fixed, moving = random_pair(dim)
    with torch.inference_mode():
        forward = network.symmetric_velocity(fixed, moving)
        backward = network.symmetric_velocity(moving, fixed)
        one_pass = network.velocity(fixed, moving)
        other_pass = network.velocity(moving, fixed)
    torch.testing.assert_close(backward, -forward, rtol=0, atol=0)
    torch.testing.assert_close(forward, (one_pass - other_pass) / 2)
    assert not torch.allclose(one_pass, -other_pass, atol=1e-3)


@pytest.mark.parametrize("dim", [2, 3])
def test_recursive_inference_adds_a_correction_and_still_swaps_to_the_inverse(dim: int) -> None:
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=dim, **SMALL)).eval()
    for parameter in network.flow.parameters():
        parameter.data.normal_(std=0.1)
    fixed, moving = random_pair(dim)
    with torch.inference_mode():
        once = network.recursive_velocity(fixed, moving, 1)
        twice = network.recursive_velocity(fixed, moving, 2)
        swapped = network.recursive_velocity(moving, fixed, 2)
        symmetric = network.symmetric_velocity(fixed, moving)
    torch.testing.assert_close(once, symmetric, rtol=0, atol=0)
    torch.testing.assert_close(swapped, -twice, rtol=0, atol=0)
    assert not torch.allclose(twice, once, atol=1e-3)


def test_one_sided_recursive_inference_runs_one_forward_pass_per_pass() -> None:
    """``symmetric=False`` (what `fast` asks for) is the (fixed, moving) order alone: half the
    forward passes, and the refinement adds the one-sided correction."""
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=3, **SMALL)).eval()
    for parameter in network.flow.parameters():
        parameter.data.normal_(std=0.1)
    fixed, moving = random_pair(3)
    calls = []
    network.unet.register_forward_hook(lambda *_: calls.append(1))
    with torch.inference_mode():
        once = network.recursive_velocity(fixed, moving, 1, symmetric=False)
        assert len(calls) == 1
        twice = network.recursive_velocity(fixed, moving, 2, symmetric=False)
        assert len(calls) == 3
        direct = network.velocity(fixed, moving)
    torch.testing.assert_close(once, direct, rtol=0, atol=0)
    assert not torch.allclose(twice, once, atol=1e-3)


@pytest.mark.parametrize("passes", [0, 9, 1.5, True, "2", None])
def test_a_model_asking_for_an_impossible_number_of_passes_is_refused(
    a_saved_3d_model: models.ModelInfo, passes: object
) -> None:
    info = models.ModelInfo(
        a_saved_3d_model.name, a_saved_3d_model.weights,
        {**a_saved_3d_model.config, "passes": passes},
    )  # fmt: skip
    with pytest.raises(ModelError, match="passes must be a whole number from 1 to 8"):
        _ = info.passes
    assert a_saved_3d_model.passes == 1  # absent: one pass


def swirl(dim: int, size: int, turn: float, sigma: float) -> torch.Tensor:
    """A smooth, divergence-free vortex in the first two array axes (voxels), ``turn`` rad/voxel
    at its centre, fading over ``sigma`` voxels."""
    axes = [torch.arange(size, dtype=torch.float64) - (size - 1) / 2] * dim
    centred = torch.stack(torch.meshgrid(*axes, indexing="ij"))
    weight = turn * torch.exp(-(centred**2).sum(0) / (2 * sigma**2))
    velocity = torch.zeros((1, dim, *[size] * dim), dtype=torch.float64)
    velocity[0, 0], velocity[0, 1] = -weight * centred[1], weight * centred[0]
    return velocity


@pytest.mark.parametrize("dim", [2, 3])
def test_integrating_a_smooth_velocity_gives_a_positive_jacobian(dim: int) -> None:
    """The velocity used directly as a displacement folds; its exponential does not (and, the
    velocity being divergence-free, stays close to volume-preserving)."""
    size = 32
    velocity = swirl(dim, size, turn=3.0, sigma=5.0)  # up to ≈ 9 voxels
    grid = Grid(tuple([size] * dim), (1.0,) * dim, (0.0,) * dim, tuple(np.eye(dim).ravel()))

    def det_j(flow: torch.Tensor) -> np.ndarray:
        mm = flow_voxels_to_mm(flow, grid)[0].numpy()
        field = image_on(grid, np.moveaxis(mm, 0, -1).copy(), vector=True)
        return sitk.GetArrayFromImage(metrics.jacobian_determinant(field))

    assert det_j(velocity).min() < 0  # the raw field folds: the test case is demanding
    integrated = det_j(integrate_velocity(velocity, steps=7))
    assert integrated.min() > 0.5
    assert np.abs(integrated - 1).mean() < 0.05


def test_following_only_the_last_squarings_keeps_the_flow_and_approximates_the_gradient() -> None:
    """The optimisation differentiates only the last squarings: the flow is the same to the
    bit, the gradient nears the exact one as more squarings are followed, and it is the exact
    one when all are (and, following none, the linear stand-in alone)."""
    velocity = swirl(3, 32, turn=3.0, sigma=5.0)  # up to ≈ 9 voxels: a demanding case
    upstream = torch.randn(velocity.shape, generator=torch.Generator().manual_seed(0))

    def flow_and_gradient(differentiated: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        parameter = velocity.clone().requires_grad_(True)
        flow = integrate_velocity(parameter, 7, differentiated)
        (flow * upstream.to(flow.dtype)).sum().backward()
        return flow.detach(), parameter.grad

    exact_flow, exact_gradient = flow_and_gradient(None)
    errors = []
    for differentiated in (0, 1, 2, 3, 7):
        flow, gradient = flow_and_gradient(differentiated)
        assert torch.equal(flow, exact_flow)
        errors.append(float((gradient - exact_gradient).norm() / exact_gradient.norm()))
        if differentiated == 0:
            torch.testing.assert_close(gradient, upstream.to(gradient.dtype))
    assert errors == sorted(errors, reverse=True)
    assert errors[-1] == 0.0
    assert errors[2] < 0.2  # two squarings followed, as the optimisation does


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
    box = Grid.of(fixed).with_spacing_cropped_to(
        result.report["network_grid"]["spacing_mm"],
        *foreground_box(fixed, None, get_preset("fast").foreground_margin_mm),
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


def test_an_unknown_model_name_lists_the_available_ones(
    a_saved_3d_model: models.ModelInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(a_saved_3d_model.weights.parent))
    with pytest.raises(ModelError, match=r"no model named 'tiny'.*tiny3d"):
        models.find_model("tiny")


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
