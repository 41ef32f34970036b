"""Figures and readable reports of a registration: PNG, Markdown and self-contained HTML.

Matplotlib is driven through its Agg canvas directly (no pyplot), so drawing never touches a GUI
backend or global figure state — safe inside Slicer, on servers and in parallel tests. Every
file is written atomically: a reader never sees half a report.
"""

from __future__ import annotations

import base64
import html
import json
import math
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
from ..imaging.fileio import atomic_write_path
from ..imaging.metrics import same_grid
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
    registration had to fix.
    """
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


# --- Markdown / HTML -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]


_Block = str | _Table | Path


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _mean_std(stats: Mapping[str, Any] | None) -> str:
    if not stats or stats.get("mean") is None:
        return "n/a"
    return f"{stats['mean']:.2f} ± {stats['std']:.2f} (max {stats['max']:.2f})"


def _sections(evaluation: Mapping[str, Any], figures: Mapping[str, Path]) -> list[_Block]:
    """The report's content once, rendered to Markdown and to HTML."""
    grid = evaluation.get("fixed_grid", {})
    size = "×".join(str(s) for s in grid.get("size", ()))
    spacing = "×".join(f"{s:g}" for s in grid.get("spacing", ()))
    blocks: list[_Block] = [
        f"Transform `{evaluation.get('transform', '?')}`, {evaluation.get('dimension', '?')}D; "
        f'measured on the fixed grid ({size} voxels of {spacing} mm). "Before" is the moving '
        "image as it lies in physical space (identity transform).",
    ]
    summary = []
    similarity = evaluation.get("similarity", {})
    before, after = similarity.get("before", {}), similarity.get("after", {})
    summary.append(["NCC", _fmt(before.get("ncc")), _fmt(after.get("ncc"))])
    summary.append(["Normalised MI", _fmt(before.get("nmi")), _fmt(after.get("nmi"))])
    labels = evaluation.get("labels")
    if labels:
        summary.append(
            ["Mean Dice", _fmt(labels.get("mean_dice_before")), _fmt(labels.get("mean_dice"))]
        )
        summary.append(["Mean HD95 (mm)", "", _fmt(labels.get("mean_hd95_mm"), 2)])
    landmarks = evaluation.get("landmarks")
    if landmarks:
        summary.append(
            [
                "TRE (mm), mean ± std",
                _mean_std(landmarks.get("tre_before_mm")),
                _mean_std(landmarks.get("tre_mm")),
            ]
        )
    blocks += ["## Summary", _Table(["Measure", "Before", "After"], summary)]

    jacobian = evaluation.get("jacobian", {})
    blocks += [
        "## Transform regularity",
        _Table(
            ["det J min", "det J max", "det J 1st–99th pct", "Folded voxels (%)", "SDlogJ"],
            [
                [
                    _fmt(jacobian.get("min")),
                    _fmt(jacobian.get("max")),
                    f"{_fmt(jacobian.get('p1'))} – {_fmt(jacobian.get('p99'))}",
                    _fmt(jacobian.get("folding_percent"), 4),
                    _fmt(jacobian.get("sdlogj"), 4),
                ]
            ],
        ),
    ]
    inverse = evaluation.get("inverse_consistency")
    if inverse:
        blocks += [
            "## Inverse consistency",
            "Distance between x and T⁻¹(T(x)) over the fixed grid.",
            _Table(
                ["Mean (mm)", "Max (mm)", "Left out: T(x) outside the inverse field (%)"],
                [
                    [
                        _fmt(inverse.get("mean_mm"), 3),
                        _fmt(inverse.get("max_mm"), 3),
                        _fmt(100.0 * (inverse.get("fraction_outside") or 0.0), 2),
                    ]
                ],
            ),
        ]
    if labels:
        blocks += [
            "## Dice per label",
            _Table(
                ["Label", "Name", "Dice before", "Dice after", "HD95 (mm)"],
                [
                    [
                        str(row["label"]),
                        str(row["name"]),
                        _fmt(row.get("dice_before")),
                        _fmt(row.get("dice")),
                        _fmt(row.get("hd95_mm"), 2),
                    ]
                    for row in labels.get("per_label", [])
                ],
            ),
        ]
    if landmarks:
        blocks += [
            "## Landmarks",
            _Table(
                ["Name", "TRE before (mm)", "TRE after (mm)"],
                [
                    [str(p["name"]), _fmt(p.get("tre_before_mm"), 2), _fmt(p.get("tre_mm"), 2)]
                    for p in landmarks.get("per_point", [])
                ],
            ),
        ]
    if figures:
        blocks += ["## Figures", *figures.values()]
    return blocks


def _markdown(blocks: Sequence[_Block]) -> str:
    out = ["# Registration evaluation"]
    for block in blocks:
        if isinstance(block, _Table):
            lines = [
                "| " + " | ".join(block.headers) + " |",
                "|" + "---|" * len(block.headers),
                *(
                    "| " + " | ".join(c.replace("|", r"\|") for c in row) + " |"
                    for row in block.rows
                ),
            ]
            out.append("\n".join(lines))
        elif isinstance(block, Path):
            out.append(f"![{block.stem}]({block.name})")
        else:
            out.append(block)
    return "\n\n".join(out) + "\n"


_CSS = (
    "body{font-family:sans-serif;max-width:70em;margin:2em auto;color:#222}"
    "table{border-collapse:collapse;margin:1em 0}"
    "th,td{border:1px solid #bbb;padding:.25em .6em;text-align:right}"
    "th{background:#eee}td:first-child,th:first-child{text-align:left}img{max-width:100%}"
)


def _inline_code(text: str) -> str:
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


def _html(blocks: Sequence[_Block]) -> str:
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Registration evaluation</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>Registration evaluation</h1>",
    ]
    for block in blocks:
        if isinstance(block, _Table):
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block.headers)
            body = "".join(
                "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
                for row in block.rows
            )
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(block, Path):
            data = base64.b64encode(block.read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{html.escape(block.stem)}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(block.stem)}</figcaption></figure>"
            )
        elif block.startswith("## "):
            out.append(f"<h2>{html.escape(block[3:])}</h2>")
        else:
            out.append(f"<p>{_inline_code(block)}</p>")
    out.append("</body></html>")
    return "\n".join(out) + "\n"


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
    blocks = _sections(evaluation, figures)
    written = {
        "json": _write_text(
            out / "report.json", json.dumps(evaluation, indent=2, allow_nan=False) + "\n"
        ),
        "markdown": _write_text(out / "report.md", _markdown(blocks)),
        "html": _write_text(out / "report.html", _html(blocks)),
    }
    return {**written, **figures}
