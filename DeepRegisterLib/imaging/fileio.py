"""Reading inputs and writing outputs with SimpleITK, atomically.

Every output goes to a temporary file in the destination folder first and is renamed into place
only when complete, so a crash, kill or error never leaves a half-written file under the name
the user asked for.
"""

from __future__ import annotations

import contextlib
import glob
import gzip
import os
import shutil
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import SimpleITK as sitk

from ..errors import InputError
from .geometry import Grid, ImageHeader
from .gzip_writing import write_mha_compressed, write_nii_gz, write_nrrd_gz
from .output_paths import (
    IMAGE_2D_SUFFIXES,
    IMAGE_SUFFIXES,
    SEGMENTATION_SUFFIX,
    TRANSFORM_SUFFIXES,
    full_suffix,
)

#: ITK's bundled HDF5 is not thread-safe: two .h5 transforms written side by side failed
#: ("H5Dwrite failed") or crashed the process at exit about two runs in five.
_HDF5_LOCK = threading.Lock()

#: Deflate level for .nii.gz images that compress (masks, labels, brains on a zero background):
#: level 1 gets most of level 6's gain in a fraction of the time.
FAST_GZIP = 1


@contextlib.contextmanager
def atomic_write_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path for ``path``; move the result into place if the block succeeds.

    The temporary file keeps the final name inside a hidden folder beside the target, so
    detached formats (.mhd + .raw, .nhdr + .raw.gz) that record their data file's name stay valid.
    """
    target = Path(path)
    if not target.parent.exists():
        raise InputError(f"cannot write {target}: folder {target.parent} does not exist")
    _sweep_stale_staging(target)
    staging = Path(
        tempfile.mkdtemp(prefix=f".{target.name}.partial-{os.getpid()}-", dir=target.parent)
    )
    try:
        staged = staging / target.name
        yield staged
        # Data files first, the header (the name the user asked for) last.
        for item in sorted(staging.iterdir(), key=lambda p: p.name == target.name):
            os.replace(item, target.parent / item.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_together(plan: Sequence[tuple[Path, Callable[[Path], object]]]) -> list[Path]:
    """Stage every output, write them side by side (ITK and zlib release the GIL), then move
    them all into place together, or none of them if any writer failed."""
    with contextlib.ExitStack() as stack:
        staged = [stack.enter_context(atomic_write_path(path)) for path, _ in plan]
        with ThreadPoolExecutor(max_workers=max(1, min(len(plan), 4))) as pool:
            futures = [pool.submit(write, to) for (_, write), to in zip(plan, staged, strict=True)]
        for future in futures:
            future.result()  # the first failure, once every writer has stopped
    return [path for path, _ in plan]


def _sweep_stale_staging(target: Path) -> None:
    """Remove staging folders for ``target`` left by a process that was killed mid-write."""
    for folder in target.parent.glob(f".{glob.escape(target.name)}.partial-*-*"):
        pid_text = folder.name.rsplit(".partial-", 1)[1].split("-", 1)[0]
        if pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(folder, ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    return True


def read_image(path: str | os.PathLike, what: str = "image") -> sitk.Image:
    """Read an image, turning ITK's low-level failures into a message about *this* input."""
    source = Path(path)
    if not source.exists():
        raise InputError(f"{what} file not found: {source}")
    if source.is_dir():
        raise InputError(f"{what} path is a folder, not an image file: {source}")
    _refuse_truncated(source, what)
    try:
        return sitk.ReadImage(str(source))
    except RuntimeError as error:
        raise InputError(
            f"cannot read {what} {source}: the file is truncated, corrupt or not an image "
            f"format SimpleITK reads ({', '.join(IMAGE_SUFFIXES)}). ITK said: {_itk_reason(error)}"
        ) from None


def _refuse_truncated(source: Path, what: str) -> None:
    """InputError for a NIfTI file shorter than its header says."""
    problem = _nifti_truncation(source) if full_suffix(source) in (".nii", ".nii.gz") else None
    if problem is not None:
        raise InputError(
            f"cannot read {what} {source}: the file is truncated ({problem}); it was probably "
            "cut short while copying or writing. Copy or export it again."
        )


def _nifti_expected_bytes(header: bytes) -> int | None:
    """Header + voxel bytes a NIfTI-1/-2 file must hold, from its header; None if unknown."""
    for order in "<>":
        size = struct.unpack(order + "i", header[:4])[0] if len(header) >= 4 else 0
        if size == 348 and len(header) >= 348:
            dims = struct.unpack(order + "8h", header[40:56])
            bitpix = struct.unpack(order + "h", header[72:74])[0]
            offset = int(struct.unpack(order + "f", header[108:112])[0])
            break
        if size == 540 and len(header) >= 540:
            bitpix = struct.unpack(order + "h", header[14:16])[0]
            dims = struct.unpack(order + "8q", header[16:80])
            offset = struct.unpack(order + "q", header[168:176])[0]
            break
    else:
        return None
    if not 1 <= dims[0] <= 7 or bitpix <= 0 or any(d < 1 for d in dims[1 : dims[0] + 1]):
        return None  # let ITK report a malformed header
    voxels = 1
    for d in dims[1 : dims[0] + 1]:
        voxels *= d
    return max(offset, size) + voxels * bitpix // 8


def _nifti_truncation(source: Path) -> str | None:
    """Why a .nii/.nii.gz file is shorter than its header says, or None.

    ITK's NIfTI reader does not check this: a truncated file reads "successfully", with
    garbage or zeros for the missing voxels. A .nii is checked by its size; a .nii.gz first by
    its gzip trailer (the uncompressed size), and decompressed in full only when that disagrees.
    """
    try:
        if full_suffix(source) == ".nii":
            with source.open("rb") as stream:
                expected = _nifti_expected_bytes(stream.read(540))
            actual = source.stat().st_size
        else:
            with gzip.open(source, "rb") as stream:
                expected = _nifti_expected_bytes(stream.read(540))
            if expected is None:
                return None
            with source.open("rb") as raw:
                raw.seek(-4, os.SEEK_END)
                if struct.unpack("<I", raw.read(4))[0] == expected % 2**32:
                    return None
            actual = 0
            with gzip.open(source, "rb") as stream:
                while chunk := stream.read(1 << 22):
                    actual += len(chunk)
    except (EOFError, zlib.error) as error:
        return f"its compressed data ends early: {error}"
    except (OSError, struct.error):
        return None  # not gzip / unreadable: ITK's own error says more
    if expected is not None and actual < expected:
        return f"it holds {actual} bytes but its header describes {expected}"
    return None


def _itk_reason(error: RuntimeError) -> str:
    """The line of an ITK exception that says what is wrong (e.g. "Zero-valued spacing ...").

    ITK puts it after "ITK ERROR: <object>: "; what follows may be a multi-line matrix dump,
    so the last line alone can be just "0 0 1".
    """
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    for line in lines:
        if "ITK ERROR:" in line:
            return line.split("ITK ERROR:", 1)[1].split("): ", 1)[-1].strip()
    return lines[-1] if lines else ""


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
        with _hdf5_guard(full_suffix(source)):
            return sitk.ReadTransform(str(source))
    except RuntimeError:
        raise InputError(
            f"cannot read transform {source}: not an ITK transform file "
            f"({', '.join(TRANSFORM_SUFFIXES)}) or a displacement-field image"
        ) from None


def image_dimension(path: str | os.PathLike, what: str = "image") -> int:
    """An image file's dimension from its header alone (no voxels read)."""
    return read_header(path, what).GetDimension()


def read_grid(path: str | os.PathLike, what: str = "image") -> Grid:
    """An image file's grid from its header alone: a reference grid need not be read whole."""
    header = read_header(path, what)
    return Grid(
        tuple(header.GetSize()), header.GetSpacing(), header.GetOrigin(), header.GetDirection()
    )


def read_header(path: str | os.PathLike, what: str = "image") -> sitk.ImageFileReader:
    """An image file's header (grid and metadata), no voxels read."""
    source = Path(path)
    if not source.is_file():
        raise InputError(f"{what} file not found: {source}")
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(source))
    try:
        reader.ReadImageInformation()
    except RuntimeError as error:
        raise InputError(f"cannot read {what} {source}: {_itk_reason(error)}") from None
    return reader


def image_header(path: str | os.PathLike, what: str = "image") -> ImageHeader:
    """An image file's :class:`ImageHeader` (no voxels read), or why it cannot be read; a
    NIfTI file cut short is refused here, as :func:`read_image` refuses it."""
    header = ImageHeader.of(read_header(path, what))
    _refuse_truncated(Path(path), what)
    return header


def _compresses(image: sitk.Image) -> bool:
    """Floating-point vector images (displacement fields) gain a few % from gzip at seconds of
    cost per 256³ field; scalar images with their zero backgrounds and labels gain a lot."""
    floating = image.GetPixelID() in (sitk.sitkVectorFloat32, sitk.sitkVectorFloat64)
    return not floating


def write_image(
    image: sitk.Image,
    path: str | os.PathLike,
    compress: bool = True,
    nrrd_fields: Mapping[str, str] | None = None,
) -> Path:
    """Write ``image`` atomically; compressed when it pays (see :func:`_compresses`).

    A ``.nii.gz`` is always a gzip file, as its name promises: ITK's NIfTI writer ignores a
    compression level, so ITK's bytes are gzipped here (:mod:`.gzip_writing`), at level 1
    when the image compresses and stored (level 0: no time spent) when it does not; a
    compressed ``.nrrd`` or ``.mha`` holds ITK's header and data packed the same way.
    ``nrrd_fields`` go into an NRRD header beside ITK's (a DWI's measurement frame, which
    SimpleITK cannot set).
    """
    target = Path(path)
    suffix = full_suffix(target)
    if suffix not in (*IMAGE_SUFFIXES, *IMAGE_2D_SUFFIXES, SEGMENTATION_SUFFIX):
        raise InputError(f"cannot write image {target}: use one of {', '.join(IMAGE_SUFFIXES)}")
    if nrrd_fields and suffix not in (".nrrd", ".nhdr"):
        raise ValueError(f"header fields {list(nrrd_fields)} need an NRRD file, not {target}")
    compress = compress and _compresses(image)
    with atomic_write_path(target) as tmp:
        if suffix == ".nii.gz":
            write_nii_gz(image, tmp, FAST_GZIP if compress else 0)
        elif suffix == ".nrrd" and compress:
            write_nrrd_gz(image, tmp, FAST_GZIP)
        elif suffix == ".mha" and compress:
            write_mha_compressed(image, tmp, FAST_GZIP)
        else:
            sitk.WriteImage(image, str(tmp), compress, FAST_GZIP if compress else -1)
        if nrrd_fields:
            _add_nrrd_fields(tmp, nrrd_fields)
    return target


def _add_nrrd_fields(path: Path, fields: Mapping[str, str]) -> None:
    """Insert ``name: value`` lines at the end of an NRRD header, data (if attached) kept."""
    lines = "".join(f"{name}: {value}\n" for name, value in fields.items()).encode("latin-1")
    rewritten = path.with_name(path.name + ".fields")
    with path.open("rb") as source, rewritten.open("wb") as target:
        for line in iter(source.readline, b""):
            if line in (b"\n", b"\r\n"):  # the blank line before attached data
                target.write(lines + line)
                shutil.copyfileobj(source, target, 1 << 24)
                break
            target.write(line)
        else:  # a detached header (.nhdr) ends without one
            target.write(lines)
    os.replace(rewritten, path)


def write_transform(transform: sitk.Transform, path: str | os.PathLike) -> Path:
    """Write an ITK transform file, or a displacement-field image (float32) for an image suffix.

    Float32, as ANTs writes its warps and the engine computes its fields: half the bytes and
    time of float64; ITK, Slicer and ANTs read it.
    """
    target = Path(path)
    suffix = full_suffix(target)
    if suffix in IMAGE_SUFFIXES:
        if not isinstance(transform, sitk.DisplacementFieldTransform):
            raise InputError(f"{target}: only displacement fields can be written as images")
        return write_field(transform.GetDisplacementField(), target)
    if suffix not in TRANSFORM_SUFFIXES:
        raise InputError(
            f"cannot write transform {target}: use .h5 (recommended) or .tfm, or an image "
            f"suffix ({', '.join(IMAGE_SUFFIXES)}) for a displacement-field image"
        )
    if suffix == ".mat" and isinstance(transform, sitk.CompositeTransform):
        # ITK writes it, then cannot read it back.
        raise InputError(f"cannot write {target}: a .mat file holds one transform; use .h5")
    with atomic_write_path(target) as tmp, _hdf5_guard(suffix):
        sitk.WriteTransform(transform, str(tmp))
    return target


def _hdf5_guard(suffix: str) -> contextlib.AbstractContextManager:
    return _HDF5_LOCK if suffix in (".h5", ".hdf5") else contextlib.nullcontext()


def write_field(displacement: sitk.Image, path: str | os.PathLike) -> Path:
    """A displacement field as a float32 ITK displacement-field image (cast only if it is not:
    the engine's field already is, and a copy of it costs a tenth of a second a brain)."""
    if displacement.GetPixelID() != sitk.sitkVectorFloat32:
        displacement = sitk.Cast(displacement, sitk.sitkVectorFloat32)
    return write_image(displacement, path)
