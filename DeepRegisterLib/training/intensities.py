"""Synthetic image intensities drawn from a label map: contrast, blur, bias, gamma.

Each call draws a new contrast from the caller's generator, so a pair's fixed and moving images
differ in contrast as well as in shape (SynthMorph's recipe for contrast-agnostic networks).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import SynthesisConfig
from .random_fields import smooth_noise, uniform

#: Rough T1-weighted intensities (background 0, white matter 0.9) of the FreeSurfer structures,
#: for T1-like synthesis (``SynthesisConfig.t1_like``). Labels not listed draw random means.
FREESURFER_T1_MEANS: dict[int, float] = {
    0: 0.0,
    **dict.fromkeys((2, 41, 7, 46, 28, 60, 16, 85), 0.9),  # white matter, ventral DC, stem
    **dict.fromkeys((3, 42, 8, 47, 17, 53, 18, 54), 0.55),  # cortex, hippocampus, amygdala
    **dict.fromkeys((10, 49, 13, 52), 0.75),  # thalamus, pallidum
    **dict.fromkeys((11, 50, 12, 51, 26, 58), 0.62),  # caudate, putamen, accumbens
    **dict.fromkeys((4, 43, 5, 44, 14, 15, 24, 72), 0.15),  # ventricles, CSF
    **dict.fromkeys((25, 57, 30, 62, 31, 63, 77), 0.45),  # lesions, vessels, plexus, WM-hypo
}


def gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur with edge replication, so borders do not darken."""
    if sigma < 0.1:
        return image
    radius = max(1, math.ceil(3 * sigma))
    x = torch.arange(-radius, radius + 1, device=image.device, dtype=image.dtype)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    dim = image.dim() - 2
    conv = F.conv3d if dim == 3 else F.conv2d
    for axis in range(dim):
        view = [1] * dim
        view[axis] = kernel.numel()
        pad = [0] * (2 * dim)
        pad[2 * (dim - 1 - axis)] = pad[2 * (dim - 1 - axis) + 1] = radius
        image = conv(F.pad(image, pad, mode="replicate"), kernel.view(1, 1, *view))
    return image


def normalise_percentiles(image: torch.Tensor) -> torch.Tensor:
    """[0, 1] between the 1st and 99th percentile, clamped: what the engine does to inputs."""
    values = image.flatten()
    values = values[:: max(1, values.numel() // 2_000_000)]
    low, high = torch.quantile(values, torch.tensor([0.01, 0.99], device=image.device))
    if high <= low:
        high = low + 1.0
    return ((image - low) / (high - low)).clamp(0.0, 1.0)


def synthesise_image(
    labels: torch.Tensor,
    means: torch.Tensor,
    config: SynthesisConfig,
    generator: torch.Generator,
) -> torch.Tensor:
    """One image (1, 1, *shape) from a label map (*shape) with labels in [0, count).

    Gaussian intensities per label (random mean and spread), blur, smooth multiplicative bias,
    gamma, then percentile normalisation.
    """
    device = labels.device
    stds = torch.rand(len(means), generator=generator, device=device) * config.intensity_std
    noise = torch.randn(labels.shape, generator=generator, device=device)
    image = (means[labels] + stds[labels] * noise)[None, None]
    image = gaussian_blur(image, float(uniform(generator, config.blur_sigma, device)))
    if config.bias_std > 0:
        bias_std = uniform(generator, config.bias_std, device)
        shape = tuple(labels.shape)
        image = image * torch.exp(
            smooth_noise(shape, 1, config.bias_spacing, bias_std, generator, device)
        )
    low, high = image.amin(), image.amax()
    image = (image - low) / (high - low).clamp_min(1e-6)
    gamma = torch.exp(torch.randn((), generator=generator, device=device) * config.gamma_std)
    return normalise_percentiles(image.clamp_min(0) ** gamma)
