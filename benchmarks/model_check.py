#!/usr/bin/env python
"""Network-only check of 3D models on the fs-dev pairs, same contrast and cross-contrast.

    python benchmarks/model_check.py --models brain3d path/to/other.pt [--pairs 20]
    python benchmarks/model_check.py --models brain3d --contrasts same

For each ordered pair (the benchmark's order) the engine's preprocessing runs once: the
SimpleITK affine stage, then both images on the model's grid cropped to the fixed foreground.
Score: mean Dice over the 27 FreeSurfer structures on that grid, the moving ``aseg`` resampled
once through affine ∘ flow (as in training validation), for the affine alone and each model
alone (the engine's inference: two symmetric forward passes, repeated for each of the
``passes`` its JSON asks). Three contrasts, with the benchmark's T2-like remapping:
``same`` (T1 ↔ T1); ``cross`` (T2-like moving image, T1 fixed), where a same-contrast model is
scored on the moving image as it is and, as the engine feeds it, mapped into the fixed image's
contrast; ``t2-pair`` (both T2-like), a same-contrast pair in a contrast no fs-dev image has,
for which only training on random synthetic contrasts prepares a model. Pairs a model's
training used for validation are marked, and means are given over the others too. Writes
``--out``/<date>-<tag>.md and .json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
import torch  # noqa: E402

from benchmarks.pairs import ordered_pairs, subjects_in, t2_like  # noqa: E402
from DeepRegisterLib.imaging.metrics import FREESURFER_EVAL_LABELS  # noqa: E402
from DeepRegisterLib.nn.models import find_model, load_model  # noqa: E402
from DeepRegisterLib.registration.contrast import in_contrast_of  # noqa: E402
from DeepRegisterLib.training.pairs import PairFiles  # noqa: E402
from DeepRegisterLib.training.validation import network_scores, real_validation_pair  # noqa: E402


def validation_names(info) -> set[str]:
    """Pairs (``sub-02→sub-01``) the model's training validated on, from its JSON."""
    pairs = info.config.get("training", {}).get("validation", {}).get("pairs", [])
    return {
        "→".join(part.split("/")[0] for part in pair.split("→")) for pair in pairs if "→" in pair
    }


# T1 ↔ T1; T2-like moving image, T1 fixed; T2-like ↔ T2-like.
CONTRASTS = ("same", "cross", "t2-pair")


def t2_like_file(data: Path, subject: str, scratch: str) -> Path:
    """The subject's brain remapped by ``t2_like``, written once into ``scratch``."""
    remapped = Path(scratch) / f"{subject}-t2like.nii.gz"
    if not remapped.exists():
        brain = sitk.ReadImage(str(data / subject / "brainmask.nii.gz"))
        sitk.WriteImage(t2_like(brain), str(remapped))
    return remapped


def main(argv: list[str] | None = None) -> int:
    args = _parse(argv)
    torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        print(f"No fs-dev data at {args.data}; pass --data.", file=sys.stderr)
        return 2
    infos = [find_model(name) for name in args.models]
    if len({info.spacing_mm for info in infos}) != 1:
        print("the models must share an input spacing", file=sys.stderr)
        return 2
    networks = [load_model(info, torch.device("cpu")) for info in infos]
    validated = [validation_names(info) for info in infos]
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepregister-models-") as scratch:
        pairs = ordered_pairs(subjects_in(args.data))[: args.pairs]
        for moving, fixed in pairs:
            for contrast in args.contrasts:
                row = _score(args, infos, networks, moving, fixed, contrast, scratch)
                rows.append(row)
                print(
                    f"{row['pair']} {contrast:5s} affine {row['affine']:.3f} "
                    + " ".join(f"{m} {s:.3f}" for m, s in row["models"].items())
                    + "".join(f" {m} mapped {s:.3f}" for m, s in row.get("mapped", {}).items()),
                    flush=True,
                )
    lines = [
        f"# Network-only check of 3D models, {datetime.date.today()}",
        "",
        f"`python benchmarks/model_check.py {' '.join(argv or sys.argv[1:])}`; "
        f"{len(pairs)} ordered fs-dev pairs; {time.perf_counter() - started:.0f} s. Mean Dice over "
        f"the 27 FreeSurfer structures on the {infos[0].spacing_mm:g} mm network grid after the "
        "affine stage; each model alone as the engine runs it (symmetric inference, "
        + ", ".join(f"`{i.name}` {i.passes} pass(es)" for i in infos)
        + "), no instance optimisation.",
        "",
        *_contrast_table(rows, args.models, set().union(*validated)),
        *_mapped_table(rows, args.models, set().union(*validated)),
        "",
        "Validation pairs (used to pick each model's checkpoint): "
        + "; ".join(
            f"`{m}`: {', '.join(sorted(v)) or 'none'}"
            for m, v in zip(args.models, validated, strict=True)
        ),
        "",
        f"Network (all passes): {np.median([r['network_seconds'] for r in rows]):.2f} s "
        f"(median, {args.threads} thread(s), CPU).",
    ]
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"{datetime.date.today()}-{args.tag}"
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    stem.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print("\n".join(lines))
    return 0


def _parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["brain3d"])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "fs-dev")
    parser.add_argument("--pairs", type=int, default=None, help="first N ordered pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="models")
    parser.add_argument(
        "--contrasts", nargs="+", choices=CONTRASTS, default=list(CONTRASTS),
        help="which contrasts to score (default all; `same` alone takes a third of the time)",
    )  # fmt: skip
    return parser.parse_args(argv)


def _score(
    args: argparse.Namespace,
    infos: list,
    networks: list,
    moving: str,
    fixed: str,
    contrast: str,
    scratch: str,
) -> dict:
    """One pair in one contrast: the affine's and each model's Dice, and for "cross" each
    same-contrast model's through the contrast map (as the engine's MIND runs feed it)."""
    images = {name: args.data / name / "brainmask.nii.gz" for name in (fixed, moving)}
    for name in {"same": (), "cross": (moving,), "t2-pair": (fixed, moving)}[contrast]:
        images[name] = t2_like_file(args.data, name, scratch)
    files = PairFiles(
        images[fixed], images[moving],
        args.data / fixed / "aseg.nii.gz", args.data / moving / "aseg.nii.gz",
    )  # fmt: skip
    labels = list(FREESURFER_EVAL_LABELS)
    pair = real_validation_pair(files, infos[0].spacing_mm, labels)
    tick = time.perf_counter()
    scores = [
        network_scores(net, [pair], torch.device("cpu"), passes=info.passes)[0]
        for info, net in zip(infos, networks, strict=True)
    ]
    seconds = (time.perf_counter() - tick) / len(networks)
    row = {
        "pair": f"{moving}→{fixed}",
        "contrast": contrast,
        "affine": pair.score(None),
        "models": dict(zip(args.models, scores, strict=True)),
        "network_seconds": seconds,
    }
    if contrast == "cross":
        mapped_moving = in_contrast_of(pair.fixed, pair.moving)
        mapped = replace(pair, moving=pair.moving if mapped_moving is None else mapped_moving)
        row["mapped"] = {
            name: network_scores(net, [mapped], torch.device("cpu"), passes=info.passes)[0]
            for name, info, net in zip(args.models, infos, networks, strict=True)
            if info.contrast == "same"
        }
    return row


def _contrast_table(rows: list[dict], models: list[str], used: set[str]) -> list[str]:
    """Mean Dice per contrast, over all pairs and over those no model validated on."""
    lines = [
        "| contrast | pairs | affine only | "
        + " | ".join(f"`{m}`" for m in models)
        + " | pairs improved over affine |",
        "|---|---|---|" + "---|" * len(models) + "---|",
    ]
    for contrast in CONTRASTS:
        for subset, chosen in (
            ("all", [r for r in rows if r["contrast"] == contrast]),
            ("held out", [r for r in rows if r["contrast"] == contrast and r["pair"] not in used]),
        ):
            if not chosen:
                continue
            means = [np.mean([r["models"][m] for r in chosen]) for m in models]
            improved = [sum(r["models"][m] > r["affine"] for r in chosen) for m in models]
            lines.append(
                f"| {contrast} | {subset} ({len(chosen)}) | "
                f"{np.mean([r['affine'] for r in chosen]):.3f} | "
                + " | ".join(f"{m:.3f}" for m in means)
                + " | "
                + ", ".join(
                    f"`{m}` {n}/{len(chosen)}" for m, n in zip(models, improved, strict=True)
                )
                + " |"
            )
    return lines


def _mapped_table(rows: list[dict], models: list[str], used: set[str]) -> list[str]:
    """Cross-contrast Dice of the same-contrast models fed through the contrast map."""
    mapped_names = [m for m in models if any(m in r.get("mapped", {}) for r in rows)]
    if not mapped_names:
        return []
    held_out = [r for r in rows if r["contrast"] == "cross" and r["pair"] not in used]
    lines = [
        "",
        "Cross-contrast, moving image mapped into the fixed image's contrast first (what the "
        "engine feeds a same-contrast model in a MIND run; "
        "`DeepRegisterLib.registration.contrast`):",
        "",
        "| model | all pairs | held out | pairs improved over affine |",
        "|---|---|---|---|",
    ]
    cross = [r for r in rows if r["contrast"] == "cross"]
    for m in mapped_names:
        improved = sum(r["mapped"][m] > r["affine"] for r in cross)
        lines.append(
            f"| `{m}` | {np.mean([r['mapped'][m] for r in cross]):.3f} | "
            + (f"{np.mean([r['mapped'][m] for r in held_out]):.3f}" if held_out else "–")
            + f" | {improved}/{len(cross)} |"
        )
    return lines


if __name__ == "__main__":
    sys.exit(main())
