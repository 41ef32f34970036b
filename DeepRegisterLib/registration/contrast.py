"""Map the moving image's contrast onto the fixed image's, so a same-contrast network can run.

After the affine stage most voxels of the two images show the same tissue, so the fixed
intensity expected at each moving intensity, read off their joint histogram, converts one
contrast into the other (Guimond et al., "Three-dimensional multimodal brain warping using the
demons algorithm and adaptive intensity corrections", IEEE TMI 2001). Misaligned voxels pull
those expectations toward the mean, so the result is then histogram-matched to the fixed image:
the expectations set the order of the tissues, the matching restores their spread.

The bins are those of equal width and those of equal counts together. With equal widths alone
a dark tissue next to a black background shares the background's bin and comes out black: on a
T1 → T2-like fs-dev pair the network then did worse than the affine alone (mean Dice 0.54
against 0.65), and with equal counts it kept most of its same-contrast gain (0.75 against
0.76). With equal counts alone a small bright tissue gets no bin of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

BINS_OF_EQUAL_COUNT = 128  # 64 left a T1 → T2-like fs-dev pair at 0.69 instead of 0.75
BINS_OF_EQUAL_WIDTH = 64


@dataclass(frozen=True)
class ContrastMap:
    """A piecewise-linear map of intensities: ``values`` at ``knots``, constant beyond them."""

    knots: np.ndarray
    values: np.ndarray

    def __call__(self, intensities: np.ndarray) -> np.ndarray:
        return np.interp(intensities, self.knots, self.values).astype(intensities.dtype)


def learn_contrast_map(moving: np.ndarray, fixed: np.ndarray) -> ContrastMap | None:
    """The map from ``moving``'s intensities to ``fixed``'s, learnt from two aligned arrays.

    Every voxel counts, background too: a mask would leave the moving background, where it
    overlaps the fixed foreground, mapped to tissue. None when ``moving`` has no contrast.
    """
    m = np.asarray(moving, dtype=np.float64).reshape(-1)
    f = np.asarray(fixed, dtype=np.float64).reshape(-1)
    by_count = np.quantile(m, np.linspace(0.0, 1.0, BINS_OF_EQUAL_COUNT + 1))
    by_width = m.min() + np.ptp(m) * np.linspace(0.0, 1.0, BINS_OF_EQUAL_WIDTH + 1)
    edges = np.unique(np.concatenate([by_count, by_width]))
    if edges.size < 2:
        return None
    index = np.searchsorted(edges[1:-1], m, side="right")
    counts = np.bincount(index, minlength=edges.size - 1)
    kept = counts > 0
    knots = np.bincount(index, weights=m, minlength=edges.size - 1)[kept] / counts[kept]
    expected = np.bincount(index, weights=f, minlength=edges.size - 1)[kept] / counts[kept]
    mapped = np.sort(np.interp(m, knots, expected))
    return ContrastMap(knots, _histogram_matched(expected, mapped, np.sort(f)))


def _histogram_matched(
    values: np.ndarray, source_sorted: np.ndarray, target_sorted: np.ndarray
) -> np.ndarray:
    """``values`` through the monotone map that gives the source the target's histogram."""
    # Mid-rank among the source values, so that equal values get one equal output.
    below = np.searchsorted(source_sorted, values, side="left")
    upto = np.searchsorted(source_sorted, values, side="right")
    quantile = (below + upto) / (2.0 * source_sorted.size)
    return np.interp(quantile, np.linspace(0.0, 1.0, target_sorted.size), target_sorted)


def in_contrast_of(fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor | None:
    """``moving`` (aligned with ``fixed``, any shape) mapped into ``fixed``'s contrast; None
    when it has no contrast to map."""
    intensities = moving.cpu().numpy()
    contrast_map = learn_contrast_map(intensities, fixed.cpu().numpy())
    if contrast_map is None:
        return None
    return torch.as_tensor(contrast_map(intensities), device=moving.device)
