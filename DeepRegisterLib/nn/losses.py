"""Similarity measures shared by instance optimisation and training (the flow penalties are in
regularizers.py).

Local statistics use box filters (``filters.box_filter``): on two CPU cores they cost a fraction
of a dense Gaussian or 7³ convolution, which decides how many optimisation steps we can afford.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .filters import box_filter

SIMILARITIES = ("lncc", "mse", "mind")


def _where_data(values: torch.Tensor, data: torch.Tensor | None) -> torch.Tensor:
    """Each voxel's dissimilarity where the moving image has ``data``, 0 elsewhere: padding
    beyond a moving image's field of view counts as matched, pulling on nothing, and the mean
    over the grid keeps the balance with the regularizer that a whole image has."""
    return values if data is None else values * data


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weight = mask.expand_as(values)
    return (values * weight).sum() / weight.sum().clamp_min(1.0)


def lncc(
    fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None, window: int = 7
) -> torch.Tensor:
    """Negative local normalised cross-correlation (squared, as in VoxelMorph): -1 is perfect."""
    return _lncc_to(fixed, _local_statistics(fixed, window), warped, mask, window)


def _local_statistics(image: torch.Tensor, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    mean = box_filter(image, window)
    return mean, (box_filter(image * image, window) - mean * mean).clamp_min(0)


def _lncc_to(
    fixed: torch.Tensor,
    fixed_statistics: tuple[torch.Tensor, torch.Tensor],
    warped: torch.Tensor,
    mask: torch.Tensor | None,
    window: int,
    data: torch.Tensor | None = None,
) -> torch.Tensor:
    mu_f, var_f = fixed_statistics
    mu_w, var_w = _local_statistics(warped, window)
    cross = box_filter(fixed * warped, window) - mu_f * mu_w
    # ε in numerator and denominator: cc ≤ 1, and exactly 1 for identical windows, even flat
    # ones. With ε only below, warps that invent contrast in flat regions would score better
    # than the identity, and an image registered to itself would move.
    eps = 1e-5
    cc = (cross * cross + eps) / (var_f * var_w + eps)
    return -_masked_mean(_where_data(cc, data), mask)


def mse(
    fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None, window: int = 0
) -> torch.Tensor:
    """Mean squared intensity difference (same modality, same intensity scale)."""
    return _masked_mean((fixed - warped) ** 2, mask)


def _shift(x: torch.Tensor, axis: int, step: int) -> torch.Tensor:
    """``x`` moved by ``step`` voxels along spatial ``axis`` with edge replication."""
    spatial = x.dim() - 2
    pad = [0] * (2 * spatial)
    slot = 2 * (spatial - 1 - axis)  # F.pad lists the last axis first
    pad[slot + (0 if step > 0 else 1)] = abs(step)
    padded = F.pad(x, pad, mode="replicate")
    index = [slice(None)] * x.dim()
    length = x.shape[2 + axis]
    start = 0 if step > 0 else abs(step)
    index[2 + axis] = slice(start, start + length)
    return padded[tuple(index)]


def mind_descriptor(image: torch.Tensor, window: int = 3, distance: int = 2) -> torch.Tensor:
    """MIND (Heinrich et al. 2012) over the 2·dim axis neighbours: a modality-independent
    description of local structure, so CT–MR or T1–T2 pairs can be compared by MSE."""
    spatial = image.dim() - 2
    patches = []
    for axis in range(spatial):
        for step in (distance, -distance):
            patches.append(box_filter((image - _shift(image, axis, step)) ** 2, window))
    d = torch.cat(patches, dim=1)
    variance = d.mean(dim=1, keepdim=True)
    variance = variance.clamp(min=1e-3 * variance.mean().item() + 1e-8)
    descriptor = torch.exp(-d / variance)
    return descriptor / descriptor.amax(dim=1, keepdim=True).clamp_min(1e-6)


def mind(
    fixed: torch.Tensor, warped: torch.Tensor, mask: torch.Tensor | None = None, window: int = 3
) -> torch.Tensor:
    """MSE between MIND descriptors: the multimodal measure."""
    return _mind_to(mind_descriptor(fixed, window), warped, mask, window)


def _mind_to(
    fixed_descriptor: torch.Tensor,
    warped: torch.Tensor,
    mask: torch.Tensor | None,
    window: int,
    data: torch.Tensor | None = None,
) -> torch.Tensor:
    diff = (fixed_descriptor - mind_descriptor(warped, window)) ** 2
    return _masked_mean(_where_data(diff.mean(dim=1, keepdim=True), data), mask)


def similarity_function(name: str) -> Callable[..., torch.Tensor]:
    """The loss called ``name``; raises ``ValueError`` listing the choices otherwise."""
    functions = {"lncc": lncc, "mse": mse, "mind": mind}
    if name not in functions:
        raise ValueError(f"unknown similarity {name!r}; choose one of {', '.join(SIMILARITIES)}")
    return functions[name]


def similarity_to(
    name: str,
    fixed: torch.Tensor,
    mask: torch.Tensor | None,
    window: int,
    data: torch.Tensor | None = None,
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``warped ↦ similarity(fixed, warped, mask, window)``, with what depends on ``fixed``
    alone computed once: instance optimisation compares one fixed image with a new warped
    image at every step (for MIND, the fixed descriptor is about half of each evaluation).
    ``data``, when given, is where the moving image has data (see ``_where_data``)."""
    similarity_function(name)  # refuses unknown names
    if name == "lncc":
        statistics = _local_statistics(fixed, window)
        return lambda warped: _lncc_to(fixed, statistics, warped, mask, window, data)
    if name == "mind":
        descriptor = mind_descriptor(fixed, window)
        return lambda warped: _mind_to(descriptor, warped, mask, window, data)
    return lambda warped: _masked_mean(_where_data((fixed - warped) ** 2, data), mask)


def soft_dice(fixed_onehot: torch.Tensor, warped_onehot: torch.Tensor) -> torch.Tensor:
    """1 − mean soft Dice over channels, for label-supervised training."""
    dims = tuple(range(2, fixed_onehot.dim()))
    inter = (fixed_onehot * warped_onehot).sum(dims)
    total = fixed_onehot.sum(dims) + warped_onehot.sum(dims)
    return 1.0 - ((2 * inter + 1e-5) / (total + 1e-5)).mean()
