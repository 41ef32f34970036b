"""Training a registration network, and saving it as a model the engine can load.

Training pairs are synthesised from label maps (:mod:`synthesis`) and, optionally, drawn from
real image pairs; the loss is a similarity + a diffusion regulariser + an optional soft Dice on
warped labels (semi-supervised, as VoxelMorph). Validation runs the network exactly as the
engine would on real pairs (affine first, then the network on the isotropic grid cropped to the
fixed foreground) and scores mean Dice; the best validated weights become the model.

Every step's batch is drawn from a generator seeded by (seed, step), and checkpoints hold the
model and optimiser tensors, so a resumed run continues at the next step with exactly the
batches and state an uninterrupted run would have had.
"""

from __future__ import annotations

import contextlib
import csv
import itertools
import math
import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .. import __version__
from ..errors import InputError
from ..imaging.fileio import IMAGE_SUFFIXES, atomic_write_path, full_suffix, read_image
from ..imaging.geometry import Grid, flow_voxels_to_mm
from ..imaging.metrics import dice_per_label, mean_dice
from ..imaging.resampling import network_inputs
from ..nn.losses import SIMILARITIES, diffusion, similarity_function, soft_dice
from ..nn.models import MAX_PASSES, ModelInfo, find_model, load_model, save_model
from ..nn.networks import NetworkConfig, VxmDense, integrate_velocity, warp
from ..registration.affine import register_normalised
from ..registration.preprocessing import foreground_box, normalised_for_registration
from .synthesis import LabelMaps, SynthesisConfig, Synthesiser

CHECKPOINT, BEST, LOG, CURVES = "checkpoint.pt", "best.pt", "log.csv", "curves.png"
ALIGNED_LABEL_MAPS = "aligned-label-maps.pt"  # the CLI's cache of aligned maps, for --resume
LOG_FIELDS = ("step", "elapsed_s", "loss", "similarity", "regularization", "dice_loss", "val_dice")
LR_SCHEDULES = ("constant", "cosine")
SYNTHETIC_VALIDATION_PAIRS = 4
PROGRESS_INTERVAL_S = 30.0

Progress = Callable[[str], None]


@dataclass(frozen=True)
class TrainingConfig:
    """What to train and how; recorded in the model's JSON."""

    shape: tuple[int, ...]  # training crop, array order; a multiple of the network's 2**levels
    spacing_mm: float = 2.0
    steps: int = 1000
    batch_size: int = 1
    learning_rate: float = 1e-4
    lr_schedule: str = "constant"  # "cosine": from learning_rate down to 0 at the last step
    similarity: str = "lncc"
    similarity_weight: float = 1.0  # 0: labels alone teach the alignment (SynthMorph's loss)
    regularization: float = 1.0
    dice_weight: float = 1.0
    # 0: the loss sees one one-sided forward pass (VoxelMorph's). n ≥ 1: it sees what the engine
    # runs, n recursive symmetric passes (2n forward passes a step), trained end to end as a
    # weight-shared recursive cascade; validation and the saved model's JSON use n passes too.
    passes: int = 0
    real_fraction: float = 0.5  # share of batch items drawn from real pairs, when there are any
    validate_every: int = 100
    checkpoint_every: int = 50
    max_minutes: float | None = None  # stop (and save) after this much training time in total
    seed: int = 0
    mixed_precision: bool | None = None  # bfloat16 autocast of the U-Net; None: on a GPU only
    network: NetworkConfig = field(default_factory=NetworkConfig)
    synthesis: SynthesisConfig = field(default_factory=SynthesisConfig)

    @property
    def dim(self) -> int:
        return len(self.shape)

    def check(self) -> None:
        """Refuse a config that would fail (or silently mis-train) only after minutes of work."""
        if self.dim not in (2, 3):
            raise InputError(f"the training shape must have 2 or 3 sizes, got {self.shape}")
        if self.network.dim != self.dim:
            raise InputError(
                f"the network is {self.network.dim}D but the training shape is {self.dim}D"
            )
        multiple = self.network.multiple
        if any(n <= 0 or n % multiple for n in self.shape):
            raise InputError(
                f"each training size must be a positive multiple of {multiple} (2**levels of "
                f"the network), got {self.shape}"
            )
        if self.similarity not in SIMILARITIES:
            raise InputError(
                f"unknown similarity {self.similarity!r}; choose {', '.join(SIMILARITIES)}"
            )
        positive = {
            "steps": self.steps,
            "batch size": self.batch_size,
            "learning rate": self.learning_rate,
            "spacing": self.spacing_mm,
            "validate-every": self.validate_every,
            "checkpoint-every": self.checkpoint_every,
        }
        for name, value in positive.items():
            if not value > 0:
                raise InputError(f"the {name} must be > 0, got {value}")
        if self.lr_schedule not in LR_SCHEDULES:
            raise InputError(
                f"unknown learning-rate schedule {self.lr_schedule!r}; choose "
                f"{', '.join(LR_SCHEDULES)}"
            )
        if not 0 <= self.passes <= MAX_PASSES:
            raise InputError(f"the passes must be from 0 to {MAX_PASSES}, got {self.passes}")
        if min(self.similarity_weight, self.regularization, self.dice_weight) < 0:
            raise InputError("the similarity, regularization and Dice weights must be ≥ 0")
        if self.similarity_weight == 0 and self.dice_weight == 0:
            raise InputError(
                "with both the similarity and the Dice weight at 0 nothing drives the alignment; "
                "give one of them a positive weight"
            )
        for name, value in (
            ("real-pair fraction", self.real_fraction),
            ("same-contrast probability", self.synthesis.same_contrast),
            ("T1-like probability", self.synthesis.t1_like),
            ("other-subject probability", self.synthesis.other_subject),
            ("zero-background probability", self.synthesis.zero_background),
        ):
            if not 0 <= value <= 1:
                raise InputError(f"the {name} must be in [0, 1], got {value}")

    @property
    def inference_passes(self) -> int:
        """The recursive passes validation and the saved model use: one for a one-sided run."""
        return max(1, self.passes)

    def learning_rate_at(self, step: int) -> float:
        """The rate for ``step`` (1-based): a function of the step alone, so resuming is exact."""
        if self.lr_schedule == "cosine":
            return self.learning_rate * 0.5 * (1 + math.cos(math.pi * (step - 1) / self.steps))
        return self.learning_rate

    def to_json(self) -> dict[str, Any]:
        data = asdict(self)
        data["shape"] = list(self.shape)
        data["network"] = self.network.to_json()
        return data


# --- real pairs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class PairFiles:
    fixed: Path
    moving: Path
    fixed_labels: Path | None = None
    moving_labels: Path | None = None

    @property
    def name(self) -> str:
        """``sub-02/brainmask→sub-01/brainmask``: folder and file, as data sets name subjects."""
        return f"{_short(self.moving)}→{_short(self.fixed)}"


def _short(path: Path) -> str:
    stem = path.name[: -len(full_suffix(path))] if full_suffix(path) else path.name
    return f"{path.parent.name}/{stem}"


def read_pairs_csv(path: str | Path) -> list[PairFiles]:
    """Pairs from a CSV with columns ``fixed,moving[,fixed_labels,moving_labels]``.

    Relative paths are taken relative to the CSV's folder, so a data set travels as one folder.
    """
    path = Path(path)
    try:
        with path.open(newline="") as stream:
            rows = list(csv.DictReader(stream))
    except OSError as error:
        raise InputError(f"cannot read the pair list {path}: {error}") from None
    if not rows or not {"fixed", "moving"} <= set(rows[0]):
        raise InputError(f"{path} needs a header with at least the columns 'fixed' and 'moving'")

    def resolve(value: str | None) -> Path | None:
        if not value:
            return None
        file = Path(value) if Path(value).is_absolute() else path.parent / value
        if not file.exists():
            raise InputError(f"{path}: file not found: {file}")
        return file

    pairs = []
    for row in rows:
        fixed, moving = resolve(row["fixed"]), resolve(row["moving"])
        if fixed is None or moving is None:
            raise InputError(f"{path}: every row needs a fixed and a moving image")
        pairs.append(
            PairFiles(
                fixed, moving, resolve(row.get("fixed_labels")), resolve(row.get("moving_labels"))
            )
        )
    return pairs


def pairs_in_folder(folder: str | Path) -> list[PairFiles]:
    """Every ordered pair of the images in ``folder`` (no labels: use a CSV for those)."""
    folder = Path(folder)
    images = sorted(p for p in folder.iterdir() if full_suffix(p) in IMAGE_SUFFIXES)
    if len(images) < 2:
        raise InputError(f"{folder} holds {len(images)} images; pairs need at least 2")
    return [PairFiles(f, m) for f, m in itertools.permutations(images, 2)]


def read_pairs(source: str | Path) -> list[PairFiles]:
    """Pairs from a CSV file or a folder of images."""
    source = Path(source)
    if source.is_dir():
        return pairs_in_folder(source)
    if not source.exists():
        raise InputError(f"pair list not found: {source}")
    return read_pairs_csv(source)


def _tensor(image: sitk.Image, dtype=torch.float32) -> torch.Tensor:
    array = sitk.GetArrayFromImage(image)
    return torch.from_numpy(array.astype(np.float32 if dtype == torch.float32 else np.int64))[
        None, None
    ]


@dataclass
class PreparedPair:
    """A pair on the network grid, after the affine stage, as the engine would feed it.

    Tensors are (1, 1, *grid.shape); labels are original label values (int64) or ``None``.
    """

    name: str
    grid: Grid
    affine: sitk.Transform
    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor | None
    moving_labels: torch.Tensor | None
    moving_labels_image: sitk.Image | None


def prepare_pair(files: PairFiles, spacing_mm: float, multiple: int, seed: int = 0) -> PreparedPair:
    """Affine-align a pair and resample it to the network grid (the engine's preprocessing)."""
    fixed = read_image(files.fixed, "fixed image")
    moving = read_image(files.moving, "moving image")
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(f"{files.name}: the fixed and moving images differ in dimension")
    dim = fixed.GetDimension()
    fixed_norm = normalised_for_registration(fixed)
    moving_norm = normalised_for_registration(moving)
    affine = register_normalised(fixed_norm, moving_norm, seed=seed)
    grid = Grid.of(fixed).with_spacing_cropped_to(
        spacing_mm, *foreground_box(fixed, fixed_norm > 0.05), multiple
    )
    reference = grid.reference_image()
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    fixed_net, moving_net, _ = network_inputs(fixed_norm, moving_norm, reference, affine)

    def labels(
        path: Path | None, transform: sitk.Transform
    ) -> tuple[sitk.Image | None, torch.Tensor | None]:
        if path is None:
            return None, None
        image = read_image(path, "label map")
        if image.GetDimension() != dim:
            raise InputError(f"label map {path} is {image.GetDimension()}D, images are {dim}D")
        image = sitk.Cast(image, sitk.sitkInt32)
        on_grid = sitk.Resample(image, reference, transform, sitk.sitkNearestNeighbor, 0)
        return image, _tensor(on_grid, torch.int64)

    _, fixed_labels = labels(files.fixed_labels, identity)
    moving_labels_image, moving_labels = labels(files.moving_labels, affine)
    return PreparedPair(
        files.name, grid, affine, _tensor(fixed_net), _tensor(moving_net), fixed_labels,
        moving_labels, moving_labels_image,
    )  # fmt: skip


class RealPairs:
    """Real training pairs, prepared (affine + resampling) when first drawn and then cached."""

    def __init__(self, files: Sequence[PairFiles], spacing_mm: float, multiple: int, dim: int):
        if not files:
            raise InputError("the real pair list is empty")
        self.files = list(files)
        self.spacing_mm, self.multiple, self.dim = spacing_mm, multiple, dim
        self._cache: dict[int, PreparedPair] = {}

    def __len__(self) -> int:
        return len(self.files)

    def prepared(self, index: int) -> PreparedPair:
        if index not in self._cache:
            pair = prepare_pair(self.files[index], self.spacing_mm, self.multiple)
            if pair.grid.dim != self.dim:
                raise InputError(f"{pair.name} is {pair.grid.dim}D; training is {self.dim}D")
            self._cache[index] = pair
        return self._cache[index]

    def draw(self, generator: torch.Generator, shape: tuple[int, ...]) -> _Item:
        """A random crop (zero-padded where the grid is smaller) of a random pair."""
        pair = self.prepared(int(torch.randint(len(self.files), (), generator=generator)))
        starts = [
            int(torch.randint(abs(g - s) + 1, (), generator=generator))
            for g, s in zip(pair.grid.shape, shape, strict=True)
        ]

        def crop(volume: torch.Tensor) -> torch.Tensor:
            out = volume.new_zeros((1, 1, *shape))
            source, target = [slice(None)] * 2, [slice(None)] * 2
            for g, s, start in zip(pair.grid.shape, shape, starts, strict=True):
                length = min(g, s)
                source.append(slice(start, start + length) if g > s else slice(0, g))
                target.append(slice(0, s) if g > s else slice(start, start + length))
            out[tuple(target)] = volume[tuple(source)]
            return out

        labels = None
        if pair.fixed_labels is not None and pair.moving_labels is not None:
            labels = (crop(pair.fixed_labels), crop(pair.moving_labels))
        return _Item(crop(pair.fixed), crop(pair.moving), labels)


# --- validation -----------------------------------------------------------------------------


@dataclass
class ValidationPair:
    """Network inputs of one pair and how to score a voxel flow on it (mean Dice)."""

    name: str
    fixed: torch.Tensor
    moving: torch.Tensor
    score: Callable[[torch.Tensor | None], float]  # None: no deformation (affine only)


def real_validation_pair(
    files: PairFiles, spacing_mm: float, multiple: int, labels: Sequence[int] | None = None
) -> ValidationPair:
    """Mean Dice on the network grid of labels warped by ``A(x + u(x))`` in one resampling.

    Composing the affine and the flow before resampling (as the engine does) keeps the moving
    labels from being interpolated twice, which would penalise the network unfairly.
    """
    if files.fixed_labels is None or files.moving_labels is None:
        raise InputError(f"validation pair {files.name} needs fixed and moving label maps")
    pair = prepare_pair(files, spacing_mm, multiple)
    reference = pair.grid.reference_image()
    fixed_labels = sitk.GetImageFromArray(pair.fixed_labels[0, 0].numpy().astype(np.int32))
    pair.grid.apply_to(fixed_labels)

    def score(flow: torch.Tensor | None) -> float:
        transform: sitk.Transform = pair.affine
        if flow is not None:
            mm = flow_voxels_to_mm(flow.detach().double().cpu(), pair.grid)[0]
            field = pair.grid.apply_to(
                sitk.GetImageFromArray(mm.movedim(0, -1).numpy(), isVector=True)
            )
            # ITK applies a composite's last transform first: x ↦ A(x + u(x)).
            transform = sitk.CompositeTransform(
                [pair.affine, sitk.DisplacementFieldTransform(field)]
            )
        warped = sitk.Resample(
            pair.moving_labels_image, reference, transform, sitk.sitkNearestNeighbor, 0
        )
        return mean_dice(dice_per_label(fixed_labels, warped, labels))

    return ValidationPair(pair.name, pair.fixed, pair.moving, score)


def _label_dice(fixed: torch.Tensor, warped: torch.Tensor) -> float:
    """Mean Dice over the non-zero labels of ``fixed`` (integer tensors)."""
    values = [v for v in torch.unique(fixed).tolist() if v != 0]
    scores = []
    for value in values:
        a, b = fixed == value, warped == value
        scores.append(2.0 * float((a & b).sum()) / float(a.sum() + b.sum()))
    return float(np.mean(scores)) if scores else float("nan")


def synthetic_validation_pairs(
    synthesiser: Synthesiser, count: int, seed: int
) -> list[ValidationPair]:
    """Held-out synthetic pairs scored by label Dice: validation that needs no data at all."""
    generator = torch.Generator(device=synthesiser.device).manual_seed(seed + 7_777_777)
    pairs = []
    for index in range(count):
        pair = synthesiser(generator)

        def score(flow: torch.Tensor | None, pair=pair) -> float:
            moving = pair.moving_labels.float()
            if flow is not None:
                moving = warp(moving, flow.to(moving.device), mode="nearest")
            return _label_dice(pair.fixed_labels, moving.round().long())

        pairs.append(ValidationPair(f"synthetic-{index}", pair.fixed, pair.moving, score))
    return pairs


def network_scores(
    network: VxmDense,
    pairs: Sequence[ValidationPair],
    device: torch.device,
    mixed_precision: bool | None = None,
    passes: int = 1,
) -> list[float]:
    """Mean Dice per pair with the network's flow alone (no instance optimisation), from the
    symmetric inference the engine runs (``passes``: as its model JSON says)."""
    was_training = network.training
    network.eval()
    scores = []
    with torch.inference_mode(), _autocast(device, mixed_precision):
        for pair in pairs:
            fixed, moving = pair.fixed.to(device), pair.moving.to(device)
            velocity = network.recursive_velocity(fixed, moving, passes).float()
            flow = integrate_velocity(velocity, network.config.integration_steps)
            scores.append(pair.score(flow))
    network.train(was_training)
    return scores


def _autocast(device: torch.device, mixed_precision: bool | None):
    """bfloat16 autocast (no loss scaling needed); by default on a GPU only."""
    if mixed_precision or (mixed_precision is None and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# --- the training loop -----------------------------------------------------------------------


@dataclass
class _Item:
    fixed: torch.Tensor
    moving: torch.Tensor
    labels: tuple[torch.Tensor, torch.Tensor] | None


def _step_generator(seed: int, step: int, device: torch.device) -> torch.Generator:
    """One generator per step: a step's batch never depends on how the run was interrupted."""
    return torch.Generator(device=device).manual_seed(seed * 1_000_003 + step)


def _dice_loss(fixed: torch.Tensor, moving: torch.Tensor, flow: torch.Tensor) -> torch.Tensor:
    """Soft Dice of one-hot moving labels warped by ``flow`` against the fixed labels.

    One-hot over the labels present in this pair only (background left out), which keeps the
    channel count — and the cost of warping them — as small as the pair allows.
    """
    values, inverse = torch.unique(torch.stack([fixed, moving]), return_inverse=True)
    count = len(values)
    fixed_1h = F.one_hot(inverse[0, :, 0], count).movedim(-1, 1).float()
    moving_1h = F.one_hot(inverse[1, :, 0], count).movedim(-1, 1).float()
    keep = slice(1, None) if values[0] == 0 and count > 1 else slice(None)
    return soft_dice(fixed_1h[:, keep], warp(moving_1h[:, keep], flow))


class _Log:
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


def _save_tensors(data: dict[str, Any], path: Path) -> None:
    with atomic_write_path(path) as staged:
        torch.save(data, staged)


@dataclass
class TrainingResult:
    model: ModelInfo
    summary: dict[str, Any]


def train(
    config: TrainingConfig,
    out_dir: str | Path,
    *,
    name: str = "model",
    model_dir: str | Path | None = None,
    label_maps: LabelMaps | None = None,
    real_pairs: Sequence[PairFiles] = (),
    validation: Sequence[PairFiles] = (),
    eval_labels: Sequence[int] | None = None,
    device: str | torch.device = "cpu",
    resume: bool = False,
    init_model: str | Path | None = None,
    progress: Progress | None = print,
) -> TrainingResult:
    """Train, validate, checkpoint; save the best validated network as model ``name``.

    Without ``label_maps`` the synthesiser draws random shapes; without ``validation`` pairs
    (real, with labels) held-out synthetic pairs are the validation. ``out_dir`` receives
    ``checkpoint.pt``, ``best.pt``, ``log.csv`` and ``curves.png``; the model goes to
    ``model_dir`` (default ``out_dir``). With ``resume`` the run continues after the last
    checkpoint in ``out_dir``; ``init_model`` (a model name or path) starts a new run from a
    model's weights instead of random ones, to fine-tune it or continue a coarser stage.
    """
    config.check()
    if config.similarity_weight == 0 and any(p.fixed_labels is None for p in real_pairs):
        raise InputError(
            "with a similarity weight of 0 every real training pair needs label maps: without "
            "them nothing but the regulariser would act on it"
        )
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device(device)
    say = progress or (lambda message: None)
    dim, multiple = config.dim, config.network.multiple

    synthesiser = Synthesiser(config.shape, config.synthesis, label_maps, device)
    real = RealPairs(real_pairs, config.spacing_mm, multiple, dim) if real_pairs else None
    if validation:
        say(f"preparing {len(validation)} validation pairs (affine + resampling)")
        val_pairs = [
            real_validation_pair(files, config.spacing_mm, multiple, eval_labels)
            for files in validation
        ]
    else:
        val_pairs = synthetic_validation_pairs(synthesiser, SYNTHETIC_VALIDATION_PAIRS, config.seed)
    if any(p.fixed.dim() - 2 != dim for p in val_pairs):
        raise InputError(f"the validation pairs must be {dim}D, like the training shape")
    affine_scores = [p.score(None) for p in val_pairs]
    affine_only = float(np.mean(affine_scores))
    say(f"validation, affine only: mean Dice {affine_only:.4f}")

    torch.manual_seed(config.seed)
    network = VxmDense(config.network).to(device)
    parent = None if init_model is None else find_model(init_model)
    if parent is not None and not (resume and (out / CHECKPOINT).exists()):
        if parent.network != config.network:
            raise InputError(
                f"model {parent.name!r} has another network ({parent.network}); give the same "
                "network options to start from it"
            )
        network.load_state_dict(load_model(parent).state_dict())
        say(f"starting from the weights of model {parent.name!r}")
    optimiser = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    similarity = similarity_function(config.similarity)
    start, elapsed, best_score, best_step = 0, 0.0, -math.inf, 0
    initial_scores: list[float] | None = None
    checkpoint_path = out / CHECKPOINT
    if resume and checkpoint_path.exists():
        state = torch.load(checkpoint_path, map_location=device, weights_only=True)
        if state["network"] != config.network.to_json():
            raise InputError(
                f"{checkpoint_path} was made for another network ({state['network']}); use a "
                "new output folder or the same network options"
            )
        network.load_state_dict(state["model"])
        optimiser.load_state_dict(state["optimiser"])
        start, elapsed = int(state["step"]), float(state["elapsed_s"])
        best_score, best_step = float(state["best_score"]), int(state["best_step"])
        initial_scores = list(state["initial_scores"])
        say(f"resuming after step {start} ({elapsed / 60:.1f} min trained)")
    log = _Log(out / LOG, keep_through_step=start)

    def validate(step: int) -> list[float]:
        nonlocal best_score, best_step
        scores = network_scores(
            network, val_pairs, device, config.mixed_precision, config.inference_passes
        )
        score = float(np.mean(scores))
        if score > best_score:
            best_score, best_step = score, step
            _save_tensors(_state_dict(network), out / BEST)
        each = " ".join(f"{s:.3f}" for s in scores)
        say(
            f"step {step}: validation mean Dice {score:.4f} (pairs: {each}; best "
            f"{best_score:.4f} @ {best_step})"
        )
        return scores

    def checkpoint(step: int) -> None:
        _save_tensors(
            {
                "model": _state_dict(network),
                "optimiser": optimiser.state_dict(),
                "step": step,
                "elapsed_s": elapsed,
                "best_score": best_score,
                "best_step": best_step,
                "initial_scores": initial_scores,
                "network": config.network.to_json(),
            },
            checkpoint_path,
        )

    if start == 0:
        initial_scores = validate(0)
        log.write({"step": 0, "elapsed_s": 0.0, "val_dice": float(np.mean(initial_scores))})

    network.train()
    step = start
    session_start = time.perf_counter()
    last_report = -math.inf
    try:
        for step in range(start + 1, config.steps + 1):
            tick = time.perf_counter()
            items = _draw_batch(config, synthesiser, real, step)
            losses = _losses(network, items, config, similarity, device)
            if not torch.isfinite(losses["loss"]):
                raise RuntimeError(f"the loss became {float(losses['loss'])} at step {step}")
            optimiser.zero_grad(set_to_none=True)
            for group in optimiser.param_groups:
                group["lr"] = config.learning_rate_at(step)
            losses["loss"].backward()
            optimiser.step()
            elapsed += time.perf_counter() - tick

            row: dict[str, Any] = {"step": step, "elapsed_s": elapsed}
            row.update({key: float(value.detach()) for key, value in losses.items()})
            out_of_time = config.max_minutes is not None and elapsed >= 60 * config.max_minutes
            final = step == config.steps or out_of_time
            if step % config.validate_every == 0 or final:
                tick = time.perf_counter()
                row["val_dice"] = float(np.mean(validate(step)))
                elapsed += time.perf_counter() - tick
            log.write(row)
            if step % config.checkpoint_every == 0 or final:
                checkpoint(step)
            if time.perf_counter() - last_report >= PROGRESS_INTERVAL_S or final:
                last_report = time.perf_counter()
                rate = (time.perf_counter() - session_start) / (step - start)
                terms = ", ".join(
                    f"{label} {row[key]:.4f}"
                    for key, label in (
                        ("similarity", "similarity"),
                        ("regularization", "regularization"),
                        ("dice_loss", "Dice loss"),
                    )
                    if key in row
                )
                say(
                    f"step {step}/{config.steps}: loss {row['loss']:.4f} ({terms}); "
                    f"{rate:.2f} s/step, "
                    f"ETA {rate * (config.steps - step) / 60:.1f} min"
                )
            if out_of_time:
                say(f"time budget of {config.max_minutes} min reached at step {step}")
                break
    finally:
        log.close()
    plot_curves(log.rows, out / CURVES, affine_only)

    # The best validated weights (possibly the initial ones: then the card must say so).
    network.load_state_dict(torch.load(out / BEST, map_location=device, weights_only=True))
    best_scores = network_scores(
        network, val_pairs, device, config.mixed_precision, config.inference_passes
    )
    summary = {
        "deepregister_version": __version__,
        "steps": step,
        "steps_planned": config.steps,
        "training_minutes": round(elapsed / 60, 2),
        "seconds_per_step": round(elapsed / max(step, 1), 3),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "machine": platform.machine(),
        "torch": torch.__version__,
        "config": config.to_json(),
        "data": {
            "label_maps": None if label_maps is None else label_maps.names,
            "label_map_spacing_mm": None if label_maps is None else label_maps.spacing_mm,
            "label_maps_aligned": None if label_maps is None else label_maps.aligned,
            "real_pairs": [p.name for p in real_pairs],
            "initial_weights": None if init_model is None else str(init_model),
            # By checksum too: a name may later stand for other weights.
            "initial_weights_sha256": None if parent is None else parent.sha256,
        },
        "validation": {
            "pairs": [p.name for p in val_pairs],
            "kind": "real" if validation else "synthetic",
            "metric": "mean Dice, network only (no instance optimisation)",
            "affine_only": affine_scores,
            "initial": initial_scores,  # step 0: random weights, or those of init_model
            "best": best_scores,
            "best_step": best_step,
        },
    }
    extra: dict[str, Any] = {
        "input_spacing_mm": config.spacing_mm,
        "passes": config.inference_passes,
        "similarity": config.similarity,
        "training": summary,
    }
    if parent is not None and parent.max_extent_mm is not None:
        # A fine-tune sees the parent's kind of images: its field-of-view guard still holds.
        extra["max_extent_mm"] = parent.max_extent_mm
    info = save_model(network, Path(model_dir) if model_dir is not None else out, name, extra)
    say(f"saved model {info.name!r} to {info.weights}")
    return TrainingResult(info, summary)


def _losses(
    network: VxmDense,
    items: Sequence[_Item],
    config: TrainingConfig,
    similarity: Callable[..., torch.Tensor],
    device: torch.device,
) -> dict[str, torch.Tensor]:
    """The weighted total ("loss") and its terms, named as the log's columns; a term whose
    weight is 0 is not computed (nor logged)."""
    fixed = torch.cat([i.fixed for i in items]).to(device)
    moving = torch.cat([i.moving for i in items]).to(device)
    with _autocast(device, config.mixed_precision):
        if config.passes:
            velocity = network.recursive_velocity(fixed, moving, config.passes)
        else:
            velocity = network.velocity(fixed, moving)
    flow = integrate_velocity(velocity.float(), config.network.integration_steps)
    terms = {"regularization": diffusion(flow), "dice_loss": flow.new_zeros(())}
    if config.similarity_weight > 0:
        terms["similarity"] = similarity(fixed, warp(moving, flow))
    labelled = [(n, i.labels) for n, i in enumerate(items) if i.labels is not None]
    if config.dice_weight > 0 and labelled:
        terms["dice_loss"] = sum(
            _dice_loss(f.to(device), m.to(device), flow[n : n + 1]) for n, (f, m) in labelled
        ) / len(labelled)
    total = config.regularization * terms["regularization"]
    total = total + config.dice_weight * terms["dice_loss"]
    if "similarity" in terms:
        total = total + config.similarity_weight * terms["similarity"]
    return {"loss": total, **terms}


def _state_dict(network: VxmDense) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in network.state_dict().items()}


def _draw_batch(
    config: TrainingConfig,
    synthesiser: Synthesiser,
    real: RealPairs | None,
    step: int,
) -> list[_Item]:
    generator = _step_generator(config.seed, step, synthesiser.device)
    items = []
    for _ in range(config.batch_size):
        use_real = (
            real is not None
            and float(torch.rand((), generator=generator, device=synthesiser.device))
            < config.real_fraction
        )
        if use_real:
            cpu_generator = torch.Generator().manual_seed(
                int(torch.randint(2**62, (), generator=generator, device=synthesiser.device))
            )
            items.append(real.draw(cpu_generator, config.shape))
        else:
            pair = synthesiser(generator)
            items.append(_Item(pair.fixed, pair.moving, (pair.fixed_labels, pair.moving_labels)))
    return items
