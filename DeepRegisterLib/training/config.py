"""What to train and how: :class:`TrainingConfig` and the synthesis ranges it holds.

Torch-free at import, so that the command line can take its defaults from here and answer
``deepregister train --help`` without loading torch; the network's config (a torch module's
neighbour) is imported only when a default one is built or a config is checked.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import InputError
from ..nn.network_config import NetworkConfig
from ..registration.settings import SIMILARITIES

LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class SynthesisConfig:
    """Ranges of the random draws. A "max" is the top of a uniform draw from 0 per pair."""

    velocity_std: float = 3.0  # max std (voxels) of the velocity between fixed and moving
    velocity_spacing: float = 8.0  # voxels between the velocity's control points
    shape_std: float = 2.0  # max velocity std (voxels) of the shape change of a source map
    integration_steps: int = 7
    rotation_deg: float = 5.0  # max rotation about each axis between fixed and moving
    scaling: float = 0.05  # max relative scaling per axis
    shear: float = 0.02
    translation: float = 2.0  # max voxels per axis
    same_contrast: float = 0.0  # probability that both images share their label means
    # Probability that the moving labels come from another map than the fixed ones (maps
    # affinely aligned by ``load_label_maps(align=True)``): real inter-subject anatomy, which
    # the random shape changes of a single map do not reproduce.
    other_subject: float = 0.0
    # Probability that a pair's label means follow FREESURFER_T1_MEANS (each jittered by
    # ``t1_jitter``) instead of uniform draws: same-modality T1 pairs, learnt in far fewer
    # steps than SynthMorph's any-contrast pairs. Needs label maps in FreeSurfer's convention.
    t1_like: float = 0.0
    t1_jitter: float = 0.05
    # Probability that a pair's background (label 0) is exactly 0 in both images, as in
    # skull-stripped scans; otherwise it draws a contrast like any label. Random contrasts
    # alone rarely show a black background beside dark tissue, which T2-like scans have.
    zero_background: float = 0.0
    intensity_std: float = 0.1  # max within-label std, intensities drawn in [0, 1]
    blur_sigma: float = 1.0  # max Gaussian blur sigma (voxels)
    bias_std: float = 0.3  # max std of the log of the multiplicative bias field
    bias_spacing: float = 16.0  # voxels between the bias field's control points
    gamma_std: float = 0.25  # std of the log of the gamma exponent
    shape_labels: int = 16  # labels of generated maps (used when no label maps are given)
    shape_spacing: float = 8.0  # voxels between control points of generated maps


@dataclass(frozen=True)
class TrainingConfig:
    """What to train and how; recorded in the model's JSON.

    ``batch_size`` is per process: ``torchrun --nproc_per_node N`` trains on N times as many
    pairs a step, as :class:`torch.nn.parallel.DistributedDataParallel` does.
    """

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
        self._check_optimisation()
        self._check_probabilities()

    def _check_optimisation(self) -> None:
        from ..nn.models import MAX_PASSES

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

    def _check_probabilities(self) -> None:
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
