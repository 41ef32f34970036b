"""A batch's summary: one row per job (from its report), as CSV, a Markdown page and a figure.

Rows are taken from the job reports and nothing else, so the summary always agrees with them;
the page lists the worst jobs first (failed, then lowest Dice or similarity), which are the
ones a user must look at.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: The summary's columns, in order; the numbers and notes come from each job's ``report.json``
#: (the notes say what a study's user should know of a job: a moving image that covers part of
#: the fixed one, a model left out, a coarser grid for memory).
COLUMNS = (
    "id", "status", "mean_dice", "folding_percent", "sdlogj", "ncc_before", "ncc_affine",
    "ncc_after", "time_s", "runtime_s", "peak_rss_mib", "notes", "error",
)  # fmt: skip
_FROM_REPORT = ("mean_dice", "folding_percent", "sdlogj", "ncc_before", "ncc_affine", "ncc_after")


def summary_row(
    job_id: str,
    report: Mapping[str, Any] | None,
    status: str,
    error: str | None = None,
    seconds: float | None = None,
) -> dict[str, Any]:
    """A job's row: its report's figures (``None`` where it has none), status and error."""
    report = report or {}
    batch = report.get("batch", {})
    peak = batch.get("worker_peak_rss_bytes")
    return {
        "id": job_id,
        "status": status,
        **{key: report.get(key) for key in _FROM_REPORT},
        "time_s": batch.get("job_s", seconds),
        "runtime_s": report.get("runtime_s"),
        "peak_rss_mib": None if peak is None else peak / 2**20,
        "notes": "; ".join(report.get("notes", [])) or None,
        "error": error,
    }


def worst_first(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Failed jobs, then by mean Dice (if any job has one) or similarity after, lowest first."""
    key = "mean_dice" if any(r["mean_dice"] is not None for r in rows) else "ncc_after"

    def rank(row: Mapping[str, Any]) -> tuple[int, float]:
        value = row[key]
        return (row["status"] != "failed", math.inf if value is None else value)

    return sorted(rows, key=rank)


def _csv_text(rows: Sequence[Mapping[str, Any]]) -> str:
    stream = io.StringIO()
    writer = csv.DictWriter(stream, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: "" if row[k] is None else row[k] for k in COLUMNS})
    return stream.getvalue()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value).replace("|", "\\|").replace("\n", " ")


def _mean_sd(values: Sequence[float]) -> str:
    if not values:
        return "–"
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return f"{mean:.3f} ± {sd:.3f} (min {min(values):.3f}, max {max(values):.3f})"


def _markdown(
    rows: Sequence[Mapping[str, Any]], settings: Mapping[str, Any], figure: Path | None
) -> str:
    counts = {s: sum(r["status"] == s for r in rows) for s in ("ok", "skipped", "failed")}
    done = [r for r in rows if r["status"] != "failed"]
    lines = [
        "# DeepRegister batch summary",
        "",
        f"{len(rows)} job(s): {counts['ok']} registered now, {counts['skipped']} already done "
        f"(skipped), {counts['failed']} failed.",
        "",
        "| | over the jobs that finished |",
        "|---|---|",
    ]
    for key, label in (
        ("mean_dice", "mean Dice"), ("folding_percent", "% voxels with det J ≤ 0"),
        ("sdlogj", "SDlogJ"), ("ncc_before", "NCC before"), ("ncc_after", "NCC after"),
        ("time_s", "time per job (s)"),
    ):  # fmt: skip
        lines.append(f"| {label} | {_mean_sd([r[key] for r in done if r[key] is not None])} |")
    lines += ["", f"Settings: `{json.dumps(dict(settings))}`", ""]
    if figure is not None:
        lines += [f"![Jobs, worst first]({figure.name})", ""]
    lines += [
        "## Jobs, worst first",
        "",
        "| " + " | ".join(COLUMNS) + " |",
        "|" + "---|" * len(COLUMNS),
    ]
    for row in worst_first(rows):
        lines.append("| " + " | ".join(_fmt(row[k]) for k in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _figure(rows: Sequence[Mapping[str, Any]], path: Path) -> Path | None:
    """Distribution of the jobs' mean Dice (or NCC after) and the worst 20 jobs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from ..imaging.fileio import atomic_write_path

    key = "mean_dice" if any(r["mean_dice"] is not None for r in rows) else "ncc_after"
    scored = [r for r in worst_first(rows) if r[key] is not None]
    if not scored:
        return None
    label = "mean Dice" if key == "mean_dice" else "NCC after registration"
    figure = Figure(figsize=(10, 4), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    bins = min(20, max(5, len(scored)))
    span = (0.0, 1.0) if key == "mean_dice" else None
    left.hist([r[key] for r in scored], bins=bins, range=span, color="tab:blue")
    left.set(xlabel=label, ylabel="jobs", title=f"{label} over {len(scored)} jobs")
    worst = scored[:20][::-1]
    right.barh([r["id"] for r in worst], [r[key] for r in worst], color="tab:orange")
    right.set(xlabel=label, title="worst jobs")
    right.tick_params(axis="y", labelsize=7)
    with atomic_write_path(path) as staged:
        figure.savefig(staged, format="png")
    return path


def write_summary(
    rows: Sequence[Mapping[str, Any]], folder: Path, settings: Mapping[str, Any]
) -> list[Path]:
    """``summary.csv``, ``summary.md`` and ``summary.png`` (when any job has a score)."""
    from ..imaging.fileio import atomic_write_path

    figure = _figure(rows, folder / "summary.png")
    written = []
    for name, text in (
        ("summary.csv", _csv_text(rows)),
        ("summary.md", _markdown(rows, settings, figure)),
    ):
        with atomic_write_path(folder / name) as staged:
            staged.write_text(text, encoding="utf-8")
        written.append(folder / name)
    return [*written, *([figure] if figure else [])]
