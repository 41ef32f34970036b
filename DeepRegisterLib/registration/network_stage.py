"""The network stage: the model's velocity field for the pair after the affine stage."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import ModelError, stop_if_cancelled
from ..nn.losses import similarity_to
from ..nn.models import ModelInfo, load_model
from ..nn.networks import integrate_velocity, resize_flow, warp
from .contrast import in_contrast_of
from .grid_images import GridImages
from .job import Job
from .optimisation import downsample_image, level_mask, level_shape
from .progress import Stages

# The default model's check runs on a grid this many times coarser (never under 8 voxels).
GUARD_REDUCTION = 2.0


@dataclass(frozen=True)
class NetworkOutcome:
    """The network's velocity (``None`` without a network, or when a default model's output
    was not used), the model it came from, its passes and the notes so far."""

    velocity: torch.Tensor | None
    model_info: ModelInfo | None
    passes: int
    notes: tuple[str, ...]


def network_stage(
    stages: Stages, job: Job, images: GridImages, device: torch.device, notes: tuple[str, ...]
) -> NetworkOutcome:
    info = job.model_info
    if info is None:
        return NetworkOutcome(None, None, 0, notes)
    passes = info.passes
    if job.preset.network_passes is not None:
        passes = min(passes, job.preset.network_passes)
    stages.report("network", 0.0, f"running model {info.name}")
    network = load_model(info, device)
    m_in = images.moving
    if job.settings.similarity == "mind" and info.contrast == "same":
        m_in, note = in_fixed_contrast(images.moving, images.fixed, info.name)
        stages.report("network", 0.1, note)
        notes = (*notes, note)
    # The forward pass takes seconds on a head-sized grid: asked before every layer.
    for layer in network.modules():
        if not any(layer.children()):
            layer.register_forward_pre_hook(lambda *_: stages.check("while running the network"))
    with torch.inference_mode():
        symmetric = job.preset.symmetric_network_in_3d or info.network.dim != 3
        velocity = network.recursive_velocity(images.fixed, m_in, passes, symmetric).clone()
    del m_in
    stages.check("after the network")
    if not bool(torch.isfinite(velocity).all()):
        raise ModelError(
            f"model {info.name!r} produced non-finite (NaN or infinite) output: its "
            "weights are corrupt or it was trained badly; reinstall or retrain it"
        )
    if job.default_model:
        steps = info.network.integration_steps
        before, after = _similarity_change(job, images, velocity, steps, stages.cancelled)
        if not after < before:
            # A model chosen for the user must not make things worse: images unlike its
            # training data (another anatomy or contrast) can mislead it.
            note = (
                f"model: the default model {info.name!r} made the {job.settings.similarity} "
                f"loss worse than the affine alone ({before:.4f} → {after:.4f}), so its "
                "output was not used; these images may be unlike its training data"
            )
            stages.report("network", 1.0, note)
            notes, velocity, info = (*notes, note), None, None
    stages.report("network", 1.0, "network done")
    return NetworkOutcome(velocity, info, passes, notes)


def in_fixed_contrast(
    moving: torch.Tensor, fixed: torch.Tensor, model_name: str
) -> tuple[torch.Tensor, str]:
    """The network's moving input for a cross-contrast run, and the note that says so.

    A same-contrast model fed an unrelated contrast deforms at random (measured: worse than the
    affine alone on 20 of 20 T1 → T2-like fs-dev pairs), so it sees the moving image mapped into
    the fixed image's contrast; the MIND loss that follows still compares the images as they are.
    """
    mapped = in_contrast_of(fixed, moving)
    if mapped is None:
        return moving, "contrast: the moving image is constant here, so it was not remapped"
    return mapped, (
        f"contrast: model {model_name!r} is trained for same-contrast pairs, so its moving input "
        "was mapped into the fixed image's contrast (joint histogram after the affine stage)"
    )


def _similarity_change(
    job: Job,
    images: GridImages,
    velocity: torch.Tensor,
    integration_steps: int,
    is_cancelled: Callable[[], bool],
) -> tuple[float, float]:
    """The optimisation's loss after the affine alone, and after the network's deformation as
    well (lower is better), on the network grid at half its resolution: the question is whether
    the network helps at all, and the full grid took 0.5 s of a brain's run to answer it."""
    shape = level_shape(tuple(images.fixed.shape[2:]), GUARD_REDUCTION)
    fixed, moving = downsample_image(images.fixed, shape), downsample_image(images.moving, shape)
    mask, data = (level_mask(image, shape, fixed.dtype) for image in (images.mask, images.data))
    similarity = job.settings.similarity
    window = job.preset.window_for(similarity)
    loss = similarity_to(similarity, fixed, mask, window, data)
    with torch.inference_mode():
        before = float(loss(moving))
        stop_if_cancelled(is_cancelled, "after the network")
        flow = integrate_velocity(resize_flow(velocity, shape), integration_steps)
        stop_if_cancelled(is_cancelled, "after the network")
        return before, float(loss(warp(moving, flow)))
