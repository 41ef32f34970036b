"""Random draws the synthesiser builds on: events, smooth noise fields, blobs, small affines.

Every function draws only from the caller's ``torch.Generator`` (on ``device``), so the same
generator state gives the same result on the same device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import SynthesisConfig


def happens(chance: float, generator: torch.Generator, device: torch.device) -> bool:
    """True with probability ``chance``; no draw at all when it is 0, so runs from before an
    option that uses this see the same pairs."""
    return chance > 0 and float(torch.rand((), generator=generator, device=device)) < chance


def uniform(generator: torch.Generator, high: float, device: torch.device) -> torch.Tensor:
    """A scalar drawn uniformly from [0, high)."""
    return torch.rand((), generator=generator, device=device) * high


def smooth_noise(
    shape: tuple[int, ...],
    channels: int,
    spacing: float,
    std: float | torch.Tensor,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """Gaussian noise on a control grid every ``spacing`` voxels, upsampled to ``shape``.

    Returns (1, channels, *shape). Linear upsampling of coarse noise gives fields smooth at the
    scale of ``spacing``: a cheap stand-in for filtering white noise at full resolution.
    """
    coarse = tuple(max(2, math.ceil((n - 1) / spacing) + 1) for n in shape)
    noise = torch.randn((1, channels, *coarse), generator=generator, device=device) * std
    mode = "trilinear" if len(shape) == 3 else "bilinear"
    return F.interpolate(noise, size=shape, mode=mode, align_corners=True)


def random_shapes(
    shape: tuple[int, ...],
    labels: int,
    spacing: float,
    generator: torch.Generator,
    device: torch.device,
) -> torch.Tensor:
    """A label map (*shape) of ``labels`` smooth blobs: the argmax of smoothed random fields."""
    fields = smooth_noise(shape, labels, spacing, 1.0, generator, device)
    return fields.argmax(dim=1)[0]


def random_matrix(dim: int, config: SynthesisConfig, generator, device) -> torch.Tensor:
    """Small rotation · scaling · shear, as a (dim, dim) matrix in voxel coordinates."""

    def symmetric(high: float, size: tuple[int, ...]) -> torch.Tensor:
        return (2 * torch.rand(size, generator=generator, device=device) - 1) * high

    angles = symmetric(math.radians(config.rotation_deg), (1 if dim == 2 else 3,))
    rotation = torch.eye(dim, device=device)
    for index, (a, b) in enumerate([(0, 1)] if dim == 2 else [(1, 2), (0, 2), (0, 1)]):
        c, s = torch.cos(angles[index]), torch.sin(angles[index])
        plane = torch.eye(dim, device=device)
        plane[a, a], plane[a, b], plane[b, a], plane[b, b] = c, -s, s, c
        rotation = rotation @ plane
    scaling = torch.diag(1 + symmetric(config.scaling, (dim,)))
    shear = torch.eye(dim, device=device) + torch.triu(symmetric(config.shear, (dim, dim)), 1)
    return rotation @ scaling @ shear


def apply_matrix(matrix: torch.Tensor, points: torch.Tensor, centre: torch.Tensor):
    """``matrix (p − centre) + centre`` for points (1, dim, *shape)."""
    view = (1, -1) + (1,) * (points.dim() - 2)
    return torch.einsum("ij,nj...->ni...", matrix, points - centre.view(view)) + centre.view(view)
