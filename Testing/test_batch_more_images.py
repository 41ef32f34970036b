"""``deepregister batch`` with more images of each moving subject (``image:<name>`` and
``labels:<name>`` columns) on a real Dask ``LocalCluster``: each is warped with its job's
transform as the job warped its moving image, a finished job is one with them all, and bad
columns or files are refused before any work."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import batch_jobs
import numpy as np
import pytest
import SimpleITK as sitk
from batch_jobs import write_csv

from DeepRegisterLib import apply_transform
from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
from DeepRegisterLib.registration.saved_transforms import SavedTransformWarp

# The shared fixture, bound here for pytest to find: each test keeps this process's
# environment, which a LocalCluster changes.
environment_kept = batch_jobs.environment_kept

QUICK = ["--model", "none", "--preset", "fast", "--iterations", "4", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """Two phantom pairs; the first with a 16-bit second sequence, its labels and a 4D series of
    three volumes, the second with its labels only (empty cells)."""
    folder = tmp_path_factory.mktemp("more-images")
    for seed in (0, 1):
        pair = phantom_pair(demo_grid(3, 24), amplitude_mm=3.0, rotation_deg=4.0, seed=seed)
        for name, image in (("fixed", pair.fixed), ("moving", pair.moving),
                            ("labels", pair.moving_labels)):  # fmt: skip
            sitk.WriteImage(image, str(folder / f"{name}{seed}.nii.gz"))
    moving = sitk.ReadImage(str(folder / "moving0.nii.gz"))
    second = sitk.Cast(sitk.Round(sitk.InvertIntensity(moving, 1.0) * 900), sitk.sitkUInt16)
    sitk.WriteImage(second, str(folder / "t2_0.nii.gz"))
    volumes = [sitk.Cast(sitk.Round(moving * (300 + 100 * t)), sitk.sitkInt16) for t in range(3)]
    sitk.WriteImage(sitk.JoinSeries(volumes), str(folder / "series0.nii.gz"))
    rows = [
        {"id": "pair0", "fixed": "fixed0.nii.gz", "moving": "moving0.nii.gz",
         "image:t2": "t2_0.nii.gz", "labels:seg": "labels0.nii.gz",
         "image:series": "series0.nii.gz"},
        {"id": "pair1", "fixed": "fixed1.nii.gz", "moving": "moving1.nii.gz",
         "image:t2": "", "labels:seg": "labels1.nii.gz", "image:series": ""},
    ]  # fmt: skip
    write_csv(folder / "jobs.csv", rows)
    return folder


def test_more_images_are_warped_as_the_job_warped_its_moving_image(data, tmp_path):
    """The job's own warp (the engine's, torch being loaded) for the 16-bit sequence and the
    labels, within rounding of ITK's; ITK for the series, as apply warps it."""
    out = tmp_path / "out"
    argv = ["batch", "--jobs", str(data / "jobs.csv"), "--out", str(out), "--workers", "1"]

    assert cli.main([*argv, *QUICK, "--quiet"]) == cli.EXIT_OK

    expected = {
        "pair0": {"t2": ("t2_0", False), "seg": ("labels0", True), "series": ("series0", False)},
        "pair1": {"seg": ("labels1", True)},
    }
    for job, images in expected.items():
        folder = out / job
        transform = sitk.ReadTransform(str(folder / "transform.h5"))
        fixed = sitk.ReadImage(str(data / f"fixed{job[-1]}.nii.gz"))
        written = {p.name for p in folder.iterdir() if p.name.endswith("_warped.nii.gz")}
        assert written == {f"{name}_warped.nii.gz" for name in images}
        warp = SavedTransformWarp(transform, Grid.of(fixed), 0)
        for name, (source, labels) in images.items():
            ours = sitk.ReadImage(str(folder / f"{name}_warped.nii.gz"))
            image = sitk.ReadImage(str(data / f"{source}.nii.gz"))
            alone, itk = warp(image, labels), apply_transform(image, transform, fixed, labels)
            assert ours.GetPixelID() == alone.GetPixelID() == itk.GetPixelID()
            values = sitk.GetArrayFromImage(ours)
            np.testing.assert_array_equal(values, sitk.GetArrayFromImage(alone))
            apart = values.astype(np.int64) - sitk.GetArrayFromImage(itk)
            if labels:  # nearest-neighbour ties
                assert np.mean(apart != 0) < 0.001
            else:  # float32 and float64 round a few .5s apart
                assert np.abs(apart).max() <= 1
            assert warp.engine_takes(image, labels) == (name != "series")
        report = json.loads((folder / "report.json").read_text())
        assert set(report["batch"]["inputs"]) >= {f"{'labels' if lab else 'image'}:{name}"
                                                  for name, (_, lab) in images.items()}  # fmt: skip
    series = sitk.ReadImage(str(out / "pair0" / "series_warped.nii.gz"))
    assert series.GetSize()[3] == 3
    # Finished means every output there, more images included: a rerun skips, a lost one reruns.
    (out / "pair1" / "seg_warped.nii.gz").unlink()
    assert cli.main([*argv, *QUICK, "--quiet"]) == cli.EXIT_OK
    with (out / "summary.csv").open() as stream:
        status = {row["id"]: row["status"] for row in csv.DictReader(stream)}
    assert status == {"pair0": "skipped", "pair1": "ok"}
    assert (out / "pair1" / "seg_warped.nii.gz").is_file()


def refused(capsys, jobs: Path, out: Path) -> str:
    assert cli.main(["batch", "--jobs", str(jobs), "--out", str(out)]) == cli.EXIT_INPUT
    assert not out.exists()
    return capsys.readouterr().err


def test_bad_more_image_columns_and_files_are_refused_before_any_work(data, tmp_path, capsys):
    base = {"fixed": str(data / "fixed0.nii.gz"), "moving": str(data / "moving0.nii.gz")}
    out = tmp_path / "out"
    for column, message in (
        ("image:", "unknown column(s) image:"),
        ("scan:t2", "unknown column(s) scan:t2"),
        ("image:a b", "unknown column(s) image:a b"),
    ):
        jobs = write_csv(tmp_path / "columns.csv", [{**base, column: "x.nii.gz"}])
        assert message in refused(capsys, jobs, out)
    twice = write_csv(tmp_path / "twice.csv", [{**base, "image:a": "x", "labels:a": "y"}])
    assert "image:a and labels:a, which would both write a_warped.nii.gz" in refused(
        capsys, twice, out
    )
    sitk.WriteImage(sitk.Image([24, 24], sitk.sitkUInt8) + 1, str(tmp_path / "slice.nii.gz"))
    rows = [
        {**base, "id": "missing", "image:t2": "absent.nii.gz", "labels:seg": ""},
        {**base, "id": "flat", "image:t2": "", "labels:seg": "slice.nii.gz"},
        {**base, "id": "fine", "image:t2": str(data / "t2_0.nii.gz"), "labels:seg": ""},
    ]
    message = refused(capsys, write_csv(tmp_path / "files.csv", rows), out)
    assert "2 of 3 job(s) cannot be run, so nothing was started" in message
    assert "row 1 (missing): image t2: not found" in message
    assert "row 2 (flat): labels seg is 2D but the fixed image is 3D" in message


def test_the_worker_plan_counts_the_more_images(data):
    """Each more image adds what reading it takes (4 bytes a value at most) and what
    ``apply`` needs to warp it, by apply's own rule, with the field the engine's warp keeps
    for them: a series of three 16-bit volumes its three volumes on the fixed grid, and the
    series joined from them (no field: it would outweigh them), labels their type."""
    from dataclasses import replace

    from DeepRegisterLib.batch import check_jobs, jobs_from_csv
    from DeepRegisterLib.batch.cluster import job_peak_bytes
    from DeepRegisterLib.imaging.geometry import Grid
    from DeepRegisterLib.imaging.volumes import SHARED_SLICES_BYTES
    from DeepRegisterLib.registration.saved_transforms import warp_bytes
    from DeepRegisterLib.registration.settings import RegistrationSettings

    job = jobs_from_csv(data / "jobs.csv")[0]
    headers = check_jobs([job])
    settings = RegistrationSettings(model="none", preset="fast")
    alone = job_peak_bytes(replace(job, more_images=()), headers, settings)
    fixed = Grid.of(sitk.ReadImage(job.fixed))
    for column, path in job.more_images:
        image = sitk.ReadImage(path)
        one = replace(job, more_images=((column, path),))
        read = 4 * image.GetNumberOfComponentsPerPixel() * image.GetNumberOfPixels()
        labels = column.startswith("labels:")
        added = job_peak_bytes(one, headers, settings) - alone
        field = SHARED_SLICES_BYTES  # the engine's field, once for a job's more images
        assert added == read + warp_bytes(image, fixed, labels) + field, column
    series = dict(job.more_images)["image:series"]
    only_series = replace(job, more_images=(("image:series", series),))
    assert job_peak_bytes(only_series, headers, settings) - alone >= 3 * 2 * 24**3
    assert job_peak_bytes(job, headers, settings) > job_peak_bytes(only_series, headers, settings)


def test_more_images_are_read_before_the_job_writes_side_by_side(data, tmp_path, monkeypatch):
    """ITK asks its HDF5 reader about every file it opens; beside the ``.h5`` transform being
    written on another thread that failed ("H5Dclose failed", once in a full suite). So each
    more image is read on the job's own thread, before its writers start side by side."""
    import threading

    from DeepRegisterLib.batch import jobs_from_csv, worker
    from DeepRegisterLib.imaging import fileio
    from DeepRegisterLib.registration.settings import RegistrationSettings

    readers, read_image = [], fileio.read_image

    def recorded(path, what="image"):
        readers.append(threading.current_thread())
        return read_image(path, what)

    monkeypatch.setattr(fileio, "read_image", recorded)
    job = jobs_from_csv(data / "jobs.csv")[0]
    settings = RegistrationSettings(model="none", preset="fast", iterations=4, device="cpu")
    row = worker.run_job(job, settings.to_dict(), ("transform",), str(tmp_path))
    assert row["status"] == "ok", row
    assert len(readers) == 2 + len(job.more_images)  # fixed, moving, then each more image
    assert set(readers) == {threading.current_thread()}


def test_a_diffusion_series_brings_its_bvecs_turned_as_apply_turns_them(data, tmp_path, capsys):
    """A NIfTI series with dcm2niix's bvec/bval: the job writes ``dwi_warped.bvec``/``.bval``
    beside ``dwi_warped.nii.gz``, equal to what ``apply`` writes through the job's transform;
    a job counts as finished only with them; a bvec that does not fit is refused up front."""
    series = sitk.ReadImage(str(data / "series0.nii.gz"))
    sitk.WriteImage(series, str(tmp_path / "dwi.nii.gz"))
    (tmp_path / "dwi.bvec").write_text("0 1 0.6\n0 0 0\n0 0 0.8\n")
    (tmp_path / "dwi.bval").write_text("0 1000 1000\n")
    base = {"id": "pair0", "fixed": str(data / "fixed0.nii.gz"),
            "moving": str(data / "moving0.nii.gz")}  # fmt: skip
    jobs = write_csv(tmp_path / "jobs.csv", [{**base, "image:dwi": str(tmp_path / "dwi.nii.gz")}])
    out = tmp_path / "out"
    argv = ["batch", "--jobs", str(jobs), "--out", str(out), "--workers", "1", *QUICK]

    assert cli.main([*argv, "--quiet"]) == cli.EXIT_OK

    folder = out / "pair0"
    alone = tmp_path / "alone"
    alone.mkdir()
    assert cli.main(["apply", "--transform", str(folder / "transform.h5"),
                     "--reference", str(data / "fixed0.nii.gz"),
                     "--image", str(tmp_path / "dwi.nii.gz"),
                     str(alone / "dwi_warped.nii.gz")]) == cli.EXIT_OK  # fmt: skip
    for suffix in (".bvec", ".bval"):
        written = (folder / f"dwi_warped{suffix}").read_text()
        assert written == (alone / f"dwi_warped{suffix}").read_text()
    report = json.loads((folder / "report.json").read_text())
    assert any(note.startswith("image:dwi: dwi_warped.bvec") for note in report["notes"])
    (folder / "dwi_warped.bvec").unlink()
    capsys.readouterr()
    assert cli.main([*argv]) == cli.EXIT_OK
    assert (folder / "dwi_warped.bvec").is_file()  # the job ran again for it

    (tmp_path / "dwi.bvec").write_text("0 1\n0 0\n0 0\n")  # two directions, three volumes
    message = refused(capsys, jobs, tmp_path / "out2")
    assert "dwi.bvec does not hold one direction for each of its 3 volumes" in message


def test_a_more_image_goes_through_the_jobs_own_warp(data, tmp_path, monkeypatch):
    """Whatever its size, a scalar more image is warped by the job's own warp: the moving scan
    and its labels given again come out as the job's warped image and labels, to the bit, and
    ITK resamples neither."""
    from DeepRegisterLib import register
    from DeepRegisterLib.batch import worker
    from DeepRegisterLib.batch.jobs import BatchJob
    from DeepRegisterLib.registration import saved_transforms

    monkeypatch.setattr(saved_transforms, "apply_transform", lambda *_: pytest.fail("ITK"))
    paths = {name: str(data / f"{name}0.nii.gz") for name in ("fixed", "moving", "labels")}
    fixed = sitk.ReadImage(paths["fixed"])
    result = register(
        fixed, sitk.ReadImage(paths["moving"]), moving_labels={"labels": paths["labels"]},
        model="none", preset="fast", iterations=4, device="cpu",
    )  # fmt: skip
    more = (("image:again", paths["moving"]), ("labels:again_seg", paths["labels"]))
    job = BatchJob("pair0", paths["fixed"], paths["moving"], more_images=more)
    writers, _ = worker._more_image_writers(job, result, fixed)
    for column, expected in (("image:again", result.warped),
                             ("labels:again_seg", result.warped_labels["labels"])):  # fmt: skip
        path = tmp_path / f"{column.split(':')[1]}.nii.gz"
        writers[column](path)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(path))),
                                      sitk.GetArrayViewFromImage(expected))  # fmt: skip
