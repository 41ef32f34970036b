"""The benchmark's image pairs: fs-dev subjects in a documented order, their T2-like and 2D
variants, and phantom pairs for ``--smoke``. Each pair is a :class:`PairSpec` of files."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from DeepRegisterLib import RegistrationSettings

from .tasks import PairSpec


def subjects_in(data: Path, image: str = "brainmask") -> list[str]:
    """The subjects with a brain mask, labels and ``image`` (``T1``: the whole head)."""
    names = {"brainmask.nii.gz", "aseg.nii.gz", f"{image}.nii.gz"}
    return sorted(
        d.name for d in data.iterdir() if d.is_dir() and all((d / n).exists() for n in names)
    )


def ordered_pairs(subjects: Sequence[str]) -> list[tuple[str, str]]:
    """Every ordered (moving, fixed) pair, in a fixed, documented order.

    First a ring in which, for five subjects, every subject is fixed once and moving once:
    ``moving = s[(2k+1) mod n], fixed = s[2k mod n]`` for k = 0…n−1 — sub-02→sub-01,
    sub-04→sub-03, sub-01→sub-05, sub-03→sub-02, sub-05→sub-04 — so ``--pairs 2`` is
    sub-02→sub-01 (the reference pair of shared/README.md) and sub-04→sub-03 (four different
    subjects). Then the remaining pairs sorted by (fixed, moving).
    """
    n = len(subjects)
    order: list[tuple[str, str]] = []
    for k in range(n):
        pair = (subjects[(2 * k + 1) % n], subjects[(2 * k) % n])
        if pair[0] != pair[1] and pair not in order:
            order.append(pair)
    rest = sorted(
        ((m, f) for f in subjects for m in subjects if m != f and (m, f) not in order),
        key=lambda p: (p[1], p[0]),
    )
    return order + rest


def _stem(spec: PairSpec) -> str:
    """The pair's name as a file name's stem: ``sub-02_to_sub-01``, ``phantom_0``."""
    return spec.name.replace("→", "_to_").replace(" ", "_")


def _region_file(image: sitk.Image, folder: Path, name: str) -> str:
    path = folder / f"{name}-region.nii.gz"
    sitk.WriteImage(sitk.Cast(image > 0, sitk.sitkUInt8), str(path))
    return str(path)


def t2_like(brain: sitk.Image) -> sitk.Image:
    """A T2-like contrast from a skull-stripped T1: inverted and non-linearly remapped.

    Inside the brain mask (voxels > 0) ``255 · (1 − v/p99)^1.5`` with ``v`` clipped to the
    99th percentile, 0 outside: CSF becomes bright, white matter dark, and the mapping is not
    linear, so no method can succeed by merely flipping the sign of a correlation.
    """
    array = sitk.GetArrayFromImage(brain).astype(np.float32)
    inside = array > 0
    top = float(np.percentile(array[inside], 99)) if inside.any() else 1.0
    remapped = 255.0 * np.clip(1.0 - np.minimum(array, top) / top, 0.0, 1.0) ** 1.5
    out = sitk.GetImageFromArray(np.where(inside, remapped, 0.0).astype(np.float32))
    out.CopyInformation(brain)
    return out


def negative(spec: PairSpec, folder: Path) -> PairSpec:
    """The pair as negatives (``max − v`` of each image): dark brains on a bright background,
    as photographs and slides on white come. Labels and the scored region are the pair's."""
    stem = _stem(spec)
    paths = {}
    for key in ("fixed", "moving"):
        image = sitk.ReadImage(getattr(spec, key))
        top = float(sitk.GetArrayViewFromImage(image).max())
        flipped = sitk.Cast(top - sitk.Cast(image, sitk.sitkFloat32), image.GetPixelID())
        paths[key] = str(folder / f"{stem}-{key}-negative.nii.gz")
        sitk.WriteImage(flipped, paths[key])
    return PairSpec(
        name=spec.name, fixed_labels=spec.fixed_labels, moving_labels=spec.moving_labels,
        region=spec.region or _region_file(sitk.ReadImage(spec.fixed), folder, stem),
        labels=spec.labels, **paths,
    )  # fmt: skip


def turned(spec: PairSpec, folder: Path, degrees: float, axis: int) -> PairSpec:
    """The pair with its moving image and labels turned by ``degrees`` about their centre, in
    their headers (no resampling, nothing cut off): about the LPS ``axis`` (0, 1, 2) in 3D, in
    the plane in 2D. The affine stage has to find the turn; the scores are the pair's own."""
    stem = _stem(spec)
    paths = {}
    for key in ("moving", "moving_labels"):
        image = sitk.ReadImage(getattr(spec, key))
        dim = image.GetDimension()
        centre = np.asarray(
            image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in image.GetSize()])
        )
        cos, sin = np.cos(np.deg2rad(degrees)), np.sin(np.deg2rad(degrees))
        turn = np.eye(dim)
        plane = [0, 1] if dim == 2 else [a for a in range(3) if a != axis]
        turn[np.ix_(plane, plane)] = [[cos, -sin], [sin, cos]]
        direction = np.asarray(image.GetDirection()).reshape(dim, dim)
        image.SetDirection(tuple((turn @ direction).ravel()))
        image.SetOrigin(tuple(centre + turn @ (np.asarray(image.GetOrigin()) - centre)))
        paths[key] = str(folder / f"{stem}-{key}-turned.nii.gz")
        sitk.WriteImage(image, paths[key])
    return PairSpec(
        name=spec.name, fixed=spec.fixed, fixed_labels=spec.fixed_labels, region=spec.region,
        labels=spec.labels, **paths,
    )  # fmt: skip


def slab(spec: PairSpec, folder: Path, mm: float) -> PairSpec:
    """The pair with its moving image cut to a slab ``mm`` thick through the middle of its
    non-zero voxels, across the S–I axis (3D) or the second axis (2D): a field of view that
    ends inside the anatomy. The labels stay whole, so Dice also scores the field beyond it."""
    stem = _stem(spec)
    image = sitk.ReadImage(spec.moving)
    dim = image.GetDimension()
    axis = axial_axis(image) if dim == 3 else 1
    others = tuple(a for a in range(dim) if a != dim - 1 - axis)  # numpy axes, reversed
    occupied = np.flatnonzero((sitk.GetArrayViewFromImage(image) > 0).any(axis=others))
    middle = (occupied[0] + occupied[-1]) / 2 if occupied.size else image.GetSize()[axis] / 2
    thickness = min(image.GetSize()[axis], max(1, round(mm / image.GetSpacing()[axis])))
    index = [0] * dim
    index[axis] = int(np.clip(round(middle - thickness / 2), 0, image.GetSize()[axis] - thickness))
    size = list(image.GetSize())
    size[axis] = thickness
    path = folder / f"{stem}-moving-slab.nii.gz"
    sitk.WriteImage(sitk.RegionOfInterest(image, size, index), str(path))
    return replace(spec, moving=str(path))


def axial_axis(image: sitk.Image) -> int:
    """The index axis (ITK order) closest to the S–I (LPS z) direction."""
    direction = np.asarray(image.GetDirection()).reshape(3, 3)
    return int(np.argmax(np.abs(direction[2])))


def _slice(image: sitk.Image, axis: int, index: int) -> sitk.Image:
    """One slice as a 2D image with the in-plane spacing, origin 0 and identity direction."""
    array = sitk.GetArrayFromImage(image)
    array_axis = 2 - axis  # ITK axis i is numpy axis (dim - 1 - i)
    plane = np.take(array, index, axis=array_axis)
    spacing = [s for a, s in enumerate(image.GetSpacing()) if a != axis]
    out = sitk.GetImageFromArray(np.ascontiguousarray(plane))
    out.SetSpacing(spacing)
    return out


def prepare_2d(spec: PairSpec, folder: Path) -> PairSpec:
    """Matched axial slices: DeepRegister's 3D affine first, then the same slice of both.

    The moving volume and labels are resampled onto the fixed grid through the 3D affine, and
    the slice through the middle of the fixed brain's S–I extent is taken from both, so the 2D
    problem is the residual in-plane deformation. "identity" in 2D is therefore "after 3D affine".
    """
    from DeepRegisterLib import register

    fixed = sitk.ReadImage(spec.fixed)
    labels = sitk.ReadImage(spec.fixed_labels)
    moving_labels = {"aseg": sitk.ReadImage(spec.moving_labels)}
    affine_only = RegistrationSettings(
        iterations=0, model="none", compute_jacobian=False, device="cpu"
    )
    result = register(fixed, sitk.ReadImage(spec.moving), affine_only, moving_labels=moving_labels)
    axis = axial_axis(fixed)
    brain = sitk.GetArrayViewFromImage(fixed) > 0
    occupied = np.flatnonzero(brain.any(axis=tuple(a for a in range(3) if a != 2 - axis)))
    index = round((occupied[0] + occupied[-1]) / 2) if occupied.size else fixed.GetSize()[axis] // 2
    stem = spec.name.replace("→", "_to_")
    paths = {}
    for key, image in (
        ("fixed", fixed),
        ("moving", result.warped),
        ("fixed_labels", labels),
        ("moving_labels", result.warped_labels["aseg"]),
    ):
        path = folder / f"{stem}-2d-{key}.nii.gz"
        sitk.WriteImage(_slice(image, axis, index), str(path))
        paths[key] = str(path)
    region = _region_file(sitk.ReadImage(paths["fixed"]), folder, f"{stem}-2d")
    return PairSpec(name=f"{spec.name} (slice {index})", region=region, labels=spec.labels, **paths)


def fsdev_pairs(
    data: Path,
    count: int | None,
    folder: Path,
    cross_contrast: bool,
    skip: int = 0,
    image: str = "brainmask",
) -> list[PairSpec]:
    """``count`` pairs (all if None) of the documented order, after its first ``skip``, of
    each subject's ``image`` (``brainmask``: the skull-stripped brain; ``T1``: the head)."""
    from DeepRegisterLib.imaging.metrics import FREESURFER_EVAL_LABELS

    pairs = ordered_pairs(subjects_in(data, image))[skip:]
    specs = []
    for moving, fixed in pairs[:count] if count else pairs:
        moving_image = str(data / moving / f"{image}.nii.gz")
        name = f"{moving}→{fixed}"
        if cross_contrast:
            path = folder / f"{moving}-t2like.nii.gz"
            if not path.exists():
                sitk.WriteImage(t2_like(sitk.ReadImage(moving_image)), str(path))
            moving_image = str(path)
        specs.append(
            PairSpec(
                name=name,
                fixed=str(data / fixed / f"{image}.nii.gz"),
                moving=moving_image,
                fixed_labels=str(data / fixed / "aseg.nii.gz"),
                moving_labels=str(data / moving / "aseg.nii.gz"),
                region=_region_file(
                    sitk.ReadImage(str(data / fixed / "brainmask.nii.gz")), folder, fixed
                ),
                labels=FREESURFER_EVAL_LABELS,
            )
        )
    return specs


def smoke_pairs(count: int, folder: Path, cross_contrast: bool) -> list[PairSpec]:
    """Phantom pairs on a small oblique, anisotropic grid with a known deformation."""
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

    specs = []
    for seed in range(count):
        pair = phantom_pair(demo_grid(3, 32), seed=seed)
        moving = t2_like(pair.moving) if cross_contrast else pair.moving
        paths = {}
        for key, image in (
            ("fixed", pair.fixed),
            ("moving", moving),
            ("fixed_labels", pair.fixed_labels),
            ("moving_labels", pair.moving_labels),
        ):
            path = folder / f"phantom{seed}-{key}.nii.gz"
            sitk.WriteImage(image, str(path))
            paths[key] = str(path)
        region = _region_file(pair.fixed_labels, folder, f"phantom{seed}")
        specs.append(PairSpec(name=f"phantom {seed}", region=region, **paths))
    return specs
