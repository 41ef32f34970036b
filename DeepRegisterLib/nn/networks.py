"""The VoxelMorph-family deformable network: U-Net → stationary velocity → diffeomorphic flow.

All flows are in voxel units, one channel per array axis (channel 0 = K in 3D), the layout of
VoxelMorph's ``SpatialTransformer``. Conversion to millimetres lives in :mod:`geometry`.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from .filters import grid_sample
from .network_config import NetworkConfig


def identity_grid(shape: tuple[int, ...], device: torch.device, dtype=torch.float32):
    """Voxel coordinates (1, dim, *shape), channel c = array axis c."""
    axes = [torch.arange(s, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]


def warp(
    image: torch.Tensor,
    flow: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Sample ``image`` at ``x + flow(x)`` (voxel units); image and flow share the spatial grid."""
    shape = tuple(flow.shape[2:])
    scale = torch.tensor([2.0 / max(s - 1, 1) for s in shape], dtype=flow.dtype, device=flow.device)
    identity = _normalised_identity(shape, flow.device, flow.dtype)
    return grid_sample(image, _SamplingGrid.apply(flow, scale, identity), mode, padding_mode)


class _SamplingGrid(torch.autograd.Function):
    """grid_sample's coordinates of ``x + flow(x)``: each flow channel scaled to [-1, 1] and
    written into its place in one contiguous (N, *shape, dim) grid (x = last axis first), then
    the cached identity added; the backward pass reads each channel back out.

    As ``mul``, ``flip``, ``movedim`` and ``add`` it took two more passes each way and left a
    strided grid that grid_sample copied again, in an optimisation step that warps four times.
    The same operations round the same values, so the grid and the gradient are the same bits.
    """

    @staticmethod
    def forward(ctx, flow: torch.Tensor, scale: torch.Tensor, identity: torch.Tensor):
        ctx.save_for_backward(scale)
        dim = flow.shape[1]
        grid = flow.new_empty((flow.shape[0], *flow.shape[2:], dim))
        for c in range(dim):
            torch.mul(flow[:, c], scale[c], out=grid[..., dim - 1 - c])
        return grid.add_(identity)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        (scale,) = ctx.saved_tensors
        dim = grad.shape[-1]
        out = grad.new_empty((grad.shape[0], dim, *grad.shape[1:-1]))
        for c in range(dim):
            torch.mul(grad[..., dim - 1 - c], scale[c], out=out[:, c])
        return out, None, None


@functools.lru_cache(maxsize=8)
def _normalised_identity(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> torch.Tensor:
    """Every voxel's grid_sample coordinates (corners aligned), (1, *shape, dim), x = I first.

    Made outside inference mode, so that a grid first cached by an inference-mode caller can
    take part in a later autograd graph.
    """
    with torch.inference_mode(False):
        return _grid_coordinates(identity_grid(shape, device, dtype), shape).contiguous()


def _grid_coordinates(voxel_coords: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Voxel coordinates (N, dim, *out_shape) of an ``in_shape`` image as grid_sample's
    normalised ones (corners aligned), (N, *out_shape, dim) with x = I first."""
    spatial = len(in_shape)
    extent = torch.tensor(
        [max(s - 1, 1) for s in in_shape], device=voxel_coords.device, dtype=voxel_coords.dtype
    ).view(1, spatial, *([1] * spatial))
    # Whole-tensor arithmetic, not a slice per axis: in an optimisation step each slice's
    # backward filled a zero tensor the flow's size, three for every sampling.
    norm = 2.0 * voxel_coords / extent - 1.0
    return norm.flip(1).movedim(1, -1)


def sample(
    image: torch.Tensor,
    voxel_coords: torch.Tensor,
    mode: str = "bilinear",
    padding_mode: str = "zeros",
) -> torch.Tensor:
    """Sample ``image`` (N, C, *in_shape) at voxel coordinates (N, dim, *out_shape)."""
    grid = _grid_coordinates(voxel_coords, tuple(image.shape[2:]))
    return grid_sample(image, grid, mode=mode, padding_mode=padding_mode)


def integrate_velocity(
    velocity: torch.Tensor, steps: int, differentiated: int | None = None
) -> torch.Tensor:
    """Scaling and squaring: exp(v) as a displacement, diffeomorphic for a smooth ``v``.

    ``differentiated``: autograd follows only the last this many squarings. An earlier one
    squares ``v / 2^k``, which doubles it up to terms of order |∇v| / 2^k, so its gradient is
    taken as that doubling: the value is the same to the bit, and the backward pass skips
    those squarings' grid sampling, the dearest part of an optimisation step.
    """
    flow = velocity / (2**steps)
    skipped = 0 if differentiated is None else max(steps - differentiated, 0)
    if skipped and flow.requires_grad:
        linear = velocity / 2 ** (steps - skipped)  # the gradient's stand-in, zero in value
        with torch.no_grad():
            for _ in range(skipped):
                flow = flow + warp(flow, flow, padding_mode="border")
        flow = flow + (linear - linear.detach())
        steps -= skipped
    for _ in range(steps):
        flow = flow + warp(flow, flow, padding_mode="border")
    return flow


def resize_flow(flow: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """Resample a voxel-unit flow to another grid over the same extent (corners aligned)."""
    if tuple(flow.shape[2:]) == tuple(shape):
        return flow
    mode = "trilinear" if flow.dim() == 5 else "bilinear"
    scale = torch.tensor(
        [(n - 1) / max(o - 1, 1) for n, o in zip(shape, flow.shape[2:], strict=True)],
        dtype=flow.dtype,
        device=flow.device,
    ).view(1, -1, *([1] * len(shape)))
    return F.interpolate(flow, size=shape, mode=mode, align_corners=True) * scale


def _conv(dim: int, cin: int, cout: int, stride: int = 1) -> nn.Module:
    conv = (nn.Conv2d if dim == 2 else nn.Conv3d)(cin, cout, 3, stride=stride, padding=1)
    return nn.Sequential(conv, nn.LeakyReLU(0.2))


class UNet(nn.Module):
    """VoxelMorph's U-Net: strided-conv encoder, upsample-concatenate decoder."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        dim = config.dim
        self.encoder = nn.ModuleList()
        prev = config.in_channels
        for f in config.encoder:
            self.encoder.append(_conv(dim, prev, f, stride=2))
            prev = f
        self.decoder = nn.ModuleList()
        skips = [config.in_channels, *config.encoder[:-1]][::-1]
        for i, f in enumerate(config.decoder):
            extra = skips[i] if i < len(skips) else 0
            self.decoder.append(_conv(dim, prev + extra, f))
            prev = f
        self.levels = len(config.encoder)
        self.out_channels = prev

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = [x]
        for layer in self.encoder:
            x = layer(x)
            skips.append(x)
        skips.pop()
        mode = "trilinear" if x.dim() == 5 else "bilinear"
        for i, layer in enumerate(self.decoder):
            if i < self.levels:
                x = F.interpolate(x, scale_factor=2, mode=mode, align_corners=False)
                x = torch.cat([x, skips.pop()], dim=1)
            x = layer(x)
        return x


def _padded_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple]:
    """``x`` zero-padded on both sides of each spatial axis to a multiple of ``multiple``, and
    the index that crops the padded grid back to ``x``'s."""
    shape = x.shape[2:]
    before = [(-n % multiple) // 2 for n in shape]
    after = [-n % multiple - b for n, b in zip(shape, before, strict=True)]
    crop = (..., *(slice(b, b + n) for b, n in zip(before, shape, strict=True)))
    if not any(after):  # before ≤ after on every axis
        return x, crop
    pads = [p for b, a in zip(before[::-1], after[::-1], strict=True) for p in (b, a)]
    return F.pad(x, pads), crop


class VxmDense(nn.Module):
    """U-Net on the (fixed, moving) pair → velocity field → displacement (voxels)."""

    def __init__(self, config: NetworkConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.unet = UNet(config)
        conv = nn.Conv2d if config.dim == 2 else nn.Conv3d
        self.flow = conv(self.unet.out_channels, config.dim, 3, padding=1)
        # Near-zero output: an untrained network predicts (almost) the identity, so the
        # engine is usable with random weights and instance optimisation does the work.
        nn.init.normal_(self.flow.weight, std=1e-5)
        nn.init.zeros_(self.flow.bias)

    def velocity(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The velocity (voxels) on the images' grid, whatever its size: the pair is padded
        with zeros to the U-Net's size multiple and the output cropped back, so the grids
        after the network need not grow to that multiple (up to a third more voxels to
        optimise on a brain)."""
        pair, crop = _padded_to_multiple(torch.cat([moving, fixed], dim=1), self.config.multiple)
        # contiguous: channels-last weights (``load_model`` on a CPU) give a channels-last
        # output, which every sampling after this would copy.
        return self.flow(self.unet(pair))[crop].contiguous()

    def symmetric_velocity(self, fixed: torch.Tensor, moving: torch.Tensor) -> torch.Tensor:
        """The mean of the pass for (fixed, moving) and the negated pass for (moving, fixed).

        exp(−v) inverts exp(v), so both passes estimate the same field; their mean cancels part
        of each one's error and gives the same answer, up to sign, whichever image is called
        fixed. On the 20 ordered fs-dev pairs brain3d alone went from 0.745 to 0.751 mean Dice
        (better on 15) for the second forward pass.
        """
        return 0.5 * (self.velocity(fixed, moving) - self.velocity(moving, fixed))

    def recursive_velocity(
        self, fixed: torch.Tensor, moving: torch.Tensor, passes: int, symmetric: bool = True
    ) -> torch.Tensor:
        """:meth:`symmetric_velocity` (or, not ``symmetric``, :meth:`velocity`: half the
        cost), refined ``passes − 1`` times on the pair it half aligns.

        Each further pass sees both images moved halfway, ``fixed ∘ exp(−v/2)`` and
        ``moving ∘ exp(v/2)``, and its velocity is added to ``v``: to first order that composes
        the deformations (the later ones are small), it stays one stationary field, and, when
        symmetric, swapping the images still gives exactly ``−v``. The network then corrects
        what it left at a scale it was trained on, as a recursive cascade does.
        """
        one_pass = self.symmetric_velocity if symmetric else self.velocity
        velocity = one_pass(fixed, moving)
        steps = self.config.integration_steps
        for _ in range(passes - 1):
            half_fixed = warp(fixed, integrate_velocity(-0.5 * velocity, steps))
            half_moving = warp(moving, integrate_velocity(0.5 * velocity, steps))
            velocity = velocity + one_pass(half_fixed, half_moving)
        return velocity

    def forward(self, fixed: torch.Tensor, moving: torch.Tensor):
        """Returns (warped moving, displacement, velocity)."""
        velocity = self.velocity(fixed, moving)
        flow = integrate_velocity(velocity, self.config.integration_steps)
        return warp(moving, flow), flow, velocity
