"""Model files: saved, found by path and by name, verified, and loaded without unpickling."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from small_networks import SMALL, random_pair, save_tiny_3d_model

from DeepRegisterLib.errors import ModelError
from DeepRegisterLib.nn import models
from DeepRegisterLib.nn.networks import NetworkConfig, VxmDense


@pytest.fixture
def a_saved_3d_model(tmp_path: Path) -> models.ModelInfo:
    return save_tiny_3d_model(tmp_path / "models")


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


def test_an_unknown_model_name_lists_the_available_ones(
    a_saved_3d_model: models.ModelInfo, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("DEEPREGISTER_MODEL_PATH", str(a_saved_3d_model.weights.parent))
    with pytest.raises(ModelError, match=r"no model named 'tiny'.*tiny3d"):
        models.find_model("tiny")
