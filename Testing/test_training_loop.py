"""The training loop on tiny data (seconds on one CPU thread): the loss drops, label Dice
alone trains, the learning-rate schedule, saved and fine-tuned models, the engine's passes,
resuming from checkpoints, the time budget, and the configuration checks."""

from __future__ import annotations

import csv
import dataclasses
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
import tiny_training
import torch
from tiny_training import _config, _write

from DeepRegisterLib.errors import InputError, ModelError
from DeepRegisterLib.nn.models import find_model, load_model, save_model
from DeepRegisterLib.nn.networks import NetworkConfig, warp
from DeepRegisterLib.training.checkpoints import BEST, CHECKPOINT
from DeepRegisterLib.training.config import SynthesisConfig
from DeepRegisterLib.training.log import CURVES, LOG
from DeepRegisterLib.training.loop import train
from DeepRegisterLib.training.pairs import PairFiles
from DeepRegisterLib.training.synthesis import Synthesiser
from DeepRegisterLib.training.validation import (
    SYNTHETIC_VALIDATION_PAIRS,
    network_scores,
    synthetic_validation_pairs,
)

# The shared autouse fixture, bound here for pytest to find and use in this module.
one_thread = tiny_training.one_thread

# --- training ------------------------------------------------------------------------------


@pytest.mark.parametrize("passes", [0, 2])
def test_training_lowers_the_loss_of_the_pair_it_trains_on(tmp_path: Path, passes: int) -> None:
    """30 steps on one tiny synthetic pair, as real-pair files: the loss must drop, whether it
    sees one one-sided pass or the engine's two recursive symmetric passes.

    The moving image is the fixed one under a smooth local bump (which the affine stage
    cannot undo), so there is a deformation to learn whatever the random draws.
    """
    config = SynthesisConfig(shape_spacing=12.0, blur_sigma=0.0, bias_std=0.0)
    fixed = Synthesiser((32, 32), config)(torch.Generator().manual_seed(2)).fixed
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    bump = 4.0 * torch.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 60)
    moving = warp(fixed, torch.stack([bump, -bump])[None], padding_mode="border")
    files = PairFiles(
        _write(fixed[0, 0].numpy(), tmp_path / "fixed.nii.gz"),
        _write(moving[0, 0].numpy(), tmp_path / "moving.nii.gz"),
    )
    result = train(
        _config(
            steps=30,
            learning_rate=3e-3,
            real_fraction=1.0,
            validate_every=30,
            checkpoint_every=30,
            passes=passes,
        ),
        tmp_path / "run",
        real_pairs=[files],
        progress=None,
    )
    with (tmp_path / "run" / LOG).open() as stream:
        losses = [float(r["loss"]) for r in csv.DictReader(stream) if r["loss"]]
    assert len(losses) == 30
    assert np.mean(losses[-5:]) < losses[0] - 0.03
    assert result.summary["steps"] == 30


def test_label_dice_alone_trains_without_computing_the_image_similarity(tmp_path: Path) -> None:
    """SynthMorph's loss: a similarity weight of 0 leaves Dice + regulariser, and they learn.

    The moving image has another contrast (label intensities scrambled, background kept), so
    local NCC would mislead; the affine stage leaves the bump, and the labels, warped by the
    same bump, still say where everything went.
    """
    config = SynthesisConfig(shape_spacing=12.0, blur_sigma=0.0, bias_std=0.0)
    pair = Synthesiser((32, 32), config)(torch.Generator().manual_seed(2))
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    bump = 6.0 * torch.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 60)
    flow = torch.stack([bump, -bump])[None]
    moving = warp(pair.fixed, flow, padding_mode="border")
    moving = torch.where(moving > 0.02, (5 * moving) % 1 + 0.1, moving)
    moving_labels = warp(pair.fixed_labels.float(), flow, mode="nearest", padding_mode="border")
    files = PairFiles(
        _write(pair.fixed[0, 0].numpy(), tmp_path / "fixed.nii.gz"),
        _write(moving[0, 0].numpy(), tmp_path / "moving.nii.gz"),
        _write(pair.fixed_labels[0, 0].numpy().astype(np.int16), tmp_path / "fixed_labels.nii.gz"),
        _write(moving_labels[0, 0].numpy().astype(np.int16), tmp_path / "moving_labels.nii.gz"),
    )
    train(
        _config(
            steps=30, learning_rate=3e-3, real_fraction=1.0, similarity_weight=0.0,
            validate_every=30, checkpoint_every=30,
        ),
        tmp_path / "run", real_pairs=[files], progress=None,
    )  # fmt: skip
    with (tmp_path / "run" / LOG).open() as stream:
        rows = [r for r in csv.DictReader(stream) if r["loss"]]
    assert all(r["similarity"] == "" for r in rows)
    for row in rows:
        terms = float(row["regularization"]) + float(row["dice_loss"])
        assert float(row["loss"]) == pytest.approx(terms, rel=1e-4, abs=1e-6)
    dice = [float(r["dice_loss"]) for r in rows]
    # From 0.67 to 0.60: the affine stage leaves the bump and a few millimetres (levels at 2
    # and 1 mm for this 32² pair; at 4 and 2 mm it left up to 15 mm, from 0.72 to 0.57).
    assert np.mean(dice[-5:]) < dice[0] - 0.05


def test_a_zero_similarity_weight_needs_labels_on_every_real_pair(tmp_path: Path) -> None:
    image = _write(np.zeros((32, 32), np.float32), tmp_path / "image.nii.gz")
    with pytest.raises(InputError, match="needs label maps"):
        train(
            _config(similarity_weight=0.0), tmp_path, real_pairs=[PairFiles(image, image)],
            progress=None,
        )  # fmt: skip
    assert not (tmp_path / CHECKPOINT).exists()


def test_the_cosine_schedule_decays_from_the_learning_rate_to_zero(tmp_path: Path) -> None:
    config = _config(steps=6, lr_schedule="cosine", learning_rate=1e-3)
    rates = [config.learning_rate_at(step) for step in range(1, 8)]
    assert rates[0] == pytest.approx(1e-3)
    assert rates[3] == pytest.approx(0.5e-3)  # halfway: step 4 of 6
    assert rates[6] == pytest.approx(0.0, abs=1e-18)  # one past the last step
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert _config().learning_rate_at(6) == _config().learning_rate

    train(config, tmp_path, progress=None)
    state = torch.load(tmp_path / CHECKPOINT, weights_only=True)
    assert state["optimiser"]["param_groups"][0]["lr"] == pytest.approx(rates[5])


@pytest.mark.parametrize("dim", [2, 3])
def test_training_end_to_end_writes_a_loadable_checksummed_model(tmp_path: Path, dim: int) -> None:
    out = tmp_path / "run"
    result = train(_config(dim, steps=4), out, name="tiny", progress=None)
    for name in (CHECKPOINT, BEST, LOG, CURVES, "tiny.pt", "tiny.json", "tiny.sha256"):
        assert (out / name).exists(), name
    config = json.loads((out / "tiny.json").read_text())
    assert config["input_spacing_mm"] == 1.0
    assert config["similarity"] == "lncc"
    assert config["training"]["steps"] == 4
    validation = config["training"]["validation"]
    assert validation["kind"] == "synthetic"
    assert len(validation["best"]) == 4

    network = load_model(find_model(out / "tiny.pt"))
    assert network.config.dim == dim
    assert result.model.sha256 == find_model(out / "tiny.pt").sha256

    weights = out / "tiny.pt"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="checksum mismatch"):
        load_model(find_model(weights))


def test_fine_tuning_starts_from_the_given_model_and_records_its_checksum(tmp_path: Path) -> None:
    parent = train(_config(steps=3), tmp_path / "parent", name="parent", progress=None)
    child = train(
        _config(steps=2), tmp_path / "child", name="child", init_model=parent.model.weights,
        progress=None,
    )  # fmt: skip
    validation = child.summary["validation"]
    # Step 0 of the child scores the parent's saved (best) weights on the same validation pairs.
    assert validation["initial"] == pytest.approx(parent.summary["validation"]["best"])
    data = json.loads(child.model.weights.with_suffix(".json").read_text())["training"]["data"]
    assert data["initial_weights"] == str(parent.model.weights)
    assert data["initial_weights_sha256"] == parent.model.sha256
    other = dataclasses.replace(_config(), network=NetworkConfig(dim=2, encoder=(4, 4, 4, 4)))
    with pytest.raises(InputError, match="another network"):
        train(other, tmp_path / "other", init_model=parent.model.weights, progress=None)


def test_training_the_engines_passes_validates_and_saves_them(tmp_path: Path) -> None:
    """With ``passes`` the loss, the validation and the model's JSON all use the engine's
    recursive inference, so the chosen checkpoint is the best at what the engine runs; a
    fine-tune keeps its parent's field-of-view guard."""
    parent = train(_config(steps=2), tmp_path / "parent", name="parent", progress=None)
    assert json.loads(parent.model.weights.with_suffix(".json").read_text())["passes"] == 1
    # A barely trained network predicts almost nothing, the same in one pass or two: give it
    # a flow to predict, so that scores in one and in two passes tell each other apart.
    network = load_model(parent.model)
    torch.manual_seed(0)
    torch.nn.init.normal_(network.flow.weight, std=10.0)  # velocities of a voxel or two
    bold = save_model(network, tmp_path / "bold", "bold", {"max_extent_mm": 120.0})

    config = _config(steps=2, passes=2)
    child = train(config, tmp_path / "child", name="child", init_model=bold.weights, progress=None)
    assert json.loads(child.model.weights.with_suffix(".json").read_text())["passes"] == 2
    assert find_model(child.model.weights).passes == 2
    assert find_model(child.model.weights).max_extent_mm == 120.0  # the parent's guard

    pairs = synthetic_validation_pairs(
        Synthesiser(config.shape, config.synthesis), SYNTHETIC_VALIDATION_PAIRS, config.seed
    )
    expected = network_scores(network, pairs, torch.device("cpu"), passes=2)
    assert child.summary["validation"]["initial"] == pytest.approx(expected)
    assert expected != pytest.approx(network_scores(network, pairs, torch.device("cpu")))

    # The same first batch from the same weights, seen through one one-sided pass instead.
    train(_config(steps=1), tmp_path / "one", init_model=bold.weights, progress=None)
    first_losses = []
    for run in ("child", "one"):
        with (tmp_path / run / LOG).open() as stream:
            first_losses.append(next(float(r["loss"]) for r in csv.DictReader(stream) if r["loss"]))
    assert first_losses[0] != pytest.approx(first_losses[1], rel=1e-3)


@pytest.mark.parametrize("schedule", ["constant", "cosine"])
def test_resume_continues_at_the_next_step_exactly(tmp_path: Path, schedule: str) -> None:
    """Stopped after step 1, resumed to 6 == 6 steps straight: the same weights and optimiser
    state after step 6, each step logged once.

    The cosine rate depends on the planned steps, so the interrupted run plans 6 as well and
    its time budget stops it.
    """
    config = _config(steps=6, lr_schedule=schedule)
    train(config, tmp_path / "straight", progress=None)
    stopped = train(
        dataclasses.replace(config, max_minutes=1e-9), tmp_path / "resumed", progress=None
    )
    assert stopped.summary["steps"] == 1
    messages: list[str] = []
    train(config, tmp_path / "resumed", resume=True, progress=messages.append)
    assert any("resuming after step 1" in m for m in messages)
    validations = [m for m in messages if "validation mean Dice" in m]
    assert validations  # each shows the score of every pair, to tell contrasts apart
    assert all(len(m.split("(pairs: ")[1].split(";")[0].split()) == 4 for m in validations)

    state = torch.load(tmp_path / "resumed" / CHECKPOINT, weights_only=True)
    assert state["step"] == 6
    with (tmp_path / "resumed" / LOG).open() as stream:
        assert [int(r["step"]) for r in csv.DictReader(stream)] == list(range(7))
    reference = torch.load(tmp_path / "straight" / CHECKPOINT, weights_only=True)
    assert all(torch.equal(reference["model"][k], state["model"][k]) for k in state["model"])
    moments = [reference["optimiser"]["state"], state["optimiser"]["state"]]
    assert all(
        torch.equal(moments[0][i][key], moments[1][i][key])
        for i in moments[0]
        for key in ("exp_avg", "exp_avg_sq")
    )
    lrs = [c["optimiser"]["param_groups"][0]["lr"] for c in (reference, state)]
    assert lrs[0] == lrs[1]


def test_resume_refuses_a_checkpoint_of_another_network(tmp_path: Path) -> None:
    train(_config(steps=3), tmp_path, progress=None)
    other = dataclasses.replace(
        _config(steps=6), network=NetworkConfig(dim=2, encoder=(4, 4, 4, 4))
    )
    with pytest.raises(InputError, match="another network"):
        train(other, tmp_path, resume=True, progress=None)


def test_a_time_budget_stops_training_and_still_saves(tmp_path: Path) -> None:
    result = train(_config(steps=1000, max_minutes=1e-6), tmp_path, progress=None)
    assert result.summary["steps"] == 1
    assert result.model.weights.exists()


@pytest.mark.parametrize(("native", "noted"), [(False, True), (True, False)])
def test_mixed_precision_on_a_cpu_without_bfloat16_says_it_is_slow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, native: bool, noted: bool
) -> None:
    """Emulated bfloat16 cost ten times a float32 step on such a CPU: the run says so."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)
    said: list[str] = []
    train(_config(steps=1, mixed_precision=True), tmp_path, progress=said.append)
    assert any("no bfloat16 instructions" in line for line in said) == noted
    said.clear()
    train(_config(steps=1, mixed_precision=None), tmp_path / "default", progress=said.append)
    assert not any("bfloat16" in line for line in said)  # off by default on a CPU: no note


def test_config_check_refuses_a_shape_the_network_cannot_take() -> None:
    with pytest.raises(InputError, match="multiple of 16"):
        _config(shape=(30, 30)).check()


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"similarity_weight": 0.0, "dice_weight": 0.0}, "nothing drives the alignment"),
        ({"similarity_weight": -1.0}, "must be ≥ 0"),
        ({"lr_schedule": "step"}, "unknown learning-rate schedule"),
        ({"passes": -1}, "passes must be from 0 to 8"),
        ({"passes": 9}, "passes must be from 0 to 8"),
    ],
)
def test_config_check_refuses_weights_or_schedules_that_cannot_train(
    changes: dict, message: str
) -> None:
    with pytest.raises(InputError, match=message):
        _config(**changes).check()


def test_config_check_refuses_an_other_subject_probability_above_one() -> None:
    with pytest.raises(InputError, match="other-subject probability"):
        _config(synthesis=SynthesisConfig(other_subject=1.5)).check()
