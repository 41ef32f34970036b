"""The tables of ``user_time.py``: the command a user types, timed alone, beside ANTs SyN; the
same command with labels and a report for the engine's stages, Dice and folding."""

from __future__ import annotations

import argparse
import statistics
from typing import Any

STAGES = ("affine_s", "network_s", "optimisation_s", "outputs_s")


def _ratio(seconds: float, syn: float | None) -> str:
    return f"{seconds / syn:.2f}×" if syn else "–"


def _number(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _folded(percent: float | None) -> str:
    """A share of folded voxels readable at one voxel (6 × 10⁻⁶ % of a 256³ grid)."""
    return "–" if percent is None else "0" if percent == 0 else f"{percent:.1e}"


def _same(rows: list[dict[str, Any]]) -> str:
    """How many pairs wrote the same files alone as with labels and a report."""
    checked = [r["same_outputs"] for r in rows if r.get("same_outputs") is not None]
    return f"{sum(checked)} of {len(checked)}" if checked else "–"


def _mean_ratio(rows: list[dict[str, Any]], ants: dict[str, Any], key: str, syn_key: str) -> str:
    """Mean ``key`` over the pairs SyN ran on, as a multiple of SyN's mean ``syn_key`` there."""
    with_syn = [r for r in rows if r["pair"] in ants]
    if not with_syn:
        return "–"
    syn = statistics.mean(ants[r["pair"]][syn_key] for r in with_syn)
    return _ratio(statistics.mean(r[key] for r in with_syn), syn)


def summary(results: dict[str, Any]) -> list[str]:
    """One line per (preset, version) and one for SyN: means over the pairs SyN also ran on
    for the times beside SyN's, and over every pair for the rest."""
    ants = results["ants"]
    lines = [
        "| preset | version | pairs | the command alone s | × SyN | with labels and report s "
        "| × SyN | affine / network / optimisation / outputs s | Dice (27) "
        "| pairs folding (max % det J ≤ 0) | same files | peak RSS MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for row in results["runs"]:
        groups.setdefault((row["preset"], row["version"]), []).append(row)
    for (preset, version), rows in groups.items():
        stages = " / ".join(
            f"{statistics.mean(r['stages_s'].get(key, 0) for r in rows):.1f}" for key in STAGES
        )
        dice = [r["dice_27"] for r in rows if r.get("dice_27") is not None]
        folding = [r["folding_percent"] for r in rows if r.get("folding_percent") is not None]
        lines.append(
            f"| {preset} | {version} | {len(rows)} "
            f"| {statistics.mean(r['total_s'] for r in rows):.1f} "
            f"| {_mean_ratio(rows, ants, 'total_s', 'total_s')} "
            f"| {statistics.mean(r['checked_s'] for r in rows):.1f} "
            f"| {_mean_ratio(rows, ants, 'checked_s', 'with_labels_s')} | {stages} "
            f"| {_number(statistics.mean(dice) if dice else None, 4)} "
            f"| {sum(f > 0 for f in folding)} ({_folded(max(folding) if folding else None)}) "
            f"| {_same(rows)} | {max(r['peak_rss_mb'] for r in rows):.0f} |"
        )
    if ants:
        syn = list(ants.values())
        dice = [a["dice_27"] for a in syn if a.get("dice_27") is not None]
        lines.append(
            f"| ANTs SyN | antspyx | {len(ants)} "
            f"| {statistics.mean(a['total_s'] for a in syn):.1f} | 1.00× "
            f"| {statistics.mean(a['with_labels_s'] for a in syn):.1f} | 1.00× | – "
            f"| {_number(statistics.mean(dice) if dice else None, 3)} | – | – "
            f"| {max(a['peak_rss_mb'] for a in syn):.0f} |"
        )
    return lines


def _devices(results: dict[str, Any]) -> str:
    """The devices the engine reports it ran on (``--device auto`` decides in each run)."""
    return ", ".join(sorted({str(run.get("device")) for run in results["runs"]})) or "–"


def _pair_lines(results: dict[str, Any]) -> list[str]:
    lines = [
        "| pair | preset | version | alone s | × SyN | before engine s | engine s "
        "| after engine s | peak RSS MB | MB written | with labels and report s "
        "| affine / network / optimisation / outputs s | Dice (27) | % det J ≤ 0 | same files |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["runs"]:
        syn = results["ants"].get(row["pair"], {}).get("total_s")
        stages = " / ".join(f"{row['stages_s'].get(key, 0):.1f}" for key in STAGES)
        same = {True: "yes", False: "**no**", None: "–"}[row.get("same_outputs")]
        lines.append(
            f"| {row['pair']} | {row['preset']} | {row['version']} | {row['total_s']:.1f} "
            f"| {_ratio(row['total_s'], syn)} | {row['before_engine_s']:.1f} "
            f"| {row['engine_s']:.1f} | {row['after_engine_s']:.1f} "
            f"| {row['peak_rss_mb']:.0f} | {row['bytes_written'] / 1e6:.0f} "
            f"| {row['checked_s']:.1f} | {stages} "
            f"| {_number(row.get('dice_27'), 3)} | {_folded(row.get('folding_percent'))} "
            f"| {same} |"
        )
    return lines


def markdown(results: dict[str, Any], args: argparse.Namespace) -> str:
    lines = [
        "# What a user waits for: `deepregister register`, start to files on disk",
        "",
        f"The command alone: `register --fixed --moving --preset` with {', '.join(args.outputs)}; "
        f"{args.threads} threads; device {_devices(results)}; presets "
        f"{', '.join(args.presets)}. Then the same command with --labels/--fixed-labels and "
        "--report, in a fresh process, for the engine's stages, Dice and folding; 'same files' "
        "says whether both runs wrote the same transform and images."
        + (f" Each command after {args.pause:g} s idle." if args.pause else "")
        + (" Whole-head T1 images (`--heads`)." if args.heads else "")
        + (
            " A CT-like pair (`--ct`: 512² × 600 at 0.78 × 0.78 × 1 mm, int16, NRRD): no "
            "FreeSurfer structures, so Dice (27) is empty; the JSON's `mean_dice` is over its "
            "lungs, soft tissue and bone."
            if getattr(args, "ct", False)
            else ""
        ),
        "Start-up is `register --help` alone (median of 3). In the command alone, 'before "
        "engine' is the time to the first progress line (start-up, imports, reading), 'engine' "
        "from there to the 100 % line, 'after engine' writing and exit. Ratios are × ANTs SyN's "
        "time on the same pairs in the same run: read, register, write the warped image (for "
        "the command alone), and its labels warped too (beside the run with labels). Dice (27): "
        "mean over the 27 FreeSurfer structures, for SyN and DeepRegister alike; % det J ≤ 0 "
        "over the fixed grid.",
        "",
        "| version | start-up (--help) s |",
        "|---|---|",
        *[f"| {label} | {s:.2f} |" for label, s in results["startup_s"].items()],
        "",
        *summary(results),
        "",
        *_pair_lines(results),
    ]
    for name, syn in results["ants"].items():
        dice = _number(syn.get("dice_27"), 3)
        lines.append(
            f"\nANTs SyN on {name}: {syn['total_s']:.1f} s to its warped image, "
            f"{syn['with_labels_s']:.1f} s with its labels, peak {syn['peak_rss_mb']:.0f} MB, "
            f"Dice (27) {dice}"
        )
    return "\n".join(lines) + "\n"
