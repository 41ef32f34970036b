"""Pair synthesis and the training loop, on tiny data (seconds on one CPU thread)."""

from __future__ import annotations

import argparse
import csv
import dataclasses
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from DeepRegisterLib.cli.train import add_train_parser, run_train
from DeepRegisterLib.errors import InputError, ModelError
from DeepRegisterLib.imaging import metrics
from DeepRegisterLib.imaging.geometry import Grid, flow_voxels_to_mm
from DeepRegisterLib.nn.models import find_model, load_model, save_model
from DeepRegisterLib.nn.networks import NetworkConfig, identity_grid, warp
from DeepRegisterLib.training import label_maps
from DeepRegisterLib.training.checkpoints import BEST, CHECKPOINT
from DeepRegisterLib.training.config import SynthesisConfig, TrainingConfig
from DeepRegisterLib.training.label_maps import ALIGNED_LABEL_MAPS, LabelMaps, load_label_maps
from DeepRegisterLib.training.log import CURVES, LOG
from DeepRegisterLib.training.loop import train
from DeepRegisterLib.training.pairs import PairFiles, prepare_pair, read_pairs_csv
from DeepRegisterLib.training.synthesis import Synthesiser
from DeepRegisterLib.training.validation import (
    SYNTHETIC_VALIDATION_PAIRS,
    network_scores,
    real_validation_pair,
    synthetic_validation_pairs,
)

SHAPES = {2: (32, 32), 3: (16, 16, 16)}


@pytest.fixture(autouse=True)
def one_thread():
    """Tests share two cores with other work; one thread also keeps results bitwise stable."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _config(dim: int = 2, **changes) -> TrainingConfig:
    base = TrainingConfig(
        shape=SHAPES[dim],
        spacing_mm=1.0,
        steps=6,
        learning_rate=1e-3,
        validate_every=3,
        checkpoint_every=3,
        network=NetworkConfig(dim=dim, encoder=(8, 8, 8, 8), decoder=(8, 8, 8, 8, 8, 8)),
    )
    return dataclasses.replace(base, **changes)


def _dice(fixed: torch.Tensor, warped: torch.Tensor) -> float:
    labels = [v for v in torch.unique(fixed).tolist()]
    return float(
        np.mean(
            [
                2
                * float(((fixed == v) & (warped == v)).sum())
                / float((fixed == v).sum() + (warped == v).sum())
                for v in labels
            ]
        )
    )


# --- synthesis -------------------------------------------------------------------------------


@pytest.mark.parametrize("dim", [2, 3])
def test_synthesis_is_deterministic_given_the_generator(dim: int) -> None:
    synthesiser = Synthesiser(SHAPES[dim])
    first = synthesiser(torch.Generator().manual_seed(5), batch=2)
    again = synthesiser(torch.Generator().manual_seed(5), batch=2)
    other = synthesiser(torch.Generator().manual_seed(6), batch=2)
    for name in ("fixed", "moving", "fixed_labels", "moving_labels", "flow"):
        assert torch.equal(getattr(first, name), getattr(again, name)), name
    assert not torch.equal(first.fixed, other.fixed)
    assert first.fixed.shape == (2, 1, *SHAPES[dim])
    assert first.flow.shape == (2, dim, *SHAPES[dim])
    assert float(first.fixed.min()) >= 0.0
    assert float(first.fixed.max()) <= 1.0


def test_a_zero_background_pair_is_black_outside_its_labels_like_a_skull_stripped_scan() -> None:
    black = Synthesiser(SHAPES[3], SynthesisConfig(zero_background=1.0))
    pair = black(torch.Generator().manual_seed(3))
    for image, labels in ((pair.fixed, pair.fixed_labels), (pair.moving, pair.moving_labels)):
        assert bool((labels == 0).any())
        assert float(image[labels == 0].abs().max()) == 0.0
        assert float(image[labels != 0].mean()) > 0.1

    # The mask is drawn last: everything else is the pair the default (0, no draw) gives.
    plain = Synthesiser(SHAPES[3])(torch.Generator().manual_seed(3))
    assert torch.equal(pair.moving, plain.moving * (plain.moving_labels != 0))
    assert float(plain.fixed[plain.fixed_labels == 0].abs().max()) > 0.0


@pytest.mark.parametrize("noise", [0.0, 0.03])
def test_each_label_has_one_intensity_up_to_noise(noise: float) -> None:
    """Without blur, bias and gamma, a label's voxels share one mean: their spread is the
    per-label noise only, well below the spread between labels' means."""
    config = SynthesisConfig(intensity_std=noise, blur_sigma=0.0, bias_std=0.0, gamma_std=0.0)
    pair = Synthesiser((48, 48), config)(torch.Generator().manual_seed(1))
    image, labels = pair.fixed.flatten(), pair.fixed_labels.flatten()
    inside = (image > 0) & (image < 1)  # the percentile normalisation clamps the extremes
    means, spreads = [], []
    for label in torch.unique(labels).tolist():
        values = image[(labels == label) & inside]
        if values.numel() > 10:
            means.append(float(values.mean()))
            spreads.append(float(values.std()))
    assert len(means) >= 5
    if noise == 0.0:
        assert max(spreads) < 1e-5
    else:
        assert 0 < np.median(spreads) < 0.1 < np.std(means)


@pytest.mark.parametrize("dim", [2, 3])
def test_the_true_flow_maps_fixed_labels_onto_moving_labels(dim: int) -> None:
    shape = (64, 64) if dim == 2 else (32, 32, 32)
    config = SynthesisConfig(shape_spacing=16.0, shape_labels=6)
    pair = Synthesiser(shape, config)(torch.Generator().manual_seed(3))
    one_hot = F.one_hot(pair.moving_labels[:, 0], 6).movedim(-1, 1).float()
    warped = warp(one_hot, pair.flow).argmax(dim=1, keepdim=True)
    # Only where x + flow(x) falls inside the moving image does it hold the answer.
    target = identity_grid(shape, torch.device("cpu")) + pair.flow
    size = torch.tensor(shape).view(1, dim, *([1] * dim))
    inside = ((target >= 0) & (target <= size - 1)).all(dim=1, keepdim=True)
    assert inside.float().mean() > 0.8
    assert _dice(pair.fixed_labels[inside], warped[inside]) > 0.9
    assert _dice(pair.fixed_labels, pair.moving_labels) < 0.8  # the pair really is deformed

    # Diffeomorphic: the Jacobian determinant of x ↦ x + flow(x) is positive everywhere.
    grid = Grid((*shape[::-1],), (1.0,) * dim, (0.0,) * dim, tuple(np.eye(dim).ravel()))
    vectors = flow_voxels_to_mm(pair.flow.double(), grid)[0].movedim(0, -1).numpy()
    displacement = grid.apply_to(sitk.GetImageFromArray(vectors, isVector=True))
    assert metrics.folding_percent(metrics.jacobian_determinant(displacement)) == 0.0


def test_label_maps_from_files_are_resampled_cropped_and_relabelled(tmp_path: Path) -> None:
    array = np.zeros((30, 30, 30), dtype=np.int16)
    array[5:25, 6:24, 8:22] = 7
    array[10:20, 10:20, 10:20] = 3
    array[12:14, 12:14, 12:14] = 502  # extra-cerebral in SynthSeg's convention
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((1.0, 1.0, 1.0))
    path = tmp_path / "labels.nii.gz"
    sitk.WriteImage(image, str(path))

    maps = load_label_maps([path], spacing_mm=2.0, background_from=100)
    assert maps.values == [0, 3, 7]
    assert maps.names == ["labels.nii.gz"]
    (volume,) = maps.maps
    assert volume.dim() == 3
    assert max(volume.shape) < 30  # 2 mm, cropped to the labels + margin
    assert set(torch.unique(volume).tolist()) == {0, 1, 2}

    pair = Synthesiser((16, 16), label_maps=maps)(torch.Generator().manual_seed(0))
    assert pair.fixed.shape == (1, 1, 16, 16)  # 2D training takes slices of 3D maps
    assert set(torch.unique(pair.fixed_labels).tolist()) <= {0, 1, 2}


def _head(tmp_path: Path, name: str, transform: sitk.Transform | None = None) -> Path:
    """An asymmetric three-label "head" (1 mm), optionally moved by ``transform``."""
    k, j, i = np.mgrid[:48, :48, :48].astype(float)
    outer = ((i - 24) / 15) ** 2 + ((j - 24) / 12) ** 2 + ((k - 24) / 10) ** 2 <= 1
    inner = ((i - 20) / 6) ** 2 + ((j - 26) / 5) ** 2 + ((k - 24) / 4) ** 2 <= 1
    blob = (i - 32) ** 2 + (j - 18) ** 2 + (k - 27) ** 2 <= 9
    array = np.where(blob, 17, np.where(inner, 4, np.where(outer, 2, 0))).astype(np.int16)
    image = sitk.GetImageFromArray(array)
    if transform is not None:
        image = sitk.Resample(image, image, transform, sitk.sitkNearestNeighbor, 0)
    sitk.WriteImage(image, str(tmp_path / name))
    return tmp_path / name


def test_aligned_label_maps_share_the_first_grid_in_register(tmp_path: Path) -> None:
    """A second subject in another pose is brought onto the first map's grid by the affine
    stage: pairs of two maps then differ by anatomy, not by pose."""
    pose = sitk.Euler3DTransform((23.5, 23.5, 23.5), 0.0, 0.0, np.radians(10), (3.0, -2.0, 0.0))
    first, second = _head(tmp_path, "a.nii.gz"), _head(tmp_path, "b.nii.gz", pose)

    as_they_are = load_label_maps([first, second], spacing_mm=2.0)
    aligned = load_label_maps([first, second], spacing_mm=2.0, align=True)

    assert not as_they_are.aligned
    assert aligned.aligned
    assert aligned.maps[0].shape == aligned.maps[1].shape
    assert torch.equal(aligned.maps[0], as_they_are.maps[0])
    assert _dice(aligned.maps[0], aligned.maps[1]) > 0.9
    unmoved = [torch.from_numpy(sitk.GetArrayFromImage(sitk.ReadImage(p))) for p in (first, second)]
    assert _dice(*unmoved) < 0.8  # the pose difference that the alignment removed


def test_aligned_label_maps_come_from_the_cache_while_files_and_options_match(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The cache saves minutes at every resume, and is never trusted when anything changed."""
    pose = sitk.Euler3DTransform((23.5, 23.5, 23.5), 0.0, 0.0, np.radians(10), (3.0, -2.0, 0.0))
    paths = [_head(tmp_path, "a.nii.gz"), _head(tmp_path, "b.nii.gz", pose)]
    cache = tmp_path / "aligned.pt"
    registrations = []
    register = label_maps.register_normalised
    monkeypatch.setattr(
        label_maps,
        "register_normalised",
        lambda *args, **kwargs: registrations.append(1) or register(*args, **kwargs),
    )

    def load(spacing_mm: float = 2.0) -> LabelMaps:
        return load_label_maps(paths, spacing_mm, align=True, cache=cache)

    first = load()
    assert len(registrations) == 1
    assert cache.exists()
    again = load()
    assert len(registrations) == 1  # from the cache
    assert again.aligned
    assert (again.names, again.values) == (first.names, first.values)
    assert all(torch.equal(a, b) for a, b in zip(first.maps, again.maps, strict=True))

    load(spacing_mm=3.0)  # another option: computed again (and cached for it)
    assert len(registrations) == 2
    _head(tmp_path, "b.nii.gz")  # the second subject's file changed
    load(spacing_mm=3.0)
    assert len(registrations) == 3
    cache.write_bytes(cache.read_bytes()[:100])  # truncated
    load(spacing_mm=3.0)
    assert len(registrations) == 4


def _two_subjects(aligned: bool = True) -> LabelMaps:
    one = torch.ones((24, 24, 24), dtype=torch.uint8)
    return LabelMaps([one, 2 * one], [0, 1, 2], 1.0, ["one", "two"], aligned=aligned)


@pytest.mark.parametrize("dim", [2, 3])
def test_other_subject_pairs_take_the_moving_labels_from_another_map(dim: int) -> None:
    def nonzero(labels: torch.Tensor) -> set[int]:
        return set(torch.unique(labels).tolist()) - {0}

    generator = torch.Generator().manual_seed(0)
    other = Synthesiser(SHAPES[dim], SynthesisConfig(other_subject=1.0), _two_subjects())
    for _ in range(4):
        pair = other(generator)
        assert {*nonzero(pair.fixed_labels), *nonzero(pair.moving_labels)} == {1, 2}
        assert pair.flow is None  # two anatomies: no true flow exists

    same = Synthesiser(SHAPES[dim], SynthesisConfig(other_subject=0.0), _two_subjects())
    pair = same(generator, batch=2)
    assert nonzero(pair.fixed_labels[:1]) == nonzero(pair.moving_labels[:1])
    assert pair.flow is not None
    assert pair.flow.shape == (2, dim, *SHAPES[dim])


@pytest.mark.parametrize("maps", [None, _two_subjects(aligned=False)])
def test_other_subject_pairs_need_aligned_label_maps(maps: LabelMaps | None) -> None:
    with pytest.raises(InputError, match="align=True"):
        Synthesiser((16, 16, 16), SynthesisConfig(other_subject=0.5), maps)


# --- training ------------------------------------------------------------------------------


def _write(array: np.ndarray, path: Path) -> Path:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(path))
    return path


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
    local NCC would mislead and even the affine stage leaves the pair misaligned; the labels,
    warped by the same bump, still say where everything went.
    """
    config = SynthesisConfig(shape_spacing=12.0, blur_sigma=0.0, bias_std=0.0)
    pair = Synthesiser((32, 32), config)(torch.Generator().manual_seed(2))
    y, x = torch.meshgrid(torch.arange(32.0), torch.arange(32.0), indexing="ij")
    bump = 4.0 * torch.exp(-((y - 16) ** 2 + (x - 16) ** 2) / 60)
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
    assert np.mean(dice[-5:]) < dice[0] - 0.1


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


# --- real pairs ---------------------------------------------------------------------------


def test_real_validation_scores_affine_only_like_a_zero_flow(tmp_path: Path) -> None:
    labels = np.zeros((40, 40), dtype=np.uint8)
    labels[8:30, 10:28] = 1
    labels[14:22, 12:20] = 2
    image = labels.astype(np.float32) * 50 + 10
    moved = np.roll(labels, 2, axis=1)
    (tmp_path / "pairs.csv").write_text(
        "fixed,moving,fixed_labels,moving_labels\nf.nii.gz,m.nii.gz,fl.nii.gz,ml.nii.gz\n"
    )
    _write(image, tmp_path / "f.nii.gz")
    _write(moved.astype(np.float32) * 50 + 10, tmp_path / "m.nii.gz")
    _write(labels, tmp_path / "fl.nii.gz")
    _write(moved, tmp_path / "ml.nii.gz")

    (files,) = read_pairs_csv(tmp_path / "pairs.csv")
    assert files.fixed == tmp_path / "f.nii.gz"  # relative to the CSV's folder
    pair = real_validation_pair(files, spacing_mm=1.0, multiple=16)
    assert pair.fixed.shape[2:] == (48, 48)  # the foreground box, rounded up to 16
    affine_only = pair.score(None)
    assert affine_only > 0.9  # the affine stage undoes the shift
    assert pair.score(torch.zeros(1, 2, 48, 48)) == pytest.approx(affine_only)


# --- command line -----------------------------------------------------------------------------


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deepregister")
    add_train_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["train", *argv])


def test_cli_trains_and_saves_a_model(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    args = _parse(
        "--out", str(tmp_path / "run"), "--name", "cli", "--model-dir", str(tmp_path / "models"),
        "--shape", "32", "32", "--spacing", "1", "--steps", "2", "--validate-every", "2",
        "--encoder", "4", "4", "4", "4", "--decoder", "4", "4", "4", "4", "4",
        "--threads", "1", "--device", "cpu",
    )  # fmt: skip
    assert args.run is run_train
    assert run_train(args) == 0
    assert find_model(tmp_path / "models" / "cli.pt").network.encoder == (4, 4, 4, 4)
    assert '"kind": "synthetic"' in capsys.readouterr().out


def test_cli_trains_on_pairs_of_two_aligned_label_maps(tmp_path: Path) -> None:
    pose = sitk.Euler3DTransform((23.5, 23.5, 23.5), np.radians(6), 0.0, 0.0, (0.0, 2.0, 1.0))
    maps = [_head(tmp_path, "a.nii.gz"), _head(tmp_path, "b.nii.gz", pose)]
    args = _parse(
        "--out", str(tmp_path / "run"), "--name", "pairs", "--label-maps", *map(str, maps),
        "--other-subject", "1", "--zero-background", "0.5", "--similarity-weight", "0",
        "--lr-schedule", "cosine",
        "--shape", "16", "16", "16", "--spacing", "2", "--steps", "2",
        "--validate-every", "2", "--encoder", "4", "4", "4", "4", "--decoder", "4", "4", "4",
        "4", "4", "--threads", "1", "--device", "cpu",
    )  # fmt: skip
    assert run_train(args) == 0
    recorded = json.loads((tmp_path / "run" / "pairs.json").read_text())["training"]
    assert recorded["config"]["synthesis"]["other_subject"] == 1.0
    assert recorded["data"]["label_maps_aligned"] is True
    assert (tmp_path / "run" / ALIGNED_LABEL_MAPS).exists()  # for a --resume
    assert recorded["config"]["similarity_weight"] == 0.0
    assert recorded["config"]["synthesis"]["zero_background"] == 0.5
    assert recorded["config"]["lr_schedule"] == "cosine"


def test_cli_help_and_options_load_neither_torch_nor_the_training_code() -> None:
    """``deepregister train --help`` answers at once: torch, numpy, SimpleITK, matplotlib and
    the training modules load only when training runs (a fresh interpreter tells)."""
    script = (
        "import argparse, contextlib, io, sys\n"
        "from DeepRegisterLib.cli.train import add_train_parser\n"
        "parser = argparse.ArgumentParser()\n"
        "add_train_parser(parser.add_subparsers())\n"
        "with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):\n"
        "    parser.parse_args(['train', '--help'])\n"
        "parser.parse_args(['train', '--out', 'x', '--shape', '32', '32'])\n"
        "heavy = {'torch', 'numpy', 'SimpleITK', 'matplotlib'}\n"
        "training = {'DeepRegisterLib.training', 'DeepRegisterLib.training.config'}\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in heavy\n"
        "             or m.startswith('DeepRegisterLib.training') and m not in training))\n"
    )
    root = Path(__file__).resolve().parents[1]
    loaded = subprocess.run(
        [sys.executable, "-c", script], cwd=root, capture_output=True, text=True, check=True
    )
    assert loaded.stdout.strip() == "[]"


def test_cli_reports_bad_options_as_input_errors(
    tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    args = _parse("--out", str(tmp_path), "--shape", "30", "30", "--device", "cpu")
    assert run_train(args) == 2
    assert "multiple of 16" in capsys.readouterr().err


def test_real_pairs_are_prepared_exactly_as_the_engine_feeds_its_network(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Validation scores a model on what the engine will give it: both images normalised on
    their full grids, then smoothed and resampled (the fixed image was once normalised after
    resampling in training only, which put validation on other intensities than real use)."""
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
    from DeepRegisterLib.registration import engine, optimisation_stage

    generated = phantom_pair(demo_grid(3, size=64), amplitude_mm=3.0)
    files = PairFiles(tmp_path / "fixed.nii.gz", tmp_path / "moving.nii.gz")
    sitk.WriteImage(generated.fixed, str(files.fixed))
    sitk.WriteImage(generated.moving * 7.0 + 100.0, str(files.moving))  # another intensity scale
    fed: list[torch.Tensor] = []

    def capture(fixed, moving, *args, **kwargs):
        fed.extend((fixed, moving))
        raise RuntimeError("captured")

    monkeypatch.setattr(optimisation_stage, "optimise_velocity", capture)
    with pytest.raises(RuntimeError, match="captured"):
        engine.register(files.fixed, files.moving, preset="balanced", model=None, device="cpu")
    # "balanced" runs on a 2 mm grid, with the affine stage's default settings, as training.
    prepared = prepare_pair(files, spacing_mm=2.0, multiple=2)
    assert tuple(prepared.grid.size) == tuple(fed[0].shape[2:][::-1])
    torch.testing.assert_close(prepared.fixed, fed[0], rtol=0, atol=0)
    torch.testing.assert_close(prepared.moving, fed[1], rtol=0, atol=0)
