"""What a run leaves to read: ``log.csv`` (a row per step) and ``curves.png`` (loss, Dice).

Written by the main process only in a distributed run; the loss logged is the mean over every
process's share of the step's batch.
"""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from ..imaging.fileio import atomic_write_path

LOG, CURVES = "log.csv", "curves.png"
LOG_FIELDS = ("step", "elapsed_s", "loss", "similarity", "regularization", "dice_loss", "val_dice")


class TrainingLog:
    """``log.csv``: one row per step; on resume the rows after the checkpoint are dropped."""

    def __init__(self, path: Path, keep_through_step: int):
        rows = []
        if keep_through_step > 0 and path.exists():
            with path.open(newline="") as stream:
                rows = [r for r in csv.DictReader(stream) if int(r["step"]) <= keep_through_step]
        self.rows: list[dict[str, Any]] = rows
        with atomic_write_path(path) as staged, staged.open("w", newline="") as stream:
            writer = csv.DictWriter(stream, LOG_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.stream = path.open("a", newline="")
        self.writer = csv.DictWriter(self.stream, LOG_FIELDS)

    def write(self, row: dict[str, Any]) -> None:
        row = {k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        self.writer.writerow(row)
        self.stream.flush()

    def close(self) -> None:
        self.stream.close()


def plot_curves(rows: Sequence[dict[str, Any]], path: Path, affine_only: float) -> None:
    """Loss and validation Dice against the step, with the affine-only Dice for reference."""
    steps = np.array([int(r["step"]) for r in rows if r.get("loss") not in (None, "")])
    losses = np.array([float(r["loss"]) for r in rows if r.get("loss") not in (None, "")])
    validated = [(int(r["step"]), float(r["val_dice"])) for r in rows if r.get("val_dice")]
    figure = Figure(figsize=(10, 4))
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    if len(losses):
        left.plot(steps, losses, color="0.75", linewidth=0.5, label="loss")
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
        left.plot(steps[window - 1 :], smooth, color="C0", label=f"mean of {window}")
        left.legend()
    left.set(xlabel="step", ylabel="training loss", title="loss")
    if validated:
        right.plot(*zip(*validated, strict=True), marker="o", color="C1", label="network")
    right.axhline(affine_only, color="0.4", linestyle="--", label="affine only")
    right.set(xlabel="step", ylabel="mean Dice", title="validation")
    right.legend()
    figure.tight_layout()
    with atomic_write_path(path) as staged:
        figure.savefig(staged, dpi=100, format="png")
