"""Mattes mutual information of sampled intensity pairs in PyTorch, differentiable in the moving
values: the affine search's metric where its compiled descent (affine_descent.c, which computes
the same) was not built.

As Mattes et al. (2003) and ITK's metric: a joint histogram whose moving axis is filled through
a cubic B-spline Parzen window, so the metric has a gradient in each moving intensity, while the
fixed axis is a plain bin count (the fixed values do not move). Intensities are in [0, 1]
(``normalised_for_registration``). Each sample adds its four B-spline taps with one
``index_add``, not a dense samples × bins kernel: 20 000 samples cost a fraction of a
millisecond, and the sum is in sample order, so the result does not depend on thread timing.
"""

from __future__ import annotations

import math

import torch

from .affine_levels import BINS, LOG_FLOOR


def _cubic_bspline_taps(fraction: torch.Tensor) -> torch.Tensor:
    """The weights of the four bins around a position ``base + fraction`` (bins base − 1 to
    base + 2), (4, N); they sum to one."""
    f2 = fraction * fraction
    f3 = f2 * fraction
    taps = torch.stack(
        [(1 - fraction) ** 3, 3 * f3 - 6 * f2 + 4, -3 * f3 + 3 * f2 + 3 * fraction + 1, f3]
    )
    return taps / 6.0


class SampledMutualInformation:
    """MI between fixed values given once, as their bins (``affine_levels.fixed_bins``), and
    moving values given at each evaluation."""

    def __init__(self, fixed_bins: torch.Tensor):
        self._rows = (fixed_bins.long() * BINS)[None]
        self._taps = torch.arange(-1, 3, device=fixed_bins.device)[:, None]

    def __call__(self, moving_values: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """MI in nats of the samples, each counted with its weight (0 for a sample that falls
        outside the moving image); 0 when no sample counts. Values and weights of shape
        (samples,) give one MI; (poses, samples), one per pose, each in its own histogram (the
        affine stage's turned starts, tried at once)."""
        bins = BINS
        batch = moving_values.shape[:-1]
        # Bin centres 1 … bins − 2 keep every tap of a value in [0, 1] inside the histogram.
        position = moving_values.clamp(0, 1) * (bins - 3) + 1.0
        base = torch.floor(position.detach())
        taps = _cubic_bspline_taps(position - base) * weights
        columns = (base.long() + self._taps.view(4, *[1] * len(batch), 1)).clamp(0, bins - 1)
        entries = self._rows + columns
        if math.prod(batch) > 1:  # each pose's histogram after the one before
            first = torch.arange(math.prod(batch), device=entries.device) * (bins * bins)
            entries = entries + first.view(*batch, 1)
        joint = torch.zeros(math.prod(batch) * bins * bins, dtype=taps.dtype, device=taps.device)
        joint = joint.index_add(0, entries.reshape(-1), taps.reshape(-1)).view(*batch, bins, bins)
        total = joint.sum(dim=(-2, -1), keepdim=True)
        joint = joint / total.clamp_min(torch.finfo(taps.dtype).tiny)
        fixed = joint.sum(dim=-1, keepdim=True)
        moving = joint.sum(dim=-2, keepdim=True)
        information = torch.log(joint + LOG_FLOOR) - torch.log(fixed * moving + LOG_FLOOR)
        return (joint * information).sum(dim=(-2, -1))
