"""Small networks and inputs for the model and network tests: fast to build, run and save."""

from __future__ import annotations

from pathlib import Path

import torch

from DeepRegisterLib.nn import models
from DeepRegisterLib.nn.networks import NetworkConfig, VxmDense

#: A 3D U-Net of a few thousand parameters.
SMALL = dict(encoder=(8, 8, 8), decoder=(8, 8, 8, 8))


def save_tiny_3d_model(folder: Path) -> models.ModelInfo:
    """A seeded, untrained SMALL 3D model saved as "tiny3d" (weights, config, checksum)."""
    torch.manual_seed(0)
    network = VxmDense(NetworkConfig(dim=3, **SMALL))
    return models.save_model(network, folder, "tiny3d", extra_config={"input_spacing_mm": 3.0})


def random_pair(dim: int, size: int = 16, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    shape = (1, 1, *[size] * dim)
    return torch.rand(shape, generator=generator), torch.rand(shape, generator=generator)
