"""The ``deepregister`` command line end to end: outputs, exit codes, nothing half-written."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
from DeepRegisterLib.registration.presets import PRESETS


@pytest.fixture(scope="module")
def a_pair_on_disk(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pair")
    pair = phantom_pair(demo_grid(3, 24), amplitude_mm=3.0, rotation_deg=4.0)
    paths = {
        "fixed": folder / "fixed.nii.gz",
        "moving": folder / "moving.nrrd",
        "fixed_labels": folder / "fixed_labels.nii.gz",
        "moving_labels": folder / "moving_labels.mha",
    }
    sitk.WriteImage(pair.fixed, str(paths["fixed"]))
    sitk.WriteImage(pair.moving, str(paths["moving"]))
    sitk.WriteImage(pair.fixed_labels, str(paths["fixed_labels"]))
    sitk.WriteImage(pair.moving_labels, str(paths["moving_labels"]))
    return paths


def test_labels_without_warped_label_outputs_give_dice_in_the_report(a_pair_on_disk, tmp_path):
    """``--labels`` + ``--fixed-labels`` alone ask for Dice, not for a warped label file."""
    report = tmp_path / "report.json"
    code = cli.main([
        "register", "--fixed", str(a_pair_on_disk["fixed"]),
        "--moving", str(a_pair_on_disk["moving"]),
        "--labels", str(a_pair_on_disk["moving_labels"]),
        "--fixed-labels", str(a_pair_on_disk["fixed_labels"]),
        "--report", str(report), "--preset", "fast", "--iterations", "0", "--device", "cpu",
        "--quiet",
    ])  # fmt: skip
    assert code == cli.EXIT_OK
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]
    assert json.loads(report.read_text())["mean_dice"] > 0


def test_register_writes_every_requested_output_readable_by_simpleitk(a_pair_on_disk, tmp_path):
    out = {
        "warped": tmp_path / "warped.nii.gz",
        "transform": tmp_path / "transform.h5",
        "displacement": tmp_path / "displacement.nrrd",
        "inverse": tmp_path / "inverse.h5",
        "labels": tmp_path / "labels_warped.nii.gz",
        "jacobian": tmp_path / "jacobian.mha",
        "qa": tmp_path / "qa.png",
        "report": tmp_path / "report.json",
    }
    code = cli.main([
        "register", "--fixed", str(a_pair_on_disk["fixed"]),
        "--moving", str(a_pair_on_disk["moving"]),
        "--labels", str(a_pair_on_disk["moving_labels"]),
        "--fixed-labels", str(a_pair_on_disk["fixed_labels"]),
        "--warped", str(out["warped"]), "--transform", str(out["transform"]),
        "--displacement", str(out["displacement"]),
        "--inverse-transform", str(out["inverse"]),
        "--warped-labels", str(out["labels"]), "--jacobian", str(out["jacobian"]),
        "--qa-png", str(out["qa"]), "--report", str(out["report"]),
        "--preset", "fast", "--device", "cpu", "--quiet",
    ])  # fmt: skip
    assert code == cli.EXIT_OK
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in out.values())

    fixed = sitk.ReadImage(str(a_pair_on_disk["fixed"]))
    moving = sitk.ReadImage(str(a_pair_on_disk["moving"]))
    warped = sitk.ReadImage(str(out["warped"]))
    resampled = sitk.Resample(
        moving, fixed, sitk.ReadTransform(str(out["transform"])), sitk.sitkLinear, 0.0,
        sitk.sitkFloat32,
    )  # fmt: skip
    difference = np.abs(sitk.GetArrayFromImage(resampled) - sitk.GetArrayFromImage(warped))
    assert difference.max() < 1e-2 * float(sitk.GetArrayFromImage(moving).max())

    field = sitk.ReadImage(str(out["displacement"]))
    assert field.GetSize() == fixed.GetSize()
    assert field.GetNumberOfComponentsPerPixel() == 3
    np.testing.assert_allclose(field.GetOrigin(), fixed.GetOrigin(), atol=1e-6)

    labels = sitk.ReadImage(str(out["labels"]))
    assert set(np.unique(sitk.GetArrayFromImage(labels))) <= set(
        np.unique(sitk.GetArrayFromImage(sitk.ReadImage(str(a_pair_on_disk["moving_labels"]))))
    )
    assert sitk.ReadTransform(str(out["inverse"])) is not None
    assert out["qa"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    report = json.loads(out["report"].read_text())
    assert report["preset"] == "fast"
    assert report["device"] == "cpu"
    assert report["ncc_after"] > report["ncc_before"]
    assert report["mean_dice"] > 0.5
    assert report["folding_percent"] < 0.01


@pytest.mark.parametrize(
    ("overrides", "extra", "expected"),
    [
        ({"--moving": "missing.nii.gz"}, [], "not found"),
        ({}, ["--device", "tpu"], "unknown device"),
        ({}, ["--model", "no-such-model"], "no model named"),
        ({}, ["--labels", "L1", "L2", "--warped-labels", "W1"], "one --warped-labels output"),
    ],
)
def test_bad_input_exits_with_2_a_clear_message_and_no_output(
    a_pair_on_disk, tmp_path, capsys, overrides, extra, expected
):
    args = {
        "--fixed": str(a_pair_on_disk["fixed"]),
        "--moving": str(a_pair_on_disk["moving"]),
        "--warped": str(tmp_path / "warped.nii.gz"),
    }
    args.update({key: str(tmp_path / value) for key, value in overrides.items()})
    argv = ["register", "--quiet", *[part for item in args.items() for part in item], *extra]
    assert cli.main(argv) == cli.EXIT_INPUT
    assert expected in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_register_without_any_output_is_refused(a_pair_on_disk, capsys):
    code = cli.main(
        ["register", "--fixed", str(a_pair_on_disk["fixed"]), "--moving",
         str(a_pair_on_disk["moving"])]
    )  # fmt: skip
    assert code == cli.EXIT_INPUT
    assert "nothing to write" in capsys.readouterr().err


def test_a_failure_during_writing_leaves_no_output_at_all(a_pair_on_disk, tmp_path, monkeypatch):
    """Outputs are staged and committed together: if the last one fails, none appears."""
    from DeepRegisterLib.evaluation import figures as report_figures

    def broken_figure(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_figures, "qa_figure", broken_figure)
    with pytest.raises(RuntimeError, match="disk full"):
        cli.main([
            "register", "--fixed", str(a_pair_on_disk["fixed"]),
            "--moving", str(a_pair_on_disk["moving"]), "--preset", "fast", "--iterations", "2",
            "--warped", str(tmp_path / "w.nii.gz"), "--transform", str(tmp_path / "t.h5"),
            "--qa-png", str(tmp_path / "qa.png"), "--quiet",
        ])  # fmt: skip
    assert list(tmp_path.iterdir()) == []


def test_a_reader_that_leaves_stops_the_run_quietly_with_nothing_written(a_pair_on_disk, tmp_path):
    """``register --progress json | head -1``: the next progress line meets a closed pipe. The
    run stops as a program stopped by SIGPIPE does, without a traceback or any output."""
    warped = tmp_path / "warped.nii.gz"
    child = subprocess.Popen(
        [sys.executable, "-m", "DeepRegisterLib", "register",
         "--fixed", str(a_pair_on_disk["fixed"]), "--moving", str(a_pair_on_disk["moving"]),
         "--warped", str(warped), "--progress", "json", "--model", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    assert json.loads(child.stdout.readline())["event"] == "progress"
    child.stdout.close()
    code = child.wait(timeout=120)
    errors = child.stderr.read()
    child.stderr.close()
    assert code == cli.EXIT_INTERRUPTED, errors
    assert "Traceback" not in errors
    assert list(tmp_path.iterdir()) == []


def test_help_and_models_explain_themselves():
    completed = subprocess.run(
        [sys.executable, "-m", "DeepRegisterLib", "register", "--help"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    for option in ("--fixed", "--moving", "--preset", "--device", "--qa-png", "--report"):
        assert option in completed.stdout
    help_text = " ".join(completed.stdout.split())  # argparse wraps lines
    for name, preset in PRESETS.items():
        assert f"{name}: {preset.summary()}" in help_text
    models = subprocess.run(
        [sys.executable, "-m", "DeepRegisterLib", "models"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    assert "search path" in models.stdout
    rows = {line.split()[0]: line.split() for line in models.stdout.splitlines()}
    brain3d = rows["brain3d"]
    assert brain3d[1:9] == ["3D", "2", "mm", "2", "passes", "same", "contrast", "default"]


def test_demo_runs_on_its_embedded_pair_and_reports_improvement(tmp_path, capsys):
    assert cli.main(["demo", "--dim", "2", "--output", str(tmp_path), "--quiet"]) == cli.EXIT_OK
    printed = capsys.readouterr().out
    assert "mean Dice" in printed
    report = json.loads((tmp_path / "report.json").read_text())["demo"]
    assert report["mean_dice_after"] > report["mean_dice_before"]
    assert report["endpoint_error_mm_after"] < report["endpoint_error_mm_before"]
    for name in ("warped.nii.gz", "transform.h5", "inverse_transform.h5", "qa.png"):
        assert (tmp_path / name).stat().st_size > 0


def _standby(line: str, cwd: Path) -> subprocess.CompletedProcess:
    """``python -m DeepRegisterLib.cli.standby`` sent ``line`` on stdin."""
    command = [sys.executable, "-m", "DeepRegisterLib.cli.standby"]
    return subprocess.run(command, input=line, capture_output=True, text=True, cwd=cwd)


def test_a_standby_process_runs_the_command_line_it_is_sent(a_pair_on_disk, tmp_path):
    warped = tmp_path / "warped.nii.gz"
    arguments = [
        "register", "--fixed", str(a_pair_on_disk["fixed"]),
        "--moving", str(a_pair_on_disk["moving"]), "--preset", "fast", "--iterations", "2",
        "--device", "cpu", "--warped", str(warped), "--quiet",
    ]  # fmt: skip
    assert _standby(json.dumps(arguments) + "\n", tmp_path).returncode == cli.EXIT_OK
    assert (
        sitk.ReadImage(str(warped)).GetSize()
        == sitk.ReadImage(str(a_pair_on_disk["fixed"])).GetSize()
    )

    missing = ["register", "--fixed", str(tmp_path / "none.nii.gz"), "--moving", str(warped),
               "--warped", str(tmp_path / "again.nii.gz")]  # fmt: skip
    refused = _standby(json.dumps(missing) + "\n", tmp_path)
    assert refused.returncode == cli.EXIT_INPUT  # the command line's own exit code
    assert "none.nii.gz" in refused.stderr


def test_a_standby_process_let_go_ends_quietly_and_refuses_a_garbled_line(tmp_path):
    let_go = _standby("", tmp_path)
    assert (let_go.returncode, let_go.stdout, let_go.stderr) == (cli.EXIT_OK, "", "")
    garbled = _standby('{"register": 1}\n', tmp_path)
    assert garbled.returncode == cli.EXIT_INPUT
    assert "one JSON list of strings" in garbled.stderr
    assert list(tmp_path.iterdir()) == []
