"""Synthetic image pairs with a known deformation, for the demo and for tests.

A "head" of nested ellipsoids with distinct intensities and integer labels; the moving image is
the fixed one pushed through a known smooth, invertible deformation plus a small rotation, so
every result can be checked against the truth without any data files.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from .geometry import Grid

# (centre, semi-axes) in units of the half-extent, label, intensity
_STRUCTURES_3D = (
    ((0.0, 0.0, 0.0), (0.85, 0.75, 0.9), 1, 60.0),  # tissue
    ((0.0, 0.05, 0.0), (0.7, 0.6, 0.75), 2, 110.0),  # grey-matter-like shell
    ((0.0, 0.05, 0.0), (0.55, 0.45, 0.6), 3, 160.0),  # white-matter-like core
    ((-0.22, 0.0, 0.05), (0.12, 0.25, 0.1), 4, 30.0),  # left "ventricle"
    ((0.22, 0.0, 0.05), (0.12, 0.25, 0.1), 5, 30.0),  # right "ventricle"
    ((0.0, -0.35, -0.3), (0.15, 0.12, 0.12), 6, 200.0),  # small bright structure
    ((-0.35, 0.3, -0.2), (0.1, 0.1, 0.15), 7, 90.0),
    ((0.35, 0.3, -0.2), (0.1, 0.1, 0.15), 8, 90.0),
)


@dataclass
class PhantomPair:
    fixed: sitk.Image
    moving: sitk.Image
    fixed_labels: sitk.Image
    moving_labels: sitk.Image
    true_displacement: sitk.Image  # fixed → moving (LPS mm), on the fixed grid


def phantom(grid: Grid) -> tuple[sitk.Image, sitk.Image]:
    """Intensity image (float32, mild texture) and label map (uint8) on ``grid``."""
    dim = grid.dim
    axes = [np.linspace(-1.0, 1.0, n) for n in grid.shape]
    coords = np.meshgrid(*axes, indexing="ij")[::-1]  # (I, J[, K]) order, each (K, J, I)
    intensity = np.zeros(grid.shape, dtype=np.float32)
    labels = np.zeros(grid.shape, dtype=np.uint8)
    for centre, radii, label, value in _STRUCTURES_3D:
        r2 = sum(((coords[a] - centre[a]) / radii[a]) ** 2 for a in range(dim))
        inside = r2 <= 1.0
        intensity[inside] = value
        labels[inside] = label
    texture = sum(np.sin(5.0 * coords[a] + a) for a in range(dim)) * 4.0
    intensity = np.where(labels > 0, intensity + texture, 0.0).astype(np.float32)
    image = grid.apply_to(sitk.GetImageFromArray(intensity))
    label_image = grid.apply_to(sitk.GetImageFromArray(labels))
    return sitk.SmoothingRecursiveGaussian(image, min(grid.spacing)), label_image


def smooth_displacement(grid: Grid, amplitude_mm: float, seed: int = 0) -> sitk.Image:
    """A smooth random displacement (LPS mm) on ``grid``: a few low-frequency sinusoids.

    Its gradient stays well below 1, so ``x + u(x)`` is invertible (no folding).
    """
    rng = np.random.default_rng(seed)
    dim = grid.dim
    axes = [np.linspace(0.0, 1.0, n) for n in grid.shape]
    coords = np.meshgrid(*axes, indexing="ij")[::-1]
    field = np.zeros((*grid.shape, dim))
    for component in range(dim):
        for _ in range(3):
            freq = rng.uniform(0.5, 1.5, size=dim)
            phase = rng.uniform(0, 2 * np.pi)
            wave = np.sin(2 * np.pi * sum(freq[a] * coords[a] for a in range(dim)) + phase)
            field[..., component] += wave
    field *= amplitude_mm / max(np.abs(field).max(), 1e-9)
    return grid.apply_to(sitk.GetImageFromArray(field, isVector=True))


def phantom_pair(
    grid: Grid, amplitude_mm: float = 6.0, rotation_deg: float = 5.0, seed: int = 0
) -> PhantomPair:
    """Fixed phantom and a moving phantom ``moving(T(x)) = fixed(x)`` for a known ``T``.

    ``T = R ∘ (x + d(x))`` — a rotation about the centre after a smooth deformation — is given
    as the true fixed → moving displacement on the fixed grid; the moving image is made by
    resampling the fixed image through ``T⁻¹`` (computed by ITK's iterative inversion).
    """
    fixed, fixed_labels = phantom(grid)
    dim = grid.dim
    deformation = smooth_displacement(grid, amplitude_mm, seed)
    centre = fixed.TransformContinuousIndexToPhysicalPoint([(s - 1) / 2 for s in grid.size])
    rotation = sitk.Euler3DTransform() if dim == 3 else sitk.Euler2DTransform()
    rotation.SetCenter(centre)
    angle = np.deg2rad(rotation_deg)
    if dim == 3:
        rotation.SetRotation(0.0, 0.0, angle)
    else:
        rotation.SetAngle(angle)
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(fixed)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    total = sitk.CompositeTransform(dim)
    total.AddTransform(rotation)
    total.AddTransform(sitk.DisplacementFieldTransform(sitk.Image(deformation)))
    true_displacement = to_field.Execute(total)
    inverse = sitk.InvertDisplacementField(
        true_displacement, maximumNumberOfIterations=50, meanErrorToleranceThreshold=1e-4,
        maxErrorToleranceThreshold=1e-2,
    )  # fmt: skip
    backward = sitk.DisplacementFieldTransform(sitk.Image(inverse))
    moving = sitk.Resample(fixed, fixed, backward, sitk.sitkLinear, 0.0)
    moving_labels = sitk.Resample(fixed_labels, fixed, backward, sitk.sitkNearestNeighbor, 0)
    return PhantomPair(fixed, moving, fixed_labels, moving_labels, true_displacement)


def demo_grid(dim: int = 3, size: int = 64) -> Grid:
    """An oblique, anisotropic grid: the demo exercises the geometry, not just the maths."""
    if dim == 2:
        angle = np.deg2rad(10.0)
        direction = (np.cos(angle), -np.sin(angle), np.sin(angle), np.cos(angle))
        return Grid((size, size), (1.5, 1.2), (-40.0, -35.0), tuple(direction))
    rotation = sitk.VersorTransform((0.3, 0.2, 1.0), np.deg2rad(12.0))
    direction = tuple(np.asarray(rotation.GetMatrix()))
    return Grid((size, size + 8, size - 8), (1.5, 1.3, 1.8), (-50.0, -60.0, -40.0), direction)
