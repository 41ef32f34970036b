"""The Markdown and JSON report of one benchmark run: tables, figures, notes, machine."""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from . import report
from .tasks import PairSpec


def variant_name(args: argparse.Namespace) -> str:
    parts = [
        name
        for name, on in (
            ("smoke", args.smoke),
            ("cross-contrast", args.cross_contrast),
            ("2d", args.two_d),
            ("gpu", args.gpu),
        )
        if on
    ]
    if args.tag:
        parts.append(args.tag)
    return "-".join(parts)


def write_report(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    methods: list[str],
    pairs: list[PairSpec],
    notes: list[str],
    machine: dict[str, Any],
    timing: dict[str, Any],
) -> tuple[str, Path]:
    """Markdown (returned and written), JSON of every row, and the two figures."""
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    variant = variant_name(args)
    stem = out / (timing["date"] + (f"-{variant}" if variant else ""))
    summaries = report.summarise(rows, methods)
    figure_paths = report.figures(rows, methods, stem)
    fingerprints = sorted({r["library_fingerprint"] for r in rows if "library_fingerprint" in r})
    if len(fingerprints) > 1:
        notes = [
            *notes,
            f"DeepRegisterLib changed while this benchmark ran ({len(fingerprints)} different "
            "source fingerprints: " + ", ".join(fingerprints) + "); rows are not all from the "
            "same library version — see `library_fingerprint` per row in the JSON.",
        ]
    md = [
        *_introduction(args, pairs, timing, variant),
        *_results(args, rows, methods, pairs, summaries, figure_paths),
    ]
    failures = [e for s in summaries for e in s.errors]
    if notes or failures:
        md += ["### Notes", ""] + [f"- {n}" for n in notes]
        md += [f"- failed: {f}" for f in failures] + [""]
    md += _machine(args, rows, machine, timing, fingerprints)
    text = "\n".join(md)
    stem.with_suffix(".md").write_text(text)
    stem.with_suffix(".json").write_text(
        json.dumps(
            {
                "command": timing["command"],
                "machine": machine,
                "timing": timing,
                "settings": vars(args),
                "pairs": [dataclasses.asdict(p) for p in pairs],
                "methods": methods,
                "notes": notes,
                "rows": rows,
            },
            indent=1,
            default=str,
        )
    )
    return text, stem.with_suffix(".md")


def _introduction(
    args: argparse.Namespace, pairs: list[PairSpec], timing: dict[str, Any], variant: str
) -> list[str]:
    ok_dims = "2D matched axial slices" if args.two_d else "3D volumes"
    data = (
        "phantom pairs (DeepRegisterLib.imaging.phantoms, 32-voxel oblique grid)"
        if args.smoke
        else (f"fs-dev ({Path(args.data).resolve()}), {ok_dims}")
    )
    return [
        f"# DeepRegister benchmark — {timing['date']}" + (f" ({variant})" if variant else ""),
        "",
        f"Command: `{timing['command']}`",
        "",
        *(
            []
            if timing.get("complete", True)
            else ["**Interim report, written while the run was still going.**", ""]
        ),
        f"Data: {data}; {len(pairs)} pair(s): " + ", ".join(p.name for p in pairs) + ".",
        "Contrast: "
        + (
            "moving images remapped to a T2-like contrast (inverted, `255·(1−v/p99)^1.5` inside "
            'the brain); DeepRegister uses `similarity="mind"`, ANTs and elastix Mattes MI.'
            if args.cross_contrast
            else "same contrast (T1 brainmask ↔ T1 brainmask)."
        ),
        "",
    ]


def _results(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    methods: list[str],
    pairs: list[PairSpec],
    summaries: list[report.Summary],
    figure_paths: dict[str, Path],
) -> list[str]:
    md = [
        "## Results",
        "",
        report.main_table(summaries),
        "",
        "Dice: mean ± sd over every (pair, structure) value; HD95: mean over structures and "
        "pairs; % det J ≤ 0 and SDlogJ inside the fixed brain mask; time: registration plus "
        "warping the labels (no file I/O, no scoring), mean ± sd over pairs; × ANTs SyN: the "
        "per-pair ratio to ANTs SyN's time on the same pair in this run, averaged; peak RSS: "
        "high-water resident memory of the method's own child process (includes the Python "
        "interpreter and imported libraries; the identity row is that baseline).",
        "",
        f"![Dice per method]({figure_paths['dice'].name})",
        f"![Time per method]({figure_paths['time'].name})",
        "",
        "### Per pair (mean Dice / time)",
        "",
        report.pair_table(rows, methods, [p.name for p in pairs]),
        "",
        "### Per structure (mean Dice over pairs)",
        "",
        report.structure_table(rows, methods),
        "",
    ]
    if not args.smoke:
        md += [
            "### Performance targets",
            "",
            report.targets(summaries, args.gpu),
            "",
            "(The targets are stated for 3D T1 pairs at 256³, 1 mm, on 2 CPU cores.)"
            if (args.two_d or args.cross_contrast)
            else "",
            "",
        ]
    return md


def _machine(
    args: argparse.Namespace,
    rows: list[dict[str, Any]],
    machine: dict[str, Any],
    timing: dict[str, Any],
    fingerprints: list[str],
) -> list[str]:
    threads = sorted({r["torch_threads"] for r in rows if "torch_threads" in r})
    usable = machine.get("usable_cores")
    return [
        "## Machine",
        "",
        f"- CPU: {machine['cpu']}; {machine['logical_cores']} logical cores ({usable} usable); "
        f"RAM {machine['ram_gb']} GB; {machine['platform']}",
        f"- Threads: torch {threads or '?'}, ITK/ANTs/elastix {args.threads} "
        f"(`--threads {args.threads}`); device for DeepRegister: {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else ""),
        "- Versions: "
        + ", ".join(f"{k} {v}" for k, v in machine["versions"].items())
        + (f"; DeepRegisterLib fingerprint {', '.join(fingerprints)}" if fingerprints else ""),
        f"- Load average (1 min) at start {timing['load_start']:.2f}, at end "
        f"{timing['load_end']:.2f}, on {usable} usable cores; benchmark wall time "
        f"{timing['wall_s'] / 60:.1f} min.",
        "",
        "**Timings.** "
        + (args.note + " " if args.note else "")
        + "Methods ran one at a time, interleaved pair by pair, each in a fresh process. When "
        "the load average exceeds the core count, other work competed for the CPU: absolute "
        "times are then inflated and noisy, and the ratios to ANTs SyN measured in the same run "
        "are the meaningful figure.",
        "",
        report.PUBLISHED,
    ]
