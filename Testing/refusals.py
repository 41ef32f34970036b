"""What every bad-input test checks: a run refused with a specific error leaves the output
folder exactly as it was. Shared by the test_bad_*.py modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import grid_centre, image_on, make_phantom, oblique_grid

from DeepRegisterLib.errors import DeepRegisterError
from DeepRegisterLib.imaging import fileio
from DeepRegisterLib.registration.engine import register


def register_and_write(out: Path, fixed, moving, **kwargs):
    """What an application does: register (which validates first), then write the outputs."""
    result = register(
        fixed, moving, **{"preset": "fast", "iterations": 2, "device": "cpu", **kwargs}
    )
    fileio.write_image(result.warped, out / "warped.nii.gz")
    fileio.write_image(result.displacement, out / "displacement.nrrd")
    fileio.write_transform(result.transform(), out / "transform.h5")
    return result


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def folder_with_an_earlier_result(tmp_path: Path) -> Path:
    """An output folder holding one earlier result, which a failed run must leave untouched."""
    out = tmp_path / "out"
    out.mkdir()
    (out / "warped.nii.gz").write_bytes(b"an earlier result")
    return out


def three_d_pair() -> tuple[sitk.Image, sitk.Image]:
    """A small 3D phantom pair, shifted by 1 mm."""
    grid = oblique_grid(3, size=(20, 18, 16))
    phantom = make_phantom(3, grid_centre(grid), scale_mm=8.0)
    return phantom.image(grid), phantom.image(grid, through=lambda y: y - 1.0)


def truncated_nifti(folder: Path) -> Path:
    """A .nii.gz cut in half: ITK alone reads it "successfully", with garbage voxels."""
    image = image_on(
        oblique_grid(3, size=(20, 18, 16)),
        np.random.default_rng(0).uniform(0, 255, (16, 18, 20)).astype(np.float32),
    )
    whole = folder / "whole.nii.gz"
    sitk.WriteImage(image, str(whole))
    cut = folder / "cut.nii.gz"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    return cut


def refused(
    out: Path,
    error: type[Exception],
    message: str,
    fixed,
    moving,
    **kwargs,
) -> str:
    """Run ``register_and_write`` expecting ``error`` matching ``message``; the folder must not
    change. Returns the message for further checks."""
    before = listing(out)
    with pytest.raises(error, match=message) as caught:
        register_and_write(out, fixed, moving, **kwargs)
    assert isinstance(caught.value, DeepRegisterError)  # one family for callers to catch
    assert listing(out) == before
    return str(caught.value)
