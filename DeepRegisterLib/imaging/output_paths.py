"""Where a command may write what: file suffixes per kind of output, folders, clashes.

Checked before any input is read, so a typo in an output name costs a second, not a whole
registration. Only the standard library here: the command line checks its outputs (and answers
``--help``) without importing SimpleITK, numpy or torch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

from ..errors import InputError

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
#: 2D only, 8 or 16 bits per pixel: what photographs, fundus images and slices come in.
IMAGE_2D_SUFFIXES = (".png", ".tif", ".tiff")
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")
#: A Slicer segmentation: an NRRD whose header names and colours its segments.
SEGMENTATION_SUFFIX = ".seg.nrrd"

#: Output kind → the suffixes it may be written with, and how to say so. An "image" may be a
#: 2D picture; a "volume" (a field, a Jacobian: floating point) may not; "labels" may also be a
#: Slicer segmentation.
SUFFIXES = {
    "image": IMAGE_SUFFIXES + IMAGE_2D_SUFFIXES,
    "labels": IMAGE_SUFFIXES + IMAGE_2D_SUFFIXES + (SEGMENTATION_SUFFIX,),
    "volume": IMAGE_SUFFIXES,
    "transform": TRANSFORM_SUFFIXES + IMAGE_SUFFIXES,
    "png": (".png",),
    "json": (".json",),
}
_ADVICE = {
    "image": f"use one of {', '.join(IMAGE_SUFFIXES)} (or {', '.join(IMAGE_2D_SUFFIXES)} in 2D)",
    "labels": f"use one of {', '.join(IMAGE_SUFFIXES)}, {SEGMENTATION_SUFFIX} (or "
    f"{', '.join(IMAGE_2D_SUFFIXES)} in 2D)",
    "volume": f"use one of {', '.join(IMAGE_SUFFIXES)}",
    "transform": "use .h5 (recommended) or .tfm, or an image suffix "
    f"({', '.join(IMAGE_SUFFIXES)}) for a displacement-field image",
    "png": "use .png",
    "json": "use .json",
}


def full_suffix(path: Path) -> str:
    """``.nii.gz`` for ``a.nii.gz`` (ITK picks its writer from the whole suffix)."""
    name = path.name.lower()
    for suffix in (".nii.gz", SEGMENTATION_SUFFIX):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


def stem(path: Path) -> str:
    """The file's name without its :func:`full_suffix`: ``a`` for ``a.nii.gz``."""
    suffix = full_suffix(path)
    return path.name[: -len(suffix)] if suffix else path.name


def check_suffix(path: Path, kind: str, option: str = "output") -> None:
    if full_suffix(path) not in SUFFIXES[kind]:
        suffix = full_suffix(path) or "no suffix"
        raise InputError(f"cannot write {option} {path} ({suffix}): {_ADVICE[kind]}")


def check_writable(path: Path) -> None:
    """The folder exists and takes files, and ``path`` is not a folder."""
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent} (for {path.name})")
    if path.is_dir():
        raise InputError(f"output path is a folder: {path}")
    if not os.access(path.parent, os.W_OK | os.X_OK):
        raise InputError(f"output folder is not writable: {path.parent}")


def check_outputs(
    outputs: Sequence[tuple[str, str, Path]], inputs: Iterable[Path | None] = ()
) -> None:
    """Refuse what could not be written: ``outputs`` are (option, kind, path) triples.

    Each suffix must suit its kind; the folder must exist and be writable; no two outputs may
    share a file, and no output may replace an input.
    """
    if not outputs:
        raise InputError("nothing to write: give at least one output, e.g. --warped or --transform")
    seen: dict[Path, str] = {}
    read = {Path(os.path.realpath(p)) for p in inputs if p is not None}
    for option, kind, path in outputs:
        check_writable(path)
        check_suffix(path, kind, option)
        real = Path(os.path.realpath(path))
        if real in seen:
            raise InputError(f"{option} and {seen[real]} both name {path}: give each its own file")
        if real in read:
            raise InputError(f"{option} {path} is one of the inputs: write it to another file")
        seen[real] = option


def check_dimension(outputs: Sequence[tuple[str, str, Path]], dimension: int) -> None:
    """PNG and TIFF hold 2D pictures: refuse them for a 3D registration's images."""
    if dimension == 2:
        return
    for option, kind, path in outputs:
        if kind in ("image", "labels") and full_suffix(path) in IMAGE_2D_SUFFIXES:
            raise InputError(
                f"cannot write {option} {path}: {full_suffix(path)} holds 2D pictures and "
                f"these images are {dimension}D; use {', '.join(IMAGE_SUFFIXES)}"
            )
