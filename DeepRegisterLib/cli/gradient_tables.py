"""``apply``'s care of a diffusion series' gradient directions: turned with the transform and
carried with the warped series, in the form the series came with (a DWI NRRD's header keys, or
FSL's ``.bvec``/``.bval`` beside a NIfTI), or a note saying why they cannot be."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ..imaging import diffusion, fsl_gradients
from ..imaging.geometry import Grid
from ..imaging.output_paths import full_suffix

_NRRD = (".nrrd", ".nhdr")


def carry_gradients(
    image: Any, warped: Any, source: Path, target: Path, transform: Any, grid: Grid
) -> dict[Path, str]:
    """An NRRD table goes into ``warped``'s header keys; FSL files come back as the text of
    the files to write beside ``target`` (path → text). Anything else: nothing."""
    if diffusion.is_diffusion(image):
        _nrrd_table(image, warped, source, target, transform, grid)
        return {}
    bvec = fsl_gradients.companion(source, ".bvec")
    if full_suffix(source) in fsl_gradients.NIFTI_SUFFIXES and image.GetDimension() == 4:
        return _fsl_files(image, bvec, source, target, transform, grid) if bvec.is_file() else {}
    return {}


def _nrrd_table(image, warped, source: Path, target: Path, transform, grid: Grid) -> None:
    table = diffusion.read_gradient_table(source, image)
    if table is None or full_suffix(target) not in _NRRD:
        reason = (
            "its header gives no anatomical frame for them" if table is None
            else f"only an NRRD holds one: write {_stem(target)}.nrrd to keep it"
        )  # fmt: skip
        _note(f"{target.name} does not carry {source.name}'s gradient table: {reason}")
        return
    rotation = diffusion.transform_rotation(transform, grid)
    diffusion.carry_gradients(warped, table, rotation)
    _turned(target.name, len(table.directions), rotation)


def _fsl_files(image, bvec: Path, source: Path, target: Path, transform, grid: Grid):
    volumes = image.GetSize()[3]
    direction = _block(image.GetDirection(), 4)
    directions = fsl_gradients.read_bvecs(bvec, direction, volumes)
    if directions is None or full_suffix(target) not in fsl_gradients.NIFTI_SUFFIXES:
        reason = (
            f"{bvec.name} does not hold one direction for each of its {volumes} volumes"
            if directions is None
            else f"bvecs go beside a NIfTI: write {_stem(target)}.nii.gz to keep them"
        )
        _note(f"{target.name} gets no bvec file: {reason}")
        return {}
    rotation = diffusion.transform_rotation(transform, grid)
    turned = directions @ rotation  # Rᵀ g for each row g
    files = {
        fsl_gradients.companion(target, ".bvec"): fsl_gradients.bvec_text(
            turned, _block(grid.direction, 3)
        )
    }
    bval = fsl_gradients.companion(source, ".bval")
    if bval.is_file():
        files[fsl_gradients.companion(target, ".bval")] = bval.read_text()
    _turned(", ".join(path.name for path in files), volumes, rotation)
    return files


def _turned(what: str, count: int, rotation) -> None:
    _note(
        f"{what}: {count} gradient directions, turned {diffusion.degrees(rotation):.1f}° with "
        "the transform's affine (not by the deformation's local turns)"
    )


def _block(direction, dim: int):
    import numpy as np

    return np.reshape(direction, (dim, dim))[:3, :3]


def _stem(path: Path) -> str:
    return path.name[: -len(full_suffix(path))]


def _note(text: str) -> None:
    print(f"note: {text}")
