"""evaluate() with transforms that went through files, label-name tables, reports and figures."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.errors import InputError
from DeepRegisterLib.evaluation.evaluate import (
    displacement_on_grid,
    evaluate,
    evaluation_images,
    json_ready,
    read_label_names,
)
from DeepRegisterLib.evaluation.figures import qa_figure, write_report
from DeepRegisterLib.evaluation.landmarks import Landmarks
from DeepRegisterLib.imaging.fileio import read_transform
from DeepRegisterLib.imaging.geometry import Grid

ANGLE = math.radians(20.0)
OBLIQUE_3D = (
    (math.cos(ANGLE), -math.sin(ANGLE), 0.0),
    (math.sin(ANGLE), math.cos(ANGLE), 0.0),
    (0.0, 0.0, 1.0),
)


def _pair(dim: int) -> tuple[sitk.Image, sitk.Image, sitk.Image, sitk.Image, np.ndarray]:
    """Fixed and moving images (and label maps) where moving = fixed moved by ``shift`` mm.

    The moving image holds the same voxels with its origin moved by a whole number of voxels,
    so T(x) = x + shift registers the pair exactly (no interpolation error).
    """
    shape = (12, 16, 20)[-dim:]
    rng = np.random.default_rng(5)
    intensity = rng.normal(size=shape).astype(np.float32)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[(slice(3, 9),) * dim] = 1
    labels[(slice(2, 6), *(slice(10, 15),) * (dim - 1))] = 2
    intensity += 4.0 * labels
    direction = np.array(OBLIQUE_3D)[:dim, :dim] if dim == 3 else np.array(OBLIQUE_3D)[:2, :2]
    grid = Grid(
        tuple(reversed(shape)),
        (0.9, 1.4, 2.0)[:dim],
        (5.0, -7.0, 11.0)[:dim],
        tuple(direction.ravel()),
    )
    shift = grid.index_to_physical @ np.array([2.0, -1.0, 1.0][:dim])
    moving_grid = Grid(grid.size, grid.spacing, tuple(np.add(grid.origin, shift)), grid.direction)

    def image(array: np.ndarray, where: Grid) -> sitk.Image:
        return where.apply_to(sitk.GetImageFromArray(array))

    return (
        image(intensity, grid),
        image(intensity, moving_grid),
        image(labels, grid),
        image(labels, moving_grid),
        shift,
    )


def _field_transform_file(transform: sitk.Transform, fixed: sitk.Image, path: Path) -> Path:
    field = displacement_on_grid(transform, fixed)
    sitk.WriteTransform(sitk.DisplacementFieldTransform(field), str(path))
    return path


@pytest.mark.parametrize("kind", ["translation.tfm", "field.h5"])
def test_exact_transform_read_back_from_file_scores_perfectly(tmp_path: Path, kind: str) -> None:
    fixed, moving, fixed_labels, moving_labels, shift = _pair(3)
    translation = sitk.TranslationTransform(3, tuple(shift))
    path = tmp_path / kind
    if kind.endswith(".tfm"):
        sitk.WriteTransform(translation, str(path))
    else:
        _field_transform_file(translation, fixed, path)
    transform = read_transform(path)
    landmarks = np.array([[10.0, 0.0, 20.0], [14.0, 3.0, 25.0]])

    result = evaluate(
        fixed,
        moving,
        transform,
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        fixed_landmarks=landmarks,
        moving_landmarks=landmarks + shift,
        inverse_transform=sitk.TranslationTransform(3, tuple(-shift)),
        label_names={1: "box", 2: "slab"},
    )

    labels = result["labels"]
    assert [row["name"] for row in labels["per_label"]] == ["box", "slab"]
    assert labels["mean_dice"] == pytest.approx(1.0)
    assert labels["mean_dice_before"] < 0.8
    assert all(row["hd95_mm"] == pytest.approx(0.0, abs=1e-5) for row in labels["per_label"])
    assert result["landmarks"]["tre_mm"]["max"] == pytest.approx(0.0, abs=1e-6)
    assert result["landmarks"]["tre_before_mm"]["mean"] == pytest.approx(np.linalg.norm(shift))
    assert result["jacobian"]["folding_percent"] == 0.0
    assert result["jacobian"]["min"] == pytest.approx(1.0, abs=1e-5)
    assert result["similarity"]["after"]["ncc"] == pytest.approx(1.0)
    assert result["similarity"]["before"]["ncc"] < 0.9
    assert result["inverse_consistency"]["max_mm"] == pytest.approx(0.0, abs=1e-6)
    json.dumps(result, allow_nan=False)  # JSON-ready: no numpy types, no nan


def test_evaluate_in_2d_with_named_landmarks_and_chosen_labels() -> None:
    fixed, moving, fixed_labels, moving_labels, shift = _pair(2)
    fixed_points = Landmarks(np.array([[1.0, 2.0], [3.0, 4.0]]), ["a", "b"])
    moving_points = Landmarks(np.array([[3.0, 4.0], [1.0, 2.0]]) + shift, ["b", "a"])

    result = evaluate(
        fixed,
        moving,
        sitk.TranslationTransform(2, tuple(shift)),
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        fixed_landmarks=fixed_points,
        moving_landmarks=moving_points,
        labels=[2, 9],
    )

    assert result["dimension"] == 2
    assert [row["label"] for row in result["labels"]["per_label"]] == [2, 9]
    assert result["labels"]["per_label"][1]["dice"] is None  # absent from both: undefined
    assert result["labels"]["per_label"][1]["hd95_mm"] is None
    assert result["labels"]["mean_dice"] == pytest.approx(1.0)
    assert [p["name"] for p in result["landmarks"]["per_point"]] == ["a", "b"]
    assert result["landmarks"]["tre_mm"]["max"] == pytest.approx(0.0, abs=1e-9)


def test_affine_transform_jacobian_is_its_determinant() -> None:
    fixed, moving, *_ = _pair(3)
    scaling = sitk.ScaleTransform(3, (1.1, 0.9, 1.2))
    result = evaluate(fixed, moving, scaling)
    assert result["jacobian"]["mean"] == pytest.approx(1.1 * 0.9 * 1.2, rel=1e-5)
    assert result["jacobian"]["sdlogj"] == pytest.approx(0.0, abs=1e-5)
    assert "labels" not in result
    assert "landmarks" not in result


def test_evaluate_rejects_unpaired_or_mismatched_inputs() -> None:
    fixed, moving, fixed_labels, _, _ = _pair(3)
    transform = sitk.TranslationTransform(3)
    with pytest.raises(InputError, match="both the fixed and the moving label maps"):
        evaluate(fixed, moving, transform, fixed_labels=fixed_labels)
    with pytest.raises(InputError, match="both the fixed and the moving landmarks"):
        evaluate(fixed, moving, transform, moving_landmarks=np.zeros((1, 3)))
    with pytest.raises(InputError, match="same dimension"):
        evaluate(fixed, moving, sitk.TranslationTransform(2))
    with pytest.raises(InputError, match="inverse transform is 2D"):
        evaluate(fixed, moving, transform, inverse_transform=sitk.TranslationTransform(2))
    with pytest.raises(InputError, match="not a vector image"):  # floats: not a picture
        evaluate(fixed, sitk.Compose(moving, moving, moving), transform)
    with pytest.raises(InputError, match="lacks"):
        evaluate(fixed, moving, transform, images={"fixed": fixed})


def test_similarity_is_measured_only_where_the_moving_image_was_sampled() -> None:
    fixed, moving, *_ = _pair(2)
    far = sitk.TranslationTransform(2, (1000.0, 0.0))
    result = evaluate(fixed, moving, far)
    assert result["similarity"]["after"] == {"ncc": None, "nmi": None, "overlap_fraction": 0.0}


def test_json_ready_converts_numpy_and_non_finite_values() -> None:
    converted = json_ready({1: np.float32(0.5), "b": [np.int64(3), math.inf], "c": (math.nan,)})
    assert converted == {"1": 0.5, "b": [3, None], "c": [None]}


FREESURFER_LUT = """\
#$Id: FreeSurferColorLUT.txt $

#No. Label Name:                            R   G   B   A
0   Unknown                                 0   0   0   0
2   Left-Cerebral-White-Matter              245 245 245 0
17  Left-Hippocampus                        220 216 20  0   # trailing comment
"""


@pytest.mark.parametrize(
    ("name", "text"), [("lut.txt", FREESURFER_LUT), ("c.ctbl", "1 a 1 2 3 255\n")]
)
def test_read_label_names(tmp_path: Path, name: str, text: str) -> None:
    path = tmp_path / name
    path.write_text(text)
    names = read_label_names(path)
    if name == "lut.txt":
        assert names == {0: "Unknown", 2: "Left-Cerebral-White-Matter", 17: "Left-Hippocampus"}
    else:
        assert names == {1: "a"}


@pytest.mark.parametrize(
    ("text", "message"), [("two words here\n", "line 1"), ("# only\n\n", "no entries")]
)
def test_read_label_names_rejects_malformed_tables(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "lut.txt"
    path.write_text(text)
    with pytest.raises(InputError, match=message):
        read_label_names(path)
    with pytest.raises(InputError, match="Cannot read"):
        read_label_names(tmp_path / "missing.txt")


def _decodes_as_png(path: Path) -> tuple[int, ...]:
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return sitk.ReadImage(str(path)).GetSize()


@pytest.mark.parametrize("dim", [2, 3])
def test_write_report_writes_all_files(tmp_path: Path, dim: int) -> None:
    fixed, moving, fixed_labels, moving_labels, shift = _pair(dim)
    transform = sitk.TranslationTransform(dim, tuple(shift))
    images = evaluation_images(fixed, moving, transform)
    result = evaluate(
        fixed,
        moving,
        transform,
        fixed_labels=fixed_labels,
        moving_labels=moving_labels,
        label_names={1: "Left|Thing"},
        images=images,
    )

    written = write_report(result, tmp_path / "report", images)

    assert set(written) == {
        "json", "markdown", "html", "checkerboard", "difference", "jacobian", "dice"
    }  # fmt: skip
    for key in ("checkerboard", "difference", "jacobian", "dice"):
        width, height = _decodes_as_png(written[key])
        assert min(width, height) > 100
    report = json.loads(written["json"].read_text())
    assert {"dimension", "similarity", "jacobian", "labels", "fixed_grid"} <= set(report)
    markdown = written["markdown"].read_text()
    assert "| Label | Name | Dice before | Dice after | HD95 (mm) |" in markdown
    assert r"| 1 | Left\|Thing |" in markdown
    assert "![dice](dice.png)" in markdown
    page = written["html"].read_text()
    assert page.count("data:image/png;base64,") == 4
    assert "<td>Left|Thing</td>" in page
    assert sorted(p.name for p in (tmp_path / "report").iterdir()) == sorted(
        p.name for p in written.values()
    )  # no staging folders left behind


def test_write_report_without_images_or_labels(tmp_path: Path) -> None:
    written = write_report({"dimension": 3, "jacobian": {"folding_percent": math.nan}}, tmp_path)
    assert set(written) == {"json", "markdown", "html"}
    assert json.loads(written["json"].read_text())["jacobian"]["folding_percent"] is None
    assert "n/a" in written["markdown"].read_text()
    (tmp_path / "a_file").write_text("")
    with pytest.raises(InputError, match="is a file"):
        write_report({}, tmp_path / "a_file")


@pytest.mark.parametrize("dim", [2, 3])
def test_qa_figure(tmp_path: Path, dim: int) -> None:
    fixed, moving, *_, shift = _pair(dim)
    images = evaluation_images(fixed, moving, sitk.TranslationTransform(dim, tuple(shift)))

    path = qa_figure(fixed, moving, images["warped"], images["jacobian"], tmp_path / "qa.png")

    width, height = _decodes_as_png(path)
    assert width > height if dim == 2 else height > 300  # one row in 2D, three in 3D
    _decodes_as_png(qa_figure(fixed, moving, images["warped"], None, tmp_path / "no_det.png"))
    with pytest.raises(InputError, match="warped image is not on the fixed image's grid"):
        qa_figure(fixed, moving, moving, None, tmp_path / "bad.png")
