"""An unusable model is refused with a specific, actionable error, and nothing is written: a
model for the wrong dimension, tampered or unverifiable weights, a missing name, an absurd
network config (refused before anything is allocated)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from refusals import folder_with_an_earlier_result, refused, three_d_pair

from DeepRegisterLib.errors import ModelError
from DeepRegisterLib.nn import networks
from DeepRegisterLib.nn.models import save_model
from DeepRegisterLib.nn.networks import NetworkConfig, VxmDense

TINY_NETWORK = dict(encoder=(4, 4), decoder=(4, 4, 4))


@pytest.fixture
def an_output_folder(tmp_path: Path) -> Path:
    return folder_with_an_earlier_result(tmp_path)


@pytest.fixture
def a_saved_3d_model(tmp_path: Path):
    return save_model(VxmDense(NetworkConfig(dim=3, **TINY_NETWORK)), tmp_path / "models", "m3d")


def test_a_2d_model_for_3d_images_is_refused(an_output_folder: Path, tmp_path: Path) -> None:
    info = save_model(VxmDense(NetworkConfig(dim=2, **TINY_NETWORK)), tmp_path, "m2d")
    message = refused(
        an_output_folder,
        ModelError,
        "'m2d' is 2D but the images are 3D",
        *three_d_pair(),
        model=info.weights,
    )
    assert "choose a 3D model" in message


def test_tampered_weights_fail_the_checksum(a_saved_3d_model, an_output_folder: Path) -> None:
    data = bytearray(a_saved_3d_model.weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # flip one bit in the middle of the tensors
    a_saved_3d_model.weights.write_bytes(bytes(data))
    refused(
        an_output_folder,
        ModelError,
        "checksum mismatch.*reinstall",
        *three_d_pair(),
        model=a_saved_3d_model.weights,
    )


def test_weights_without_a_checksum_file_are_refused(a_saved_3d_model, an_output_folder):
    a_saved_3d_model.weights.with_suffix(".sha256").unlink()
    refused(
        an_output_folder,
        ModelError,
        r"m3d\.sha256 is missing.*cannot be verified",
        *three_d_pair(),
        model=a_saved_3d_model.weights,
    )


def test_a_missing_model_is_refused_listing_what_is_available(an_output_folder: Path) -> None:
    refused(
        an_output_folder,
        ModelError,
        "no model named 'no-such-model'",
        *three_d_pair(),
        model="no-such-model",
    )


@pytest.mark.parametrize(
    ("network", "message"),
    [
        (dict(encoder=[16] * 100), "encoder must have 1..7 levels"),
        (dict(encoder=[10**6, 32], decoder=[32, 32, 16]), "feature counts"),
        (dict(encoder=[512] * 7, decoder=[512] * 12), "parameters"),
    ],
)
def test_an_absurd_model_config_is_refused_before_any_allocation(
    a_saved_3d_model,
    an_output_folder: Path,
    monkeypatch: pytest.MonkeyPatch,
    network: dict,
    message: str,
) -> None:
    config_path = a_saved_3d_model.weights.with_suffix(".json")
    config = json.loads(config_path.read_text())
    config["network"].update(network)
    config_path.write_text(json.dumps(config))

    def no_allocation(*args, **kwargs):
        raise AssertionError("a network was built from an absurd config")

    monkeypatch.setattr(networks.UNet, "__init__", no_allocation)
    text = refused(
        an_output_folder, ModelError, message, *three_d_pair(), model=a_saved_3d_model.weights
    )
    assert "'m3d'" in text
    assert "invalid network config" in text
    with pytest.raises(ValueError, match=message):  # and the network class checks it too
        VxmDense(_config(network))


def _config(network: dict) -> NetworkConfig:
    return NetworkConfig(
        dim=3,
        encoder=tuple(network["encoder"]),
        decoder=tuple(network.get("decoder", NetworkConfig.decoder)),
    )
