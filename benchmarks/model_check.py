#!/usr/bin/env python
"""Network-only check of 3D models on the fs-dev pairs, same contrast and cross-contrast.

    python benchmarks/model_check.py --models brain3d path/to/other.pt [--pairs 20]

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

from benchmarks.run_benchmark import ordered_pairs, subjects_in, t2_like  # noqa: E402
from DeepRegisterLib.imaging.metrics import FREESURFER_EVAL_LABELS  # noqa: E402
from DeepRegisterLib.nn.models import find_model, load_model  # noqa: E402
from DeepRegisterLib.registration.contrast import in_contrast_of  # noqa: E402
from DeepRegisterLib.training.loop import PairFiles, network_scores, real_validation_pair  # noqa: E402


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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["brain3d"])
    parser.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "fs-dev")
    parser.add_argument("--pairs", type=int, default=None, help="first N ordered pairs")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--tag", default="models")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.data.is_dir():
        print(f"No fs-dev data at {args.data}; pass --data.", file=sys.stderr)
        return 2
    infos = [find_model(name) for name in args.models]
    multiple = max(info.network.multiple for info in infos)
    if len({info.spacing_mm for info in infos}) != 1:
        print("the models must share an input spacing", file=sys.stderr)
        return 2
    networks = [load_model(info, torch.device("cpu")) for info in infos]
    validated = [validation_names(info) for info in infos]
    labels = list(FREESURFER_EVAL_LABELS)
    rows = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="deepregister-models-") as scratch:
        pairs = ordered_pairs(subjects_in(args.data))[: args.pairs]
        for moving, fixed in pairs:
            for contrast in CONTRASTS:
                images = {name: args.data / name / "brainmask.nii.gz" for name in (fixed, moving)}
                for name in {"same": (), "cross": (moving,), "t2-pair": (fixed, moving)}[contrast]:
                    images[name] = t2_like_file(args.data, name, scratch)
                files = PairFiles(
                    images[fixed], images[moving],
                    args.data / fixed / "aseg.nii.gz", args.data / moving / "aseg.nii.gz",
                )  # fmt: skip
                pair = real_validation_pair(files, infos[0].spacing_mm, multiple, labels)
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
                if contrast == "cross":  # as the engine's MIND runs feed same-contrast models
                    mapped_moving = in_contrast_of(pair.fixed, pair.moving)
                    mapped = replace(
                        pair, moving=pair.moving if mapped_moving is None else mapped_moving
                    )
                    row["mapped"] = {
                        name: network_scores(
                            net, [mapped], torch.device("cpu"), passes=info.passes
                        )[0]
                        for name, info, net in zip(args.models, infos, networks, strict=True)
                        if info.contrast == "same"
                    }
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
        "| contrast | pairs | affine only | "
        + " | ".join(f"`{m}`" for m in args.models)
        + " | pairs improved over affine |",
        "|---|---|---|" + "---|" * len(args.models) + "---|",
    ]
    used = set().union(*validated)
    for contrast in CONTRASTS:
        for subset, chosen in (
            ("all", [r for r in rows if r["contrast"] == contrast]),
            ("held out", [r for r in rows if r["contrast"] == contrast and r["pair"] not in used]),
        ):
            if not chosen:
                continue
            means = [np.mean([r["models"][m] for r in chosen]) for m in args.models]
            improved = [sum(r["models"][m] > r["affine"] for r in chosen) for m in args.models]
            lines.append(
                f"| {contrast} | {subset} ({len(chosen)}) | "
                f"{np.mean([r['affine'] for r in chosen]):.3f} | "
                + " | ".join(f"{m:.3f}" for m in means)
                + " | "
                + ", ".join(
                    f"`{m}` {n}/{len(chosen)}" for m, n in zip(args.models, improved, strict=True)
                )
                + " |"
            )
    mapped_names = [m for m in args.models if any(m in r.get("mapped", {}) for r in rows)]
    if mapped_names:
        held_out = [r for r in rows if r["contrast"] == "cross" and r["pair"] not in used]
        lines += [
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
    lines += [
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


if __name__ == "__main__":
    sys.exit(main())
