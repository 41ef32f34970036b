"""``deepregister apply``: a saved transform carried to more images exactly as ``register``
warps its own, checked against register's files and against hand-computed values; bad input
refused before any work, with nothing written."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import image_on, oblique_grid
from registered_phantom import apply, array

from DeepRegisterLib import apply_transform
from DeepRegisterLib.cli import main as cli
from DeepRegisterLib.imaging import apply_transform as warping
from DeepRegisterLib.imaging import fileio as cli_fileio
from DeepRegisterLib.imaging import volumes
from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.imaging.metrics import dice_per_label, mean_dice
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
from DeepRegisterLib.registration import image_checks, saved_transforms


@pytest.mark.parametrize("transform", ["transform.h5", "transform.mha"])
def test_apply_warps_as_register_did(registered, tmp_path, transform):
    """The moving scan and its labels through either saved form of the transform come out as
    register wrote them: same grid and type, labels exact, and the 16-bit scan rounded alike
    but where its value sits on .5 (register computes in float32, ITK in float64)."""
    out_image, out_labels = tmp_path / "scan.nii.gz", tmp_path / "labels.nrrd"
    scan_as_float = tmp_path / "scan_as_float.nrrd"
    sitk.WriteImage(sitk.Cast(sitk.ReadImage(str(registered["moving"])), sitk.sitkFloat32),
                    str(scan_as_float))  # fmt: skip
    code = apply(
        "--transform", registered[transform], "--reference", registered["fixed"],
        "--image", registered["moving"], out_image, "--labels", registered["labels"], out_labels,
        "--image", scan_as_float, tmp_path / "unrounded.mha",
    )  # fmt: skip
    assert code == cli.EXIT_OK
    ours, theirs = array(out_image), array(registered["warped"])
    assert ours.dtype == theirs.dtype == np.uint16
    unrounded = array(tmp_path / "unrounded.mha")
    np.testing.assert_array_equal(ours, np.rint(unrounded))
    differing = ours != theirs
    assert np.abs(ours[differing].astype(int) - theirs[differing]).max(initial=0) <= 1
    assert np.all(np.abs(unrounded[differing] % 1 - 0.5) < 0.05)
    labels, their_labels = array(out_labels), array(registered["warped_labels"])
    assert labels.dtype == their_labels.dtype
    np.testing.assert_array_equal(labels, their_labels)
    fixed = sitk.ReadImage(str(registered["fixed"]))
    for path in (out_image, out_labels):
        assert sitk.ReadImage(str(path)).GetOrigin() == fixed.GetOrigin()


def test_a_series_through_the_composite_transform_matches_each_volume_alone(registered, tmp_path):
    """Twelve 16-bit volumes are warped through the transform's field sampled once on the grid
    (ITK's Warp), a volume alone by Resample: the same values through register's ``.h5``."""
    scan = sitk.ReadImage(str(registered["moving"]))
    volumes = [sitk.Cast(scan * (1 + t / 4), sitk.sitkUInt16) for t in range(12)]
    series = sitk.JoinSeries(volumes)
    transform = sitk.ReadTransform(str(registered["transform.h5"]))
    fixed = sitk.ReadImage(str(registered["fixed"]))
    assert warping._field_pays(series, Grid.of(fixed), labels=False)  # what this test is about
    warped = sitk.GetArrayFromImage(apply_transform(series, transform, fixed))
    for volume, alone in zip(warped, volumes, strict=True):
        one = apply_transform(alone, transform, fixed)
        np.testing.assert_array_equal(volume, sitk.GetArrayFromImage(one))
    assert warped[11].max() > warped[0].max() > 0


def test_the_inverse_carries_warped_labels_back_onto_the_moving_grid(registered, tmp_path):
    """register's warped labels through ``--inverse-transform``, with the moving image as the
    reference, land back on the moving labels (two nearest-neighbour passes lose a little);
    through the forward transform a second time they do not."""
    moving_labels = sitk.ReadImage(str(registered["labels"]))

    def round_trip(transform: str) -> float:
        back = tmp_path / f"back_through_{transform}.nii.gz"
        code = apply(
            "--transform", registered[transform], "--reference", registered["moving"],
            "--labels", registered["warped_labels"], back,
        )  # fmt: skip
        assert code == cli.EXIT_OK
        return mean_dice(dice_per_label(moving_labels, sitk.ReadImage(str(back))))

    back = round_trip("inverse.h5")
    assert back > 0.85
    assert back > round_trip("transform.h5") + 0.2


def along_i(grid: Grid, voxels: float) -> sitk.TranslationTransform:
    """Every point moved ``voxels`` along the grid's first axis."""
    return sitk.TranslationTransform(grid.dim, (grid.index_to_physical[:, 0] * voxels).tolist())


@pytest.fixture
def a_ramp() -> tuple[sitk.Image, Grid]:
    """Values 3·i along the first axis of an oblique, anisotropic grid."""
    grid = oblique_grid(3, size=(12, 7, 5), spacing=(1.5, 1.0, 2.0))
    i = np.arange(12, dtype=np.uint16)
    return image_on(grid, np.broadcast_to(3 * i, (5, 7, 12)).astype(np.uint16)), grid


def test_integer_images_are_rounded_where_itk_truncates(a_ramp):
    """A quarter voxel along the ramp: ITK's linear sample is 3·i + 0.75, rounded to 3·i + 1."""
    ramp, grid = a_ramp
    warped = sitk.GetArrayFromImage(apply_transform(ramp, along_i(grid, 0.25), grid))
    assert warped.dtype == np.uint16
    i = np.arange(11)
    np.testing.assert_array_equal(warped[..., :11], np.broadcast_to(3 * i + 1, (5, 7, 11)))
    truncated = sitk.Resample(ramp, ramp, along_i(grid, 0.25), sitk.sitkLinear)
    assert np.all(sitk.GetArrayFromImage(truncated)[..., :11] == 3 * i)  # ITK alone
    assert np.all(warped[..., 11] == 33)  # ITK holds the edge value for half a voxel


def test_rounding_into_the_type_goes_slab_by_slab_to_the_same_bits(monkeypatch):
    """A warped integer image is rounded into its type a slab at a time, not as a float copy
    of the whole (a CT's scan in ITK's warp: 2.4 → 1.8 GB at peak), with the bits and the
    geometry of rounding it whole: ties to even, negative values too."""
    monkeypatch.setattr(volumes, "SLAB_VOXELS", 2 * 7 * 12)  # rows of 2, 2 and 1
    grid = oblique_grid(3, size=(12, 7, 5), spacing=(1.5, 1.0, 2.0))
    halves = np.random.default_rng(5).integers(-2000, 2000, (5, 7, 12)) / 2  # ties among them
    warped = image_on(grid, halves.astype(np.float32))
    for pixel_id in (sitk.sitkInt16, sitk.sitkInt32):
        rounded = warping.in_type_of(warped, sitk.Image([1, 1, 1], pixel_id))
        assert rounded.GetPixelID() == pixel_id
        assert Grid.of(rounded) == grid
        whole = np.rint(halves).astype(sitk.GetArrayViewFromImage(rounded).dtype)
        np.testing.assert_array_equal(sitk.GetArrayFromImage(rounded), whole)


def test_label_maps_keep_type_and_values_and_floats_become_float32(a_ramp):
    """Three quarters of a voxel along the ramp: a label map takes its next voxel's label
    (a linear sample, 3·i + 2.25, would make labels that are not there)."""
    ramp, grid = a_ramp
    labels = sitk.Cast(ramp, sitk.sitkInt16)
    # A reference image serves as well as its grid.
    warped = sitk.GetArrayFromImage(apply_transform(labels, along_i(grid, 0.75), ramp, True))
    assert warped.dtype == np.int16
    np.testing.assert_array_equal(warped[..., :11], sitk.GetArrayFromImage(labels)[..., 1:])
    as_double = apply_transform(sitk.Cast(ramp, sitk.sitkFloat64), along_i(grid, 0.25), grid)
    assert as_double.GetPixelID() == sitk.sitkFloat32
    expected = np.broadcast_to(3 * np.arange(11) + 0.75, (5, 7, 11))
    np.testing.assert_allclose(sitk.GetArrayFromImage(as_double)[..., :11], expected)


def test_voxels_that_are_not_numbers_are_carried_and_said(a_ramp, tmp_path, capsys, monkeypatch):
    """A map that marks "no value" with NaN (which ``register`` refuses) is warped as ITK
    warps it, each NaN or infinite voxel making the output NaN wherever a sample's cell
    touches it, and a note says how many the input had; a finite image gets no such note."""
    ramp, grid = a_ramp
    values = sitk.GetArrayFromImage(ramp).astype(np.float32)
    values[2, 3, 5], values[3, 4, 8] = np.nan, np.inf
    paths = {name: tmp_path / f"{name}.nrrd" for name in ("nan", "finite")}
    sitk.WriteImage(image_on(grid, values), str(paths["nan"]))
    sitk.WriteImage(sitk.Cast(ramp, sitk.sitkFloat32), str(paths["finite"]))
    sitk.WriteTransform(along_i(grid, 0.25), str(tmp_path / "t.tfm"))
    monkeypatch.setattr(image_checks, "NOT_FINITE_ROWS", 64)  # counted in 7 pieces of 420

    code = apply(
        "--transform", tmp_path / "t.tfm", "--reference", paths["finite"],
        "--image", paths["nan"], tmp_path / "nan_w.nrrd",
        "--image", paths["finite"], tmp_path / "finite_w.nrrd",
    )  # fmt: skip
    notes = [line for line in capsys.readouterr().out.splitlines() if "not a number" in line]
    assert code == 0
    assert notes == [
        f"note: {paths['nan']}: 2 voxels not a number (NaN or infinite); the output is NaN "
        "wherever a sample's cell touches one"
    ]
    warped = array(tmp_path / "nan_w.nrrd")
    assert 2 <= np.count_nonzero(np.isnan(warped)) <= 16  # each in 1 to 8 samples' cells
    assert np.isfinite(array(tmp_path / "finite_w.nrrd")).all()


def test_2d_pictures_come_back_as_pictures(tmp_path):
    grid = demo_grid(2, 32)
    pair = phantom_pair(grid, amplitude_mm=2.0)
    picture = sitk.Cast(sitk.Round(pair.moving * (200.0 / 1.0)), sitk.sitkUInt8)
    paths = {name: tmp_path / f"{name}.png" for name in ("fixed", "moving", "labels")}
    sitk.WriteImage(sitk.Cast(sitk.Round(pair.fixed * 200.0), sitk.sitkUInt8), str(paths["fixed"]))
    sitk.WriteImage(picture, str(paths["moving"]))
    sitk.WriteImage(sitk.Cast(pair.moving_labels, sitk.sitkUInt8), str(paths["labels"]))
    transform = tmp_path / "t.tfm"
    sitk.WriteTransform(sitk.Euler2DTransform((0.0, 0.0), 0.05, (1.0, -2.0)), str(transform))
    out, out_labels = tmp_path / "warped.png", tmp_path / "warped_labels.png"
    code = apply(
        "--transform", transform, "--reference", paths["fixed"],
        "--image", paths["moving"], out, "--labels", paths["labels"], out_labels,
    )  # fmt: skip
    assert code == cli.EXIT_OK
    assert sitk.ReadImage(str(out)).GetPixelID() == sitk.sitkUInt8
    assert set(np.unique(array(out_labels))) <= set(np.unique(array(paths["labels"])))
    assert array(out).max() > 0


def refused(capsys, tmp_path: Path, *argv) -> str:
    """Run a command that must be refused: exit 2, nothing new in ``tmp_path``; its message."""
    before = sorted(tmp_path.iterdir())
    assert apply(*argv) == cli.EXIT_INPUT
    assert sorted(tmp_path.iterdir()) == before
    return capsys.readouterr().err


def test_outputs_are_checked_before_any_input_is_read(registered, tmp_path, capsys):
    absent = tmp_path / "absent.nii.gz"  # never read: the output is refused first
    base = ("--transform", absent, "--reference", absent)
    assert "nothing to warp" in refused(capsys, tmp_path, *base)
    assert ".jpg" in refused(capsys, tmp_path, *base, "--image", absent, tmp_path / "w.jpg")
    over_input = ("--image", registered["moving"], registered["moving"])
    assert "is one of the inputs" in refused(capsys, tmp_path, *base, *over_input)
    twice = ("--image", absent, tmp_path / "w.nii.gz")
    assert "give each its own file" in refused(capsys, tmp_path, *base, *twice, *twice)


def test_unusable_inputs_are_refused_with_nothing_written(registered, tmp_path, capsys):
    fine = ("--image", registered["moving"], tmp_path / "fine.nii.gz")
    base = ("--transform", registered["transform.h5"], "--reference", registered["fixed"])
    flat = tmp_path / "flat.nii.gz"
    sitk.WriteImage(sitk.Image([8, 8], sitk.sitkUInt8), str(flat))
    message = refused(capsys, tmp_path, *base, *fine, "--image", flat, tmp_path / "o.nii.gz")
    assert f"image {flat} is 2D and the reference 3D" in message
    flat_reference = ("--transform", registered["transform.h5"], "--reference", flat)
    message = refused(capsys, tmp_path, *flat_reference, "--image", flat, tmp_path / "o.nii.gz")
    assert "the transform is 3D and the reference 2D" in message
    volume = tmp_path / "volume.nrrd"  # a 3D image is not a series of 2D ones
    sitk.WriteImage(sitk.Image([8, 8, 8], sitk.sitkUInt8), str(volume))
    on_a_plane = (tmp_path / "plane.tfm", "--reference", flat, "--image", volume)
    sitk.WriteTransform(sitk.TranslationTransform(2, (1.0, 0.0)), str(on_a_plane[0]))
    message = refused(capsys, tmp_path, "--transform", *on_a_plane, tmp_path / "o.nii.gz")
    assert f"image {volume} is 3D and the reference 2D: a transform carries 2D images " in message
    missing = ("--transform", tmp_path / "none.h5", "--reference", registered["fixed"])
    assert "transform file not found" in refused(capsys, tmp_path, *missing, *fine)
    cut = tmp_path / "cut.nii.gz"  # refused from its header, before the fine one is warped
    whole = Path(registered["labels"]).read_bytes()
    cut.write_bytes(whole[: len(whole) // 2])
    before = sorted(tmp_path.iterdir())
    assert apply(*base, *fine, "--labels", cut, tmp_path / "c.nii.gz") == cli.EXIT_INPUT
    captured = capsys.readouterr()
    assert f"cannot read label map {cut}: the file is truncated" in captured.err
    assert "warping" not in captured.out
    assert sorted(tmp_path.iterdir()) == before


def test_an_image_the_transform_sends_elsewhere_is_refused(registered, tmp_path, capsys):
    """Files from two spaces (a transform that sends the reference 10 m away): nothing would
    land, so nothing is written, the other image included, and the message says why."""
    far = tmp_path / "far.tfm"
    sitk.WriteTransform(sitk.TranslationTransform(3, (10_000.0, 0.0, 0.0)), str(far))
    message = refused(
        capsys, tmp_path, "--transform", far, "--reference", registered["fixed"],
        "--labels", registered["labels"], tmp_path / "l.nii.gz",
        "--image", registered["moving"], tmp_path / "w.nii.gz",
    )  # fmt: skip
    assert f"nothing of {registered['moving']} lands on the reference grid" in message


def noting_staged(real, folder: Path, notes: list[list[str]]):
    """``real``, noting at each call the outputs staged in ``folder`` (not yet in place)."""

    def watched(*args, **kwargs):
        notes.append(sorted(p.name for p in folder.glob(".*.partial-*/*")))
        return real(*args, **kwargs)

    return watched


def test_each_output_is_written_before_the_next_is_warped(registered, tmp_path, monkeypatch):
    """One warped image is held at a time: when the second is warped, the first lies staged
    beside its name (not yet in place); at the end both are in place, and none if a warp
    fails."""
    staged_at_each_warp: list[list[str]] = []
    real = warping.apply_transform
    watched = noting_staged(real, tmp_path, staged_at_each_warp)
    monkeypatch.setattr(saved_transforms, "apply_transform", watched)
    outputs = ("--transform", registered["transform.h5"], "--reference", registered["fixed"])
    outputs += ("--labels", registered["labels"], tmp_path / "l.nii.gz")
    outputs += ("--image", registered["moving"], tmp_path / "w.nrrd")
    assert apply(*outputs) == cli.EXIT_OK
    assert staged_at_each_warp == [[], ["w.nrrd"]]  # images first, then label maps
    assert sorted(p.name for p in tmp_path.iterdir()) == ["l.nii.gz", "w.nrrd"]

    calls = []

    def failing(*args, **kwargs):  # the second warp, once the first output is staged
        calls.append(1)
        if len(calls) == 2:
            raise OSError("no space left on device")
        return real(*args, **kwargs)

    monkeypatch.setattr(saved_transforms, "apply_transform", failing)
    again = [tmp_path / "again" / name for name in ("l.nii.gz", "w.nrrd")]
    again[0].parent.mkdir()
    with pytest.raises(OSError, match="no space left"):
        apply(*outputs[:4], "--labels", registered["labels"], again[0],
              "--image", registered["moving"], again[1])  # fmt: skip
    assert list(again[0].parent.iterdir()) == []


def test_each_input_is_read_when_it_is_warped(registered, tmp_path, monkeypatch):
    """Checked from their headers first, the inputs are read one at a time: the second when
    the first output lies staged, so that one input is held at a time, not all of them."""
    staged_at_each_read: list[list[str]] = []
    watched = noting_staged(cli_fileio.read_image, tmp_path, staged_at_each_read)
    monkeypatch.setattr(cli_fileio, "read_image", watched)
    code = apply(
        "--transform", registered["transform.h5"], "--reference", registered["fixed"],
        "--image", registered["moving"], tmp_path / "w.nrrd",
        "--labels", registered["labels"], tmp_path / "l.nii.gz",
    )  # fmt: skip
    assert code == cli.EXIT_OK
    assert staged_at_each_read == [[], ["w.nrrd"]]


def test_apply_loads_no_torch(registered, tmp_path):
    """ITK does the work: the command never pays for torch's second-long import."""
    probe = (
        "import sys; from DeepRegisterLib.cli.main import main; code = main(sys.argv[1:]); "
        "print(code, 'torch' in sys.modules)"
    )
    argv = ["apply", "--transform", registered["transform.h5"], "--reference"]
    argv += [registered["fixed"], "--image", registered["moving"], tmp_path / "w.nii.gz"]
    completed = subprocess.run(
        [sys.executable, "-c", probe, *map(str, argv)], capture_output=True, text=True, timeout=120
    )
    assert completed.stdout.split()[-2:] == ["0", "False"], completed.stderr
    assert (tmp_path / "w.nii.gz").exists()


# --- a large image through the engine's warp ----------------------------------------------------
