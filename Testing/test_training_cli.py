"""The `deepregister train` command line: it trains and saves a model, trains on pairs of
aligned label maps, answers --help without loading torch, and reports bad options."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import tiny_training
from tiny_training import _head

from DeepRegisterLib.cli.train import add_train_parser, run_train
from DeepRegisterLib.nn.models import find_model
from DeepRegisterLib.training.label_maps import ALIGNED_LABEL_MAPS

# The shared autouse fixture, bound here for pytest to find and use in this module.
one_thread = tiny_training.one_thread

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
