"""``deepregister batch`` on a real Dask ``LocalCluster`` with process workers.

Tiny phantom pairs, no network, four optimisation steps on the CPU: what is tested is the batch
machinery (outputs, resuming, retries after a killed worker, summaries, refusing bad rows), not
registration quality.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path

import batch_jobs
import pytest
import SimpleITK as sitk
from batch_jobs import write_csv
from page_faults import PAGES, only_glibc, reallocation_faults

from DeepRegisterLib.batch import jobs_from_csv, jobs_from_template, run_batch
from DeepRegisterLib.batch.cluster import WorkerPlan, dask_client, usable_cores
from DeepRegisterLib.batch.runner import job_settings
from DeepRegisterLib.batch.summary import COLUMNS, summary_row
from DeepRegisterLib.batch.worker import OUTPUT_FILES, finished_report
from DeepRegisterLib.cli import batch as batch_cli
from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.errors import InputError
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
from DeepRegisterLib.registration.settings import RegistrationSettings

# The shared fixture, bound here for pytest to find: each test keeps this process's
# environment, which a LocalCluster changes.
environment_kept = batch_jobs.environment_kept

# As the jobs run them: they write .h5 transforms, so no job builds the dense float64 field.
SETTINGS = RegistrationSettings(
    model="none", preset="fast", iterations=4, device="cpu", compute_displacement=False
)
QUICK = ["--model", "none", "--preset", "fast", "--iterations", "4", "--device", "cpu"]
EVERY_OUTPUT = ("warped", "transform", "labels", "jacobian")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two phantom pairs with label maps, a constant (unregistrable) image, and a jobs CSV."""
    folder = tmp_path_factory.mktemp("batch-data")
    for seed in (0, 1):
        pair = phantom_pair(demo_grid(3, 24), amplitude_mm=3.0, rotation_deg=4.0, seed=seed)
        for name, image in (
            ("fixed", pair.fixed), ("moving", pair.moving),
            ("fixed_labels", pair.fixed_labels), ("labels", pair.moving_labels),
        ):  # fmt: skip
            sitk.WriteImage(image, str(folder / f"{name}{seed}.nii.gz"))
    flat = sitk.Image([24, 24, 24], sitk.sitkFloat32)
    sitk.WriteImage(flat, str(folder / "flat.nii.gz"))
    write_csv(
        folder / "jobs.csv",
        [
            {"id": f"pair{seed}", "fixed": f"fixed{seed}.nii.gz", "moving": f"moving{seed}.nii.gz",
             "labels": f"labels{seed}.nii.gz", "fixed_labels": f"fixed_labels{seed}.nii.gz"}
            for seed in (0, 1)
        ]
        + [{"id": "flat", "fixed": "fixed0.nii.gz", "moving": "flat.nii.gz"}],
    )  # fmt: skip
    return folder


def _no_partial_files(folder: Path) -> bool:
    return not any(".partial-" in path.name for path in folder.rglob("*"))


@pytest.fixture(scope="module")
def first_run(data, tmp_path_factory):
    """The command line on the CSV: two jobs that work and one that fails."""
    out = tmp_path_factory.mktemp("batch-out")
    args = ["batch", "--jobs", str(data / "jobs.csv"), "--out", str(out), "--workers", "2"]
    environment = dict(os.environ)
    code = cli.main([*args, *QUICK, "--quiet"])
    # Dask's nanny writes OMP_NUM_THREADS=1 and more into this process's environment; a child
    # started after the batch (the Slicer runner's, say) would inherit the workers' settings.
    assert dict(os.environ) == environment
    return out, code, args


def test_a_batch_writes_every_output_and_records_the_failed_job(data, first_run):
    out, code, _ = first_run
    assert code == batch_cli.EXIT_JOBS_FAILED  # one job failed; the others still ran
    for job in ("pair0", "pair1"):
        names = {p.name for p in (out / job).iterdir()}
        assert names == {OUTPUT_FILES[o] for o in EVERY_OUTPUT} | {"report.json"}
        warped = sitk.ReadImage(str(out / job / "warped.nii.gz"))
        fixed = sitk.ReadImage(str(data / "fixed0.nii.gz"))
        assert warped.GetSize() == fixed.GetSize()
        assert sitk.ReadTransform(str(out / job / "transform.h5")).GetDimension() == 3
        report = json.loads((out / job / "report.json").read_text())
        assert report["settings"] == SETTINGS.to_dict()
        assert 0.0 < report["mean_dice"] <= 1.0
    error = json.loads((out / "flat" / "error.json").read_text())
    assert "constant" in error["error"]
    assert not (out / "flat" / "report.json").exists()
    assert {"summary.csv", "summary.md", "summary.png", "batch.log"} <= set(os.listdir(out))
    assert "flat: failed: InputError" in (out / "batch.log").read_text()
    assert _no_partial_files(out)


def test_the_summary_holds_the_reports_numbers(first_run):
    out, _, _ = first_run
    with (out / "summary.csv").open() as stream:
        rows = {row["id"]: row for row in csv.DictReader(stream)}
    assert list(rows) == ["pair0", "pair1", "flat"]
    for job in ("pair0", "pair1"):
        report = json.loads((out / job / "report.json").read_text())
        expected = summary_row(job, report, "ok")
        assert rows[job]["status"] == "ok"
        for key in ("mean_dice", "folding_percent", "sdlogj", "ncc_before", "ncc_after"):
            assert float(rows[job][key]) == pytest.approx(report[key], rel=1e-12)
        assert float(rows[job]["time_s"]) == pytest.approx(report["batch"]["job_s"], rel=1e-12)
        assert float(rows[job]["peak_rss_mib"]) == pytest.approx(expected["peak_rss_mib"])
        assert rows[job]["notes"] == "; ".join(report["notes"])
    assert rows["flat"]["status"] == "failed"
    assert "constant" in rows["flat"]["error"]
    page = (out / "summary.md").read_text()
    table = page[page.index("## Jobs, worst first") :]
    assert table.index("| flat | failed") < table.index("| pair")  # worst first
    assert f"| {float(rows['pair0']['mean_dice']):.3f} |" in page


def test_a_rerun_skips_finished_jobs_and_retries_the_failed_one(data, first_run):
    out, _, args = first_run
    before = {job: (out / job / "report.json").stat().st_mtime_ns for job in ("pair0", "pair1")}
    assert cli.main([*args, *QUICK, "--quiet"]) == batch_cli.EXIT_JOBS_FAILED
    after = {job: (out / job / "report.json").stat().st_mtime_ns for job in ("pair0", "pair1")}
    assert after == before
    log = (out / "batch.log").read_text()
    assert "batch of 3 job(s): 2 already done, 1 to run" in log
    assert log.count("flat: started") == 2
    assert log.count("pair0: started") == 1
    with (out / "summary.csv").open() as stream:
        status = {row["id"]: row["status"] for row in csv.DictReader(stream)}
    assert status == {"pair0": "skipped", "pair1": "skipped", "flat": "failed"}
    # Finished means: the same inputs and settings, and every output present.
    job = jobs_from_csv(data / "jobs.csv")[0]
    same = SETTINGS.to_dict()
    assert finished_report(job, out / "pair0", EVERY_OUTPUT, same) is not None
    assert finished_report(job, out / "pair0", EVERY_OUTPUT, {**same, "seed": 1}) is None
    assert finished_report(job, out / "pair0", (*EVERY_OUTPUT, "qa"), same) is None
    other = replace(job, moving=job.fixed)
    assert finished_report(other, out / "pair0", EVERY_OUTPUT, same) is None


def _started(log: Path, job: str) -> list[int]:
    text = log.read_text() if log.exists() else ""
    return [int(pid) for pid in re.findall(rf"{job}: started \(pid (\d+)\)", text)]


def test_a_worker_killed_mid_job_has_its_job_run_again(data, tmp_path):
    """SIGKILL the worker process of a running job: the job runs again and completes."""
    jobs = jobs_from_csv(data / "jobs.csv")[:2]
    outcome: list = []
    batch = threading.Thread(
        target=lambda: outcome.append(run_batch(jobs, tmp_path, SETTINGS, workers=2, stream=None))
    )
    batch.start()
    log = tmp_path / "batch.log"
    deadline = time.monotonic() + 120
    while not _started(log, "pair0") and time.monotonic() < deadline:
        time.sleep(0.01)
    victim = _started(log, "pair0")[0]
    os.kill(victim, signal.SIGKILL)
    batch.join(timeout=180)
    assert not batch.is_alive()
    assert [row["status"] for row in outcome[0].rows] == ["ok", "ok"]
    pids = _started(log, "pair0")
    assert len(pids) == 2
    assert pids[0] == victim != pids[1]
    report = json.loads((tmp_path / "pair0" / "report.json").read_text())
    assert report["batch"]["pid"] == pids[1]
    assert sitk.ReadImage(str(tmp_path / "pair0" / "warped.nii.gz")).GetDimension() == 3
    assert _no_partial_files(tmp_path)


def test_jobs_go_to_an_existing_scheduler(data, tmp_path):
    """``--scheduler``: a cluster started elsewhere (here: by the test) runs the jobs; each job
    takes its worker's cores divided by the worker's task slots."""
    from distributed import LocalCluster

    jobs = jobs_from_csv(data / "jobs.csv")[:1]
    with LocalCluster(
        n_workers=1, threads_per_worker=1, processes=True, dashboard_address=":0"
    ) as cluster:
        address = cluster.scheduler_address
        outcome = run_batch(jobs, tmp_path, SETTINGS, scheduler=address, stream=None)
    assert [row["status"] for row in outcome.rows] == ["ok"]
    report = json.loads((tmp_path / "pair0" / "report.json").read_text())
    assert report["batch"]["threads"] == usable_cores()
    assert f"scheduler {address}" in (tmp_path / "batch.log").read_text()


def test_bad_rows_are_all_refused_before_any_work(data, tmp_path, capsys):
    shutil.copy(data / "moving0.nii.gz", tmp_path / "good.nii.gz")
    sitk.WriteImage(sitk.Image([24, 24], sitk.sitkFloat32) + 1, str(tmp_path / "slice.nii.gz"))
    (tmp_path / "notes.nii.gz").write_text("not an image")
    rows = [
        {"fixed": str(data / "fixed0.nii.gz"), "moving": "good.nii.gz"},
        {"fixed": str(data / "fixed0.nii.gz"), "moving": "missing.nii.gz"},
        {"fixed": str(data / "fixed0.nii.gz"), "moving": "slice.nii.gz"},
        {"fixed": str(data / "fixed1.nii.gz"), "moving": "notes.nii.gz",
         "fixed_labels": str(data / "fixed_labels1.nii.gz")},
        {"fixed": "", "moving": "good.nii.gz", "id": "nofixed"},
    ]  # fmt: skip
    out = tmp_path / "out"
    jobs = write_csv(tmp_path / "j.csv", rows)
    code = cli.main(["batch", "--jobs", str(jobs), "--out", str(out)])
    message = capsys.readouterr().err
    assert code == 2
    assert "4 of 5 job(s) cannot be run, so nothing was started" in message
    assert "row 2 (missing): moving image: not found" in message
    assert "row 3 (slice): moving image is 2D but the fixed image is 3D" in message
    assert "row 4 (notes): moving image: not an image SimpleITK reads" in message
    assert "row 4 (notes): fixed_labels needs labels" in message
    assert "row 5 (nofixed): no fixed image given" in message
    assert not out.exists()


def test_a_jobs_notes_reach_its_summary_row():
    """A study's user scans the summary, not thousands of reports: what a report notes
    (a moving image that covers part of the fixed one, say) is in its job's row."""
    notes = ["field of view: the moving image covers 35% …", "model: left out …"]
    row = summary_row("scan7", {"mean_dice": 0.8, "notes": notes}, "ok")
    assert row["notes"] == "field of view: the moving image covers 35% …; model: left out …"
    assert summary_row("scan8", {"notes": []}, "ok")["notes"] is None
    assert list(row) == list(COLUMNS)


def test_csv_and_template_jobs_are_named_and_checked(data, tmp_path):
    (tmp_path / "typo.csv").write_text("fixed,moving,label\na,b,c\n")
    with pytest.raises(InputError, match=r"unknown column.*label"):
        jobs_from_csv(tmp_path / "typo.csv")
    jobs = jobs_from_template(data / "fixed0.nii.gz", str(data / "moving*.nii.gz"), None)
    assert [job.id for job in jobs] == ["moving0", "moving1"]
    assert {job.fixed for job in jobs} == {str((data / "fixed0.nii.gz").resolve())}
    with pytest.raises(InputError, match="no moving images found"):
        jobs_from_template(data / "fixed0.nii.gz", str(tmp_path / "*.nrrd"), None)
    assert tuple(OUTPUT_FILES) == batch_cli.OUTPUTS
    assert COLUMNS[:2] == ("id", "status")


def test_jobs_compute_the_inverse_only_when_asked_and_never_the_dense_field():
    """The float64 field on the fixed grid costs a second a brain, and no job writes it."""
    asked = RegistrationSettings(compute_displacement=True)
    assert job_settings(asked, EVERY_OUTPUT) == asked.replace(compute_displacement=False)
    with_inverse = job_settings(asked, ("transform", "inverse"))
    assert with_inverse.compute_inverse
    assert not with_inverse.compute_displacement


@only_glibc
def test_local_workers_keep_the_memory_they_free():
    """A local worker reuses what it frees: glibc's defaults hand a 64 MB block back and map a
    new one (16 385 faults here; Dask's own trim threshold made one fs-dev registration take
    31.0 s instead of 17.5 s), a kept heap serves it again (0)."""
    plan = WorkerPlan(workers=1, threads=1, memory_limit_bytes=2**30, job_bytes=2**28)
    with dask_client(plan, None, retries=1) as client:
        (faults,) = client.run(reallocation_faults).values()
    assert faults < PAGES // 20
    assert reallocation_faults() > PAGES // 2, "this process kept glibc's defaults"
