"""Every unusable input is refused with a specific, actionable error, and nothing is written.

Failures go through ``register_and_write`` — register, then write the outputs with
:mod:`DeepRegisterLib.imaging.fileio` — and each test checks that the output folder is unchanged.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import grid_centre, make_phantom, oblique_grid
from refusals import (
    folder_with_an_earlier_result,
    listing,
    refused,
    register_and_write,
    truncated_nifti,
)

from DeepRegisterLib.errors import InputError, ResourceError
from DeepRegisterLib.registration import memory_plan


@pytest.fixture
def an_output_folder(tmp_path: Path) -> Path:
    return folder_with_an_earlier_result(tmp_path)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def a_good_pair(request: pytest.FixtureRequest) -> tuple[sitk.Image, sitk.Image]:
    dim = request.param
    grid = oblique_grid(dim, size=(24, 22, 20)[:dim], spacing=(1.3, 1.4, 1.5)[:dim])
    phantom = make_phantom(dim, grid_centre(grid), scale_mm=9.0)
    shift = np.array([1.0, -1.0, 0.5][:dim])
    return phantom.image(grid), phantom.image(grid, through=lambda y: y - shift)


def like(image: sitk.Image, array: np.ndarray, vector: bool = False) -> sitk.Image:
    out = sitk.GetImageFromArray(array, isVector=vector)
    out.CopyInformation(image)
    return out


# --- images ---------------------------------------------------------------------------------


def test_the_helper_writes_outputs_for_good_input(a_good_pair, an_output_folder: Path) -> None:
    """The failure tests below are meaningful only if the same path succeeds on good input."""
    register_and_write(an_output_folder, *a_good_pair, model=None)
    assert {"warped.nii.gz", "displacement.nrrd", "transform.h5"} <= set(listing(an_output_folder))
    assert (
        sitk.ReadImage(str(an_output_folder / "warped.nii.gz")).GetSize()
        == a_good_pair[0].GetSize()
    )


def test_a_2d_image_with_a_3d_image_is_refused(an_output_folder: Path) -> None:
    grid3, grid2 = oblique_grid(3, size=(16, 16, 16)), oblique_grid(2, size=(16, 16))
    fixed = make_phantom(3, grid_centre(grid3), 7.0).image(grid3)
    moving = make_phantom(2, grid_centre(grid2), 7.0).image(grid2)
    message = refused(an_output_folder, InputError, "3D.*2D", fixed, moving, model=None)
    assert "both must be 2D or both 3D" in message


def constant_like(image: sitk.Image, value: float) -> sitk.Image:
    return like(image, np.full(sitk.GetArrayViewFromImage(image).shape, value, np.float32))


def with_bad_voxel(image: sitk.Image, value: float) -> sitk.Image:
    array = sitk.GetArrayFromImage(image)
    array.flat[array.size // 2] = value
    return like(image, array)


BAD_MOVING_IMAGES: dict[str, tuple[Callable[[sitk.Image], sitk.Image], str]] = {
    "4d": (
        lambda im: sitk.Image([6, 6, 6, 6], sitk.sitkFloat32),
        "is 4D.*time series.*deepregister apply",
    ),
    "rgb-black": (  # a colour picture is registered on its luminance: here, nothing
        lambda im: sitk.Image(im.GetSize(), sitk.sitkVectorUInt8, 3),
        "constant",
    ),
    "three-floats": (  # not a picture: a field, or directions
        lambda im: sitk.Image(im.GetSize(), sitk.sitkVectorFloat32, 3),
        "3-component vector.*colour.*deepregister apply",
    ),
    "vector": (
        lambda im: sitk.Image(im.GetSize(), sitk.sitkVectorFloat32, 5),
        "5-component vector",
    ),
    "complex": (lambda im: sitk.Image(im.GetSize(), sitk.sitkComplexFloat32), "complex.*magnitude"),
    "empty": (lambda im: sitk.Image([0] * im.GetDimension(), sitk.sitkFloat32), "too small"),
    "tiny": (lambda im: sitk.Image([3] * im.GetDimension(), sitk.sitkFloat32), "too small.*3"),
    "constant": (lambda im: constant_like(im, 7.0), "constant.*7"),
    "nan": (lambda im: with_bad_voxel(im, np.nan), "1 NaN or infinite"),
    "inf": (lambda im: with_bad_voxel(im, -np.inf), "1 NaN or infinite"),
}


@pytest.mark.parametrize("case", list(BAD_MOVING_IMAGES))
def test_an_unusable_moving_image_is_refused_with_a_message_naming_the_problem(
    a_good_pair, an_output_folder: Path, case: str
) -> None:
    fixed, moving = a_good_pair
    build, message = BAD_MOVING_IMAGES[case]
    text = refused(an_output_folder, InputError, message, fixed, build(moving), model=None)
    assert "moving image" in text  # it says WHICH input is wrong


def test_an_unusable_fixed_image_is_named_as_the_fixed_one(a_good_pair, an_output_folder):
    fixed, moving = a_good_pair
    refused(
        an_output_folder,
        InputError,
        "the fixed image.*NaN",
        with_bad_voxel(fixed, np.nan),
        moving,
        model=None,
    )


# --- masks and label maps --------------------------------------------------------------------


def test_an_empty_mask_is_refused(a_good_pair, an_output_folder: Path) -> None:
    fixed, moving = a_good_pair
    empty = sitk.Cast(fixed * 0, sitk.sitkUInt8)
    refused(
        an_output_folder,
        InputError,
        "fixed mask has no voxels set",
        fixed,
        moving,
        fixed_mask=empty,
        model=None,
    )
    refused(
        an_output_folder,
        InputError,
        "moving mask has no voxels set",
        fixed,
        moving,
        moving_mask=empty,
        model=None,
    )


def test_a_mask_that_does_not_overlap_its_image_is_refused(a_good_pair, an_output_folder):
    fixed, moving = a_good_pair
    far_away = sitk.Cast(fixed > -1, sitk.sitkUInt8)  # all ones …
    far_away.SetOrigin(tuple(np.asarray(fixed.GetOrigin()) + 500.0))  # … half a metre away
    refused(
        an_output_folder,
        InputError,
        "does not overlap",
        fixed,
        moving,
        fixed_mask=far_away,
        model=None,
    )


def test_a_label_map_with_non_integer_values_is_refused(a_good_pair, an_output_folder: Path):
    fixed, moving = a_good_pair
    labels = like(moving, sitk.GetArrayFromImage(moving) / 7.3)  # an intensity image by mistake
    refused(
        an_output_folder,
        InputError,
        "non-integer values",
        fixed,
        moving,
        moving_labels={"seg": labels},
        model=None,
    )
    refused(
        an_output_folder,
        InputError,
        "non-integer values",
        fixed,
        moving,
        fixed_labels=labels,
        moving_labels={"seg": labels},
        model=None,
    )


def test_a_multi_layer_label_map_is_refused_pointing_to_apply(a_good_pair, an_output_folder):
    """Overlapping Slicer segments come as one layer per overlap: ``apply`` warps those."""
    fixed, moving = a_good_pair
    layers = sitk.Image(moving.GetSize(), sitk.sitkVectorUInt8, 2)
    layers.CopyInformation(moving)
    message = "not a vector image.*one layer per overlap.*deepregister apply --labels"
    refused(an_output_folder, InputError, message, fixed, moving, moving_labels={"seg": layers},
            model=None)  # fmt: skip


def test_float_label_maps_holding_whole_numbers_are_accepted(a_good_pair, an_output_folder):
    fixed, moving = a_good_pair
    labels = sitk.Cast(sitk.Cast(moving > 100, sitk.sitkUInt8) * 3, sitk.sitkFloat32)
    result = register_and_write(
        an_output_folder, fixed, moving, moving_labels={"seg": labels}, model=None
    )
    assert set(np.unique(sitk.GetArrayViewFromImage(result.warped_labels["seg"]))) <= {0, 3}


# --- files -------------------------------------------------------------------------------------


def test_registering_a_truncated_or_missing_file_is_refused(
    a_good_pair, an_output_folder: Path, tmp_path: Path
) -> None:
    fixed = a_good_pair[0]
    a_truncated_nifti = truncated_nifti(tmp_path)
    refused(
        an_output_folder,
        InputError,
        "moving image.*truncated",
        fixed,
        a_truncated_nifti,
        model=None,
    )
    refused(
        an_output_folder,
        InputError,
        "moving image file not found",
        fixed,
        tmp_path / "nowhere.nii.gz",
        model=None,
    )
    not_an_image = tmp_path / "notes.nii.gz"
    not_an_image.write_bytes(gzip.compress(b"this is not an image"))
    refused(
        an_output_folder, InputError, "cannot read moving image", fixed, not_an_image, model=None
    )


# --- options -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (dict(preset="ludicrous"), "unknown preset 'ludicrous'.*fast"),
        (dict(similarity="vibes"), "unknown similarity 'vibes'.*lncc"),
        (dict(device="tpu"), "unknown device 'tpu'.*cpu"),
        (dict(regularization=-1.0), "regularization must be"),
        (dict(iterations=-5), "iterations must be"),
    ],
)
def test_an_unknown_option_is_refused_listing_the_choices(
    a_good_pair, an_output_folder: Path, option: dict, message: str
) -> None:
    refused(an_output_folder, InputError, message, *a_good_pair, **{"model": None, **option})


def test_a_deformable_initial_transform_is_refused(a_good_pair, an_output_folder: Path):
    """A smooth field over the fixed image (whose small, off-centre domain random probe points
    in ±200 mm would all miss) must not pass for the identity and be silently dropped."""
    fixed, moving = a_good_pair
    dim = fixed.GetDimension()
    shape = sitk.GetArrayViewFromImage(fixed).shape
    bend = np.stack(
        np.meshgrid(*[np.sin(np.linspace(0, np.pi, n)) for n in shape], indexing="ij"), axis=-1
    )
    field = like(fixed, np.ascontiguousarray(2.0 * bend[..., :dim]), vector=True)
    deformable = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    refused(
        an_output_folder,
        InputError,
        "must be linear",
        fixed,
        moving,
        model=None,
        initial_transform=deformable,
    )


# --- resources and geometry after the affine stage ---------------------------------------------


def test_images_too_big_for_memory_are_refused_suggesting_a_coarser_run(
    a_good_pair, an_output_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(memory_plan, "available_memory_bytes", lambda: 1_000)
    message = refused(
        an_output_folder, ResourceError, "needs about .* GiB of memory", *a_good_pair, model=None
    )
    assert "coarser" in message
    assert "mm grid" in message  # the coarser grids were tried before refusing


def test_fields_of_view_that_do_not_overlap_are_refused(a_good_pair, an_output_folder):
    fixed, moving = a_good_pair
    far = sitk.Image(moving)
    far.SetOrigin(tuple(np.asarray(moving.GetOrigin()) + 10_000.0))  # 10 m away
    refused(an_output_folder, InputError, "do not overlap", fixed, far, affine=False, model=None)
