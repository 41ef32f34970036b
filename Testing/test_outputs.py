"""What ``deepregister register`` writes, and what it refuses before doing any work.

Real runs of the command line on small phantoms; every file is read back by SimpleITK (and by
ANTs where antspyx is installed).
"""

from __future__ import annotations

import gzip
import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.errors import InputError
from DeepRegisterLib.imaging import fileio, metrics
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

FAST = ["--preset", "fast", "--iterations", "0", "--device", "cpu", "--quiet"]


def array(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


@pytest.fixture(scope="module")
def pair_3d(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("pair3d")
    pair = phantom_pair(demo_grid(3, 24), amplitude_mm=3.0, rotation_deg=4.0)
    paths = {key: folder / f"{key}.nii.gz" for key in ("fixed", "moving", "moving_labels")}
    for key, path in paths.items():
        sitk.WriteImage(getattr(pair, key), str(path))
    return paths


def register(pair: dict[str, Path], *options: str | Path, moving: str = "moving") -> int:
    argv = ["register", "--fixed", pair["fixed"], "--moving", pair[moving], *options, *FAST]
    return cli.main([str(part) for part in argv])


def test_transform_fields_are_float32_images_that_itk_and_ants_apply(pair_3d, tmp_path):
    out = {
        "warped": tmp_path / "warped.nii.gz",
        "field": tmp_path / "transform.nii.gz",
        "nrrd": tmp_path / "inverse.nrrd",
        "exact": tmp_path / "displacement.mha",
    }
    code = register(
        pair_3d, "--warped", out["warped"], "--transform", out["field"],
        "--inverse-transform", out["nrrd"], "--displacement", out["exact"],
    )  # fmt: skip
    assert code == cli.EXIT_OK

    field = sitk.ReadImage(str(out["field"]))
    assert field.GetPixelID() == sitk.sitkVectorFloat32
    assert sitk.ReadImage(str(out["nrrd"])).GetPixelID() == sitk.sitkVectorFloat32
    with gzip.open(out["field"]) as stream:  # a real gzip file, as the name promises
        assert len(stream.read()) > 0
    exact = sitk.ReadImage(str(out["exact"]))
    assert exact.GetPixelID() == sitk.sitkVectorFloat32  # as the engine computes it
    np.testing.assert_array_equal(array(field), array(exact))

    fixed, moving = (sitk.ReadImage(str(pair_3d[key])) for key in ("fixed", "moving"))
    transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    resampled = sitk.Resample(moving, fixed, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)
    warped = array(sitk.ReadImage(str(out["warped"])))
    assert np.abs(array(resampled) - warped).max() < 1e-2 * float(array(moving).max())
    assert_ants_warps_as_we_do(pair_3d, out["field"], warped)


def on_grid(transform: sitk.Transform, grid_image: sitk.Image) -> np.ndarray:
    """``transform`` sampled as a displacement field on ``grid_image``'s grid."""
    field = sitk.TransformToDisplacementField(
        transform, sitk.sitkVectorFloat64, grid_image.GetSize(), grid_image.GetOrigin(),
        grid_image.GetSpacing(), grid_image.GetDirection(),
    )  # fmt: skip
    return array(field)


def test_the_h5_transform_is_the_affine_after_the_deformation_on_the_network_grid(
    pair_3d, tmp_path
):
    """As ANTs writes its transforms: a composite, the same map as the dense field to float32
    rounding (on a brain, a twentieth of the bytes: 2 mm over the foreground against 1 mm over
    the whole image)."""
    out = {
        "h5": tmp_path / "transform.h5",
        "exact": tmp_path / "displacement.mha",
        "inverse": tmp_path / "inverse.h5",
        "inverse_exact": tmp_path / "inverse.mha",
        "warped": tmp_path / "warped.mha",
        "report": tmp_path / "report.json",
    }
    code = register(
        pair_3d, "--transform", out["h5"], "--displacement", out["exact"],
        "--inverse-transform", out["inverse"], "--inverse-displacement", out["inverse_exact"],
        "--warped", out["warped"], "--report", out["report"],
    )  # fmt: skip
    assert code == cli.EXIT_OK

    transform = sitk.CompositeTransform(sitk.ReadTransform(str(out["h5"])))
    assert transform.GetNumberOfTransforms() == 2
    assert transform.GetNthTransform(0).IsLinear()
    deformation = sitk.DisplacementFieldTransform(transform.GetNthTransform(1))
    network_grid = json.loads(out["report"].read_text())["network_grid"]
    grown = deformation.GetDisplacementField()  # by a voxel of zeros on every side
    assert list(grown.GetSize()) == [size + 2 for size in network_grid["size"]]
    assert grown.GetSpacing() == pytest.approx((network_grid["spacing_mm"],) * 3)
    exact = sitk.ReadImage(str(out["exact"]))
    np.testing.assert_allclose(on_grid(transform, exact), array(exact), rtol=0, atol=1e-4)

    inverse = sitk.CompositeTransform(sitk.ReadTransform(str(out["inverse"])))
    assert inverse.GetNthTransform(1).IsLinear()  # [w, A⁻¹]: the affine's inverse runs first
    inverse_exact = sitk.ReadImage(str(out["inverse_exact"]))
    assert inverse_exact.GetPixelID() == sitk.sitkVectorFloat32
    np.testing.assert_allclose(
        on_grid(inverse, inverse_exact), array(inverse_exact), rtol=0, atol=1e-4
    )
    warped = array(sitk.ReadImage(str(out["warped"])))
    assert_ants_warps_as_we_do(pair_3d, out["h5"], warped)


def test_a_mat_transform_is_the_dense_field_and_reads_back(pair_3d, tmp_path):
    """ITK writes a composite into a MATLAB .mat file and then cannot read it: --transform t.mat
    writes the displacement-field transform instead, and the library refuses the composite."""
    out = {"mat": tmp_path / "t.mat", "exact": tmp_path / "displacement.mha"}
    code = register(pair_3d, "--transform", out["mat"], "--displacement", out["exact"])
    assert code == cli.EXIT_OK
    exact = sitk.ReadImage(str(out["exact"]))
    read_back = sitk.ReadTransform(str(out["mat"]))
    np.testing.assert_allclose(on_grid(read_back, exact), array(exact), rtol=0, atol=1e-9)
    composite = sitk.CompositeTransform(
        [
            sitk.AffineTransform(3),
            sitk.DisplacementFieldTransform(sitk.Cast(exact, sitk.sitkVectorFloat64)),
        ]
    )
    with pytest.raises(InputError, match=r"a \.mat file holds one transform; use \.h5"):
        fileio.write_transform(composite, tmp_path / "composite.mat")
    assert not (tmp_path / "composite.mat").exists()


def assert_ants_warps_as_we_do(pair: dict[str, Path], transform: Path, warped: np.ndarray):
    ants = pytest.importorskip("ants")
    by_ants = ants.apply_transforms(
        fixed=ants.image_read(str(pair["fixed"])),
        moving=ants.image_read(str(pair["moving"])),
        transformlist=[str(transform)],
    )
    interior = (slice(3, -3),) * 3  # ANTs and ITK differ only at the image border
    difference = np.abs(by_ants.numpy().transpose() - warped)[interior]
    assert difference.max() < 2e-2 * float(np.abs(warped).max())


def test_jacobian_asked_for_is_written_even_when_the_settings_turn_it_off(pair_3d, tmp_path):
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"compute_jacobian": False}))
    jacobian, report = tmp_path / "jacobian.nrrd", tmp_path / "report.json"
    assert register(pair_3d, "--settings", settings, "--jacobian", jacobian) == cli.EXIT_OK
    fixed = sitk.ReadImage(str(pair_3d["fixed"]))
    assert sitk.ReadImage(str(jacobian)).GetSize() == fixed.GetSize()
    assert register(pair_3d, "--settings", settings, "--report", report) == cli.EXIT_OK
    assert "folding_percent" not in json.loads(report.read_text())


def test_a_report_alone_keeps_no_det_j_image_and_the_same_figures(pair_3d, tmp_path):
    """Folding and SDlogJ are gathered slab by slab: a report needs no det J image (67 MB for a
    brain), and says the same as when the image is written, and as the image itself."""
    reports = [tmp_path / "alone.json", tmp_path / "with.json"]
    jacobian = tmp_path / "j.nrrd"
    assert register(pair_3d, "--report", reports[0]) == cli.EXIT_OK
    assert register(pair_3d, "--report", reports[1], "--jacobian", jacobian) == cli.EXIT_OK
    alone, beside = (json.loads(path.read_text()) for path in reports)
    assert [r["settings"]["keep_jacobian"] for r in (alone, beside)] == [False, True]
    assert [r["settings"]["compute_jacobian"] for r in (alone, beside)] == [True, True]
    assert alone["folding_percent"] == beside["folding_percent"]
    assert alone["sdlogj"] == beside["sdlogj"] > 0
    written = metrics.determinant_statistics(sitk.ReadImage(str(jacobian)))
    assert beside["sdlogj"] == pytest.approx(written.sdlogj, rel=1e-9)
    assert beside["folding_percent"] == written.folding_percent


def test_the_moving_image_is_warped_only_when_an_output_shows_it(pair_3d, tmp_path):
    """A transform alone costs no warping of the moving image (0.7 s for a 256³ brain), and the
    transform is the same as when the warped image is written too."""
    alone, both = tmp_path / "alone", tmp_path / "both"
    for folder in (alone, both):
        folder.mkdir()
    assert register(pair_3d, "--transform", alone / "t.nrrd", "--report", alone / "r.json") == 0
    assert register(
        pair_3d, "--transform", both / "t.nrrd", "--warped", both / "w.nrrd",
        "--report", both / "r.json",
    ) == cli.EXIT_OK  # fmt: skip
    reports = [json.loads((folder / "r.json").read_text()) for folder in (alone, both)]
    assert [r["settings"]["compute_warped"] for r in reports] == [False, True]
    fields = [array(sitk.ReadImage(str(folder / "t.nrrd"))) for folder in (alone, both)]
    np.testing.assert_array_equal(*fields)
    assert sorted(p.name for p in alone.iterdir()) == ["r.json", "t.nrrd"]


def test_the_dense_field_is_made_only_for_an_output_written_from_it(pair_3d, tmp_path):
    """An .h5 transform is [affine, deformation]: without --displacement (or a field or .mat
    transform) no dense field is built (200 MB a brain), and every output is the same."""
    lean, full = tmp_path / "lean", tmp_path / "full"
    outputs = ("t.h5", "w.nrrd", "j.nrrd", "labels.nrrd", "r.json")
    for folder in (lean, full):
        folder.mkdir()
    common = ("--labels", pair_3d["moving_labels"])
    for folder, extra in ((lean, ()), (full, ("--displacement", full / "d.mha"))):
        paths = [folder / name for name in outputs]
        code = register(
            pair_3d, *common, "--transform", paths[0], "--warped", paths[1],
            "--jacobian", paths[2], "--warped-labels", paths[3], "--report", paths[4], *extra,
        )  # fmt: skip
        assert code == cli.EXIT_OK
    reports = [json.loads((folder / "r.json").read_text()) for folder in (lean, full)]
    assert [r["settings"]["compute_displacement"] for r in reports] == [False, True]
    assert reports[0]["folding_percent"] == reports[1]["folding_percent"]
    assert reports[0]["sdlogj"] == reports[1]["sdlogj"]
    for name in outputs[1:4]:
        images = [array(sitk.ReadImage(str(folder / name))) for folder in (lean, full)]
        np.testing.assert_array_equal(*images)
    fields = [sitk.CompositeTransform(sitk.ReadTransform(str(f / "t.h5"))) for f in (lean, full)]
    exact = sitk.ReadImage(str(full / "d.mha"))
    np.testing.assert_array_equal(on_grid(fields[0], exact), on_grid(fields[1], exact))
    assert not (lean / "d.mha").exists()


def test_the_dense_inverse_is_made_only_for_an_output_written_from_it(pair_3d, tmp_path):
    """An .h5 inverse is [w, affine⁻¹]: without --inverse-displacement (or a field inverse)
    no dense field is built on the moving grid (200 MB for a 1 mm brain), and the inverse is
    the same map; with it, the forward field is still not built."""
    lean, full = tmp_path / "lean", tmp_path / "full"
    for folder, extra in ((lean, ()), (full, ("--inverse-displacement", tmp_path / "i.mha"))):
        folder.mkdir()
        code = register(
            pair_3d, "--inverse-transform", folder / "i.h5", "--report", folder / "r.json", *extra
        )
        assert code == cli.EXIT_OK
    reports = [json.loads((folder / "r.json").read_text()) for folder in (lean, full)]
    assert [r["settings"]["compute_inverse_displacement"] for r in reports] == [False, True]
    assert [r["settings"]["compute_displacement"] for r in reports] == [False, False]
    exact = sitk.ReadImage(str(tmp_path / "i.mha"))
    assert exact.GetSize() == sitk.ReadImage(str(pair_3d["moving"])).GetSize()
    inverses = [sitk.ReadTransform(str(folder / "i.h5")) for folder in (lean, full)]
    np.testing.assert_array_equal(on_grid(inverses[0], exact), on_grid(inverses[1], exact))
    np.testing.assert_allclose(on_grid(inverses[0], exact), array(exact), atol=1e-5)  # float32


def test_uncompressed_images_hold_the_same_voxels(pair_3d, tmp_path):
    """--uncompressed (the Slicer module's handover) writes the same images without zlib."""
    names = ("w.mha", "j.mha", "labels.mha")
    for folder, extra in (("packed", ()), ("plain", ("--uncompressed",))):
        (tmp_path / folder).mkdir()
        paths = [tmp_path / folder / name for name in names]
        code = register(
            pair_3d, "--warped", paths[0], "--jacobian", paths[1], "--labels",
            pair_3d["moving_labels"], "--warped-labels", paths[2], *extra,
        )  # fmt: skip
        assert code == cli.EXIT_OK
    for name in names:
        packed, plain = (tmp_path / folder / name for folder in ("packed", "plain"))
        assert b"CompressedData = True" in packed.read_bytes()[:2000], name
        assert b"CompressedData = False" in plain.read_bytes()[:2000], name
        images = [array(sitk.ReadImage(str(path))) for path in (packed, plain)]
        np.testing.assert_array_equal(*images)


def refused(pair: dict[str, Path], capsys, *options: str | Path) -> str:
    """The error message of a refused run that wrote nothing."""
    assert register(pair, *options) == cli.EXIT_INPUT
    return capsys.readouterr().err


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        (["--warped", "{out}/w.jpg"], "--warped"),
        (["--transform", "{out}/t.json"], "use .h5"),
        (["--displacement", "{out}/d.png"], "--displacement"),
        (["--jacobian", "{out}/j.tif"], "--jacobian"),
        (["--inverse-transform", "{out}/inverse"], "no suffix"),
        (["--qa-png", "{out}/qa.jpg"], "use .png"),
        (["--report", "{out}/r.txt"], "use .json"),
        (["--labels", "{moving_labels}", "--warped-labels", "{out}/l.bmp"], "--warped-labels"),
        (["--warped", "{out}/missing/w.nii.gz"], "folder does not exist"),
        (["--warped", "{out}"], "is a folder"),
        (["--warped", "{out}/a.nii.gz", "--jacobian", "{out}/./a.nii.gz"], "both name"),
        (["--warped", "{moving}"], "one of the inputs"),
    ],
)
def test_unusable_outputs_are_refused_before_the_inputs_are_read(
    pair_3d, tmp_path, capsys, options, expected
):
    """The fixed image given does not exist: a message about the output proves it came first."""
    argv = [option.format(out=tmp_path, **pair_3d) for option in options]
    missing = {**pair_3d, "fixed": tmp_path / "no-such-fixed.nii.gz"}
    assert expected in refused(missing, capsys, *argv)
    assert list(tmp_path.iterdir()) == []


def test_2d_formats_are_refused_for_3d_images_before_any_work(pair_3d, tmp_path, capsys):
    message = refused(pair_3d, capsys, "--warped", tmp_path / "w.png")
    assert ".png holds 2D pictures and these images are 3D" in message
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_an_unwritable_output_folder_is_refused(pair_3d, tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o555)
    assert "not writable" in refused(pair_3d, capsys, "--warped", folder / "w.nii.gz")
