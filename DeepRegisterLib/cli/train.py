"""``deepregister train``: train a model on synthetic (and optionally real) pairs.

Kept apart from ``main.py`` so the command is wired in with two calls (:func:`add_train_parser`,
:func:`run_train`) and can be tested on its own. Torch and the training code are imported only
when training runs: the options' defaults come from the torch-free :mod:`training.config`, so
``deepregister --help`` stays fast.

``torchrun --nproc_per_node N -m DeepRegisterLib train ...`` trains in N processes (GPUs) with
DistributedDataParallel; see :mod:`DeepRegisterLib.training.distributed`.
"""

from __future__ import annotations

import argparse
import glob
import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import InputError
from ..nn.network_config import NetworkConfig
from ..registration.settings import SIMILARITIES
from ..training.config import LR_SCHEDULES, SynthesisConfig, TrainingConfig
from .exit_codes import run_reporting_errors

if TYPE_CHECKING:
    from ..training.label_maps import LabelMaps


def _config_option(
    group: Any, flag: str, help: str | None = None, *, config: type = TrainingConfig, **options
) -> None:
    """An option whose type and default are those of ``config``'s field of the same name (for
    ``--spacing``, ``spacing_mm``): the command line and the Python API share one default."""
    name = flag.removeprefix("--").replace("-", "_")
    fields = config.__dataclass_fields__
    default = fields[name if name in fields else f"{name}_mm"].default
    group.add_argument(flag, type=type(default), default=default, help=help, **options)


def add_train_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``train`` subcommand to ``parser.add_subparsers()``'s result."""
    parser = subparsers.add_parser(
        "train",
        help="train a registration model (SynthMorph-style synthetic pairs, optional real pairs)",
        description=(
            "Train a VoxelMorph-style network on pairs synthesised from label maps (or from "
            "random shapes when none are given), validate it on real labelled pairs, and save "
            "it as a model (weights + JSON + SHA-256) that 'deepregister register --model' "
            "loads. Checkpoints allow --resume. Launched by 'torchrun --nproc_per_node N -m "
            "DeepRegisterLib train ...', it trains in N processes (GPUs) with "
            "DistributedDataParallel."
        ),
    )
    _add_data_options(parser.add_argument_group("data"))
    _add_model_options(parser.add_argument_group("model"))
    _add_optimisation_options(parser.add_argument_group("optimisation"))
    parser.set_defaults(run=run_train)  # cli.main dispatches with args.run(args)
    return parser


def _add_data_options(data: Any) -> None:
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
    _config_option(
        data,
        "--same-contrast",
        "probability that a synthetic pair shares one contrast (default %(default)s: independent "
        "contrasts, as SynthMorph; higher values learn same-modality pairs in fewer steps)",
        metavar="P",
        config=SynthesisConfig,
    )
    _config_option(
        data,
        "--t1-like",
        "probability that a synthetic pair gets T1-like intensities (FreeSurfer label "
        "maps only; default %(default)s)",
        metavar="P",
        config=SynthesisConfig,
    )
    _config_option(
        data,
        "--other-subject",
        "probability that a synthetic pair's moving image comes from another label map "
        "than its fixed image (real inter-subject anatomy; the maps are first aligned to the "
        "first one by the affine stage). Default %(default)s: one map, randomly deformed",
        metavar="P",
        config=SynthesisConfig,
    )
    _config_option(
        data,
        "--zero-background",
        "probability that a synthetic pair's background (label 0) is exactly 0 in both "
        "images, as in skull-stripped scans (default %(default)s: a random contrast like any "
        "label)",
        metavar="P",
        config=SynthesisConfig,
    )
    data.add_argument(
        "--real-pairs",
        type=Path,
        help="real training pairs: a CSV (fixed,moving[,fixed_labels,moving_labels]) or a "
        "folder of images (every ordered pair); each pair is affine-aligned first",
    )
    _config_option(
        data,
        "--real-fraction",
        "share of pairs drawn from --real-pairs (default %(default)s)",
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


def _add_model_options(model: Any) -> None:
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
    _config_option(
        model,
        "--spacing",
        "isotropic training spacing, mm (default %(default)s)",
    )
    model.add_argument(
        "--encoder",
        type=int,
        nargs="+",
        help=f"encoder features per level (default {' '.join(map(str, NetworkConfig.encoder))})",
    )
    model.add_argument(
        "--decoder",
        type=int,
        nargs="+",
        help=f"decoder features per stage (default {' '.join(map(str, NetworkConfig.decoder))})",
    )
    model.add_argument(
        "--integration-steps",
        type=int,
        help=f"scaling-and-squaring steps (default {NetworkConfig.integration_steps})",
    )


def _add_optimisation_options(run: Any) -> None:
    _config_option(run, "--steps", "training steps (default %(default)s)")
    _config_option(
        run,
        "--batch-size",
        "pairs per step and process: torchrun's N processes train on N times as many "
        "(default %(default)s)",
    )
    _config_option(run, "--learning-rate", "Adam's learning rate (default %(default)s)")
    _config_option(
        run,
        "--lr-schedule",
        "cosine: decay the learning rate to 0 at the last step (default %(default)s)",
        choices=LR_SCHEDULES,
    )
    _config_option(run, "--similarity", choices=SIMILARITIES)
    _config_option(
        run,
        "--similarity-weight",
        "weight of the image similarity; 0 trains on label Dice alone, as SynthMorph does "
        "for contrast-agnostic models (default %(default)s)",
    )
    _config_option(run, "--regularization", "diffusion weight (default %(default)s)")
    _config_option(run, "--dice-weight", "weight of the soft Dice on labels (default %(default)s)")
    _config_option(
        run,
        "--passes",
        "0: train one one-sided forward pass, VoxelMorph's loss (default). n: train what "
        "the engine runs, n recursive symmetric passes end to end (2n forward passes a step); "
        "the model's JSON then asks the engine for n",
    )
    _config_option(run, "--validate-every")
    _config_option(run, "--checkpoint-every")
    run.add_argument(
        "--max-minutes", type=float, help="stop after this much training time, and save"
    )
    run.add_argument(
        "--init-model", help="start from this model's weights (name or .pt path): fine-tuning"
    )
    _config_option(run, "--seed")
    run.add_argument(
        "--device",
        default="auto",
        help="auto (GPU when present), cpu or cuda; under torchrun each process takes the GPU "
        "of its LOCAL_RANK",
    )
    run.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's own)")
    run.add_argument(
        "--mixed-precision",
        action=argparse.BooleanOptionalAction,
        help="bfloat16 autocast of the network (default: on a GPU only; on a CPU with "
        "bfloat16 instructions it saves about a third of the time, on one without them it is "
        "emulated and several times slower)",
    )
    run.add_argument("--resume", action="store_true", help="continue after the checkpoint in --out")


def _label_map_files(patterns: list[str]) -> list[Path]:
    files: list[Path] = []
    for pattern in patterns:
        matches = sorted(glob.glob(pattern)) if glob.has_magic(pattern) else [pattern]
        if not matches:
            raise InputError(f"--label-maps: nothing matches {pattern!r}")
        files.extend(Path(m) for m in matches)
    return files


def _network_config(args: argparse.Namespace) -> NetworkConfig:
    """The standard network, with the architecture options given."""
    given = {
        "encoder": None if args.encoder is None else tuple(args.encoder),
        "decoder": None if args.decoder is None else tuple(args.decoder),
        "integration_steps": args.integration_steps,
    }
    try:
        network = NetworkConfig(
            dim=len(args.shape), **{k: v for k, v in given.items() if v is not None}
        )
        network.validate()
    except ValueError as error:
        raise InputError(f"invalid network options: {error}") from None
    return network


def config_from_args(args: argparse.Namespace) -> TrainingConfig:
    """The training configuration the options describe (checked)."""
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
        network=_network_config(args),
        synthesis=SynthesisConfig(
            same_contrast=args.same_contrast,
            t1_like=args.t1_like,
            other_subject=args.other_subject,
            zero_background=args.zero_background,
        ),
    )
    config.check()
    return config


def _say(message: str) -> None:
    print(message, flush=True)


def _label_maps(
    args: argparse.Namespace, config: TrainingConfig, say: Callable[[str], None] | None
) -> LabelMaps | None:
    """The --label-maps, resampled (and aligned, for --other-subject: cached in --out)."""
    from ..training.label_maps import ALIGNED_LABEL_MAPS, load_label_maps

    if not args.label_maps:
        return None
    files = _label_map_files(args.label_maps)
    if say is not None:
        say(f"loading {len(files)} label maps at {config.spacing_mm:g} mm")
    align = config.synthesis.other_subject > 0
    if align:
        Path(args.out).mkdir(parents=True, exist_ok=True)
    return load_label_maps(
        files,
        config.spacing_mm,
        args.background_from,
        align=align,
        progress=say,
        cache=Path(args.out) / ALIGNED_LABEL_MAPS if align else None,
    )


def _train(args: argparse.Namespace) -> None:
    """Train as the options say: alone, or as one of the processes torchrun launched."""
    import torch

    from ..imaging.metrics import parse_labels
    from ..nn.devices import resolve_device
    from ..training.distributed import Ranks, main_first, process_group
    from ..training.loop import train
    from ..training.pairs import read_pairs

    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be ≥ 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    config = config_from_args(args)
    with process_group(resolve_device(args.device)) as device:
        ranks = Ranks.current()
        with main_first(ranks):  # the others then read the main process's aligned-map cache
            label_maps = _label_maps(args, config, _say if ranks.is_main else None)
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
            progress=_say,  # the main process's only
        )
    if result is not None:
        print(json.dumps(result.summary["validation"], indent=2))


def run_train(args: argparse.Namespace) -> int:
    """Run the subcommand; 0 on success, 2 for unusable input (message printed), 1 otherwise."""
    return run_reporting_errors("deepregister train", lambda: _train(args))
