"""Real image pairs for training: validation on a pairs CSV, and pairs prepared exactly as
the registration engine feeds its network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tiny_training
import torch
from tiny_training import _write

from DeepRegisterLib.training.pairs import PairFiles, prepare_pair, read_pairs_csv
from DeepRegisterLib.training.validation import real_validation_pair

# The shared autouse fixture, bound here for pytest to find and use in this module.
one_thread = tiny_training.one_thread

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
    pair = real_validation_pair(files, spacing_mm=1.0)
    # The foreground box (rows 8–29, columns 10–27) with the default preset's 5 mm margin, not
    # rounded up to 48 × 48 for a network whose size multiple is 16 (it pads its own input).
    assert pair.fixed.shape[2:] == (32, 28)
    affine_only = pair.score(None)
    assert affine_only > 0.9  # the affine stage undoes the shift
    assert pair.score(torch.zeros(1, 2, 32, 28)) == pytest.approx(affine_only)


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
    prepared = prepare_pair(files, spacing_mm=2.0)
    assert tuple(prepared.grid.size) == tuple(fed[0].shape[2:][::-1])
    torch.testing.assert_close(prepared.fixed, fed[0], rtol=0, atol=0)
    torch.testing.assert_close(prepared.moving, fed[1], rtol=0, atol=0)
