"""Landmark readers: Slicer markups JSON, Slicer .fcsv and plain CSV, RAS vs LPS."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from DeepRegisterLib.errors import InputError
from DeepRegisterLib.evaluation.landmarks import Landmarks, pair_landmarks, read_landmarks

LPS = np.array([[10.0, -20.0, 30.5], [-1.5, 2.0, 0.0]])
RAS = LPS * [-1.0, -1.0, 1.0]


def _markups(system: str | None, points: np.ndarray, **extra: object) -> dict:
    markup: dict = {
        "type": "Fiducial",
        "coordinateUnits": "mm",
        "controlPoints": [
            {"id": str(n), "label": f"P-{n}", "position": list(p), "positionStatus": "defined"}
            for n, p in enumerate(points, start=1)
        ],
        **extra,
    }
    if system is not None:
        markup["coordinateSystem"] = system
    return {"@schema": "markups-schema-v1.0.3.json#", "markups": [markup]}


@pytest.mark.parametrize(("system", "stored"), [("RAS", RAS), ("LPS", LPS), (None, LPS)])
def test_markups_json_respects_its_coordinate_system(
    tmp_path: Path, system: str | None, stored: np.ndarray
) -> None:
    path = tmp_path / "points.mrk.json"
    path.write_text(json.dumps(_markups(system, stored)))

    landmarks = read_landmarks(path)

    np.testing.assert_allclose(landmarks.points, LPS)
    assert landmarks.names == ["P-1", "P-2"]


def _fcsv(header_system: str | None, points: np.ndarray) -> str:
    lines = ["# Markups fiducial file version = 4.11"]
    if header_system is not None:
        lines.append(f"# CoordinateSystem = {header_system}")
    lines.append("# columns = id,x,y,z,ow,ox,oy,oz,vis,sel,lock,label,desc,associatedNodeID")
    lines += [
        f'vtkMRMLMarkupsFiducialNode_{n},{x},{y},{z},0,0,0,1,1,1,0,"F-{n}, left",,'
        for n, (x, y, z) in enumerate(points)
    ]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("system", "stored"), [("RAS", RAS), ("LPS", LPS), ("0", RAS), ("1", LPS), (None, RAS)]
)
def test_fcsv_is_ras_unless_the_header_says_lps(
    tmp_path: Path, system: str | None, stored: np.ndarray
) -> None:
    path = tmp_path / "points.fcsv"
    path.write_text(_fcsv(system, stored))

    landmarks = read_landmarks(path)

    np.testing.assert_allclose(landmarks.points, LPS)
    assert landmarks.names == ["F-0, left", "F-1, left"]


def test_fcsv_without_columns_header_uses_slicer_default_columns(tmp_path: Path) -> None:
    path = tmp_path / "old.fcsv"
    path.write_text("# Markups fiducial file version = 4.4\n1,-10,20,30.5,0,0,0,1,1,1,0,A\n")
    landmarks = read_landmarks(path)
    np.testing.assert_allclose(landmarks.points, [[10.0, -20.0, 30.5]])
    assert landmarks.names == ["A"]


@pytest.mark.parametrize(
    ("text", "expected_names"),
    [
        ("x,y,z,label\n10,-20,30.5,a\n-1.5,2,0,b\n", ["a", "b"]),
        ("label,z,y,x\na,30.5,-20,10\nb,0,2,-1.5\n", ["a", "b"]),
        ("10,-20,30.5\n-1.5,2,0\n", ["1", "2"]),
        ("10,-20,30.5,a\n\n-1.5,2,0,b\n", ["a", "b"]),
    ],
)
def test_plain_csv_is_lps(tmp_path: Path, text: str, expected_names: list[str]) -> None:
    path = tmp_path / "points.csv"
    path.write_text(text)

    landmarks = read_landmarks(path)

    np.testing.assert_allclose(landmarks.points, LPS)
    assert landmarks.names == expected_names


def test_plain_csv_in_2d(tmp_path: Path) -> None:
    path = tmp_path / "points.csv"
    path.write_text("x,y\n1,2\n3,4\n")
    assert read_landmarks(path).points.shape == (2, 2)


def test_3d_points_on_one_plane_can_be_read_as_2d(tmp_path: Path) -> None:
    path = tmp_path / "plane.csv"
    path.write_text("1,2,5\n3,4,5\n")
    np.testing.assert_allclose(read_landmarks(path, dimension=2).points, [[1, 2], [3, 4]])
    path.write_text("1,2,5\n3,4,6\n")
    with pytest.raises(InputError, match="one z coordinate"):
        read_landmarks(path, dimension=2)


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("a.mrk.json", "{not json", "not valid JSON"),
        ("a.mrk.json", '{"points": []}', "no 'markups' list"),
        ("a.mrk.json", json.dumps(_markups("XYZ", LPS)), "unknown coordinate system"),
        ("a.mrk.json", json.dumps(_markups("LPS", LPS, coordinateUnits="um")), "only mm"),
        ("a.mrk.json", json.dumps(_markups("LPS", LPS[:0])), "no points"),
        ("a.fcsv", "# columns = id,x,y,label\n1,2,3,a\n", "lacks z"),
        ("a.fcsv", "# CoordinateSystem = LPS\n1,2,3\n", "too few fields"),
        ("a.csv", "x,y,z\n1,two,3\n", "non-numeric"),
        ("a.csv", "x,y,z\n1,2,nan\n", "non-finite"),
        ("a.csv", "1,2,3,4,5\n", "found 5 columns"),
        ("a.csv", "x,y,z\n1,2\n", "too few columns"),
        ("a.csv", "", "no points"),
        ("a.xyz", "1,2,3\n", "Unknown landmark file type"),
    ],
)
def test_malformed_files_raise_input_error(
    tmp_path: Path, name: str, content: str, message: str
) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(InputError, match=message):
        read_landmarks(path)


def test_undefined_control_point_is_rejected(tmp_path: Path) -> None:
    document = _markups("LPS", LPS)
    document["markups"][0]["controlPoints"][1]["positionStatus"] = "undefined"
    path = tmp_path / "a.mrk.json"
    path.write_text(json.dumps(document))
    with pytest.raises(InputError, match="'P-2' has no position"):
        read_landmarks(path)


def test_missing_file_is_an_input_error(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="does not exist"):
        read_landmarks(tmp_path / "missing.fcsv")


def test_pairing_by_name_then_by_order() -> None:
    fixed = Landmarks(np.array([[0.0, 0], [1, 1], [2, 2]]), ["a", "b", "c"])
    shuffled = Landmarks(np.array([[12.0, 12], [10, 10], [11, 11]]), ["c", "a", "b"])
    f, m, names = pair_landmarks(fixed, shuffled)
    np.testing.assert_array_equal(m - f, 10.0)
    assert names == ["a", "b", "c"]

    unnamed = Landmarks(np.array([[5.0, 5], [6, 6], [7, 7]]), ["1", "2", "3"])
    _, m, _ = pair_landmarks(fixed, unnamed)
    np.testing.assert_array_equal(m, unnamed.points)

    with pytest.raises(InputError, match="3 fixed and 2 moving"):
        pair_landmarks(fixed, Landmarks(np.zeros((2, 2)), ["a", "b"]))
    with pytest.raises(InputError, match="2D and the moving ones 3D"):
        pair_landmarks(fixed, Landmarks(np.zeros((3, 3)), ["a", "b", "c"]))
