"""Reading inputs and writing outputs with SimpleITK, atomically.

Every output goes to a temporary file in the destination folder first and is renamed into place
only when complete, so a crash, kill or error never leaves a half-written file under the name
the user asked for.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import SimpleITK as sitk

from .errors import InputError

IMAGE_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".nhdr", ".mha", ".mhd")
TRANSFORM_SUFFIXES = (".h5", ".hdf5", ".tfm", ".txt", ".mat")


def full_suffix(path: Path) -> str:
    """``.nii.gz`` for ``a.nii.gz`` (ITK picks its writer from the whole suffix)."""
    name = path.name.lower()
    for suffix in (".nii.gz", ".seg.nrrd"):
        if name.endswith(suffix):
            return suffix
    return path.suffix.lower()


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for ``path``; move the result into place if the block succeeds.

    The temporary file keeps the final name inside a hidden folder beside the target, so
    detached formats (.mhd + .raw, .nhdr + .raw.gz) that record their data file's name stay valid.
    """
    target = Path(path)
    if not target.parent.exists():
        raise InputError(f"cannot write {target}: folder {target.parent} does not exist")
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        staged = staging / target.name
        yield staged
        # Data files first, the header (the name the user asked for) last.
        for item in sorted(staging.iterdir(), key=lambda p: p.name == target.name):
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def read_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read an image, turning ITK's low-level failures into a message about *this* input."""
    source = Path(path)
    if not source.exists():
        raise InputError(f"{what} file not found: {source}")
    if source.is_dir():
        raise InputError(f"{what} path is a folder, not an image file: {source}")
    try:
        return sitk.ReadImage(str(source))
    except RuntimeError as error:
        first_line = str(error).strip().splitlines()[-1] if str(error).strip() else ""
        raise InputError(
            f"cannot read {what} {source}: the file is truncated, corrupt or not an image "
            f"format SimpleITK reads ({', '.join(IMAGE_SUFFIXES)}). ITK said: {first_line}"
        ) from None


def read_transform(path: str | os.PathLike) -> sitk.Transform:
    """Read an ITK transform file (.h5/.tfm/.txt/.mat) or a displacement-field image."""
    source = Path(path)
    if not source.exists():
        raise InputError(f"transform file not found: {source}")
    if full_suffix(source) in IMAGE_SUFFIXES:
        field = read_image(source, "displacement field")
        if field.GetNumberOfComponentsPerPixel() != field.GetDimension():
            raise InputError(
                f"{source} is not a displacement field: it has "
                f"{field.GetNumberOfComponentsPerPixel()} components per voxel, "
                f"expected {field.GetDimension()}"
            )
        return sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
    try:
        return sitk.ReadTransform(str(source))
    except RuntimeError:
        raise InputError(
            f"cannot read transform {source}: not an ITK transform file "
            f"({', '.join(TRANSFORM_SUFFIXES)}) or a displacement-field image"
        ) from None


def write_image(image: sitk.Image, path: str | os.PathLike, compress: bool = True) -> Path:
    target = Path(path)
    if full_suffix(target) not in IMAGE_SUFFIXES:
        raise InputError(f"cannot write image {target}: use one of {', '.join(IMAGE_SUFFIXES)}")
    with atomic_write_path(target) as tmp:
        sitk.WriteImage(image, str(tmp), compress)
    return target


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> Path:
    """Write an ITK transform file; a displacement-field image if the suffix is an image's."""
    target = Path(path)
    suffix = full_suffix(target)
    if suffix in IMAGE_SUFFIXES:
        if not isinstance(transform, sitk.DisplacementFieldTransform):
            raise InputError(f"{target}: only displacement fields can be written as images")
        return write_image(transform.GetDisplacementField(), target)
    if suffix not in TRANSFORM_SUFFIXES:
        raise InputError(
            f"cannot write transform {target}: use .h5 (recommended) or .tfm, or an image "
            f"suffix ({', '.join(IMAGE_SUFFIXES)}) for a displacement-field image"
        )
    with atomic_write_path(target) as tmp:
        sitk.WriteTransform(transform, str(tmp))
    return target


def check_writable(paths: Sequence[str | os.PathLike | None]) -> None:
    """Fail before any work if an output cannot be written, rather than after minutes of it."""
    for path in paths:
        if path is None:
            continue
        target = Path(path)
        if not target.parent.exists():
            raise InputError(f"output folder does not exist: {target.parent} (for {target.name})")
        if target.is_dir():
            raise InputError(f"output path is a folder: {target}")
        if not os.access(target.parent, os.W_OK):
            raise InputError(f"output folder is not writable: {target.parent}")
