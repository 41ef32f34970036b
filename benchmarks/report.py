"""Summaries, the Markdown report and the box-plot figures of one benchmark run."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .methods import METHOD_LABELS

#: FreeSurfer names of the 27 evaluation structures (FreeSurferColorLUT).
FREESURFER_NAMES: dict[int, str] = {
    2: "Left-Cerebral-White-Matter",
    3: "Left-Cerebral-Cortex",
    4: "Left-Lateral-Ventricle",
    7: "Left-Cerebellum-White-Matter",
    8: "Left-Cerebellum-Cortex",
    10: "Left-Thalamus",
    11: "Left-Caudate",
    12: "Left-Putamen",
    13: "Left-Pallidum",
    16: "Brain-Stem",
    17: "Left-Hippocampus",
    18: "Left-Amygdala",
    26: "Left-Accumbens-area",
    28: "Left-VentralDC",
    41: "Right-Cerebral-White-Matter",
    42: "Right-Cerebral-Cortex",
    43: "Right-Lateral-Ventricle",
    46: "Right-Cerebellum-White-Matter",
    47: "Right-Cerebellum-Cortex",
    49: "Right-Thalamus",
    50: "Right-Caudate",
    51: "Right-Putamen",
    52: "Right-Pallidum",
    53: "Right-Hippocampus",
    54: "Right-Amygdala",
    58: "Right-Accumbens-area",
    60: "Right-VentralDC",
}

#: Published figures quoted in shared/docs/reference/anchors.md — NOT measured by this script.
PUBLISHED = """\
### Published reference numbers (quoted, not measured here)

These come from `shared/docs/reference/anchors.md` (tags as there: [V] verified in the primary
source, [3P] third-party table, [UNVERIFIED] not re-checked). They were obtained on other data
(LUMIR-24: OpenBHB T1 brains already affine-aligned; L2R-2021 OASIS), other label sets and other
hardware, so they give orders of magnitude, not a ranking against the rows above.

| Source | Method | Dice | % det J ≤ 0 (NDV) | SDlogJ | HD95 mm |
|---|---|---|---|---|---|
| LUMIR-24 val [3P] | Initial (affine only) | 0.5657 | 0 | – | 4.79 |
| LUMIR-24 val [3P] | ANTs SyN | 0.6988 | 0.0000 | – | 3.70 |
| LUMIR-24 val [3P] | deedsBCV | 0.6977 | 0.0001 | – | 3.95 |
| LUMIR-24 val [3P] | VoxelMorph | 0.7186 | 1.1836 | – | 3.98 |
| LUMIR-24 val [3P] | SynthMorph (off the shelf) | 0.7243 | 0.0000 | – | 3.57 |
| LUMIR-24 val [3P] | uniGradICON, no IO | 0.7369 | 0.0000 | – | 3.61 |
| LUMIR-24 val [3P] | uniGradICON, IO 50 | 0.7512 | 0.0001 | – | 3.51 |
| LUMIR-24 val [3P] | TransMorph | 0.7594 | 0.3509 | – | 3.51 |
| LUMIR-24 val [3P] | VFA | 0.7726 | 0.0788 | – | 3.21 |
| LUMIR-24 test [V] | SITReg (winner) | 0.7851 | 0.0025 | – | – |
| L2R-2021 OASIS test [V] | TransMorph | 0.8162 | – | 0.1242 | 1.692 |
| L2R-2021 OASIS test [V] | TransMorph-TVF (rank 1) | 0.8241 | – | 0.0905 | 1.633 |
| L2R-2021 OASIS test [3P] | LapIRN | 0.82 | – | 0.07 | 1.67 |
| L2R-2021 OASIS test [3P] | ConvexAdam | 0.81 | – | 0.07 | 1.63 |

Published speed and memory: ANTs SyN "≈20 s to hours depending on parameters" [V];
VoxelMorph ≈0.45 s GPU / ≈57 s CPU per pair [UNVERIFIED]; uniGradICON instance optimisation
≈1 s per iteration on a GPU, peak GPU memory 3.4 GB without IO, 11.4–14.8 GB with IO [V];
SlicerElastix default preset "a couple of minutes" [V].

Earlier in-house figure (shared/README.md, fs-dev sub-02 → sub-01, 27 structures, 2 cores):
no registration 0.06, affine 0.55, ANTs SyN 0.81 in 95 s.
"""


@dataclass
class Summary:
    """One method's row: statistics over the pairs that ran."""

    method: str
    pairs_ok: int = 0
    pairs_failed: int = 0
    dice_values: list[float] = field(default_factory=list)  # every (pair, structure)
    pair_dice: list[float] = field(default_factory=list)
    hd95: list[float] = field(default_factory=list)
    folding: list[float] = field(default_factory=list)
    sdlogj: list[float] = field(default_factory=list)
    times: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    peak_gb: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def label(self) -> str:
        return METHOD_LABELS.get(self.method, self.method)


def summarise(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> list[Summary]:
    """Per-method statistics; time ratios are per pair, to ANTs SyN on that same pair."""
    ants_time = {
        row["pair"]: row["time_s"]
        for row in rows
        if row["method"] == "ants" and row.get("status") == "ok"
    }
    summaries = []
    for method in methods:
        summary = Summary(method)
        for row in rows:
            if row["method"] != method:
                continue
            if row.get("status") != "ok":
                summary.pairs_failed += 1
                summary.errors.append(f"{row['pair']}: {row.get('error', row.get('status'))}")
                continue
            summary.pairs_ok += 1
            summary.dice_values += [v for v in row["dice"].values() if v is not None]
            if row.get("mean_dice") is not None:
                summary.pair_dice.append(row["mean_dice"])
            if row.get("mean_hd95_mm") is not None:
                summary.hd95.append(row["mean_hd95_mm"])
            summary.folding.append(row["folding_percent"])
            summary.sdlogj.append(row["sdlogj"])
            summary.times.append(row["time_s"])
            summary.peak_gb.append(row["peak_rss_bytes"] / 1e9)
            if row["pair"] in ants_time and ants_time[row["pair"]] > 0:
                summary.ratios.append(row["time_s"] / ants_time[row["pair"]])
        summaries.append(summary)
    return summaries


def _mean(values: Sequence[float]) -> float:
    return float(np.mean(values)) if len(values) else math.nan


def _fmt(value: float, digits: int = 3) -> str:
    return "–" if not math.isfinite(value) else f"{value:.{digits}f}"


def _mean_sd(values: Sequence[float], digits: int) -> str:
    if not len(values):
        return "–"
    if len(values) == 1:
        return _fmt(values[0], digits)
    return f"{_fmt(float(np.mean(values)), digits)} ± {_fmt(float(np.std(values)), digits)}"


def _folding(values: Sequence[float]) -> str:
    if not len(values):
        return "–"
    mean = float(np.mean(values))
    return "0" if mean == 0 else f"{mean:.4f}"


def main_table(summaries: Sequence[Summary]) -> str:
    lines = [
        "| Method | Dice (mean ± sd) | HD95 mm | % det J ≤ 0 | SDlogJ | Time s | × ANTs SyN "
        "| Peak RSS GB | Pairs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summaries:
        pairs = f"{s.pairs_ok}" + (f" ({s.pairs_failed} failed)" if s.pairs_failed else "")
        if not s.pairs_ok:
            lines.append(f"| {s.label} | – | – | – | – | – | – | – | {pairs} |")
            continue
        lines.append(
            f"| {s.label} | {_mean_sd(s.dice_values, 3)} | {_fmt(_mean(s.hd95), 2)} "
            f"| {_folding(s.folding)} | {_fmt(_mean(s.sdlogj), 3)} | {_mean_sd(s.times, 1)} "
            f"| {_fmt(_mean(s.ratios), 2)} | {_fmt(max(s.peak_gb), 2)} | {pairs} |"
        )
    return "\n".join(lines)


def pair_table(rows: Sequence[dict[str, Any]], methods: Sequence[str], pairs: Sequence[str]) -> str:
    lines = ["| Method | " + " | ".join(pairs) + " |", "|---|" + "---|" * len(pairs)]
    index = {(row["method"], row["pair"]): row for row in rows}
    for method in methods:
        cells = []
        for pair in pairs:
            row = index.get((method, pair))
            if row is None:
                cells.append("–")
            elif row.get("status") != "ok":
                cells.append(str(row.get("status")))
            else:
                dice = row.get("mean_dice")
                cells.append(
                    f"{_fmt(dice if dice is not None else math.nan)} / {row['time_s']:.1f} s"
                )
        lines.append(f"| {METHOD_LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def structure_table(rows: Sequence[dict[str, Any]], methods: Sequence[str]) -> str:
    labels: list[str] = []
    for row in rows:
        for label in row.get("dice", {}):
            if label not in labels:
                labels.append(label)
    shown = [m for m in methods if any(r["method"] == m and r.get("status") == "ok" for r in rows)]
    lines = [
        "| Structure | " + " | ".join(METHOD_LABELS.get(m, m) for m in shown) + " |",
        "|---|" + "---|" * len(shown),
    ]
    for label in labels:
        name = FREESURFER_NAMES.get(int(label), "") if label.lstrip("-").isdigit() else ""
        cells = []
        for method in shown:
            values = [
                r["dice"][label]
                for r in rows
                if r["method"] == method
                and r.get("status") == "ok"
                and r["dice"].get(label) is not None
            ]
            cells.append(_fmt(_mean(values)))
        lines.append(f"| {label} {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(summaries: Sequence[Summary], gpu: bool) -> str:
    """The DESIGN.md performance targets, checked on this run's numbers."""
    by = {s.method: s for s in summaries if s.pairs_ok}
    lines = ["| Target (DESIGN.md) | Measured | Met? |", "|---|---|---|"]

    def verdict(ok: bool) -> str:
        return "yes" if ok else "**no**"

    ants = by.get("ants")
    for preset in ("fast", "balanced", "accurate"):
        s = by.get(preset)
        if s is None:
            continue
        if ants is not None:
            ours, theirs = _mean(s.pair_dice), _mean(ants.pair_dice)
            lines.append(
                f"| {preset}: mean Dice ≥ ANTs SyN's | {ours:.3f} vs {theirs:.3f} "
                f"| {verdict(ours >= theirs)} |"
            )
        folding = max(s.folding)
        lines.append(
            f"| {preset}: < 0.01% voxels with det J ≤ 0 | max {folding:.4f}% "
            f"| {verdict(folding < 0.01)} |"
        )
        sdlogj = _mean(s.sdlogj)
        lines.append(
            f"| {preset}: SDlogJ ≤ 0.10 (anchors.md D, suggested) | {sdlogj:.3f} "
            f"| {verdict(sdlogj <= 0.10)} |"
        )
        peak = max(s.peak_gb)
        lines.append(f"| {preset}: peak memory ≤ 4 GB | {peak:.2f} GB | {verdict(peak <= 4.0)} |")
    fast = by.get("fast")
    if fast is not None:
        limit, where = (1.0, "GPU") if gpu else (10.0, "CPU")
        time = _mean(fast.times)
        lines.append(
            f"| fast: ≤ {limit:g} s per pair ({where}) | {time:.1f} s | {verdict(time <= limit)} |"
        )
    accurate = by.get("accurate")
    if accurate is not None and accurate.ratios:
        ratio = _mean(accurate.ratios)
        lines.append(
            f"| accurate: ≤ 1/4 of ANTs SyN's time | {ratio:.2f} × ANTs "
            f"| {verdict(ratio <= 0.25)} |"
        )
    return "\n".join(lines) if len(lines) > 2 else "(no DeepRegister preset in this run)"


def figures(rows: Sequence[dict[str, Any]], methods: Sequence[str], stem: Path) -> dict[str, Path]:
    """Box plots of per-structure Dice and of per-pair time, one box per method (PNG)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [m for m in methods if any(r["method"] == m and r.get("status") == "ok" for r in rows)]
    labels = [METHOD_LABELS.get(m, m).replace(" (", "\n(") for m in shown]
    dice = [
        [
            v
            for r in rows
            if r["method"] == m and r.get("status") == "ok"
            for v in r["dice"].values()
            if v is not None
        ]
        for m in shown
    ]
    times = [
        [r["time_s"] for r in rows if r["method"] == m and r.get("status") == "ok"] for m in shown
    ]
    paths = {}
    for key, data, ylabel, log in (
        ("dice", dice, "Dice per structure (all pairs)", False),
        ("time", times, "wall time per pair (s)", True),
    ):
        figure, axes = plt.subplots(figsize=(max(6.0, 1.3 * len(shown)), 4.5))
        if shown:
            axes.boxplot(data, showmeans=True)
            rng = np.random.default_rng(0)
            for position, values in enumerate(data, start=1):
                jitter = rng.uniform(-0.12, 0.12, size=len(values))
                axes.scatter(position + jitter, values, s=8, alpha=0.5, color="tab:blue")
            axes.set_xticks(range(1, len(shown) + 1), labels, fontsize=7, rotation=30)
        axes.set_ylabel(ylabel)
        if log and any(times):
            axes.set_yscale("log")
        axes.grid(axis="y", alpha=0.3)
        figure.tight_layout()
        path = stem.with_name(f"{stem.name}-{key}.png")
        figure.savefig(path, dpi=110)
        plt.close(figure)
        paths[key] = path
    return paths
