"""Instance optimisation: refine a stationary velocity field on one image pair.

Coarse-to-fine levels over the same physical box; at each level Adam updates a velocity whose
box-filtered version is used (a cheap preconditioner: every step moves smooth regions, so a
few dozen steps suffice), tapered to zero at the box border so the deformation joins the
surrounding affine-only region continuously. Scaling and squaring keeps it diffeomorphic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..errors import stop_if_cancelled
from ..nn.filters import box_filter
from ..nn.losses import similarity_function, similarity_to
from ..nn.networks import integrate_velocity, resize_flow, warp
from ..nn.regularizers import diffusion, folding_penalty
from .presets import Level

CONTROL_MIN_VOXELS = 16


class Adam:
    """Adam (Kingma & Ba 2015) for one tensor.

    ``torch.optim.Adam`` imports torch's compiler stack on first use (about 1.5 s, which a
    cancel request could not interrupt, paid by every command-line run); this is the same update.
    """

    def __init__(self, parameter: torch.Tensor, lr: float, betas=(0.9, 0.999), eps=1e-8):
        self.parameter, self.lr, self.betas, self.eps = parameter, lr, betas, eps
        self.first = torch.zeros_like(parameter)
        self.second = torch.zeros_like(parameter)
        self.steps = 0

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        self.steps += 1
        grad = self.parameter.grad
        self.first.mul_(beta1).add_(grad, alpha=1 - beta1)
        self.second.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        # lr · first / (1 − β1^t) / (√(second / (1 − β2^t)) + ε), in two temporaries.
        update = torch.div(self.first, 1 - beta1**self.steps).mul_(self.lr)
        denominator = torch.div(self.second, 1 - beta2**self.steps).sqrt_().add_(self.eps)
        self.parameter.sub_(update.div_(denominator))


@dataclass
class LevelImages:
    fixed: torch.Tensor
    moving: torch.Tensor
    mask: torch.Tensor | None
    data: torch.Tensor | None


def _smooth(field: torch.Tensor, passes: int = 2, window: int = 3) -> torch.Tensor:
    for _ in range(passes):
        field = box_filter(field, window)
    return field


def border_taper(shape: tuple[int, ...], width: float, device, dtype) -> torch.Tensor:
    """1 inside, falling linearly to 0 over ``width`` voxels at the grid border."""
    taper = torch.ones((1, 1, *shape), device=device, dtype=dtype)
    for axis, n in enumerate(shape):
        ramp = torch.arange(n, device=device, dtype=dtype)
        ramp = torch.minimum(ramp, n - 1 - ramp).div(max(width, 1e-6)).clamp(0, 1)
        view = [1] * len(shape)
        view[axis] = n
        taper = taper * ramp.view(1, 1, *view)
    return taper


def level_shape(shape: tuple[int, ...], factor: float, minimum: int = 8) -> tuple[int, ...]:
    return tuple(max(minimum, round((n - 1) / factor) + 1) for n in shape)


def downsample_image(image: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Box-smooth in proportion to the reduction, then sample with corners aligned."""
    if tuple(image.shape[2:]) == shape:
        return image
    factor = max(a / b for a, b in zip(image.shape[2:], shape, strict=True))
    window = 2 * int(factor // 2) + 1
    if window > 1:
        image = _smooth(image, passes=1, window=window)
    mode = "trilinear" if image.dim() == 5 else "bilinear"
    return F.interpolate(image, size=shape, mode=mode, align_corners=True)


def optimise_velocity(
    fixed: torch.Tensor,
    moving: torch.Tensor,
    mask: torch.Tensor | None,
    levels: list[tuple[tuple[int, ...], Level]],
    *,
    similarity: str,
    regularization: float,
    learning_rate: float,
    window: int,
    folding_weight: float = 0.0,
    folding_margin: float = 0.05,
    initial_velocity: torch.Tensor | None = None,
    data: torch.Tensor | None = None,
    progress: Callable[[float, str], None] | None = None,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> tuple[torch.Tensor, list[float]]:
    """Velocity (voxels of the finest grid ``fixed.shape``) and the loss trace.

    Each level hands on the parameter with the lowest loss it evaluated (the start included).

    ``levels`` pairs each level's grid shape with its settings, coarse first.
    ``folding_weight`` adds ``folding_penalty`` (det J kept above ``folding_margin``) to the
    loss, for fine control grids. ``data``, when given, is where the moving image has data:
    the similarity counts nothing elsewhere (``similarity_to``).
    """
    similarity_function(similarity)  # refuses unknown names before any work
    fine_shape = tuple(fixed.shape[2:])
    velocity = (
        torch.zeros((1, len(fine_shape), *fine_shape), device=fixed.device, dtype=fixed.dtype)
        if initial_velocity is None
        else initial_velocity
    )
    total_steps = sum(level.iterations for _, level in levels) or 1
    trace: list[float] = []

    def step_done(value: float, level: Level) -> None:
        trace.append(value)
        if progress is not None:
            progress(len(trace) / total_steps, f"optimising at {level.spacing_mm:.3g} mm")

    for shape, level in levels:
        images = LevelImages(
            downsample_image(fixed, shape),
            downsample_image(moving, shape),
            level_mask(mask, shape, fixed.dtype),
            level_mask(data, shape, fixed.dtype),
        )
        objective = Objective(
            similarity_to(similarity, images.fixed, images.mask, window, images.data),
            regularization,
            folding_weight,
            folding_margin,
        )
        velocity = _optimise_level(
            images, objective, shape, level, velocity, fine_shape, learning_rate, step_done,
            is_cancelled,
        )  # fmt: skip
    return velocity, trace


def level_mask(
    mask: torch.Tensor | None, shape: tuple[int, ...], dtype: torch.dtype
) -> torch.Tensor | None:
    """A 0/1 mask on a level's grid: where most of each coarse voxel was inside."""
    return None if mask is None else (downsample_image(mask, shape) > 0.5).to(dtype)


@dataclass(frozen=True)
class Objective:
    """The loss of one level: dissimilarity to the fixed image plus the field's penalties."""

    similarity_to_fixed: Callable[[torch.Tensor], torch.Tensor]
    regularization: float
    folding_weight: float
    folding_margin: float

    def __call__(self, warped: torch.Tensor, control_flow: torch.Tensor) -> torch.Tensor:
        loss = self.similarity_to_fixed(warped)
        loss = loss + self.regularization * diffusion(control_flow)
        if self.folding_weight > 0:
            penalty = folding_penalty(control_flow, self.folding_margin)
            loss = loss + self.folding_weight * penalty
        return loss


def _optimise_level(
    images: LevelImages,
    objective: Objective,
    shape: tuple[int, ...],
    level: Level,
    velocity: torch.Tensor,
    fine_shape: tuple[int, ...],
    learning_rate: float,
    step_done: Callable[[float, Level], None],
    is_cancelled: Callable[[], bool],
) -> torch.Tensor:
    """One level's Adam steps from ``velocity``; the best parameter seen, at ``fine_shape``."""
    fixed = images.fixed

    def cancel_point(_: torch.Tensor | None = None) -> None:  # also a gradient hook
        stop_if_cancelled(is_cancelled, "during optimisation")

    # The velocity may live on a coarser control grid (VoxelMorph's int_downsize): a smooth
    # field loses little detail, and integration costs up to 8× less in 3D.
    factor = min(2.0, max(1.0, level.control_mm / level.spacing_mm))
    coarse_enough = min(shape) >= factor * CONTROL_MIN_VOXELS
    control = level_shape(shape, factor) if coarse_enough else shape
    taper = border_taper(control, width=2.0, device=fixed.device, dtype=fixed.dtype)
    start = resize_flow(velocity, control)
    parameter = start.clone().requires_grad_(True)
    optimiser = Adam(parameter, learning_rate)
    best = float("inf")
    stale = 0
    # Adam's first steps have a fixed size whatever the gradient, so a step can make things
    # worse (e.g. on an already aligned pair): keep the best parameter seen, not the last.
    best_value, best_parameter = float("inf"), parameter.detach().clone()
    for index in range(level.iterations):
        cancel_point()
        parameter.grad = None
        control_flow = integrate_velocity(
            _smooth(parameter) * taper, level.integration_steps, level.differentiated_squarings
        )
        cancel_point()
        warped = warp(images.moving, resize_flow(control_flow, shape))
        loss = objective(warped, control_flow)
        value = float(loss.detach())
        if value < best_value:  # the loss of the parameter before this step
            best_value, best_parameter = value, parameter.detach().clone()
        # Early stop: no relative improvement of 1e-4 over the last 10 steps.
        if best == float("inf") or value < best - 1e-4 * abs(best):
            best, stale = value, 0
        else:
            stale += 1
        if index == level.iterations - 1 or stale >= 10:
            # No step follows to take this gradient: the backward pass (two thirds of a step)
            # would only move the parameter past the last loss evaluated.
            step_done(value, level)
            break
        cancel_point()
        # A step on a CT-sized grid takes seconds: asked after integrating, after the forward
        # pass, and (these hooks) twice during backward.
        warped.register_hook(cancel_point)
        control_flow.register_hook(cancel_point)
        loss.backward()
        optimiser.step()
        step_done(value, level)
    with torch.no_grad():
        if level.adds_change and control != fine_shape:
            # The detail of ``velocity`` finer than this grid survives for finer levels.
            return velocity + resize_flow(_smooth(best_parameter - start) * taper, fine_shape)
        return resize_flow(_smooth(best_parameter) * taper, fine_shape)
