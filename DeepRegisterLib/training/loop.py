"""Training a registration network, and saving it as a model the engine can load.

Training pairs are synthesised from label maps (:mod:`synthesis`) and, optionally, drawn from
real image pairs (:mod:`pairs`); the loss is :mod:`objective`'s. Validation (:mod:`validation`)
runs the network exactly as the engine would; the best validated weights become the model.

Every batch item is drawn from a generator seeded by (seed, step, place in the batch), and
checkpoints hold the model and optimiser tensors, so a resumed run continues at the next step
with exactly the batches and state an uninterrupted run would have had.

Launched by ``torchrun``, each process trains on its own share of every step's batch and DDP
averages the gradients (:mod:`step`); only the main process validates, logs and writes.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import InputError
from ..nn import forked_children
from ..nn.models import ModelInfo, find_model
from ..nn.networks import VxmDense
from .checkpoints import (
    BEST,
    CHECKPOINT,
    RunState,
    load_checkpoint,
    load_parent_weights,
    save_checkpoint,
)
from .config import TrainingConfig
from .distributed import Ranks
from .label_maps import LabelMaps
from .log import CURVES, LOG, TrainingLog, plot_curves
from .pairs import PairFiles, RealPairs
from .precision import slow_mixed_precision_note
from .step import TrainingStep
from .summary import TrainingResult, save_best_model, training_data
from .synthesis import Synthesiser
from .validation import Validator, validation_pairs

PROGRESS_INTERVAL_S = 30.0

Progress = Callable[[str], None]


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
) -> TrainingResult | None:
    """Train, validate, checkpoint; save the best validated network as model ``name``.

    Without ``label_maps`` the synthesiser draws random shapes; without ``validation`` pairs
    (real, with labels) held-out synthetic pairs are the validation. ``out_dir`` receives
    ``checkpoint.pt``, ``best.pt``, ``log.csv`` and ``curves.png``; the model goes to
    ``model_dir`` (default ``out_dir``). With ``resume`` the run continues after the last
    checkpoint in ``out_dir``; ``init_model`` (a model name or path) starts a new run from a
    model's weights instead of random ones, to fine-tune it or continue a coarser stage.

    In a process group (``torchrun``; see :mod:`distributed`) every process calls this with
    the same arguments and its own device; the main process returns the result, the others
    ``None``. ``out_dir`` must then be one folder all processes read (a resume loads it).
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
    ranks = Ranks.current()
    say = (progress if ranks.is_main else None) or _silent
    forked_children.guard()
    for note in (slow_mixed_precision_note(device, config.mixed_precision), forked_children.note()):
        if note:
            say(note)

    synthesiser = Synthesiser(config.shape, config.synthesis, label_maps, device)
    validator = None
    if ranks.is_main:
        pairs = validation_pairs(config, synthesiser, validation, eval_labels, say)
        validator = Validator(pairs, config, device, out / BEST, say)

    network, optimiser, state, parent = _starting_point(
        config, out / CHECKPOINT if resume else None, init_model, device, say
    )
    if ranks.from_main(state.step, device) != state.step:
        raise InputError(
            f"this process found another checkpoint in {out} than the main process: give "
            "every process the same output folder (a shared file system across machines)"
        )

    real = None
    if real_pairs:
        real = RealPairs(real_pairs, config.spacing_mm, config.dim)
    trainer = TrainingStep(network, optimiser, config, synthesiser, real, ranks)
    _Session(config, network, optimiser, trainer, validator, out, state, say).run()

    result = None
    if validator is not None:
        result = save_best_model(
            network, config, state, validator, out=out,
            model_dir=Path(model_dir) if model_dir is not None else out, name=name,
            data=training_data(label_maps, real_pairs, init_model, parent),
            real_validation=bool(validation), parent=parent, processes=ranks.world_size,
        )  # fmt: skip
    ranks.barrier()  # the others wait until the model is saved
    return result


def _starting_point(
    config: TrainingConfig,
    checkpoint: Path | None,
    init_model: str | Path | None,
    device: torch.device,
    say: Progress,
) -> tuple[VxmDense, torch.optim.Optimizer, RunState, ModelInfo | None]:
    """The network and optimiser to train, and where the run stands: random weights from the
    seed, a model's (``init_model``), or the ``checkpoint`` to resume when it exists."""
    torch.manual_seed(config.seed)
    network = VxmDense(config.network).to(device)
    resuming = checkpoint is not None and checkpoint.exists()
    parent = None if init_model is None else find_model(init_model)
    if parent is not None and not resuming:
        load_parent_weights(network, parent)
        say(f"starting from the weights of model {parent.name!r}")
    optimiser = torch.optim.Adam(network.parameters(), lr=config.learning_rate)
    state = RunState()
    if resuming:
        state = load_checkpoint(checkpoint, network, optimiser, device)
        say(f"resuming after step {state.step} ({state.elapsed_s / 60:.1f} min trained)")
    return network, optimiser, state, parent


def _silent(message: str) -> None:
    """The progress of processes other than the main one, which say nothing."""


class _Session:
    """The step loop of one session of a run, and what the main process does around it:
    validation, the log, checkpoints, progress. The other processes wait at a barrier while
    it writes, so that none runs ahead into a step the main process may not take."""

    def __init__(
        self,
        config: TrainingConfig,
        network: VxmDense,
        optimiser: torch.optim.Optimizer,
        trainer: TrainingStep,
        validator: Validator | None,
        out: Path,
        state: RunState,
        say: Progress,
    ):
        self.config, self.network, self.optimiser = config, network, optimiser
        self.trainer, self.validator, self.out, self.state, self.say = (
            trainer, validator, out, state, say,
        )  # fmt: skip
        self.ranks = trainer.ranks
        self.log = TrainingLog(out / LOG, keep_through_step=state.step) if validator else None

    def run(self) -> None:
        config, state = self.config, self.state
        start = state.step
        if start == 0 and self.validator is not None:
            state.initial_scores = self.validator(self.network, state)
            self.log.write({"step": 0, "elapsed_s": 0.0, "val_dice": np.mean(state.initial_scores)})
        self.ranks.barrier()
        session_start, last_report = time.perf_counter(), -math.inf
        try:
            for step in range(start + 1, config.steps + 1):
                tick = time.perf_counter()
                losses = self.trainer(step)
                state.step, state.elapsed_s = step, state.elapsed_s + time.perf_counter() - tick
                out_of_time = config.max_minutes is not None and bool(
                    self.ranks.from_main(state.elapsed_s >= 60 * config.max_minutes, self.device)
                )
                final = step == config.steps or out_of_time
                row = self._after_step(losses, final)
                if row and (time.perf_counter() - last_report >= PROGRESS_INTERVAL_S or final):
                    last_report = time.perf_counter()
                    self._report(row, (last_report - session_start) / (step - start))
                if out_of_time:
                    self.say(f"time budget of {config.max_minutes} min reached at step {step}")
                    break
        finally:
            if self.log is not None:
                self.log.close()
        if self.validator is not None:
            plot_curves(self.log.rows, self.out / CURVES, self.validator.affine_only)

    @property
    def device(self) -> torch.device:
        return self.trainer.device

    def _after_step(self, losses: dict[str, float], final: bool) -> dict[str, Any] | None:
        """The main process validates, logs and checkpoints; the others wait for it to finish.
        The step's log row (main process only)."""
        config, state = self.config, self.state
        validate = state.step % config.validate_every == 0 or final
        checkpoint = state.step % config.checkpoint_every == 0 or final
        row = None
        if self.validator is not None:
            row = {"step": state.step, "elapsed_s": state.elapsed_s, **losses}
            if validate:
                tick = time.perf_counter()
                row["val_dice"] = float(np.mean(self.validator(self.network, state)))
                state.elapsed_s += time.perf_counter() - tick
            self.log.write(row)
            if checkpoint:
                save_checkpoint(self.out / CHECKPOINT, self.network, self.optimiser, state)
        if validate or checkpoint:
            self.ranks.barrier()
        return row

    def _report(self, row: dict[str, Any], seconds_per_step: float) -> None:
        terms = ", ".join(
            f"{label} {row[key]:.4f}"
            for key, label in (
                ("similarity", "similarity"),
                ("regularization", "regularization"),
                ("dice_loss", "Dice loss"),
            )
            if key in row
        )
        left = self.config.steps - self.state.step
        self.say(
            f"step {self.state.step}/{self.config.steps}: loss {row['loss']:.4f} ({terms}); "
            f"{seconds_per_step:.2f} s/step, ETA {seconds_per_step * left / 60:.1f} min"
        )
