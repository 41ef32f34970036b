"""SynthMorph-style training pairs, synthesised on the fly from label maps.

Images drawn from label maps with random contrast, bias, blur and noise teach a network to
register any contrast, and label maps carry no image-data licence problem (Hoffmann et al.,
SynthMorph, 2022). The label maps come from files or, with no data at all, from the argmax of
smoothed random fields. Everything is torch and draws only from the caller's
``torch.Generator``: the same generator state gives the same pair on the same device, which is
what lets a resumed training run see exactly the batches an uninterrupted one would have.

Coordinates are voxels of the training grid, one flow channel per array axis (as in
:mod:`networks`). The returned ``flow`` follows the project's convention: ``warp(moving, flow)``
reproduces ``fixed``.
"""

from __future__ import annotations

import hashlib
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch
import torch.nn.functional as F

from ..errors import InputError
from ..imaging.fileio import atomic_write_path, read_image
from ..imaging.geometry import Grid
from ..nn.networks import identity_grid, integrate_velocity, resize_flow, sample
from ..registration.affine import register_normalised
from ..registration.preprocessing import foreground_box, normalised_for_registration

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


@dataclass(frozen=True)
class SynthesisConfig:
    """Ranges of the random draws. A "max" is the top of a uniform draw from 0 per pair."""

    velocity_std: float = 3.0  # max std (voxels) of the velocity between fixed and moving
    velocity_spacing: float = 8.0  # voxels between the velocity's control points
    shape_std: float = 2.0  # max velocity std (voxels) of the shape change of a source map
    integration_steps: int = 7
    rotation_deg: float = 5.0  # max rotation about each axis between fixed and moving
    scaling: float = 0.05  # max relative scaling per axis
    shear: float = 0.02
    translation: float = 2.0  # max voxels per axis
    same_contrast: float = 0.0  # probability that both images share their label means
    # Probability that the moving labels come from another map than the fixed ones (maps
    # affinely aligned by ``load_label_maps(align=True)``): real inter-subject anatomy, which
    # the random shape changes of a single map do not reproduce.
    other_subject: float = 0.0
    # Probability that a pair's label means follow FREESURFER_T1_MEANS (each jittered by
    # ``t1_jitter``) instead of uniform draws: same-modality T1 pairs, learnt in far fewer
    # steps than SynthMorph's any-contrast pairs. Needs label maps in FreeSurfer's convention.
    t1_like: float = 0.0
    t1_jitter: float = 0.05
    # Probability that a pair's background (label 0) is exactly 0 in both images, as in
    # skull-stripped scans; otherwise it draws a contrast like any label. Random contrasts
    # alone rarely show a black background beside dark tissue, which T2-like scans have.
    zero_background: float = 0.0
    intensity_std: float = 0.1  # max within-label std, intensities drawn in [0, 1]
    blur_sigma: float = 1.0  # max Gaussian blur sigma (voxels)
    bias_std: float = 0.3  # max std of the log of the multiplicative bias field
    bias_spacing: float = 16.0  # voxels between the bias field's control points
    gamma_std: float = 0.25  # std of the log of the gamma exponent
    shape_labels: int = 16  # labels of generated maps (used when no label maps are given)
    shape_spacing: float = 8.0  # voxels between control points of generated maps


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


@dataclass
class LabelMaps:
    """Label maps on an isotropic grid, cropped to their foreground, with consecutive labels.

    ``values[i]`` is the original label value of index ``i`` (index 0 is background);
    ``names`` are the source files, for the model card. ``aligned`` maps share the first map's
    grid, each affinely registered to it.
    """

    maps: list[torch.Tensor]
    values: list[int]
    spacing_mm: float
    names: list[str]
    aligned: bool = False

    @property
    def count(self) -> int:
        return len(self.values)


def load_label_maps(
    paths: Sequence[str | os.PathLike],
    spacing_mm: float,
    background_from: int | None = None,
    align: bool = False,
    progress: Callable[[str], None] | None = None,
    cache: str | os.PathLike | None = None,
) -> LabelMaps:
    """Read label maps and resample them (nearest) to ``spacing_mm`` in their own orientation.

    Each map is cropped to its foreground with the engine's margin, so training sees brains
    framed as the engine frames a fixed image. Labels ≥ ``background_from`` become background
    (SynthSeg's extra-cerebral labels are ≥ 100: dropping them gives skull-stripped anatomy).
    With ``align``, every map is registered (the engine's affine stage, on label-derived
    images) to the first and resampled onto its grid: pairs of two maps then differ as two
    subjects do after the engine's affine stage.

    ``cache`` names a file that keeps the result for the next call with the same files (by
    content) and options: aligning 20 SynthSeg maps takes minutes, and every ``--resume``
    of a training run would otherwise pay them again.
    """
    if not paths:
        raise InputError("no label maps given")
    key = _cache_key(paths, spacing_mm, background_from, align) if cache is not None else ""
    if cache is not None and (cached := _read_cache(Path(cache), key, spacing_mm, align)):
        if progress is not None:
            progress(f"label maps from {cache} (same files and options)")
        return cached
    images = [_read_label_map(path, background_from) for path in paths]
    grid = _cropped_grid(images[0], spacing_mm)
    reference = _label_image(images[0]) if align else None
    arrays = []
    for index, (path, image) in enumerate(zip(paths, images, strict=True)):
        if not align:
            grid = _cropped_grid(image, spacing_mm)
        transform = sitk.Transform()
        if reference is not None and index > 0:
            if progress is not None:
                progress(f"aligning label map {index + 1}/{len(paths)} ({Path(path).name})")
            transform = register_normalised(reference, _label_image(image))
        resampled = sitk.Resample(
            image, grid.reference_image(), transform, sitk.sitkNearestNeighbor, 0
        )
        arrays.append(sitk.GetArrayFromImage(resampled))
    values = np.unique(np.concatenate([np.unique(a) for a in arrays]))
    values = np.union1d([0], values)
    storage = torch.uint8 if len(values) <= 256 else torch.int16
    maps = [torch.from_numpy(np.searchsorted(values, a)).to(storage) for a in arrays]
    result = LabelMaps(
        maps, [int(v) for v in values], float(spacing_mm), [Path(p).name for p in paths], align
    )
    if cache is not None:
        data = {"key": key, "maps": maps, "values": result.values, "names": result.names}
        with atomic_write_path(cache) as staged:
            torch.save(data, staged)
    return result


def _cache_key(
    paths: Sequence[str | os.PathLike], spacing_mm: float, background_from: int | None, align: bool
) -> str:
    digest = hashlib.sha256(f"v1 {spacing_mm!r} {background_from!r} {align}".encode())
    for path in paths:
        digest.update(hashlib.sha256(Path(path).read_bytes()).digest())
    return digest.hexdigest()


def _read_cache(path: Path, key: str, spacing_mm: float, align: bool) -> LabelMaps | None:
    """The cached maps if ``path`` holds them for ``key``; None (recompute) otherwise."""
    try:
        data = torch.load(path, weights_only=True)
    except Exception:  # absent, truncated, refused by weights_only: computing again is safe
        return None
    if not isinstance(data, dict) or data.get("key") != key:
        return None
    return LabelMaps(data["maps"], data["values"], float(spacing_mm), data["names"], align)


def _read_label_map(path: str | os.PathLike, background_from: int | None) -> sitk.Image:
    image = read_image(path, "label map")
    if image.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"label map {path} is a vector image; give a scalar label map")
    labels = sitk.Cast(image, sitk.sitkInt32)
    if background_from is not None:
        labels = labels * sitk.Cast(labels < background_from, sitk.sitkInt32)
    if not sitk.GetArrayViewFromImage(labels).any():
        raise InputError(f"label map {path} has no non-zero labels")
    return labels


def _cropped_grid(labels: sitk.Image, spacing_mm: float) -> Grid:
    lower, upper = foreground_box(labels, labels > 0)
    return Grid.of(labels).with_spacing_cropped_to(spacing_mm, lower, upper, multiple=1)


def _label_image(labels: sitk.Image) -> sitk.Image:
    """An image to register label maps by (normalised for the affine stage): T1-like values for
    FreeSurfer labels, and a fixed value per label otherwise, so any two maps in one label
    convention look alike."""
    array = sitk.GetArrayViewFromImage(labels)
    values, inverse = np.unique(array, return_inverse=True)
    golden = 0.6180339887
    intensity = np.array(
        [FREESURFER_T1_MEANS.get(int(v), 0.2 + 0.7 * ((int(v) * golden) % 1.0)) for v in values],
        dtype=np.float32,
    )
    intensity[values == 0] = 0.0
    image = sitk.GetImageFromArray(intensity[inverse].reshape(array.shape))
    image.CopyInformation(labels)
    return normalised_for_registration(image)


def _happens(chance: float, generator: torch.Generator, device: torch.device) -> bool:
    """True with probability ``chance``; no draw at all when it is 0, so runs from before an
    option that uses this see the same pairs."""
    return chance > 0 and float(torch.rand((), generator=generator, device=device)) < chance


def _uniform(generator: torch.Generator, high: float, device: torch.device) -> torch.Tensor:
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


def _random_matrix(dim: int, config: SynthesisConfig, generator, device) -> torch.Tensor:
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


def _apply_matrix(matrix: torch.Tensor, points: torch.Tensor, centre: torch.Tensor):
    """``matrix (p − centre) + centre`` for points (1, dim, *shape)."""
    view = (1, -1) + (1,) * (points.dim() - 2)
    return torch.einsum("ij,nj...->ni...", matrix, points - centre.view(view)) + centre.view(view)


def _gaussian_blur(image: torch.Tensor, sigma: float) -> torch.Tensor:
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
    gamma, then percentile normalisation. Each call draws a new contrast, so fixed and moving
    images differ in contrast as well as in shape.
    """
    device = labels.device
    stds = torch.rand(len(means), generator=generator, device=device) * config.intensity_std
    noise = torch.randn(labels.shape, generator=generator, device=device)
    image = (means[labels] + stds[labels] * noise)[None, None]
    image = _gaussian_blur(image, float(_uniform(generator, config.blur_sigma, device)))
    if config.bias_std > 0:
        bias_std = _uniform(generator, config.bias_std, device)
        shape = tuple(labels.shape)
        image = image * torch.exp(
            smooth_noise(shape, 1, config.bias_spacing, bias_std, generator, device)
        )
    low, high = image.amin(), image.amax()
    image = (image - low) / (high - low).clamp_min(1e-6)
    gamma = torch.exp(torch.randn((), generator=generator, device=device) * config.gamma_std)
    return normalise_percentiles(image.clamp_min(0) ** gamma)


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
        if _happens(self.config.other_subject, generator, device):
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
            std = _uniform(generator, high / 2, device)
            return smooth_noise(half, dim, config.velocity_spacing / 2, std, generator, device)

        shape_change = exp(velocity(config.shape_std))
        v = velocity(config.velocity_std)
        matrix = _random_matrix(dim, config, generator, device)
        translation = (2 * torch.rand(dim, generator=generator, device=device) - 1) * (
            config.translation
        )
        translation = translation.view(1, dim, *([1] * dim))

        # Moving voxel y ↦ fixed position T(y) = A(y + w(y)), w = exp(v).
        moved = identity + exp(v)
        to_fixed = _apply_matrix(matrix, moved, centre) + translation
        # Fixed position x ↦ source position x + s(x) + offset.
        fixed_source = identity + shape_change + offset
        moving_source = to_fixed + sample(shape_change, to_fixed, padding_mode="border") + offset
        fixed_labels = sample(source.float()[None, None], fixed_source, mode="nearest")
        moving_labels = sample(moving_map.float()[None, None], moving_source, mode="nearest")
        fixed_labels, moving_labels = fixed_labels.round().long(), moving_labels.round().long()

        flow = None
        if moving_map is source:
            # True flow: T⁻¹(x) − x with T⁻¹(x) = z + exp(−v)(z), z = A⁻¹(x − t).
            z = _apply_matrix(torch.linalg.inv(matrix), identity - translation, centre)
            flow = z + sample(exp(-v), z, padding_mode="border") - identity

        t1_like = float(torch.rand((), generator=generator, device=device)) < config.t1_like
        means = self._means(generator, t1_like)
        if float(torch.rand((), generator=generator, device=device)) >= config.same_contrast:
            moving_means = self._means(generator, t1_like)
        else:
            moving_means = means
        fixed = synthesise_image(fixed_labels[0, 0], means, config, generator)
        moving = synthesise_image(moving_labels[0, 0], moving_means, config, generator)
        if _happens(config.zero_background, generator, device):
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
