"""Landmark files → points in LPS millimetres, for target registration error.

Slicer writes markups in RAS or LPS depending on version and settings, and says which in the
file; reading that flag (instead of assuming) is what keeps a TRE from being off by a mirror
image. Supported: Slicer markups JSON (``.mrk.json``), Slicer fiducial CSV (``.fcsv``) and plain
CSV (``x,y[,z][,label]`` in LPS, optional header row).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from ..errors import InputError
from ..imaging.geometry import lps_to_ras_matrix

_FCSV_DEFAULT_COLUMNS = ("id", "x", "y", "z", "ow", "ox", "oy", "oz", "vis", "sel", "lock", "label")
# Slicer 4.x wrote the coordinate system as a number: vtkMRMLStorageNode's RAS = 0, LPS = 1.
_COORDINATE_SYSTEMS = {"RAS": "RAS", "LPS": "LPS", "0": "RAS", "1": "LPS"}


class Landmarks(NamedTuple):
    """Points (N, dim) in LPS mm and one name per point (used to pair fixed and moving)."""

    points: np.ndarray
    names: list[str]


def read_landmarks(path: str | Path, dimension: int | None = None) -> Landmarks:
    """Read a landmark file, whatever its format, as LPS points.

    ``dimension=2`` accepts Slicer's 3D points for a 2D image when they all lie in one
    z-plane (how Slicer stores points on a single-slice volume) and drops z.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"Landmark file {path} does not exist or is not a file.")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as error:
        raise InputError(f"Cannot read landmark file {path}: {error}.") from error
    name = path.name.lower()
    if name.endswith(".json"):
        landmarks = _parse_markups_json(text, path)
    elif name.endswith(".fcsv") or text.lstrip().startswith("# Markups fiducial file"):
        landmarks = _parse_fcsv(text, path)
    elif name.endswith((".csv", ".txt")):
        landmarks = _parse_plain_csv(text, path)
    else:
        raise InputError(
            f"Unknown landmark file type {path.name}; use a Slicer markups file (.mrk.json), "
            "a Slicer fiducial file (.fcsv) or a CSV file (.csv) with x,y,z columns in LPS."
        )
    if len(landmarks.names) == 0:
        raise InputError(f"Landmark file {path} contains no points.")
    return _to_dimension(landmarks, dimension, path)


def _to_dimension(landmarks: Landmarks, dimension: int | None, path: Path) -> Landmarks:
    points = landmarks.points
    if dimension is None or points.shape[1] == dimension:
        return landmarks
    if dimension == 2 and points.shape[1] == 3 and np.ptp(points[:, 2]) < 1e-6:
        return Landmarks(points[:, :2].copy(), landmarks.names)
    raise InputError(
        f"Landmark file {path} holds {points.shape[1]}D points, but {dimension}D points are "
        "needed (3D points for a 2D image must all share one z coordinate)."
    )


def _coordinate(value: Any, path: Path, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{path}: {where} has a non-numeric coordinate {value!r}.") from None
    if not math.isfinite(number):
        raise InputError(f"{path}: {where} has a non-finite coordinate {value!r}.")
    return number


def _coordinate_system(value: str, path: Path) -> str:
    system = _COORDINATE_SYSTEMS.get(str(value).strip().upper())
    if system is None:
        raise InputError(
            f"{path}: unknown coordinate system {value!r}; Slicer files say RAS or LPS."
        )
    return system


def _to_lps(points: list[list[float]], system: str) -> np.ndarray:
    array = np.asarray(points, dtype=np.float64).reshape(len(points), 3)
    return array @ lps_to_ras_matrix(3) if system == "RAS" else array


def _parse_markups_json(text: str, path: Path) -> Landmarks:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as error:
        raise InputError(f"{path} is not valid JSON ({error}); is it a .mrk.json file?") from None
    markups = document.get("markups") if isinstance(document, dict) else None
    if not isinstance(markups, list):
        raise InputError(
            f"{path} has no 'markups' list; save the points from Slicer as a markups .mrk.json."
        )
    all_points, names = [], []
    for markup in markups:
        if not isinstance(markup, dict):
            raise InputError(f"{path}: every entry of 'markups' must be an object.")
        units = markup.get("coordinateUnits", "mm")
        if units != "mm":
            raise InputError(f"{path}: coordinates are in {units!r}; only mm is supported.")
        system = _coordinate_system(markup.get("coordinateSystem", "LPS"), path)
        points = []
        for number, point in enumerate(markup.get("controlPoints") or [], start=1):
            label = str(point.get("label") or point.get("id") or number)
            where = f"control point {label!r}"
            if point.get("positionStatus") == "undefined":
                raise InputError(
                    f"{path}: {where} has no position yet; place it or delete it in Slicer."
                )
            position = point.get("position")
            if not isinstance(position, list) or len(position) != 3:
                raise InputError(f"{path}: {where} needs a 'position' of three numbers.")
            points.append([_coordinate(v, path, where) for v in position])
            names.append(label)
        if points:
            all_points.append(_to_lps(points, system))
    points = np.concatenate(all_points) if all_points else np.empty((0, 3))
    return Landmarks(points, names)


def _parse_fcsv(text: str, path: Path) -> Landmarks:
    system, columns = "RAS", list(_FCSV_DEFAULT_COLUMNS)
    rows = []
    for line in text.splitlines():
        stripped = line.strip()
        if not stripped.startswith("#"):
            if stripped:
                rows.append(line)
            continue
        key, _, value = stripped.lstrip("#").partition("=")
        key = key.strip().lower()
        if key == "coordinatesystem":
            system = _coordinate_system(value, path)
        elif key == "columns":
            columns = [c.strip().lower() for c in value.split(",")]
    missing = {"x", "y", "z"} - set(columns)
    if missing:
        raise InputError(f"{path}: the '# columns =' header lacks {', '.join(sorted(missing))}.")
    needed = 1 + max(columns.index(c) for c in "xyz")
    points, names = [], []
    for number, fields in enumerate(csv.reader(rows), start=1):
        if len(fields) < needed:
            raise InputError(f"{path}: point {number} has too few fields: {','.join(fields)!r}.")
        record = dict(zip(columns, fields, strict=False))
        name = record.get("label") or record.get("id") or str(number)
        points.append([_coordinate(record[c], path, f"point {name!r}") for c in "xyz"])
        names.append(name)
    return Landmarks(_to_lps(points, system) if points else np.empty((0, 3)), names)


def _parse_plain_csv(text: str, path: Path) -> Landmarks:
    rows = [row for row in csv.reader(text.splitlines()) if any(f.strip() for f in row)]
    if not rows:
        return Landmarks(np.empty((0, 3)), [])
    header = [f.strip().lower() for f in rows[0]]
    if "x" in header and "y" in header:
        axes = [header.index(a) for a in ("x", "y", "z") if a in header]
        name_column = next((header.index(c) for c in ("label", "name", "id") if c in header), None)
        rows = rows[1:]
    else:
        width = len(rows[0])
        if width not in (2, 3, 4):
            raise InputError(
                f"{path}: expected columns x,y[,z][,label] (LPS mm), found {width} columns; "
                "add a header row naming the x, y, z and label columns."
            )
        axes = list(range(min(width, 3)))
        name_column = 3 if width == 4 else None
    needed = 1 + max(*axes, name_column or 0)
    points, names = [], []
    for number, row in enumerate(rows, start=1):
        if len(row) < needed:
            raise InputError(f"{path}: row {number} has too few columns: {','.join(row)!r}.")
        name = row[name_column].strip() if name_column is not None else str(number)
        points.append([_coordinate(row[a], path, f"row {number}") for a in axes])
        names.append(name)
    return Landmarks(np.asarray(points, dtype=np.float64).reshape(len(rows), len(axes)), names)


def pair_landmarks(fixed: Landmarks, moving: Landmarks) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Fixed and moving points in matching order, for TRE.

    Points are paired by name when both files name the same unique set of points (files
    exported from different sessions often list them in different orders), else by position
    in the file, which needs equal counts.
    """
    if fixed.points.shape[1] != moving.points.shape[1]:
        raise InputError(
            f"The fixed landmarks are {fixed.points.shape[1]}D and the moving ones "
            f"{moving.points.shape[1]}D."
        )
    if _unique(fixed.names) and set(fixed.names) == set(moving.names):
        order = [moving.names.index(name) for name in fixed.names]
        return fixed.points, moving.points[order], list(fixed.names)
    if len(fixed.names) != len(moving.names):
        raise InputError(
            f"{len(fixed.names)} fixed and {len(moving.names)} moving landmarks: give the same "
            "points in both files (same names, or the same order)."
        )
    return fixed.points, moving.points, list(fixed.names)


def _unique(names: Sequence[str]) -> bool:
    return len(set(names)) == len(names)
