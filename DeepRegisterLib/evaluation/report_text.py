"""An evaluation's content as blocks (paragraphs, headings, tables, figures), rendered once to
Markdown and once to self-contained HTML, so the two never say different things."""

from __future__ import annotations

import base64
import html
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class Table:
    headers: Sequence[str]
    rows: Sequence[Sequence[str]]


Block = str | Table | Path


def sections(evaluation: Mapping[str, Any], figures: Mapping[str, Path]) -> list[Block]:
    """The report's content once, rendered by :func:`markdown` and :func:`html_page`."""
    grid = evaluation.get("fixed_grid", {})
    size = "×".join(str(s) for s in grid.get("size", ()))
    spacing = "×".join(f"{s:g}" for s in grid.get("spacing", ()))
    blocks: list[Block] = [
        f"Transform `{evaluation.get('transform', '?')}`, {evaluation.get('dimension', '?')}D; "
        f'measured on the fixed grid ({size} voxels of {spacing} mm). "Before" is the moving '
        "image as it lies in physical space (identity transform).",
        "## Summary",
        Table(["Measure", "Before", "After"], _summary_rows(evaluation)),
        *_regularity(evaluation.get("jacobian", {})),
        *_inverse_consistency(evaluation.get("inverse_consistency")),
        *_dice_per_label(evaluation.get("labels")),
        *_landmarks(evaluation.get("landmarks")),
    ]
    if figures:
        blocks += ["## Figures", *figures.values()]
    return blocks


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


def _summary_rows(evaluation: Mapping[str, Any]) -> list[list[str]]:
    similarity = evaluation.get("similarity", {})
    before, after = similarity.get("before", {}), similarity.get("after", {})
    rows = [
        ["NCC", _fmt(before.get("ncc")), _fmt(after.get("ncc"))],
        ["Normalised MI", _fmt(before.get("nmi")), _fmt(after.get("nmi"))],
    ]
    labels = evaluation.get("labels")
    if labels:
        rows.append(
            ["Mean Dice", _fmt(labels.get("mean_dice_before")), _fmt(labels.get("mean_dice"))]
        )
        rows.append(["Mean HD95 (mm)", "", _fmt(labels.get("mean_hd95_mm"), 2)])
    landmarks = evaluation.get("landmarks")
    if landmarks:
        rows.append(
            [
                "TRE (mm), mean ± std",
                _mean_std(landmarks.get("tre_before_mm")),
                _mean_std(landmarks.get("tre_mm")),
            ]
        )
    return rows


def _regularity(jacobian: Mapping[str, Any]) -> list[Block]:
    return [
        "## Transform regularity",
        Table(
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


def _inverse_consistency(inverse: Mapping[str, Any] | None) -> list[Block]:
    if not inverse:
        return []
    return [
        "## Inverse consistency",
        "Distance between x and T⁻¹(T(x)) over the fixed grid.",
        Table(
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


def _dice_per_label(labels: Mapping[str, Any] | None) -> list[Block]:
    if not labels:
        return []
    return [
        "## Dice per label",
        Table(
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


def _landmarks(landmarks: Mapping[str, Any] | None) -> list[Block]:
    if not landmarks:
        return []
    return [
        "## Landmarks",
        Table(
            ["Name", "TRE before (mm)", "TRE after (mm)"],
            [
                [str(p["name"]), _fmt(p.get("tre_before_mm"), 2), _fmt(p.get("tre_mm"), 2)]
                for p in landmarks.get("per_point", [])
            ],
        ),
    ]


def markdown(blocks: Sequence[Block]) -> str:
    out = ["# Registration evaluation"]
    for block in blocks:
        if isinstance(block, Table):
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


def html_page(blocks: Sequence[Block]) -> str:
    """One self-contained page: the figures are embedded as data URIs."""
    out = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8"><title>Registration evaluation</title>',
        f"<style>{_CSS}</style></head><body>",
        "<h1>Registration evaluation</h1>",
    ]
    for block in blocks:
        if isinstance(block, Table):
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
