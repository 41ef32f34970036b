"""Real inter-subject T1 brains (../shared/data/fs-dev): "fast" beats the affine and the network.

sub-02 (moving) → sub-01 (fixed), skull-stripped ``brainmask.nii.gz`` with FreeSurfer ``aseg``
labels, both downsampled to 2 mm first to keep the test well under a minute on two cores.
Run with ``-s`` to see the figures.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.imaging import fileio, metrics
from DeepRegisterLib.registration.affine_search import register_affine
from DeepRegisterLib.registration.engine import register

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
FS_DEV = DATA / "fs-dev"

pytestmark = [
    pytest.mark.realdata,
    pytest.mark.skipif(
        not (FS_DEV / "sub-01" / "aseg.nii.gz").exists(),
        reason=f"real brain data not available: {FS_DEV} is absent (internal dev data, "
        "not shipped with the project)",
    ),
]


def at_2mm(subject: str) -> tuple[sitk.Image, sitk.Image]:
    """Brain image averaged down by 2 per axis (1 → 2 mm), labels nearest-sampled onto it."""
    brain = fileio.read_image(FS_DEV / subject / "brainmask.nii.gz", f"{subject} brain")
    labels = fileio.read_image(FS_DEV / subject / "aseg.nii.gz", f"{subject} aseg")
    small = sitk.BinShrink(sitk.Cast(brain, sitk.sitkFloat32), [2] * brain.GetDimension())
    small_labels = sitk.Resample(
        labels, small, sitk.Transform(), sitk.sitkNearestNeighbor, 0, labels.GetPixelID()
    )
    return small, small_labels


def eval_dice(fixed_labels: sitk.Image, warped_labels: sitk.Image) -> float:
    per_label = metrics.dice_per_label(
        fixed_labels, warped_labels, labels=metrics.FREESURFER_EVAL_LABELS
    )
    return metrics.mean_dice(per_label)


def test_fast_registration_of_two_real_brains_beats_the_affine_and_the_network_alone() -> None:
    started = time.perf_counter()
    fixed, fixed_labels = at_2mm("sub-01")
    moving, moving_labels = at_2mm("sub-02")
    labels = {"aseg": moving_labels}

    fast = register(fixed, moving, moving_labels=labels, preset="fast", device="cpu")
    # The affine-only baseline is the SAME run's affine stage, applied alone (iterations=0).
    affine_only = register(
        fixed,
        moving,
        moving_labels=labels,
        affine=False,
        initial_transform=fast.affine,
        iterations=0,
        model=None,
        preset="fast",
        device="cpu",
    )

    # The network alone, from the same affine: refinement must add to it, not re-smooth it.
    # `balanced` runs all the model's passes (`fast` caps them at one), as the benchmark does.
    network_only = register(
        fixed, moving, moving_labels=labels, affine=False, initial_transform=fast.affine,
        iterations=0, preset="balanced", device="cpu",
    )  # fmt: skip

    dice_affine = eval_dice(fixed_labels, affine_only.warped_labels["aseg"])
    dice_network = eval_dice(fixed_labels, network_only.warped_labels["aseg"])
    dice_fast = eval_dice(fixed_labels, fast.warped_labels["aseg"])
    dice_none = eval_dice(
        fixed_labels,
        sitk.Resample(moving_labels, fixed_labels, sitk.Transform(), sitk.sitkNearestNeighbor),
    )
    elapsed = time.perf_counter() - started
    print(
        f"\nsub-02 → sub-01 at 2 mm, mean Dice over {len(metrics.FREESURFER_EVAL_LABELS)} "
        f"FreeSurfer labels: none {dice_none:.3f}, affine {dice_affine:.3f}, network alone "
        f"{dice_network:.3f}, fast {dice_fast:.3f} (model {fast.report['model']}); folding "
        f"{fast.report['folding_percent']:.4f} %, SDlogJ {fast.report['sdlogj']:.3f}; "
        f"fast run {fast.report['runtime_s']:.1f} s {fast.report['timings']}, whole test "
        f"{elapsed:.1f} s"
    )
    assert dice_affine > dice_none + 0.2  # the affine stage itself works on real data
    assert dice_fast >= dice_affine + 0.05
    assert network_only.report["model"] == fast.report["model"] == "brain3d"
    # Refinement keeps and adds to what the network found (a `fast` that re-smoothed the
    # network's field on a 4 mm control grid beat the network alone on only 11 of the 20
    # pairs). Here `fast` scores 0.792 from stage 4 of brain3d (alone 0.788) and from stage 5
    # (alone 0.790): the better the network, the less is left to add on this pair (on the 20
    # pairs at 1 mm, `fast` 0.8315 and 0.8317).
    assert dice_fast > dice_network
    assert fast.report["folding_percent"] < 0.01


@pytest.mark.slow
def test_the_model_check_scores_a_shipped_model_in_three_contrasts(tmp_path: Path) -> None:
    """``benchmarks/model_check.py`` on one pair: the affine and the model scored on the same
    grid, T1 pair, T2-like moving image (as it is and through the contrast map) and T2-like
    pair, and a table that marks the pairs used for validation."""
    from benchmarks import model_check

    assert model_check.main(["--models", "brain3d", "--pairs", "1", "--threads", "1",
                             "--data", str(FS_DEV), "--out", str(tmp_path)]) == 0  # fmt: skip
    rows = json.loads(next(tmp_path.glob("*-models.json")).read_text())
    assert [(row["pair"], row["contrast"]) for row in rows] == [
        ("sub-02→sub-01", "same"), ("sub-02→sub-01", "cross"), ("sub-02→sub-01", "t2-pair"),
    ]  # fmt: skip
    same, cross, t2_pair = rows
    for row in rows:
        assert 0.3 < row["affine"] < 0.9
    assert same["affine"] + 0.03 < same["models"]["brain3d"] < 0.9
    assert cross["models"]["brain3d"] < cross["affine"]  # a T1 model fed a T2-like image
    assert cross["affine"] + 0.03 < cross["mapped"]["brain3d"] < 0.9  # as the engine feeds it
    # Trained on random synthetic contrasts: a same-contrast pair need not be T1.
    assert t2_pair["affine"] + 0.03 < t2_pair["models"]["brain3d"] < 0.9
    table = next(tmp_path.glob("*-models.md")).read_text()
    assert "| same | all (1) |" in table
    assert "| cross | all (1) |" in table
    assert "| t2-pair | all (1) |" in table
    assert "`brain3d`: sub-02→sub-01, sub-04→sub-03" in table  # its validation pairs
    assert "| `brain3d` | " in table  # the mapped cross-contrast row


@pytest.mark.slow
def test_the_model_check_scores_only_the_contrasts_asked_for(tmp_path: Path) -> None:
    from benchmarks import model_check

    assert model_check.main(["--models", "brain3d", "--pairs", "1", "--threads", "1",
                             "--contrasts", "same", "--data", str(FS_DEV),
                             "--out", str(tmp_path), "--tag", "same"]) == 0  # fmt: skip
    rows = json.loads(next(tmp_path.glob("*-same.json")).read_text())
    assert [(row["pair"], row["contrast"]) for row in rows] == [("sub-02→sub-01", "same")]
    table = next(tmp_path.glob("*-same.md")).read_text()
    assert "| same | all (1) |" in table
    assert "| cross |" not in table
    assert "mapped into" not in table


def test_a_t2_like_moving_brain_keeps_the_networks_gain_through_the_contrast_map() -> None:
    """The 3D default model is same-contrast; a cross-contrast (MIND) run feeds it the moving
    image mapped into the fixed image's contrast, and it must still clearly beat the affine."""
    from benchmarks.pairs import t2_like

    fixed, fixed_labels = at_2mm("sub-01")
    moving, moving_labels = at_2mm("sub-02")
    labels = {"aseg": moving_labels}
    options = dict(similarity="mind", preset="fast", iterations=0, device="cpu")

    network = register(fixed, t2_like(moving), moving_labels=labels, **options)
    affine_only = register(
        fixed, t2_like(moving), moving_labels=labels, affine=False,
        initial_transform=network.affine, model=None, **options,
    )  # fmt: skip

    dice_affine = eval_dice(fixed_labels, affine_only.warped_labels["aseg"])
    dice_network = eval_dice(fixed_labels, network.warped_labels["aseg"])
    print(
        f"\nsub-02 (T2-like) → sub-01 at 2 mm: affine {dice_affine:.3f}, network alone "
        f"{dice_network:.3f} (model {network.report['model']}), network stage "
        f"{network.report['timings']['network_s']:.1f} s"
    )
    assert network.report["model"] == "brain3d"
    assert any("mapped into the fixed image's contrast" in n for n in network.report["notes"])
    assert dice_network >= dice_affine + 0.05


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_brain_turned_a_quarter_turn_in_its_header_is_turned_back_the_right_way(
    seed: int,
) -> None:
    """sub-02 turned 90° about x in its header, onto sub-04 (run_benchmark.py --turn 90's
    pair): the trials preferred turning it back the wrong way (with seeds 1 and 2 they ranked
    the right way third), and the rigid search's sample scored that end highest (a half-turn
    from the truth: 52–118 mm off below, Dice 0.09). Tried both ways and judged on every voxel
    of the finest rigid level, the affine found is the unturned pair's, turned: 1.4 mm off at
    most in the round's script, asserted within 5 mm, where the wrong way lies 50 mm off or
    more."""
    quarter_turn_about_x = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])
    assert _error_turned_back(quarter_turn_about_x, seed) < 5.0


@pytest.mark.parametrize(
    "turn",
    [np.diag([-1.0, -1.0, 1.0]), np.diag([-1.0, 1.0, -1.0])],
    ids=["lps-read-as-ras", "feet-first-read-as-head-first"],
)
def test_a_brain_turned_half_a_turn_in_its_header_is_righted(turn: np.ndarray) -> None:
    """Two axes of a header negated: the affine stage left such a brain upside down (19 of
    the 20 fs-dev pairs turned 180° with seed 0 ended 24–206 mm off, this one among them); it
    now runs the rigid search from the start's half-turns too, and the judge rights it."""
    assert _error_turned_back(turn, seed=0) < 5.0


def _error_turned_back(turn: np.ndarray, seed: int) -> float:
    """sub-02 turned in its header by ``turn`` about its centre, registered onto sub-04: how
    far (mm, at five points around the brain's middle) its affine lies from the unturned
    pair's, turned."""
    fixed = fileio.read_image(FS_DEV / "sub-04" / "brainmask.nii.gz", "sub-04 brain")
    moving = fileio.read_image(FS_DEV / "sub-02" / "brainmask.nii.gz", "sub-02 brain")
    unturned = register_affine(fixed, moving, iterations=30, seed=seed)

    centre = np.asarray(
        moving.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in moving.GetSize()])
    )
    turned = sitk.Image(moving)
    turned.SetDirection(tuple((turn @ np.reshape(moving.GetDirection(), (3, 3))).ravel()))
    turned.SetOrigin(tuple(centre + turn @ (np.asarray(moving.GetOrigin()) - centre)))
    found = register_affine(fixed, turned, iterations=30, seed=seed)

    middle = np.asarray(
        fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in fixed.GetSize()])
    )
    errors = []
    for offset in ([40, 0, 0], [0, 40, 0], [0, 0, 40], [-30, -30, 20], [0, 0, 0]):
        point = tuple(middle + offset)
        expected = centre + turn @ (np.asarray(unturned.TransformPoint(point)) - centre)
        errors.append(np.linalg.norm(np.asarray(found.TransformPoint(point)) - expected))
    return float(max(errors))
