"""benchmarks/user_time.py --smoke times the real command line on a phantom and writes its table.

Only the machinery is checked; the times themselves are never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def test_timed_runs_keep_what_is_already_on_the_python_path(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The checkout comes first; packages someone put on PYTHONPATH stay importable."""
    from benchmarks.user_time import child_env

    monkeypatch.setenv("PYTHONPATH", "/opt/extra-site")
    env = child_env(Path("/tmp/checkout"), threads=2)
    assert env["PYTHONPATH"].split(os.pathsep) == ["/tmp/checkout", "/opt/extra-site"]
    assert env["OMP_NUM_THREADS"] == env["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] == "2"
    monkeypatch.delenv("PYTHONPATH")
    assert child_env(Path("/tmp/checkout"), threads=1)["PYTHONPATH"] == "/tmp/checkout"


def test_a_timed_command_reports_its_own_peak_memory_not_the_benchmarks() -> None:
    """After the benchmark itself held 800 MB, a command that holds 300 MB reports about 300
    (started straight from it, Linux would report the benchmark's 800 for any command)."""
    from benchmarks.user_time import timed_child

    held = np.ones(100_000_000)  # 800 MB touched: the benchmark's high-water mark
    del held
    holds_300_mb = "import numpy as np, sys; a = np.ones(300 * 2**17); print('ok', file=sys.stderr)"
    small = timed_child([sys.executable, "-c", holds_300_mb], dict(os.environ), REPO)
    assert small["returncode"] == 0
    assert 300 < small["peak_rss_mb"] < 500
    assert small["stderr"][-1][1] == "ok"
    assert 0 < small["stderr"][-1][0] <= small["wall_s"]
    failed = timed_child([sys.executable, "-c", "raise SystemExit(3)"], dict(os.environ), REPO)
    assert failed["returncode"] == 3


def _smoke(script: str, folder: Path, *extra: str) -> Path:
    """Run ``benchmarks/<script>.py --smoke`` into ``folder``; the JSON results file it wrote."""
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{script}.py"), "--smoke",
         "--out", str(folder), "--tag", "smoke", *extra],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    (results_file,) = folder.glob(f"*-{script.replace('_', '-')}-smoke.json")
    return results_file


def test_smoke_times_the_command_line_and_writes_markdown_and_json(tmp_path: Path) -> None:
    results_file = _smoke("user_time", tmp_path, "--pause", "0.2")
    results = json.loads(results_file.read_text())
    (row,) = results["runs"]
    assert row["preset"] == "fast"
    assert row["version"] == "this"
    assert row["total_s"] >= row["engine_s"] > 0
    assert row["before_engine_s"] > 0
    assert row["after_engine_s"] >= 0
    # The run with labels and a report gives the stages and Dice, and wrote the same files.
    assert row["checked_s"] > 0
    assert set(row["stages_s"]) >= {"affine_s", "network_s", "optimisation_s", "outputs_s"}
    assert 0 < row["dice_27"] <= 1
    assert row["same_outputs"] is True
    assert row["bytes_written"] > 0
    assert row["peak_rss_mb"] > 0
    # A machine without a GPU: --device auto ran on the CPU, and the files say so.
    assert row["device"] == results["machine"]["device"] == "cpu"
    markdown = results_file.with_suffix(".md").read_text()
    assert "| phantom 0 | fast | this |" in markdown
    assert "; device cpu;" in markdown
    assert results["options"]["pause"] == 0.2
    assert "Each command after 0.2 s idle." in markdown


def test_the_pause_comes_before_the_timed_command(monkeypatch: pytest.MonkeyPatch) -> None:
    """``--pause`` idles outside the time it measures: sleep first, then the timed child."""
    from benchmarks import user_time

    calls: list[str] = []
    monkeypatch.setattr(user_time.time, "sleep", lambda s: calls.append(f"sleep {s}"))

    def timed_child(command, env, cwd):
        calls.append("timed")
        return {"returncode": 0}

    monkeypatch.setattr(user_time, "timed_child", timed_child)
    pair = {"fixed": "f.nii.gz", "moving": "m.nii.gz"}
    user_time._register(REPO, {}, pair, "fast", ["warped"], Path("/tmp"), "cpu", pause_s=3.0)
    assert calls == ["sleep 3.0", "timed"]


def test_same_outputs_reads_the_files_back_and_tells_them_apart(tmp_path: Path) -> None:
    import SimpleITK as sitk

    from benchmarks.user_time import same_outputs

    image = sitk.GetImageFromArray(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    for name, shift in (("a", 0.0), ("b", 0.0), ("c", 0.5)):
        (tmp_path / name).mkdir()
        sitk.WriteImage(image + shift, str(tmp_path / name / "warped.nii.gz"))
        sitk.WriteTransform(
            sitk.TranslationTransform(3, (1.0, 2.0, 3.0)), str(tmp_path / name / "transform.h5")
        )
    sitk.WriteTransform(
        sitk.TranslationTransform(3, (1.0, 2.0, 3.5)), str(tmp_path / "c" / "transform.h5")
    )
    outputs = ["warped", "transform"]
    assert same_outputs(tmp_path / "a", tmp_path / "b", outputs) is True
    assert same_outputs(tmp_path / "a", tmp_path / "c", outputs) is False
    assert same_outputs(tmp_path / "a", tmp_path / "c", ["warped"]) is False
    assert same_outputs(tmp_path / "a", tmp_path / "c", ["qa"]) is None


def test_apply_time_smoke_times_both_children_and_writes_its_table(tmp_path: Path) -> None:
    pytest.importorskip("mrml_scenes")  # skips without slicer-core, as every MRML test does
    results_file = _smoke("apply_time", tmp_path)
    runs = json.loads(results_file.read_text())["runs"]
    assert [run["version"] for run in runs] == ["new child", "waiting child"]
    assert not any(run["inverse"] for run in runs)
    for run in runs:
        assert run["total_s"] >= run["child_s"] >= run["engine_s"] > 0
    assert "× new child" in results_file.with_suffix(".md").read_text()


def test_apply_time_smoke_with_the_inverse_says_so(tmp_path: Path) -> None:
    pytest.importorskip("mrml_scenes")
    results_file = _smoke("apply_time", tmp_path, "--inverse")
    runs = json.loads(results_file.read_text())["runs"]
    assert [run["inverse"] for run in runs] == [True, True]
    assert "with the inverse transform" in results_file.with_suffix(".md").read_text()


def test_warp_time_smoke_times_apply_and_compares_it_with_register(tmp_path: Path) -> None:
    results_file = _smoke("warp_time", tmp_path, "--no-ants", "--series", "3")
    (row,) = json.loads(results_file.read_text())["runs"]
    assert row["apply_s"] > 0
    assert row["series_apply_s"] > 0
    assert row["apply_peak_mb"] > 0
    # The phantom is float: apply and register agree to float32 rounding, labels exactly.
    assert row["apply_vs_register"]["scan_max_abs"] < 1e-2
    assert row["apply_vs_register"]["labels_differing"] == 0
    assert "ants_s" not in row
    report = results_file.with_suffix(".md").read_text()
    assert "| phantom 0 |" in report
    assert "A 4D series of 3 volumes" in report


def test_warp_in_process_smoke_times_both_warps_and_compares_with_the_job(
    tmp_path: Path,
) -> None:
    results_file = _smoke("warp_in_process", tmp_path, "--rounds", "1")
    (row,) = json.loads(results_file.read_text())["runs"]
    for name in ("scan", "labels"):
        assert row[name]["engine_s"] > 0
        assert row[name]["itk_s"] > 0
        assert row[name]["differing_from_job"] == 0  # the job's own warp, to the bit
    assert "| phantom 0 |" in results_file.with_suffix(".md").read_text()


def test_warp_memory_smoke_measures_each_warp_beside_what_apply_counts(tmp_path: Path) -> None:
    results_file = _smoke("warp_memory", tmp_path, "--series", "2")
    rows = json.loads(results_file.read_text())["runs"]
    ways = [(row["image"], row["way"]) for row in rows]
    assert ways == [("scan", "engine"), ("scan", "ITK"), ("labels", "engine"),
                    ("labels", "ITK"), ("series of 2", "ITK")]  # fmt: skip
    for row in rows:
        assert row["rise_mb"] > 0  # a warp that allocated nothing was not measured
        assert row["counted_mb"] > 0
    assert "| phantom 0 | series of 2 | this | ITK |" in results_file.with_suffix(".md").read_text()


def test_the_ct_pair_is_written_as_nrrd_with_its_tissues_labelled(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--ct`` writes the CT-like pair and label maps by HU (here at a small size): every
    tissue is labelled in both images, on each image's grid, and the labels follow the HU."""
    import SimpleITK as sitk

    from benchmarks import command_pairs

    monkeypatch.setattr(command_pairs, "CT_SHAPE", (48, 40, 36))
    monkeypatch.setattr(command_pairs, "CT_SPACING", (6.0, 6.0, 8.0))
    (pair,) = command_pairs.ct_pairs(tmp_path)
    assert pair["structures"] == "tissues"  # not scored as FreeSurfer's 27 structures
    for key in ("fixed", "moving"):
        assert pair[key].endswith(".nrrd")
        image, labels = sitk.ReadImage(pair[key]), sitk.ReadImage(pair[f"{key}_labels"])
        assert image.GetPixelID() == sitk.sitkInt16
        assert labels.GetSize() == image.GetSize() == (48, 40, 36)
        assert labels.GetOrigin() == image.GetOrigin()
        hu, label = sitk.GetArrayViewFromImage(image), sitk.GetArrayViewFromImage(labels)
        assert set(np.unique(label)) == {0, 1, 2, 3}
        assert hu[label == 1].max() < -500
        assert hu[label == 3].min() > 250
        assert np.all(np.abs(hu[label == 2]) < 200)
