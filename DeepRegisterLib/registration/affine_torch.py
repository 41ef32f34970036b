"""The affine search's inner loop in PyTorch, where its compiled descent (affine_descent.c) was
not built (no C compiler at install): the same mutual information and the same descent over the
same levels, in tensor operations, on the CPU. Slower (each step is a few dozen small
operations) and, in a fresh process, only once torch has loaded.
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from ..nn.filters import grid_sample
from .affine_levels import Level, Pose, Steps, parameter_count
from .mutual_information import SampledMutualInformation


class _Tensors:
    """A level's arrays as tensors, and its metric."""

    def __init__(self, level: Level):
        self.offsets = torch.from_numpy(level.offsets).float()
        self.metric = SampledMutualInformation(torch.from_numpy(level.fixed_bins))
        self.moving = torch.from_numpy(level.moving)[None, None]
        mask = level.moving_mask
        self.mask = None if mask is None else torch.from_numpy(mask).float()[None, None]
        self.to_sampler = torch.from_numpy(level.to_sampler)
        self.sampler_offset = torch.from_numpy(level.sampler_offset)
        self.centre = torch.from_numpy(level.centre)


_tensors: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _of(level: Level) -> _Tensors:
    if level not in _tensors:
        _tensors[level] = _Tensors(level)
    return _tensors[level]


def _information(level: Level, matrix: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """The mutual information under each of the poses (matrix, shift), (poses,)."""
    t = _of(level)
    linear = t.to_sampler @ matrix
    constant = (t.centre + shift) @ t.to_sampler.T + t.sampler_offset
    coordinates = torch.baddbmm(
        constant.float()[:, None], t.offsets.expand(len(linear), -1, -1),
        linear.float().transpose(1, 2),
    )  # fmt: skip
    dim = coordinates.shape[-1]
    where = coordinates.view(1, *[1] * (dim - 1), -1, dim)
    inside = (coordinates.abs().amax(dim=-1) <= 1.0).float()
    if t.mask is not None:
        within = grid_sample(t.mask, where.detach(), "nearest")
        inside = inside * (within.view(inside.shape) > 0).float()
    values = grid_sample(t.moving, where, "bilinear", "border").view(inside.shape)
    return t.metric(values, inside)


def similarity(level: Level, pose: Pose) -> np.ndarray:
    """The mutual information under each of the poses, (poses,)."""
    with torch.no_grad():
        values = _information(level, torch.from_numpy(pose.matrix), torch.from_numpy(pose.shift))
    return values.double().numpy()


def information(level: Level, pose: Pose) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The mutual information under each pose and its gradient in each pose's matrix and
    shift, by autograd (affine_descent.information computes the same)."""
    with torch.enable_grad():
        matrix = torch.from_numpy(pose.matrix).clone().requires_grad_()
        shift = torch.from_numpy(pose.shift).clone().requires_grad_()
        values = _information(level, matrix, shift)
        values.sum().backward()
    return values.detach().double().numpy(), matrix.grad.numpy(), shift.grad.numpy()


def _rotation(angles: torch.Tensor) -> torch.Tensor:
    """Rotations by (poses, 1) angles in 2D or (poses, 3) in 3D (R = Rz Ry Rx)."""
    cos, sin = torch.cos(angles).unbind(-1), torch.sin(angles).unbind(-1)
    poses = len(angles)
    if len(cos) == 1:
        return torch.stack([cos[0], -sin[0], sin[0], cos[0]], dim=-1).view(poses, 2, 2)
    (cx, cy, cz), (sx, sy, sz) = cos, sin
    one, zero = torch.ones_like(cx), torch.zeros_like(cx)
    about_x = torch.stack([one, zero, zero, zero, cx, -sx, zero, sx, cx], dim=-1)
    about_y = torch.stack([cy, zero, sy, zero, one, zero, -sy, zero, cy], dim=-1)
    about_z = torch.stack([cz, -sz, zero, sz, cz, zero, zero, zero, one], dim=-1)
    return about_z.view(poses, 3, 3) @ about_y.view(poses, 3, 3) @ about_x.view(poses, 3, 3)


def descend(level: Level, start: Pose, parameters: np.ndarray, rigid: bool, steps: Steps) -> Pose:
    """affine_descent.descend in PyTorch: every pose at once, each with its own step."""
    poses, dim = start.shift.shape
    linear_count = parameter_count(dim, rigid) - dim
    changes = torch.from_numpy(parameters.copy()).requires_grad_()
    matrix0, shift0 = torch.from_numpy(start.matrix), torch.from_numpy(start.shift)

    def pose() -> tuple[torch.Tensor, torch.Tensor]:
        linear = changes[:, :linear_count] / steps.radius_mm
        identity = torch.eye(dim, dtype=torch.float64)
        change = _rotation(linear) if rigid else identity + linear.view(poses, dim, dim)
        return change @ matrix0, shift0 + changes[:, linear_count:]

    step = torch.full((poses,), steps.first, dtype=torch.float64)
    previous = None
    with torch.enable_grad():
        for _ in range(steps.iterations):
            if not bool((step >= steps.min_step).any()):
                break
            changes.grad = None
            (-_information(level, *pose()).sum()).backward()
            gradient = changes.grad.detach().clone()
            if previous is not None:  # where it turned back, the optimum is within the step
                turned = (gradient * previous).sum(-1) < 0
                step = torch.where(turned, step * steps.relaxation, step)
            previous = gradient
            length = gradient.norm(dim=-1, keepdim=True)
            moves = (step[:, None] >= steps.min_step) & (length > 0)
            with torch.no_grad():
                changes -= torch.where(moves, step[:, None] * gradient / length, 0.0)
    parameters[:] = changes.detach().numpy()
    with torch.no_grad():
        matrix, shift = pose()
    return Pose(matrix.numpy().copy(), shift.numpy().copy())
