"""A torso-like CT phantom pair (int16 HU) with a known smooth deformation, built a slab at a
time so that even a 512² × 600 pair fits beside the registration it is made for."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import SimpleITK as sitk


def displacement_mm(points: np.ndarray, extent: np.ndarray) -> np.ndarray:
    """The known smooth deformation d(x) (mm), ≤ about 4 mm: a shift plus two sine waves."""
    shift = np.array([2.0, -1.5, 1.0], dtype=np.float32)
    phase = points / extent.astype(np.float32) * np.float32(2 * np.pi)
    d = np.empty_like(points)
    d[..., 0] = shift[0] + 2.5 * np.sin(phase[..., 1] + 0.3) * np.cos(phase[..., 2])
    d[..., 1] = shift[1] + 2.0 * np.sin(phase[..., 2] + 1.1)
    d[..., 2] = shift[2] + 1.5 * np.cos(phase[..., 0] - 0.4)
    return d


def ct_values(points: np.ndarray, extent: np.ndarray, seed: int) -> np.ndarray:
    """Hounsfield units of a torso-like phantom at LPS points (origin at the volume centre)."""
    x, y, z = points[..., 0], points[..., 1], points[..., 2]
    a, b = 0.42 * extent[0], 0.30 * extent[1]
    half_z = 0.45 * extent[2]
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2)
    inside = (r < 1.0) & (np.abs(z) < half_z)
    hu = np.full(points.shape[:-1], -1024.0, dtype=np.float32)
    tissue = 40.0 + 25.0 * np.sin(x / 9.0) * np.cos(y / 11.0) * np.sin(z / 13.0)
    hu[inside] = tissue[inside]
    hu[inside & (r > 0.9)] = -100.0  # subcutaneous fat
    chest = z > 0.0
    for side in (-1.0, 1.0):
        lung = (
            ((x - side * 0.45 * a) / (0.33 * a)) ** 2
            + ((y + 0.1 * b) / (0.6 * b)) ** 2
            + ((z - 0.5 * half_z) / (0.45 * half_z)) ** 2
        ) < 1.0
        hu[lung & inside] = -850.0
    spine = np.sqrt(x**2 + (y - 0.6 * b) ** 2)
    hu[inside & (spine < 18.0)] = 1000.0
    hu[inside & (spine < 12.0)] = 300.0
    ribs = inside & chest & (r > 0.8) & (r < 0.86) & (np.sin(z / 6.0) > 0.3)
    hu[ribs] = 700.0
    noise = np.random.default_rng(seed).normal(0.0, 12.0, size=hu.shape).astype(np.float32)
    hu[inside] += noise[inside]
    return np.clip(np.rint(hu), -1024, 3071).astype(np.int16)


def ct_pair(shape_ijk: tuple[int, int, int], spacing: tuple[float, float, float]):
    """Fixed f(x) and moving m(y) = f(y − d(y)) (so u ≈ d), built a slab at a time: at most one
    int16 array, its SimpleITK copy and one slab of coordinates exist at once."""
    size = np.asarray(shape_ijk)
    sp = np.asarray(spacing, dtype=np.float32)
    extent = size * sp
    origin = -(size - 1) / 2.0 * sp
    images = []
    for moving in (False, True):
        volume = np.empty(tuple(size[::-1]), dtype=np.int16)  # (K, J, I)
        slab = max(1, 4_000_000 // int(size[0] * size[1]))
        i = origin[0] + sp[0] * np.arange(size[0], dtype=np.float32)
        j = origin[1] + sp[1] * np.arange(size[1], dtype=np.float32)
        for k0 in range(0, size[2], slab):
            k = origin[2] + sp[2] * np.arange(k0, min(k0 + slab, size[2]), dtype=np.float32)
            points = np.stack(np.meshgrid(k, j, i, indexing="ij")[::-1], axis=-1)
            if moving:
                points -= displacement_mm(points, extent)
            volume[k0 : k0 + len(k)] = ct_values(points, extent, seed=k0 + 7919 * moving)
        image = sitk.GetImageFromArray(volume)
        del volume
        image.SetSpacing(tuple(float(s) for s in sp))
        image.SetOrigin(tuple(float(o) for o in origin))
        images.append(image)
    return images[0], images[1], extent


#: Label values of :func:`hu_labels`: what a CT pair's overlap is scored on.
CT_LABELS = {1: "lungs", 2: "soft tissue", 3: "bone"}


def hu_labels(image: sitk.Image) -> sitk.Image:
    """Lungs (−1000 to −500 HU), soft tissue (−200 to 200 HU) and bone (above 250 HU) of a
    phantom image, as 1, 2 and 3 (the phantom's noise is 12 HU: the classes stay apart)."""
    hu = sitk.GetArrayViewFromImage(image)
    labels = np.zeros(hu.shape, dtype=np.uint8)
    labels[(hu > -1000) & (hu < -500)] = 1
    labels[(hu > -200) & (hu < 200)] = 2
    labels[hu > 250] = 3
    out = sitk.GetImageFromArray(labels)
    out.CopyInformation(image)
    return out


def ct_pair_files(
    folder: Path, shape_ijk: tuple[int, int, int], spacing: tuple[float, float, float]
) -> dict[str, str]:
    """:func:`ct_pair` written to ``folder`` as NRRD, as Slicer saves a scan, with its
    :func:`hu_labels`: the paths under ``fixed``, ``moving``, ``fixed_labels`` and
    ``moving_labels``."""
    fixed, moving, _ = ct_pair(shape_ijk, spacing)
    paths = {}
    for key, image in (("fixed", fixed), ("moving", moving)):
        paths[key] = str(folder / f"ct-{key}.nrrd")
        sitk.WriteImage(image, paths[key])
        paths[f"{key}_labels"] = str(folder / f"ct-{key}-labels.nrrd")
        sitk.WriteImage(hu_labels(image), paths[f"{key}_labels"])
    return paths
