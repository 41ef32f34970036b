"""The benchmark's --smoke mode runs end to end and writes its table, report and figures."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "run_benchmark.py"
HAS_ANTS = importlib.util.find_spec("ants") is not None


@pytest.mark.slow
def test_smoke_writes_table_report_and_figures(tmp_path: Path) -> None:
    methods = ["identity", "affine", "fast", "fast-smooth", *(["ants"] if HAS_ANTS else [])]
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--pairs", "1", "--out", str(tmp_path),
         "--methods", *methods, "--regularization", "3"],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr

    expected_rows = [
        "identity (no registration)",
        "affine only (DeepRegister)",
        "DeepRegister fast",
        "DeepRegister fast, regularization 10",
    ]
    if HAS_ANTS:
        expected_rows.append("ANTs SyN (antspyx)")
    table = [line for line in completed.stdout.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| Method | Dice")
    assert [line.split(" | ")[0].lstrip("| ") for line in table[1:]] == expected_rows

    reports = sorted(tmp_path.glob("*-smoke.md"))
    assert len(reports) == 1
    text = reports[0].read_text()
    for row in expected_rows:
        assert f"| {row} |" in text
    assert "## Machine" in text
    assert "published" in text.lower()
    assert "--smoke" in text  # the command is recorded

    stem = reports[0].with_suffix("")
    for kind in ("dice", "time"):
        figure = stem.with_name(f"{stem.name}-{kind}.png")
        assert figure.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"]({figure.name})" in text

    raw = json.loads(stem.with_suffix(".json").read_text())
    assert {row["method"] for row in raw["rows"]} == set(methods)
    for row in raw["rows"]:
        assert row["status"] == "ok", row.get("traceback")
        assert 0.0 <= row["mean_dice"] <= 1.0
        assert row["time_s"] >= 0.0
        assert row["peak_rss_bytes"] > 0
    weights = {row["method"]: row["notes"].get("regularization") for row in raw["rows"]}
    # --regularization sets the presets' weight; fast-smooth keeps its own.
    assert (weights["fast"], weights["fast-smooth"]) == (3.0, 10.0)
    assert "regularization 3 (`--regularization`)" in text
    if HAS_ANTS:
        (ants_row,) = [row for row in raw["rows"] if row["method"] == "ants"]
        assert ants_row["notes"]["label_agreement_with_composite"] > 0.99


def test_missing_data_exits_clearly(tmp_path: Path) -> None:
    completed = subprocess.run(
        [sys.executable, str(SCRIPT), "--data", str(tmp_path / "absent"), "--out",
         str(tmp_path)],
        capture_output=True, text=True, timeout=120, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 2
    assert "No fs-dev data" in completed.stderr
    assert not list(tmp_path.glob("*.md"))


def test_pair_order_is_documented_ring_then_rest() -> None:
    sys.path.insert(0, str(REPO))
    from benchmarks.pairs import ordered_pairs

    subjects = [f"sub-0{i}" for i in range(1, 6)]
    pairs = ordered_pairs(subjects)
    assert pairs[:5] == [
        ("sub-02", "sub-01"), ("sub-04", "sub-03"), ("sub-01", "sub-05"),
        ("sub-03", "sub-02"), ("sub-05", "sub-04"),
    ]  # fmt: skip
    assert len(pairs) == len(set(pairs)) == 20
    assert all(moving != fixed for moving, fixed in pairs)


def test_skip_starts_later_in_the_documented_order(tmp_path: Path) -> None:
    """--skip 1 --pairs 1 is the order's second pair, so a slow method can add one pair."""
    import SimpleITK as sitk

    sys.path.insert(0, str(REPO))
    from benchmarks.pairs import fsdev_pairs
    from benchmarks.run_benchmark import parse_args

    data = tmp_path / "data"
    for subject in ("sub-01", "sub-02", "sub-03", "sub-04"):
        (data / subject).mkdir(parents=True)
        for name in ("brainmask", "aseg"):
            sitk.WriteImage(
                sitk.Image([4, 4, 4], sitk.sitkUInt8), str(data / subject / f"{name}.nii.gz")
            )
    args = parse_args(["--data", str(data), "--skip", "1", "--pairs", "1"])
    specs = fsdev_pairs(data, args.pairs, tmp_path, False, args.skip)
    assert [s.name for s in specs] == ["sub-04→sub-03"]
    assert specs[0].fixed == str(data / "sub-03" / "brainmask.nii.gz")
    assert len(fsdev_pairs(data, None, tmp_path, False, 10)) == 2  # 12 pairs, after 10
    with pytest.raises(SystemExit):
        parse_args(["--smoke", "--skip", "1"])
    with pytest.raises(SystemExit):  # the T2-like contrast is made from skull-stripped brains
        parse_args(["--heads", "--cross-contrast"])


@pytest.mark.parametrize(
    ("similarity", "model", "network_row"),
    [("lncc", "default", True), ("mind", "default", True), ("mind", "none", False)],
)
def test_the_network_only_row_uses_the_model_the_engine_would_choose(
    similarity: str, model: str, network_row: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cross-contrast run takes the same-contrast default through the contrast map, so it
    has a network to show alone; without a model there is none."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.methods import model_note
    from DeepRegisterLib.nn import models

    monkeypatch.setitem(models.DEFAULT_MODELS, 3, ("brain3d",))
    notes: list[str] = []
    methods = model_note(3, model, similarity, ["affine", "network-only"], notes)
    assert ("network-only" in methods) is network_row
    assert ("`brain3d`" in notes[0]) is network_row


def test_the_network_only_row_runs_the_model_as_it_was_trained(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Every pass the model asks for, in both orders, after the affine row's own stage: a preset
    that runs one one-sided pass to be refined (as `balanced` came to) understates the network
    alone (0.771 against 0.80 on the 20 fs-dev pairs)."""
    monkeypatch.syspath_prepend(str(REPO))
    from benchmarks.methods import DEEPREGISTER_ROWS, deepregister_settings
    from benchmarks.tasks import Settings
    from DeepRegisterLib.registration.presets import get_preset

    row, affine = DEEPREGISTER_ROWS["network-only"], DEEPREGISTER_ROWS["affine"]
    preset = get_preset(row["preset"])
    assert preset.network_passes is None
    assert preset.symmetric_network_in_3d
    assert affine["preset"] == row["preset"]
    settings = deepregister_settings("network-only", Settings())
    assert (settings.preset, settings.iterations, settings.model) == (row["preset"], 0, "default")


def test_negative_pairs_are_the_images_turned_over_and_nothing_else(tmp_path: Path) -> None:
    """``--negative`` (the bright-background runs) writes max − v of each image and keeps the
    labels, the scored labels and a region on the fixed grid."""
    import numpy as np
    import SimpleITK as sitk

    from benchmarks.pairs import negative, smoke_pairs

    (spec,) = smoke_pairs(1, tmp_path, cross_contrast=False)
    turned = negative(spec, tmp_path)

    for key in ("fixed", "moving"):
        before = sitk.GetArrayFromImage(sitk.ReadImage(getattr(spec, key)))
        after = sitk.ReadImage(getattr(turned, key))
        np.testing.assert_allclose(sitk.GetArrayFromImage(after), before.max() - before, atol=1e-4)
        assert after.GetOrigin() == sitk.ReadImage(getattr(spec, key)).GetOrigin()
    assert (turned.fixed_labels, turned.moving_labels) == (spec.fixed_labels, spec.moving_labels)
    assert turned.labels == spec.labels
    region = sitk.ReadImage(turned.region)
    assert region.GetSize() == sitk.ReadImage(spec.fixed).GetSize()


@pytest.mark.parametrize("dim", [2, 3])
def test_turned_pairs_move_only_the_moving_header(tmp_path: Path, dim: int) -> None:
    """``--turn`` (how far the affine stage reaches) turns the moving image and its labels
    about their centre in their headers: the same voxels, each now where the turn takes it
    (here a voxel on the first axis, turned 90° about z or in the plane); the fixed side is
    the pair's."""
    import numpy as np
    import SimpleITK as sitk

    from benchmarks.pairs import smoke_pairs, turned
    from benchmarks.tasks import PairSpec
    from DeepRegisterLib.imaging.geometry import Grid
    from DeepRegisterLib.imaging.phantoms import phantom

    grid = Grid((12, 10, 8)[:dim], (1.0, 2.0, 3.0)[:dim], (5.0,) * dim, tuple(np.eye(dim).ravel()))
    spec = smoke_pairs(1, tmp_path, cross_contrast=False)[0]
    paths = {}
    for key, image in zip(("moving", "moving_labels"), phantom(grid), strict=True):
        paths[key] = str(tmp_path / f"{key}.nii.gz")
        sitk.WriteImage(image, paths[key])
    spec = PairSpec(
        name=spec.name, fixed=spec.fixed, fixed_labels=spec.fixed_labels, region=spec.region,
        labels=spec.labels, **paths,
    )  # fmt: skip
    out = turned(spec, tmp_path, 90.0, axis=2)

    for key in ("moving", "moving_labels"):
        before, after = sitk.ReadImage(paths[key]), sitk.ReadImage(getattr(out, key))
        assert np.array_equal(sitk.GetArrayFromImage(after), sitk.GetArrayFromImage(before))
        centre = np.asarray(before.TransformContinuousIndexToPhysicalPoint(
            [(n - 1) / 2 for n in before.GetSize()]))  # fmt: skip
        index = (before.GetSize()[0] - 1, *[0] * (dim - 1))
        offset = np.subtract(before.TransformIndexToPhysicalPoint(index), centre)
        expected = centre + np.array([-offset[1], offset[0], *offset[2:]])  # x → y
        np.testing.assert_allclose(after.TransformIndexToPhysicalPoint(index), expected, atol=1e-6)
    assert (out.fixed, out.fixed_labels, out.region) == (spec.fixed, spec.fixed_labels, spec.region)


@pytest.mark.parametrize("dim", [2, 3], ids=["2d", "3d"])
def test_slab_pairs_cut_only_the_moving_image_through_its_middle(tmp_path: Path, dim: int) -> None:
    """``--slab`` (a field of view that ends inside the anatomy) keeps a slab of the moving
    image's voxels, as they were and where they were, centred on its non-zero voxels; the
    labels and the fixed side are the pair's."""
    import numpy as np
    import SimpleITK as sitk

    from benchmarks.pairs import axial_axis, slab, smoke_pairs

    spec = smoke_pairs(1, tmp_path, cross_contrast=False)[0]
    if dim == 2:
        volume = sitk.ReadImage(spec.moving)
        path = tmp_path / "moving-2d.nii.gz"
        sitk.WriteImage(volume[:, :, volume.GetSize()[2] // 2], str(path))
        spec = dataclasses.replace(spec, moving=str(path))
    before = sitk.ReadImage(spec.moving)
    axis = axial_axis(before) if dim == 3 else 1
    out = slab(spec, tmp_path, mm=4 * before.GetSpacing()[axis])

    after = sitk.ReadImage(out.moving)
    assert after.GetSize()[axis] == 4
    assert [n for a, n in enumerate(after.GetSize()) if a != axis] == [
        n for a, n in enumerate(before.GetSize()) if a != axis
    ]
    first = before.TransformPhysicalPointToIndex(after.GetOrigin())
    resampled = sitk.RegionOfInterest(before, after.GetSize(), first)
    assert np.array_equal(sitk.GetArrayFromImage(after), sitk.GetArrayFromImage(resampled))
    occupied = np.flatnonzero(
        (sitk.GetArrayViewFromImage(before) > 0).any(
            axis=tuple(a for a in range(dim) if a != dim - 1 - axis)
        )
    )
    assert abs(first[axis] + 2 - (occupied[0] + occupied[-1]) / 2) <= 1
    assert (out.fixed, out.fixed_labels, out.moving_labels, out.region) == (
        spec.fixed, spec.fixed_labels, spec.moving_labels, spec.region,
    )  # fmt: skip


def test_head_pairs_take_the_whole_heads_of_the_subjects_that_have_one(tmp_path: Path) -> None:
    """``--heads`` registers ``T1.nii.gz`` (the whole head) of each subject that has one; the
    labels and the scored region stay the subject's brain."""
    import SimpleITK as sitk

    from benchmarks import command_pairs
    from benchmarks.pairs import fsdev_pairs, subjects_in

    data = tmp_path / "fs-dev"
    for subject, has_head in (
        ("sub-01", True),
        ("sub-02", False),
        ("sub-03", True),
        ("sub-04", True),
    ):
        folder = data / subject
        folder.mkdir(parents=True)
        names = ["brainmask", "aseg"] + (["T1"] if has_head else [])
        for name in names:
            sitk.WriteImage(
                sitk.Image([4, 4, 4], sitk.sitkUInt8) + 1, str(folder / f"{name}.nii.gz")
            )
    assert subjects_in(data) == ["sub-01", "sub-02", "sub-03", "sub-04"]
    assert subjects_in(data, "T1") == ["sub-01", "sub-03", "sub-04"]

    work = tmp_path / "work"
    work.mkdir()
    pairs = fsdev_pairs(data, None, work, cross_contrast=False, image="T1")
    assert len(pairs) == 6
    for pair in pairs:
        moving, fixed = pair.name.split("→")
        assert (pair.moving, pair.fixed) == (
            str(data / moving / "T1.nii.gz"), str(data / fixed / "T1.nii.gz"),
        )  # fmt: skip
        assert pair.moving_labels == str(data / moving / "aseg.nii.gz")
        assert pair.region == str(work / f"{fixed}-region.nii.gz")
    timed = command_pairs.fsdev(data, 20, "T1")
    assert [(p["name"], p["fixed"], p["moving"]) for p in timed] == [
        (p.name, p.fixed, p.moving) for p in pairs
    ]


@pytest.mark.parametrize("outputs", ["api", "command"])
def test_the_memory_sweep_bins_each_image_and_measures_each_run(
    tmp_path: Path, outputs: str
) -> None:
    """``memory.py --sweep`` registers the CT-like pair with each image binned 1× or 2×, each
    in its own process, beside the engine's estimate for the outputs kept (small here: a
    smoke run); with the command line's outputs no dense field or det J is kept."""
    completed = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "memory.py"), "--big-only", "--sweep",
         "--big-shape", "40", "40", "48", "--big-spacing", "4", "4", "4", "--out", str(tmp_path),
         "--outputs", outputs],
        capture_output=True, text=True, timeout=300, cwd=REPO,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stdout + completed.stderr
    runs = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("*-memory-*.json"))]
    assert sorted(tuple(run["shrink"]) for run in runs) == [(1, 1), (1, 2), (2, 1), (2, 2)]
    for run in runs:
        fixed, moving = run["sizes"]
        assert fixed == [40 // run["shrink"][0], 40 // run["shrink"][0], 48 // run["shrink"][0]]
        assert moving[2] == 48 // run["shrink"][1]
        assert run["peak"] > run["rss_before"]
        assert run["report_estimate"] > 0
        assert run["settings"]["compute_displacement"] == (outputs == "api")
        assert 0 < run["error_mm"] < 50  # measured through the transform where none was kept
    report = next(tmp_path.glob("*-memory.md")).read_text()
    assert "fixed binned 2×, moving 1×" in report
    assert f"{outputs} outputs" in report
