"""``deepregister evaluate`` end to end on files, through its own argparse subparser."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.cli.evaluate import add_evaluate_parser, run_evaluate
from DeepRegisterLib.evaluation import evaluate as evaluation


def _parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="deepregister")
    add_evaluate_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["evaluate", *argv])


@pytest.fixture
def case(tmp_path: Path) -> dict[str, Path]:
    """A 3D pair where moving = fixed shifted by (2, -1, 1) voxels of 1.5 mm, as files."""
    shape = (12, 14, 16)
    rng = np.random.default_rng(2)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[3:9, 4:10, 5:12] = 17
    intensity = rng.normal(size=shape).astype(np.float32) + 3.0 * labels / 17
    shift = np.array([3.0, -1.5, 1.5])
    paths = {name: tmp_path / name for name in ("f.nii.gz", "m.nii.gz", "fl.nrrd", "ml.nrrd")}
    for name, array, origin in (
        ("f.nii.gz", intensity, (0.0, 0.0, 0.0)),
        ("m.nii.gz", intensity, tuple(shift)),
        ("fl.nrrd", labels, (0.0, 0.0, 0.0)),
        ("ml.nrrd", labels, tuple(shift)),
    ):
        image = sitk.GetImageFromArray(array)
        image.SetSpacing((1.5, 1.5, 1.5))
        image.SetOrigin(origin)
        sitk.WriteImage(image, str(paths[name]))
    fixed = sitk.ReadImage(str(paths["f.nii.gz"]))
    field = sitk.TransformToDisplacementField(
        sitk.TranslationTransform(3, tuple(shift)),
        sitk.sitkVectorFloat64,
        fixed.GetSize(),
        fixed.GetOrigin(),
        fixed.GetSpacing(),
        fixed.GetDirection(),
    )
    paths["field"] = tmp_path / "field.nii.gz"
    sitk.WriteImage(field, str(paths["field"]))
    paths["inverse"] = tmp_path / "inverse.tfm"
    sitk.WriteTransform(sitk.TranslationTransform(3, tuple(-shift)), str(paths["inverse"]))
    paths["lut"] = tmp_path / "lut.txt"
    paths["lut"].write_text("17  Left-Hippocampus  220 216 20 0\n")
    paths["fixed_points"] = tmp_path / "fixed.csv"
    paths["fixed_points"].write_text("x,y,z,label\n6,7,8,a\n9,9,9,b\n")
    # The same points in RAS in a Slicer .fcsv: the reader must flip them back to LPS.
    moving_lps = np.array([[6.0, 7.0, 8.0], [9.0, 9.0, 9.0]]) + shift
    paths["moving_points"] = tmp_path / "moving.fcsv"
    paths["moving_points"].write_text(
        "# CoordinateSystem = RAS\n# columns = id,x,y,z,label\n"
        + "".join(f"{n},{-x},{-y},{z},{n}\n" for n, (x, y, z) in zip("ab", moving_lps, strict=True))
    )
    return paths


def test_evaluate_command_end_to_end(
    case: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "report"
    args = _parse(
        "--fixed", str(case["f.nii.gz"]),
        "--moving", str(case["m.nii.gz"]),
        "--transform", str(case["field"]),
        "--inverse-transform", str(case["inverse"]),
        "--fixed-labels", str(case["fl.nrrd"]),
        "--moving-labels", str(case["ml.nrrd"]),
        "--labels", "17", "4",
        "--label-names", str(case["lut"]),
        "--fixed-landmarks", str(case["fixed_points"]),
        "--moving-landmarks", str(case["moving_points"]),
        "--out", str(out),
    )  # fmt: skip

    assert args.run is run_evaluate  # how cli.main dispatches
    assert args.run(args) == 0

    report = json.loads((out / "report.json").read_text())
    rows = {row["label"]: row for row in report["labels"]["per_label"]}
    assert rows[17]["name"] == "Left-Hippocampus"
    assert rows[17]["dice"] == pytest.approx(1.0)
    assert rows[4]["dice"] is None
    assert report["landmarks"]["tre_mm"]["max"] == pytest.approx(0.0, abs=1e-6)
    assert report["inverse_consistency"]["max_mm"] == pytest.approx(0.0, abs=1e-6)
    for name in ("report.md", "report.html", "checkerboard.png", "jacobian.png", "dice.png"):
        assert (out / name).stat().st_size > 0
    printed = capsys.readouterr().out
    assert "mean Dice" in printed
    assert "mean TRE" in printed
    assert str(out / "report.html") in printed


def test_freesurfer_label_keyword(case: dict[str, Path], tmp_path: Path) -> None:
    args = _parse(
        "--fixed", str(case["f.nii.gz"]),
        "--moving", str(case["m.nii.gz"]),
        "--transform", str(case["inverse"]),
        "--fixed-labels", str(case["fl.nrrd"]),
        "--moving-labels", str(case["ml.nrrd"]),
        "--labels", "freesurfer",
        "--out", str(tmp_path / "fs"),
    )  # fmt: skip
    assert run_evaluate(args) == 0
    report = json.loads((tmp_path / "fs" / "report.json").read_text())
    assert len(report["labels"]["per_label"]) == 27


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--transform": "missing.h5"}, "transform file not found"),
        ({"--labels": "seventeen"}, "--labels takes integers"),
        ({"--fixed-landmarks": "missing.fcsv"}, "does not exist"),
    ],
)
def test_bad_input_exits_2_with_the_message(
    case: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    change: dict[str, str],
    message: str,
) -> None:
    options = {
        "--fixed": str(case["f.nii.gz"]),
        "--moving": str(case["m.nii.gz"]),
        "--transform": str(case["field"]),
        "--fixed-labels": str(case["fl.nrrd"]),
        "--moving-labels": str(case["ml.nrrd"]),
        "--moving-landmarks": str(case["moving_points"]),
        "--fixed-landmarks": str(case["fixed_points"]),
        "--out": str(tmp_path / "out"),
    }
    options.update({k: str(tmp_path / v) if "missing" in v else v for k, v in change.items()})

    assert run_evaluate(_parse(*[item for pair in options.items() for item in pair])) == 2

    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_unexpected_failure_exits_1(
    case: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom")

    # The command imports it when it runs (so that --help stays fast): patched at the source.
    monkeypatch.setattr(evaluation, "evaluate", broken)
    args = _parse(
        "--fixed", str(case["f.nii.gz"]),
        "--moving", str(case["m.nii.gz"]),
        "--transform", str(case["field"]),
        "--out", str(tmp_path / "out"),
    )  # fmt: skip
    assert run_evaluate(args) == 1
    assert "unexpected error (RuntimeError)" in capsys.readouterr().err
