"""Images in gzip files (``.nii.gz``; an ``.nrrd``'s gzip encoding) and compressed MetaImages
(``.mha``, zlib) written as one stream: ITK's own header, then the voxels straight from the
image's buffer into the compressor.

ITK's NIfTI writer ignores a compression level, so a ``.nii.gz`` used to be written as a plain
``.nii`` and gzipped from the disk: a 512² × 600 CT's 314 MB written, read back and deleted,
0.5–1.2 s of a 0.8–1.3 s write. Its NRRD writer packs with zlib on one thread. The header here
is what ITK writes for a twin of the image (the same pixel type, components and geometry, two
voxels along each axis) with its sizes set; a second twin, three voxels wide, shows that nothing
else in the header depends on them, and the twins' voxels show how ITK lays them out (a NIfTI
vector's components one after the other). So the file holds ITK's bytes exactly; where the
twins cannot vouch for that, ITK writes the image as before. A compressed ``.mha`` is packed
by ITK's zlib on one thread too (the CT: 0.87–1.08 s); its header states the packed size.
"""

from __future__ import annotations

import gzip
import itertools
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, NamedTuple

import numpy as np
import SimpleITK as sitk

try:  # ISA-L's deflate: level 1 packs a 1 mm brain about 8 times as fast as zlib's, as small
    from isal import igzip_threaded
    from isal import isal_zlib as fast_deflate
except ImportError:  # Python environments without it (Slicer's own) write the same format slower
    fast_deflate, igzip_threaded = zlib, None

# From this many bytes, blocks of an image are packed on ITK's threads (16 MB: 22 → 16 ms; a
# CT's 314 MB: 0.50 → 0.30 s on two); smaller ones cost more to hand over than they gain.
THREADED_MIN_BYTES = 2**24
CHUNK_BYTES = 2**22  # handed to the compressor at a time: a vector component's copy stays small
_NIFTI_DIMS, _NIFTI_VOX_OFFSET = 40, 108  # NIfTI-1: dim[8] (int16), vox_offset (float32)
# gzip's header (RFC 1952): deflate, no name, no time (the same bytes each time), an unknown OS.
_GZIP_HEADER = b"\x1f\x8b\x08\x00\x00\x00\x00\x00\x00\xff"
_STORED_BLOCK = 0xFFFF  # bytes, the most a stored block holds


class _Twin(NamedTuple):
    """A twin's file cut around its sizes, and its voxels as written."""

    before: bytes
    after: bytes
    sizes: tuple[int, ...]
    data: bytes


class _Format(NamedTuple):
    """How ITK writes a format: its twins' suffix and compression, where a file's sizes are
    (``cut``), which sizes an image has there and how they are written."""

    suffix: str
    compress: bool
    cut: Callable[[bytes, int], _Twin | None]
    sizes: Callable[[int, tuple[int, ...]], tuple[int, ...]]  # (components, image size)
    written: Callable[[tuple[int, ...]], bytes]


def write_nii_gz(image: sitk.Image, path: Path, level: int) -> None:
    """``image`` as a gzipped NIfTI file at ``path``, deflated at ``level`` (0: stored)."""
    found = _itk_header(image, path, _NIFTI)
    with path.open("wb") as out:
        if found is not None:
            header, layout = found
            view = sitk.GetArrayViewFromImage(image)
            chunks = itertools.chain([memoryview(header)], _voxels(view, layout))
            _pack(chunks, out, level, len(header) + view.nbytes)
            return
        plain = path.with_name(path.name[: -len(".gz")])
        _write_plain(image, plain, False)
        with plain.open("rb") as reading:
            chunks = iter(lambda: reading.read(1 << 24), b"")
            _pack(chunks, out, level, plain.stat().st_size)
        plain.unlink()


def write_nrrd_gz(image: sitk.Image, path: Path, level: int) -> None:
    """``image`` as an ``.nrrd`` file with gzip encoding at ``path``."""
    found = _itk_header(image, path, _NRRD)
    if found is None:
        sitk.WriteImage(image, str(path), True, level)
        return
    header, layout = found
    view = sitk.GetArrayViewFromImage(image)
    with path.open("wb") as out:
        out.write(header)
        _pack(_voxels(view, layout), out, level, view.nbytes)


def write_mha_compressed(image: sitk.Image, path: Path, level: int) -> None:
    """``image`` as a MetaImage (``.mha``) with compressed data at ``path``. Its header states
    the packed size, so the voxels are packed in memory first (the CT's 314 MB: 66 MB; written
    in 0.51 s, where ITK took 0.87–1.08 s for 89 MB), then written after it."""
    found = _itk_header(image, path, _MHA)
    if found is None:
        sitk.WriteImage(image, str(path), True, level)
        return
    header, layout = found
    packer = fast_deflate.compressobj(level, fast_deflate.DEFLATED, fast_deflate.MAX_WBITS)
    packed = [
        packer.compress(chunk) for chunk in _voxels(sitk.GetArrayViewFromImage(image), layout)
    ]
    packed.append(packer.flush())
    size = str(sum(len(piece) for piece in packed)).encode()
    with path.open("wb") as out:
        out.write(header.replace(_PACKED_SIZE, size))
        out.writelines(packed)


def _pack(chunks: Iterator, out: BinaryIO, level: int, size: int) -> None:
    """The ``chunks`` (bytes-like) as one gzip member into ``out``."""
    if level == 0:
        _store(chunks, out)
        return
    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    if igzip_threaded is not None and threads > 1 and size >= THREADED_MIN_BYTES:
        with igzip_threaded.open(out, "wb", compresslevel=level, threads=threads) as packed:
            for chunk in chunks:
                packed.write(chunk)
        return
    packer = fast_deflate.compressobj(level, fast_deflate.DEFLATED, 16 + fast_deflate.MAX_WBITS)
    for chunk in chunks:
        out.write(packer.compress(chunk))
    out.write(packer.flush())


def _store(chunks: Iterator, out: BinaryIO) -> None:
    """The ``chunks`` in deflate's stored blocks (RFC 1951, 3.2.4), the blocks zlib's level 0
    writes, for data that does not compress (a float field): zlib copied each byte through its
    window, 0.4 s for a 256³ field against 0.01 s for ISA-L's checksum. ISA-L's level 0 still
    codes, and grows a float field by a fifth."""
    out.write(_GZIP_HEADER)
    crc, size = 0, 0
    for chunk in chunks:
        data = memoryview(chunk).cast("B")
        crc = fast_deflate.crc32(data, crc)
        size += len(data)
        for start in range(0, len(data), _STORED_BLOCK):
            block = data[start : start + _STORED_BLOCK]
            out.write(struct.pack("<BHH", 0, len(block), len(block) ^ 0xFFFF))
            out.write(block)
    out.write(b"\x01\x00\x00\xff\xff")  # an empty final block
    out.write(struct.pack("<II", crc, size % 2**32))


def _voxels(view: np.ndarray, layout: str) -> Iterator[memoryview]:
    """The voxels as ITK lays them out, a chunk at a time."""
    if layout == "buffer":
        data = _bytes_of(view)  # the image's own buffer, not a copy
        for start in range(0, len(data), CHUNK_BYTES):
            yield memoryview(data[start : start + CHUNK_BYTES])
        return
    rows = max(1, CHUNK_BYTES * view.shape[-1] // max(view[0].nbytes, 1))
    for component in range(view.shape[-1]):  # each a whole scalar volume, copied a slab at a time
        for start in range(0, len(view), rows):
            yield memoryview(_bytes_of(view[start : start + rows, ..., component]))


def _bytes_of(array: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(array).reshape(-1).view(np.uint8)


def _itk_header(image: sitk.Image, path: Path, form: _Format) -> tuple[bytes, str] | None:
    """The header ITK writes for ``image`` in ``form`` and the layout of its voxels ("buffer":
    as in memory; "components": a vector image's components one after the other); None where
    the twins cannot show them: metadata ITK might write, sizes beyond NIfTI-1's, headers or a
    layout they do not agree on."""
    size, components = image.GetSize(), image.GetNumberOfComponentsPerPixel()
    if image.GetMetaDataKeys() or max(size) > 2**15 - 1 or 2 ** len(size) * components > 120:
        return None
    twin_path = path.with_name(path.name + ".twin" + form.suffix)
    (two, values), (three, _) = (_twin_file(image, twin_path, width, form) for width in (2, 3))
    if two is None or three is None or (two.before, two.after) != (three.before, three.after):
        return None
    for twin, width in ((two, 2), (three, 3)):
        if twin.sizes != form.sizes(components, (width,) * len(size)):
            return None
    layouts = [("buffer", values)]
    if components > 1:
        layouts.append(("components", np.moveaxis(values, -1, 0)))
    for layout, order in layouts:
        if two.data == np.ascontiguousarray(order).tobytes():
            return two.before + form.written(form.sizes(components, size)) + two.after, layout
    return None


def _twin_file(
    image: sitk.Image, path: Path, width: int, form: _Format
) -> tuple[_Twin | None, np.ndarray]:
    """ITK's file of a twin of ``image`` ``width`` voxels wide, each value distinct, cut by
    ``form``, and those values (…, components)."""
    dim, components = image.GetDimension(), image.GetNumberOfComponentsPerPixel()
    twin = sitk.Image([width] * dim, image.GetPixelID(), components)
    view = sitk.GetArrayViewFromImage(twin)
    values = np.arange(view.size, dtype=np.int64).reshape(view.shape).astype(view.dtype)
    filled = sitk.GetImageFromArray(values, isVector=components > 1)
    filled.SetSpacing(image.GetSpacing())
    filled.SetOrigin(image.GetOrigin())
    filled.SetDirection(image.GetDirection())
    try:
        _write_plain(filled, path, form.compress)
        return form.cut(path.read_bytes(), dim), values.reshape(*view.shape[:dim], components)
    finally:
        path.unlink(missing_ok=True)


def _write_plain(image: sitk.Image, path: Path, compress: bool) -> None:
    sitk.WriteImage(image, str(path), compress)


def _nifti_twin(raw: bytes, dim: int) -> _Twin | None:
    """A NIfTI-1 file whose voxels fill it from ``vox_offset``, cut around dim[1..dim]."""
    if len(raw) < 352 or struct.unpack_from("<i", raw)[0] != 348:
        return None
    dims = struct.unpack_from("<8h", raw, _NIFTI_DIMS)
    offset = int(struct.unpack_from("<f", raw, _NIFTI_VOX_OFFSET)[0])
    if dims[0] < dim or not 352 <= offset <= len(raw):  # a vector's dim[0]: 5 (t, components)
        return None
    sizes_end = _NIFTI_DIMS + 2 + 2 * dim
    return _Twin(raw[: _NIFTI_DIMS + 2], raw[sizes_end:offset], dims[1 : dim + 1], raw[offset:])


_NRRD_SIZES = re.compile(rb"^sizes:((?: \d+)+)\n", re.MULTILINE)


def _nrrd_twin(raw: bytes, dim: int) -> _Twin | None:
    """An NRRD file with attached gzip data, cut around its ``sizes:`` line."""
    end = raw.find(b"\n\n")
    line = _NRRD_SIZES.search(raw, 0, end + 1) if end > 0 else None
    if line is None or b"\nencoding: gzip\n" not in raw[: end + 1]:
        return None
    sizes = tuple(int(n) for n in line.group(1).split())
    try:
        data = gzip.decompress(raw[end + 2 :])
    except (OSError, EOFError, zlib.error):
        return None
    return _Twin(raw[: line.start()], raw[line.end() : end + 2], sizes, data)


_MHA_DIMS = re.compile(rb"^DimSize =((?: \d+)+)\n", re.MULTILINE)
_MHA_PACKED = re.compile(rb"^CompressedDataSize = (\d+)\n", re.MULTILINE)
_MHA_DATA = b"ElementDataFile = LOCAL\n"  # the header's last line: the data follows
_PACKED_SIZE = b"\x00"  # where a MetaImage's packed size goes (never in ITK's text)


def _mha_twin(raw: bytes, dim: int) -> _Twin | None:
    """A MetaImage with attached zlib data, cut around its ``DimSize`` line; its stated packed
    size, which differs from twin to twin, marked."""
    end = raw.find(_MHA_DATA)
    if end < 0:
        return None
    head = raw[: end + len(_MHA_DATA)]
    packed, sizes = _MHA_PACKED.search(head), _MHA_DIMS.search(head)
    if packed is None or sizes is None or packed.end() > sizes.start():
        return None
    try:
        data = zlib.decompress(raw[len(head) :])
    except zlib.error:
        return None
    before = head[: packed.start(1)] + _PACKED_SIZE + head[packed.end(1) : sizes.start()]
    return _Twin(before, head[sizes.end() :], tuple(int(n) for n in sizes.group(1).split()), data)


_NIFTI = _Format(
    ".nii",
    False,
    _nifti_twin,
    lambda components, size: size,  # a vector's components are dim[5], beyond the cut
    lambda sizes: struct.pack(f"<{len(sizes)}h", *sizes),
)
_NRRD = _Format(
    ".nrrd",
    True,
    _nrrd_twin,
    lambda components, size: (components, *size) if components > 1 else size,
    lambda sizes: b"sizes: " + b" ".join(str(n).encode() for n in sizes) + b"\n",
)
_MHA = _Format(
    ".mha",
    True,
    _mha_twin,
    lambda components, size: size,  # components are ElementNumberOfChannels
    lambda sizes: b"DimSize = " + b" ".join(str(n).encode() for n in sizes) + b"\n",
)
