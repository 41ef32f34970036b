"""Files that cannot be read are refused naming the file and the problem, and writes are atomic:
a failed or killed write leaves the earlier file, and no partial one, under the target's name."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import image_on, oblique_grid
from refusals import folder_with_an_earlier_result, listing, truncated_nifti

from DeepRegisterLib.errors import InputError
from DeepRegisterLib.imaging import fileio


def test_reading_a_truncated_nifti_is_refused(tmp_path: Path) -> None:
    a_truncated_nifti = truncated_nifti(tmp_path)
    """ITK alone reads such a file "successfully", with garbage for the missing voxels."""
    with pytest.raises(InputError, match="truncated") as caught:
        fileio.read_image(a_truncated_nifti, "moving image")
    assert str(a_truncated_nifti) in str(caught.value)


def test_reading_a_truncated_uncompressed_nifti_is_refused(tmp_path: Path) -> None:
    whole = tmp_path / "whole.nii"
    sitk.WriteImage(sitk.Image([10, 10, 10], sitk.sitkInt16), str(whole))
    cut = tmp_path / "cut.nii"
    cut.write_bytes(whole.read_bytes()[:-100])
    with pytest.raises(InputError, match=r"truncated.*holds \d+ bytes"):
        fileio.read_image(cut)


def test_an_intact_nifti_still_reads(tmp_path: Path) -> None:
    for suffix in (".nii", ".nii.gz"):
        image = sitk.GetImageFromArray(np.arange(60, dtype=np.float32).reshape(3, 4, 5))
        sitk.WriteImage(image, str(tmp_path / f"a{suffix}"))
        back = fileio.read_image(tmp_path / f"a{suffix}")
        np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))


# --- atomic writes ---------------------------------------------------------------------------


def test_an_error_inside_an_atomic_write_leaves_neither_target_nor_temporary_files(
    tmp_path: Path,
) -> None:
    target = tmp_path / "result.nii.gz"
    staged: list[Path] = []

    def write_half_then_fail() -> None:
        with fileio.atomic_write_path(target) as tmp:
            tmp.write_bytes(b"half a file")
            staged.append(tmp)
            raise RuntimeError("disk on fire")

    with pytest.raises(RuntimeError, match="disk on fire"):
        write_half_then_fail()
    assert staged[0].parent.parent == tmp_path  # the partial file did exist, beside the target
    assert list(tmp_path.iterdir()) == []


def test_a_failed_write_keeps_the_earlier_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    an_output_folder = folder_with_an_earlier_result(tmp_path)
    before = listing(an_output_folder)

    def dies_half_way(image, path, *args):
        Path(path).write_bytes(b"partial")
        raise RuntimeError("killed while writing")

    monkeypatch.setattr(fileio.sitk, "WriteImage", dies_half_way)
    with pytest.raises(RuntimeError, match="killed"):
        fileio.write_image(sitk.Image([4, 4], sitk.sitkUInt8), an_output_folder / "warped.nii.gz")
    assert listing(an_output_folder) == before


def test_an_mhd_write_keeps_its_raw_data_file_valid(tmp_path: Path) -> None:
    image = image_on(
        oblique_grid(3, size=(6, 5, 4)), np.arange(120, dtype=np.float32).reshape(4, 5, 6)
    )
    fileio.write_image(image, tmp_path / "volume.mhd", compress=False)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["volume.mhd", "volume.raw"]  # no staging folder left behind
    header = (tmp_path / "volume.mhd").read_text()
    assert "ElementDataFile = volume.raw" in header
    back = fileio.read_image(tmp_path / "volume.mhd")
    np.testing.assert_array_equal(sitk.GetArrayFromImage(back), sitk.GetArrayFromImage(image))
    np.testing.assert_allclose(back.GetDirection(), image.GetDirection(), atol=1e-12)


def test_writing_to_a_missing_folder_or_with_an_unknown_suffix_is_refused(tmp_path: Path):
    image = sitk.Image([4, 4], sitk.sitkUInt8)
    with pytest.raises(InputError, match="does not exist"):
        fileio.write_image(image, tmp_path / "missing" / "a.nii.gz")
    with pytest.raises(InputError, match=r"use one of .*\.nii\.gz"):
        fileio.write_image(image, tmp_path / "a.jpeg")
    with pytest.raises(InputError, match=r"use \.h5"):
        fileio.write_transform(sitk.Transform(2, sitk.sitkIdentity), tmp_path / "t.json")
    assert list(tmp_path.iterdir()) == []
    assert not os.listdir(tmp_path)


def test_staging_left_by_a_killed_writer_is_swept_by_the_next_write(tmp_path):
    """A SIGKILL mid-write leaves a hidden staging folder; the next write of that file removes
    it, while a live process's staging folder is left alone."""
    target = tmp_path / "warped.nii.gz"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stale = tmp_path / f".{target.name}.partial-{dead.stdout.strip()}-abc"
    live = tmp_path / f".{target.name}.partial-{os.getpid()}-xyz"
    for folder in (stale, live):
        folder.mkdir()
        (folder / target.name).write_bytes(b"half written")
    fileio.write_image(sitk.Image(8, 8, sitk.sitkUInt8), target)
    assert not stale.exists()
    assert live.exists()
    assert sitk.ReadImage(str(target)).GetSize() == (8, 8)
