"""Figures and readable reports of a registration: PNG, Markdown and self-contained HTML
(the text is laid out in :mod:`.report_text`).

Matplotlib is driven through its Agg canvas directly (no pyplot), so drawing never touches a GUI
backend or global figure state — safe inside Slicer, on servers and in parallel tests. Every
file is written atomically: a reader never sees half a report.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..errors import InputError
from ..imaging.colour import luminance
from ..imaging.fileio import atomic_write_path
from ..imaging.metrics import same_grid
from . import report_text
from .evaluate import json_ready

_PLANES = ("sagittal", "coronal", "axial")  # normal along L, P, S
_DPI = 100


@dataclass(frozen=True)
class _Slice:
    """One displayed 2D section: rows and columns in array order, plus how to show it."""

    plane: str
    array: np.ndarray
    aspect: float
    origin: str


def _slices(image: sitk.Image) -> list[_Slice]:
    """The middle slice across each axis (3D) or the image itself (2D).

    Each slice is named after the anatomical plane its normal is closest to, read from the
    image direction, so oblique acquisitions are still labelled sensibly.
    """
    array = sitk.GetArrayViewFromImage(image)
    spacing = image.GetSpacing()
    if array.ndim == 2:
        return [
            _Slice("image", np.array(array, dtype=np.float32), spacing[1] / spacing[0], "upper")
        ]
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    sections = []
    for index_axis in (2, 1, 0):  # ITK axis normal to the slice: K, J, I
        array_axis = 2 - index_axis
        middle = array.shape[array_axis] // 2
        section = np.array(np.take(array, middle, axis=array_axis), dtype=np.float32)
        row_axis, column_axis = [a for a in (2, 1, 0) if a != index_axis]
        plane = _PLANES[int(np.argmax(np.abs(direction[:, index_axis])))]
        sections.append(
            _Slice(
                f"{plane} ({'IJK'[index_axis]} = {middle})",
                section,
                spacing[row_axis] / spacing[column_axis],
                "upper" if index_axis == 2 else "lower",
            )
        )
    return sections


def _window(image: sitk.Image) -> tuple[float, float]:
    """Robust display range (1st-99th percentile), from a subsample of big volumes."""
    values = sitk.GetArrayViewFromImage(image).ravel()
    values = values[:: max(1, values.size // 1_000_000)]
    values = values[np.isfinite(values)]
    if values.size == 0:
        return 0.0, 1.0
    low, high = np.percentile(values, [1, 99])
    return float(low), (float(high) if high > low else float(low) + 1.0)


def _normalised_slices(image: sitk.Image) -> list[np.ndarray]:
    low, high = _window(image)
    return [np.clip((s.array - low) / (high - low), 0.0, 1.0) for s in _slices(image)]


def _checkerboard(a: np.ndarray, b: np.ndarray, tiles: int = 8) -> np.ndarray:
    size = max(1, min(a.shape) // tiles)
    rows, columns = np.indices(a.shape)
    return np.where((rows // size + columns // size) % 2 == 0, a, b)


# Blue = compression, red = expansion, black = folding (det J ≤ 0, below vmin).
_JACOBIAN_STYLE = {
    "cmap": colormaps["RdBu_r"].with_extremes(under="black"),
    "vmin": 1e-6,
    "vmax": 2.0,
}


@dataclass(frozen=True)
class _Column:
    """One kind of panel: a title, one array per slice, and the imshow style."""

    title: str
    sections: list[np.ndarray]
    style: Mapping[str, Any]
    colorbar: bool = False


def _grey(title: str, image: sitk.Image) -> _Column:
    return _Column(title, _normalised_slices(image), {"cmap": "gray", "vmin": 0.0, "vmax": 1.0})


def _checkerboard_column(fixed: sitk.Image, warped: sitk.Image) -> _Column:
    pairs = zip(_normalised_slices(fixed), _normalised_slices(warped), strict=True)
    sections = [_checkerboard(a, b) for a, b in pairs]
    return _Column("checkerboard", sections, {"cmap": "gray", "vmin": 0.0, "vmax": 1.0})


def _difference_column(fixed: sitk.Image, warped: sitk.Image) -> _Column:
    pairs = zip(_normalised_slices(fixed), _normalised_slices(warped), strict=True)
    sections = [a - b for a, b in pairs]
    limit = max(0.05, max(float(np.percentile(np.abs(s), 99)) for s in sections))
    return _Column(
        "difference (fixed − warped)", sections, {"cmap": "RdBu_r", "vmin": -limit, "vmax": limit}
    )


def _jacobian_column(jacobian: sitk.Image) -> _Column:
    sections = [s.array for s in _slices(jacobian)]
    return _Column("det J (black: folded)", sections, _JACOBIAN_STYLE, colorbar=True)


def _draw(columns: Sequence[_Column], reference: sitk.Image, path: Path, by_row: bool) -> Path:
    """One panel per (slice, column): slices are rows when ``by_row``, else laid out across."""
    layout = _slices(reference)
    n_slices, n_columns = len(layout), len(columns)
    rows, cols = (n_slices, n_columns) if by_row else (n_columns, n_slices)
    figure = Figure(figsize=(2.6 * cols + 0.6, 2.6 * rows + 0.4), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    grid = figure.subplots(rows, cols, squeeze=False)
    for c, column in enumerate(columns):
        for s, (section, where) in enumerate(zip(column.sections, layout, strict=True)):
            axes: Axes = grid[s, c] if by_row else grid[c, s]
            shown = axes.imshow(section, aspect=where.aspect, origin=where.origin, **column.style)
            axes.set_xticks([])
            axes.set_yticks([])
            if by_row:
                axes.set_title(column.title if s == 0 else "", fontsize=9)
                if c == 0:
                    axes.set_ylabel(where.plane, fontsize=9)
            else:
                axes.set_title(f"{column.title}\n{where.plane}", fontsize=9)
            if column.colorbar:
                figure.colorbar(shown, ax=axes, extend="min", shrink=0.8)
    return _save(figure, path)


def _save(figure: Figure, path: Path) -> Path:
    with atomic_write_path(path) as staged:
        figure.savefig(staged, format="png")
    return path


def _on_fixed_grid(image: sitk.Image, fixed: sitk.Image, what: str) -> None:
    if not same_grid(image, fixed):
        raise InputError(
            f"The {what} image is not on the fixed image's grid; resample it onto the fixed "
            "grid first (it should come from the registration on that grid)."
        )


def qa_figure(
    fixed: sitk.Image,
    moving: sitk.Image,
    warped: sitk.Image,
    jacobian: sitk.Image | None,
    path: str | Path,
) -> Path:
    """One PNG to judge a registration at a glance, with one row per axis (middle slices) in 3D.

    Columns: fixed, moving, warped, checkerboard of fixed and warped, their difference, and
    det J (left out when ``jacobian`` is None). ``moving`` may be on its own grid: it is
    resampled onto the fixed grid in physical space (identity), which shows the misalignment the
    registration had to fix. Colour pictures are shown by their luminance, what was registered.
    """
    fixed, moving, warped = (luminance(image) for image in (fixed, moving, warped))
    if not same_grid(moving, fixed):
        identity = sitk.Transform(fixed.GetDimension(), sitk.sitkIdentity)
        moving = sitk.Resample(
            sitk.Cast(moving, sitk.sitkFloat32), fixed, identity, sitk.sitkLinear, 0.0
        )
    _on_fixed_grid(warped, fixed, "warped")
    columns = [
        _grey("fixed", fixed),
        _grey("moving", moving),
        _grey("warped", warped),
        _checkerboard_column(fixed, warped),
        _difference_column(fixed, warped),
    ]
    if jacobian is not None:
        _on_fixed_grid(jacobian, fixed, "det J")
        columns.append(_jacobian_column(jacobian))
    return _draw(columns, fixed, Path(path), by_row=True)


def _dice_figure(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
    """Horizontal bars, one per label, before and after registration."""
    names = [str(row["name"]) for row in rows]
    positions = np.arange(len(rows))

    def values(key: str) -> np.ndarray:
        return np.array([np.nan if row[key] is None else row[key] for row in rows], dtype=float)

    figure = Figure(figsize=(7.0, 1.2 + 0.28 * len(rows)), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(figure)
    axes = figure.subplots()
    axes.barh(positions + 0.2, values("dice_before"), height=0.4, color="0.7", label="before")
    axes.barh(positions - 0.2, values("dice"), height=0.4, color="tab:blue", label="after")
    axes.set_yticks(positions, names, fontsize=8)
    axes.invert_yaxis()
    axes.set_xlim(0.0, 1.0)
    axes.set_xlabel("Dice")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    return _save(figure, path)


def _write_text(path: Path, text: str) -> Path:
    with atomic_write_path(path) as staged:
        staged.write_text(text, encoding="utf-8")
    return path


def write_report(
    evaluation: Mapping[str, Any],
    out_dir: str | Path,
    images: Mapping[str, sitk.Image] | None = None,
) -> dict[str, Path]:
    """Write ``report.json``, ``report.md``, a self-contained ``report.html`` and PNG figures.

    ``evaluation`` is :func:`~.evaluate.evaluate`'s result; ``images`` (as from
    :func:`~.evaluate.evaluation_images`: fixed, warped, jacobian on the fixed
    grid) adds checkerboard, difference and det J figures. Returns the written paths by kind.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"The report folder {out} is a file; give a folder path.")
    out.mkdir(parents=True, exist_ok=True)
    evaluation = json_ready(evaluation)
    figures: dict[str, Path] = {}
    if images is not None:
        missing = {"fixed", "warped", "jacobian"} - set(images)
        if missing:
            raise InputError(f"Report images lack {', '.join(sorted(missing))}.")
        fixed, warped = images["fixed"], images["warped"]
        _on_fixed_grid(warped, fixed, "warped")
        _on_fixed_grid(images["jacobian"], fixed, "det J")
        drawings: dict[str, Callable[[], list[_Column]]] = {
            "checkerboard": lambda: [_checkerboard_column(fixed, warped)],
            "difference": lambda: [_difference_column(fixed, warped)],
            "jacobian": lambda: [_jacobian_column(images["jacobian"])],
        }
        for name, columns in drawings.items():
            figures[name] = _draw(columns(), fixed, out / f"{name}.png", by_row=False)
    labels = evaluation.get("labels")
    if labels and labels.get("per_label"):
        figures["dice"] = _dice_figure(labels["per_label"], out / "dice.png")
    blocks = report_text.sections(evaluation, figures)
    written = {
        "json": _write_text(
            out / "report.json", json.dumps(evaluation, indent=2, allow_nan=False) + "\n"
        ),
        "markdown": _write_text(out / "report.md", report_text.markdown(blocks)),
        "html": _write_text(out / "report.html", report_text.html_page(blocks)),
    }
    return {**written, **figures}
