"""What the tests of work done in pieces share: a cancel request that comes on a chosen call,
and a noise image in an oblique (flipped-axis) header."""

from __future__ import annotations

import numpy as np
import SimpleITK as sitk


class CancelOnCall:
    """``is_cancelled`` that answers True from its ``n``-th call on, counting calls."""

    def __init__(self, n: int | None):
        self.n, self.calls = n, 0

    def __call__(self) -> bool:
        self.calls += 1
        return self.n is not None and self.calls >= self.n


def an_image(shape: tuple[int, ...], spacing: tuple[float, ...], seed: int = 0) -> sitk.Image:
    """Float32 noise (σ = 100) with its first axis flipped and its origin off zero."""
    rng = np.random.default_rng(seed)
    image = sitk.GetImageFromArray((100 * rng.normal(size=shape)).astype(np.float32))
    image.SetSpacing(spacing)
    direction = np.eye(len(shape))
    direction[0, 0] = -1.0
    image.SetDirection(tuple(direction.ravel()))
    image.SetOrigin(tuple(float(i) for i in range(len(shape))))
    return image
