"""``deepregister train``: train a model on synthetic (and optionally real) pairs.

Kept apart from ``cli.py`` so the command is wired in with two calls (:func:`add_train_parser`,
:func:`run_train`) and can be tested on its own.
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path
from typing import Any

import torch

from ..errors import InputError
from ..imaging.metrics import parse_labels
from ..nn.devices import resolve_device
from ..nn.losses import SIMILARITIES
from ..nn.networks import NetworkConfig
from ..training.loop import ALIGNED_LABEL_MAPS, LR_SCHEDULES, TrainingConfig, read_pairs, train
from ..training.synthesis import SynthesisConfig, load_label_maps
from .exit_codes import run_reporting_errors

_DEFAULT_NETWORK = NetworkConfig()


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``parser.add_subparsers()``'s result."""
    parser = subparsers.add_parser(
        "train",
        help="train a registration model (SynthMorph-style synthetic pairs, optional real pairs)",
        description=(
            "Train a VoxelMorph-style network on pairs synthesised from label maps (or from "
            "random shapes when none are given), validate it on real labelled pairs, and save "
            "it as a model (weights + JSON + SHA-256) that 'deepregister register --model' "
            "loads. Checkpoints allow --resume."
        ),
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--label-maps",
        nargs="+",
        metavar="FILE",
        help="label maps to synthesise images from (files or glob patterns); 2D training "
        "takes random slices of 3D maps. Default: random shapes, no data needed",
    )
    data.add_argument(
        "--background-from",
        type=int,
        metavar="LABEL",
        help="labels ≥ this become background (100 strips SynthSeg's extra-cerebral labels)",
    )
    data.add_argument(
        "--same-contrast",
        type=float,
        default=0.0,
        metavar="P",
        help="probability that a synthetic pair shares one contrast (default 0: independent "
        "contrasts, as SynthMorph; higher values learn same-modality pairs in fewer steps)",
    )
    data.add_argument(
        "--t1-like",
        type=float,
        default=0.0,
        metavar="P",
        help="probability that a synthetic pair gets T1-like intensities (FreeSurfer label "
        "maps only; default 0)",
    )
    data.add_argument(
        "--other-subject",
        type=float,
        default=0.0,
        metavar="P",
        help="probability that a synthetic pair's moving image comes from another label map "
        "than its fixed image (real inter-subject anatomy; the maps are first aligned to the "
        "first one by the affine stage). Default 0: one map, randomly deformed",
    )
    data.add_argument(
        "--zero-background",
        type=float,
        default=0.0,
        metavar="P",
        help="probability that a synthetic pair's background (label 0) is exactly 0 in both "
        "images, as in skull-stripped scans (default 0: a random contrast like any label)",
    )
    data.add_argument(
        "--real-pairs",
        type=Path,
        help="real training pairs: a CSV (fixed,moving[,fixed_labels,moving_labels]) or a "
        "folder of images (every ordered pair); each pair is affine-aligned first",
    )
    data.add_argument(
        "--real-fraction",
        type=float,
        default=0.5,
        help="share of pairs drawn from --real-pairs (default 0.5)",
    )
    data.add_argument(
        "--validation",
        type=Path,
        help="validation pairs with labels: CSV fixed,moving,fixed_labels,moving_labels. "
        "Default: held-out synthetic pairs",
    )
    data.add_argument(
        "--eval-labels",
        nargs="+",
        metavar="LABEL",
        help="labels scored in validation (integers, or 'freesurfer' for the 27 standard "
        "structures); default: every label of the fixed label map",
    )

    model = parser.add_argument_group("model")
    model.add_argument("--out", type=Path, required=True, help="folder for checkpoints and logs")
    model.add_argument("--name", default="model", help="model name (default 'model')")
    model.add_argument(
        "--model-dir", type=Path, help="where to save the model (default: the --out folder)"
    )
    model.add_argument(
        "--shape",
        type=int,
        nargs="+",
        required=True,
        help="training crop in voxels, 2 or 3 sizes (array order), multiples of 2**levels",
    )
    model.add_argument(
        "--spacing", type=float, default=2.0, help="isotropic training spacing, mm (default 2)"
    )
    model.add_argument(
        "--encoder",
        type=int,
        nargs="+",
        default=list(_DEFAULT_NETWORK.encoder),
        help="encoder features per level (default %(default)s)",
    )
    model.add_argument(
        "--decoder",
        type=int,
        nargs="+",
        default=list(_DEFAULT_NETWORK.decoder),
        help="decoder features per stage (default %(default)s)",
    )
    model.add_argument("--integration-steps", type=int, default=_DEFAULT_NETWORK.integration_steps)

    run = parser.add_argument_group("optimisation")
    run.add_argument("--steps", type=int, default=1000, help="training steps (default 1000)")
    run.add_argument("--batch-size", type=int, default=1)
    run.add_argument("--learning-rate", type=float, default=1e-4)
    run.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        default="constant",
        help="cosine: decay the learning rate to 0 at the last step (default constant)",
    )
    run.add_argument("--similarity", choices=SIMILARITIES, default="lncc")
    run.add_argument(
        "--similarity-weight",
        type=float,
        default=1.0,
        help="weight of the image similarity; 0 trains on label Dice alone, as SynthMorph does "
        "for contrast-agnostic models (default 1)",
    )
    run.add_argument("--regularization", type=float, default=1.0, help="diffusion weight")
    run.add_argument(
        "--dice-weight", type=float, default=1.0, help="weight of the soft Dice on labels"
    )
    run.add_argument(
        "--passes",
        type=int,
        default=0,
        help="0: train one one-sided forward pass, VoxelMorph's loss (default). n: train what "
        "the engine runs, n recursive symmetric passes end to end (2n forward passes a step); "
        "the model's JSON then asks the engine for n",
    )
    run.add_argument("--validate-every", type=int, default=100)
    run.add_argument("--checkpoint-every", type=int, default=50)
    run.add_argument(
        "--max-minutes", type=float, help="stop after this much training time, and save"
    )
    run.add_argument(
        "--init-model", help="start from this model's weights (name or .pt path): fine-tuning"
    )
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--device", default="auto", help="auto (GPU when present), cpu or cuda")
    run.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own)")
    run.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        help="bfloat16 autocast of the network (default: on a GPU only; on a CPU with "
        "bfloat16 instructions it saves about a third of the time)",
    )
    run.add_argument("--resume", action="store_true", help="continue after the checkpoint in --out")
    parser.set_defaults(run=run_train)  # cli.main dispatches with args.run(args)
    return parser


def _label_map_files(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"--label-maps: nothing matches {pattern!r}")
        files.extend(Path(m) for m in matches)
    return files


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The training configuration the options describe (checked)."""
    try:
        network = NetworkConfig(
            dim=len(args.shape),
            encoder=tuple(args.encoder),
            decoder=tuple(args.decoder),
            integration_steps=args.integration_steps,
        )
        network.validate()
    except ValueError as error:
        raise InputError(f"invalid network options: {error}") from None
    config = TrainingConfig(
        shape=tuple(args.shape),
        spacing_mm=args.spacing,
        steps=args.steps,
        batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_schedule=args.lr_schedule,
        passes=args.passes,
        similarity=args.similarity,
        similarity_weight=args.similarity_weight,
        regularization=args.regularization,
        dice_weight=args.dice_weight,
        real_fraction=args.real_fraction,
        validate_every=args.validate_every,
        checkpoint_every=args.checkpoint_every,
        max_minutes=args.max_minutes,
        seed=args.seed,
        mixed_precision=args.mixed_precision,
        network=network,
        synthesis=SynthesisConfig(
            same_contrast=args.same_contrast,
            t1_like=args.t1_like,
            other_subject=args.other_subject,
            zero_background=args.zero_background,
        ),
    )
    config.check()
    return config


def _train(args: argparse.Namespace) -> None:
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    device = resolve_device(args.device)
    label_maps = None
    if args.label_maps:
        files = _label_map_files(args.label_maps)
        print(f"loading {len(files)} label maps at {config.spacing_mm:g} mm")
        align = config.synthesis.other_subject > 0
        if align:
            Path(args.out).mkdir(parents=True, exist_ok=True)
        label_maps = load_label_maps(
            files,
            config.spacing_mm,
            args.background_from,
            align=align,
            progress=lambda message: print(message, flush=True),
            cache=Path(args.out) / ALIGNED_LABEL_MAPS if align else None,
        )
    result = train(
        config,
        args.out,
        name=args.name,
        model_dir=args.model_dir,
        label_maps=label_maps,
        real_pairs=read_pairs(args.real_pairs) if args.real_pairs else (),
        validation=read_pairs(args.validation) if args.validation else (),
        eval_labels=parse_labels(args.eval_labels, "--eval-labels"),
        device=device,
        resume=args.resume,
        init_model=args.init_model,
        progress=lambda message: print(message, flush=True),
    )
    print(json.dumps(result.summary["validation"], indent=2))


def run_train(args: argparse.Namespace) -> int:
    """Run the subcommand; 0 on success, 2 for unusable input (message printed), 1 otherwise."""
    return run_reporting_errors("deepregister train", lambda: _train(args))
