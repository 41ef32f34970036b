"""Image geometry no registration can use (zero, negative or NaN spacing, singular or
subnormal directions) is refused before any work, whether it comes in memory or in a file; a
negative spacing in a file is a flipped axis, which is fine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from refusals import folder_with_an_earlier_result, refused, three_d_pair

from DeepRegisterLib.errors import InputError
from DeepRegisterLib.imaging import fileio
from DeepRegisterLib.registration.image_checks import check_intensity_image


@pytest.fixture
def an_output_folder(tmp_path: Path) -> Path:
    return folder_with_an_earlier_result(tmp_path)


IDENTITY_3D = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0)


class GeometryStandIn:
    """An image-like object with geometry SimpleITK itself would refuse to build (below), as
    other front ends (arrays, MRML nodes) could hand over: the pre-flight must still catch it."""

    def __init__(self, spacing=(1.0, 1.0, 1.0), direction=IDENTITY_3D):
        self._spacing, self._direction = spacing, direction

    def GetPixelID(self):  # noqa: N802  (SimpleITK's API)
        return sitk.sitkFloat32

    def GetNumberOfComponentsPerPixel(self):  # noqa: N802
        return 1

    def GetDimension(self):  # noqa: N802
        return 3

    def GetSize(self):  # noqa: N802
        return (8, 8, 8)

    def GetSpacing(self):  # noqa: N802
        return self._spacing

    def GetDirection(self):  # noqa: N802
        return self._direction

    def GetOrigin(self):  # noqa: N802
        return (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("geometry", "message"),
    [
        (dict(spacing=(1.0, 0.0, 1.0)), "invalid voxel spacing.*positive"),
        (dict(spacing=(1.0, -0.5, 1.0)), "invalid voxel spacing.*positive"),
        (dict(spacing=(1.0, np.nan, 1.0)), "invalid voxel spacing"),
        (dict(direction=(1, 0, 0, 1, 0, 0, 0, 0, 1)), "singular or invalid direction"),
        (dict(direction=(1, 0, 0, 0, 1, 0, 0, 0, 0)), "singular or invalid direction"),
    ],
)
def test_zero_negative_spacing_and_a_singular_direction_are_refused(geometry, message) -> None:
    with pytest.raises(InputError, match=message):
        check_intensity_image(GeometryStandIn(**geometry), "the moving image")


def test_subnormal_direction_cosines_are_refused_with_the_remedy() -> None:
    """A script can build them (1e-310 from a rotation by a vanishing angle); ITK's SVD then
    fails and resampling returns zeros, so they are refused before any work."""
    image = sitk.GetImageFromArray(np.arange(512, dtype=np.float32).reshape(8, 8, 8))
    tiny = 1e-310
    image.SetDirection((1.0, -tiny, 0.0, tiny, 1.0, 0.0, 0.0, 0.0, 1.0))
    with pytest.raises(InputError, match=r"subnormal.*numpy.round"):
        check_intensity_image(image, "the moving image")
    image.SetDirection(tuple(np.round(image.GetDirection(), 12)))
    check_intensity_image(image, "the moving image")


def test_simpleitk_itself_cannot_build_such_geometry_in_memory() -> None:
    """Why the pre-flight check above uses a stand-in: ITK refuses these outright."""
    image = sitk.Image([8, 8, 8], sitk.sitkFloat32)
    for spacing in ((1.0, 0.0, 1.0), (1.0, -1.0, 1.0)):
        with pytest.raises(RuntimeError, match="spacing"):
            image.SetSpacing(spacing)
    with pytest.raises(RuntimeError, match="direction"):
        image.SetDirection((1, 0, 0, 0, 1, 0, 0, 0, 0))


def raw_header_file(path: Path, header_lines: str) -> Path:
    """A MetaImage (.mha) with a hand-written header: the way bad geometry arrives in files."""
    data = np.arange(6**3, dtype=np.float32).tobytes()
    header = (
        "ObjectType = Image\nNDims = 3\n" + header_lines + "\nDimSize = 6 6 6\n"
        "ElementType = MET_FLOAT\nElementDataFile = LOCAL\n"
    )
    path.write_bytes(header.encode() + data)
    return path


@pytest.mark.parametrize(
    ("header", "message"),
    [
        ("ElementSpacing = 0 1 1", "Zero-valued spacing"),
        ("TransformMatrix = 1 0 0 1 0 0 0 0 1", "Bad direction, determinant is 0"),
    ],
)
def test_files_with_zero_spacing_or_a_singular_direction_are_refused_naming_the_problem(
    an_output_folder: Path, tmp_path: Path, header: str, message: str
) -> None:
    path = raw_header_file(tmp_path / "bad.mha", header)
    fixed = three_d_pair()[0]
    text = refused(an_output_folder, InputError, message, fixed, path, model=None)
    assert "moving image" in text
    assert str(path) in text


def test_a_file_with_negative_spacing_is_read_as_a_flipped_axis_not_as_negative_spacing(
    tmp_path: Path,
) -> None:
    """ITK folds a negative spacing into the direction: valid geometry, so it is accepted."""
    image = fileio.read_image(raw_header_file(tmp_path / "neg.mha", "ElementSpacing = -1 2 1"))
    assert image.GetSpacing() == (1.0, 2.0, 1.0)
    assert image.GetDirection()[0] == -1.0
    check_intensity_image(image, "the moving image")  # no error
