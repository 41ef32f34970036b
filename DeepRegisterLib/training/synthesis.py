"""SynthMorph-style training pairs, synthesised on the fly from label maps.

Images drawn from label maps with random contrast, bias, blur and noise teach a network to
register any contrast, and label maps carry no image-data licence problem (Hoffmann et al.,
SynthMorph, 2022). The label maps come from files (:mod:`label_maps`) or, with no data at all,
from the argmax of smoothed random fields. Everything is torch and draws only from the caller's
``torch.Generator``: the same generator state gives the same pair on the same device, which is
what lets a resumed training run see exactly the batches an uninterrupted one would have.

Coordinates are voxels of the training grid, one flow channel per array axis (as in
:mod:`networks`). The returned ``flow`` follows the project's convention: ``warp(moving, flow)``
reproduces ``fixed``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..errors import InputError
from ..nn.networks import identity_grid, integrate_velocity, resize_flow, sample
from .config import SynthesisConfig
from .intensities import FREESURFER_T1_MEANS, synthesise_image
from .label_maps import LabelMaps
from .random_fields import (
    apply_matrix,
    happens,
    random_matrix,
    random_shapes,
    smooth_noise,
    uniform,
)


@dataclass
class SyntheticPair:
    """A batch of pairs (N, 1, *shape) with labels and the true fixed → moving displacement.

    ``flow`` (N, dim, *shape) is in voxels: ``moving(x + flow(x)) = fixed(x)``. It is None when
    a pair's images come from two maps (``other_subject``): no true flow exists then. Labels are
    indices into the label table of the source (0 = background), as int64.
    """

    fixed: torch.Tensor
    moving: torch.Tensor
    fixed_labels: torch.Tensor
    moving_labels: torch.Tensor
    flow: torch.Tensor | None


class Synthesiser:
    """Draws :class:`SyntheticPair` batches of a fixed shape from label maps or random shapes.

    Per pair: a source label map (a random map, or a random slice of a 3D map for 2D training)
    is placed with a random offset; its shape is changed by a random diffeomorphism (variety
    beyond the few maps there are); the moving labels are the fixed labels (or, with
    probability ``other_subject``, another aligned map's) seen through ``T(y) = A(y + w(y))``,
    ``w = exp(v)`` with ``v`` smooth noise and ``A`` a small affine; then each image gets its
    own random contrast. The true flow (one map only) is ``T⁻¹(x) − x`` with
    ``T⁻¹(x) = z + exp(−v)(z)``, ``z = A⁻¹x``: diffeomorphic by construction.
    """

    def __init__(
        self,
        shape: Sequence[int],
        config: SynthesisConfig | None = None,
        label_maps: LabelMaps | None = None,
        device: torch.device | str = "cpu",
    ):
        self.shape = tuple(int(n) for n in shape)
        self.dim = len(self.shape)
        if self.dim not in (2, 3):
            raise InputError(f"the training shape must be 2D or 3D, got {self.shape}")
        self.config = config or SynthesisConfig()
        self.device = torch.device(device)
        self.label_maps = label_maps
        if label_maps is not None:
            self.maps = [m.to(self.device) for m in label_maps.maps]
            if any(m.dim() < self.dim for m in self.maps):
                raise InputError(f"{self.dim}D training needs {self.dim}D or 3D label maps")
        if self.config.other_subject > 0 and (
            label_maps is None or not label_maps.aligned or len(label_maps.maps) < 2
        ):
            raise InputError(
                "pairs from two label maps (other_subject > 0) need at least two label maps "
                "loaded with align=True (deepregister train --label-maps ... --other-subject P)"
            )
        self.count = label_maps.count if label_maps is not None else self.config.shape_labels
        values = label_maps.values if label_maps is not None else []
        self.t1_means = torch.tensor(
            [FREESURFER_T1_MEANS.get(v, math.nan) for v in values] or [math.nan] * self.count,
            device=self.device,
        )

    def _means(self, generator: torch.Generator, t1_like: bool) -> torch.Tensor:
        """Mean intensity of each label: uniform in [0, 1], or T1-like where the label is known."""
        means = torch.rand(self.count, generator=generator, device=self.device)
        if not t1_like:
            return means
        jitter = torch.randn(self.count, generator=generator, device=self.device)
        t1 = (self.t1_means + self.config.t1_jitter * jitter).clamp(0, 1)
        return torch.where(self.t1_means.isnan(), means, t1)

    def _sources(self, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """The fixed and moving source label maps (*source_shape) as int64 indices: one map,
        or two aligned maps with probability ``other_subject``."""
        if self.label_maps is None:
            source = random_shapes(
                self.shape, self.count, self.config.shape_spacing, generator, self.device
            )
            return source, source
        device = self.device
        index = int(torch.randint(len(self.maps), (), generator=generator, device=device))
        other = index
        if happens(self.config.other_subject, generator, device):
            other = int(torch.randint(len(self.maps) - 1, (), generator=generator, device=device))
            other += other >= index
        fixed, moving = self.maps[index], self.maps[other]
        if fixed.dim() == 3 and self.dim == 2:
            axis = int(torch.randint(3, (), generator=generator, device=device))
            extent = fixed.shape[axis]
            fraction = 0.25 + 0.5 * float(torch.rand((), generator=generator, device=device))
            position = min(int(fraction * extent), extent - 1)
            fixed, moving = fixed.select(axis, position), moving.select(axis, position)
        fixed = fixed.long()
        return fixed, (fixed if other == index else moving.long())

    def _offset(self, source_shape: tuple[int, ...], generator) -> torch.Tensor:
        """Training grid → source voxels: centred, jittered so crops cover the whole source."""
        source = torch.tensor(source_shape, dtype=torch.float32, device=self.device)
        target = torch.tensor(self.shape, dtype=torch.float32, device=self.device)
        jitter = (2 * torch.rand(self.dim, generator=generator, device=self.device) - 1) * (
            (source - target).abs() / 2
        )
        return (source - target) / 2 + jitter

    def _pair(self, generator: torch.Generator) -> SyntheticPair:
        config, device, dim = self.config, self.device, self.dim
        source, moving_map = self._sources(generator)
        offset = self._offset(tuple(source.shape), generator).view(1, dim, *([1] * dim))
        identity = identity_grid(self.shape, device)
        centre = (torch.tensor(self.shape, device=device, dtype=torch.float32) - 1) / 2

        # Velocities are smooth at the control-point scale, so integrating them at half
        # resolution and upsampling the result loses nothing and costs an eighth in 3D.
        half = tuple((n + 1) // 2 for n in self.shape)

        def exp(velocity: torch.Tensor) -> torch.Tensor:
            return resize_flow(integrate_velocity(velocity, config.integration_steps), self.shape)

        def velocity(high: float) -> torch.Tensor:
            std = uniform(generator, high / 2, device)
            return smooth_noise(half, dim, config.velocity_spacing / 2, std, generator, device)

        shape_change = exp(velocity(config.shape_std))
        v = velocity(config.velocity_std)
        matrix = random_matrix(dim, config, generator, device)
        translation = (2 * torch.rand(dim, generator=generator, device=device) - 1) * (
            config.translation
        )
        translation = translation.view(1, dim, *([1] * dim))

        # Moving voxel y ↦ fixed position T(y) = A(y + w(y)), w = exp(v).
        moved = identity + exp(v)
        to_fixed = apply_matrix(matrix, moved, centre) + translation
        # Fixed position x ↦ source position x + s(x) + offset.
        fixed_source = identity + shape_change + offset
        moving_source = to_fixed + sample(shape_change, to_fixed, padding_mode="border") + offset
        fixed_labels = sample(source.float()[None, None], fixed_source, mode="nearest")
        moving_labels = sample(moving_map.float()[None, None], moving_source, mode="nearest")
        fixed_labels, moving_labels = fixed_labels.round().long(), moving_labels.round().long()

        flow = None
        if moving_map is source:
            # True flow: T⁻¹(x) − x with T⁻¹(x) = z + exp(−v)(z), z = A⁻¹(x − t).
            z = apply_matrix(torch.linalg.inv(matrix), identity - translation, centre)
            flow = z + sample(exp(-v), z, padding_mode="border") - identity

        t1_like = float(torch.rand((), generator=generator, device=device)) < config.t1_like
        means = self._means(generator, t1_like)
        if float(torch.rand((), generator=generator, device=device)) >= config.same_contrast:
            moving_means = self._means(generator, t1_like)
        else:
            moving_means = means
        fixed = synthesise_image(fixed_labels[0, 0], means, config, generator)
        moving = synthesise_image(moving_labels[0, 0], moving_means, config, generator)
        if happens(config.zero_background, generator, device):
            fixed, moving = fixed * (fixed_labels != 0), moving * (moving_labels != 0)
        return SyntheticPair(fixed, moving, fixed_labels, moving_labels, flow)

    def __call__(self, generator: torch.Generator, batch: int = 1) -> SyntheticPair:
        """``batch`` pairs drawn from ``generator`` (which must live on this device)."""
        pairs = [self._pair(generator) for _ in range(batch)]
        flows = [p.flow for p in pairs]
        return SyntheticPair(
            *(
                torch.cat([getattr(p, name) for p in pairs])
                for name in ("fixed", "moving", "fixed_labels", "moving_labels")
            ),
            flow=None if any(f is None for f in flows) else torch.cat(flows),
        )
