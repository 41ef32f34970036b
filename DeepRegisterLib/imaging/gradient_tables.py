"""A diffusion series' gradient directions, turned with a transform and carried with the
warped series in the form they came in: a DWI NRRD's header keys (into an NRRD output), or
FSL's ``.bvec``/``.bval`` beside a NIfTI (beside a NIfTI output); or a note saying why they
cannot be. ``apply`` and ``batch`` write what this decides."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import diffusion, fsl_gradients
from .geometry import Grid, rotation_degrees
from .output_paths import full_suffix, stem

_NRRD = (".nrrd", ".nhdr")


@dataclass(frozen=True)
class CarriedGradients:
    keys: dict[str, str] = field(default_factory=dict)  # for the warped NRRD's header
    files: dict[Path, str] = field(default_factory=dict)  # text files beside the output
    notes: tuple[str, ...] = ()


def carried_gradients(
    image: sitk.Image, source: Path, target: Path, transform: sitk.Transform, grid: Grid
) -> CarriedGradients:
    """What goes with ``target``, ``image`` (read from ``source``) warped onto ``grid``."""
    if diffusion.is_diffusion(image):
        return _nrrd_table(image, source, target, transform, grid)
    if has_bvecs(source, image.GetDimension()):
        return _fsl_files(image, source, target, transform, grid)
    return CarriedGradients()


def has_bvecs(source: str | Path, dimension: int) -> bool:
    """A 4D NIfTI series with ``.bvec`` beside it."""
    return dimension == 4 and bool(fsl_gradients.files_beside(source))


def _nrrd_table(image, source: Path, target: Path, transform, grid: Grid) -> CarriedGradients:
    table = diffusion.read_gradient_table(source, image)
    if table is None or full_suffix(target) not in _NRRD:
        reason = (
            "its header gives no anatomical frame for them" if table is None
            else f"only an NRRD holds one: write {stem(target)}.nrrd to keep it"
        )  # fmt: skip
        return _noted(f"{target.name} does not carry {source.name}'s gradient table: {reason}")
    rotation = diffusion.transform_rotation(transform, grid)
    keys = diffusion.gradient_keys(table, rotation)
    return CarriedGradients(keys=keys, notes=(_turned(target.name, table.directions, rotation),))


def _fsl_files(image, source: Path, target: Path, transform, grid: Grid) -> CarriedGradients:
    beside = fsl_gradients.files_beside(source)
    bvec, volumes = beside[".bvec"], image.GetSize()[3]
    directions = fsl_gradients.read_bvecs(bvec, _block(image.GetDirection(), 4), volumes)
    if directions is None or full_suffix(target) not in fsl_gradients.NIFTI_SUFFIXES:
        reason = (
            f"{bvec.name} does not hold one direction for each of its {volumes} volumes"
            if directions is None
            else f"bvecs go beside a NIfTI: write {stem(target)}.nii.gz to keep them"
        )
        return _noted(f"{target.name} gets no bvec file: {reason}")
    rotation = diffusion.transform_rotation(transform, grid)
    text = fsl_gradients.bvec_text(directions @ rotation, _block(grid.direction, 3))
    files = {fsl_gradients.companion(target, ".bvec"): text}
    if ".bval" in beside:
        files[fsl_gradients.companion(target, ".bval")] = beside[".bval"].read_text()
    what = ", ".join(path.name for path in files)
    return CarriedGradients(files=files, notes=(_turned(what, directions, rotation),))


def _turned(what: str, directions: np.ndarray, rotation: np.ndarray) -> str:
    return (
        f"{what}: {len(directions)} gradient directions, turned "
        f"{rotation_degrees(rotation):.1f}° with the transform's affine (not by the "
        "deformation's local turns)"
    )


def _noted(note: str) -> CarriedGradients:
    return CarriedGradients(notes=(note,))


def _block(direction, dim: int) -> np.ndarray:
    return np.reshape(direction, (dim, dim))[:3, :3]
