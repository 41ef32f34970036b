"""``.nii.gz`` and compressed ``.nrrd`` and ``.mha`` outputs hold ITK's own bytes, written as one
stream: a ``.nii.gz`` what SimpleITK's plain ``.nii`` of the same image holds, an ``.nrrd`` or
``.mha`` its header (but the packed size an ``.mha`` states) and voxels, byte for byte, for
every layout ITK uses."""

from __future__ import annotations

import gzip
import re
import struct
import zlib

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.imaging import fileio, gzip_writing
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom

OBLIQUE = (0.0, 0.8, 0.6, 1.0, 0.0, 0.0, 0.0, 0.6, -0.8)


def image_of(values: np.ndarray, vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(values, isVector=vector)
    dim = image.GetDimension()
    image.SetSpacing([0.7 + 0.2 * axis for axis in range(dim)])
    image.SetOrigin([-3.0 * axis + 1.5 for axis in range(dim)])
    if dim == 3:
        image.SetDirection(OBLIQUE)
    return image


def itk_file(image: sitk.Image, folder, suffix: str) -> bytes:
    """SimpleITK's own file: a plain ``.nii``, or a compressed ``.nrrd`` or ``.mha``."""
    path = folder / f"itk{suffix}"
    sitk.WriteImage(image, str(path), suffix != ".nii")
    return path.read_bytes()


def nrrd_parts(raw: bytes) -> tuple[bytes, bytes]:
    """An attached NRRD's header and its data, unpacked."""
    end = raw.index(b"\n\n") + 2
    return raw[:end], gzip.decompress(raw[end:])


def mha_parts(raw: bytes) -> tuple[bytes, bytes, bool]:
    """A compressed MetaImage's header but its packed size, its data unpacked, and whether
    that size is the packed data's."""
    end = raw.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    stated = re.search(rb"\nCompressedDataSize = (\d+)\n", raw[:end])
    header = raw[: stated.start(1)] + raw[stated.end(1) : end]
    return header, zlib.decompress(raw[end:]), int(stated.group(1)) == len(raw) - end


def same_as_itks(written: bytes, itks: bytes, suffix: str) -> bool:
    if suffix == ".nii.gz":
        return gzip.decompress(written) == itks
    if suffix == ".mha":
        return mha_parts(written) == mha_parts(itks)
    return nrrd_parts(written) == nrrd_parts(itks)


RNG = np.random.default_rng(7)
CASES = {
    "uint8 scan": lambda: image_of(RNG.integers(0, 255, (9, 8, 7), dtype=np.uint8)),
    "int16 CT": lambda: image_of(RNG.integers(-1024, 3000, (6, 5, 4), dtype=np.int16)),
    "float32 det J": lambda: image_of(RNG.random((5, 6, 7), dtype=np.float32)),
    "2D float64": lambda: image_of(RNG.random((11, 13))),
    "3D field": lambda: image_of(RNG.random((7, 6, 5, 3), dtype=np.float32), vector=True),
    "2D field, float64": lambda: image_of(RNG.random((9, 8, 2)), vector=True),
    "RGB picture": lambda: image_of(RNG.integers(0, 255, (6, 9, 3), dtype=np.uint8), True),
    "4D series": lambda: sitk.JoinSeries(
        [image_of(RNG.integers(0, 500, (5, 6, 7), dtype=np.int16)) for _ in range(3)]
    ),
}
WRITERS = {
    ".nii.gz": gzip_writing.write_nii_gz,
    ".nrrd": gzip_writing.write_nrrd_gz,
    ".mha": gzip_writing.write_mha_compressed,
}
ITKS = {".nii.gz": ".nii", ".nrrd": ".nrrd", ".mha": ".mha"}  # the file of ITK's to compare with


def watch_itk(monkeypatch) -> list[int]:
    """The sizes of the files ITK writes while an image is written."""
    sizes = []
    real_write = sitk.WriteImage

    def watched(image, path, compress):
        real_write(image, str(path), compress)
        sizes.append(path.stat().st_size)

    monkeypatch.setattr(gzip_writing, "_write_plain", watched)
    monkeypatch.setattr(sitk, "WriteImage", lambda *args: sizes.append(-1))
    return sizes


@pytest.mark.parametrize("chunk", [gzip_writing.CHUNK_BYTES, 64])
@pytest.mark.parametrize("suffix", WRITERS)
@pytest.mark.parametrize("case", CASES)
def test_the_stream_holds_itks_bytes(case, suffix, chunk, monkeypatch, tmp_path):
    """Small chunks cut a vector's components into slabs of rows. ITK writes only the twins,
    a few voxels wide; nothing else is left beside the file."""
    monkeypatch.setattr(gzip_writing, "CHUNK_BYTES", chunk)
    image = CASES[case]()
    expected = itk_file(image, tmp_path, ITKS[suffix])
    sizes = watch_itk(monkeypatch)
    written = tmp_path / f"out{suffix}"
    WRITERS[suffix](image, written, 1)
    assert same_as_itks(written.read_bytes(), expected, suffix)
    assert len(sizes) == 2
    assert 0 < max(sizes) < 1024
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"itk{ITKS[suffix]}", written.name]


@pytest.mark.parametrize("suffix", WRITERS)
def test_images_with_metadata_are_written_by_itk_whole(suffix, monkeypatch, tmp_path):
    """A twin could not carry what ITK writes from metadata (a NIfTI's notes become its
    description; an NRRD or a MetaImage keeps every string): ITK writes the image itself."""
    image = CASES["int16 CT"]()
    image.SetMetaData("ITK_FileNotes", "a scan with a description")
    expected = itk_file(image, tmp_path, ITKS[suffix])
    written = fileio.write_image(image, tmp_path / f"out{suffix}")
    assert same_as_itks(written.read_bytes(), expected, suffix)
    assert b"a scan with a description" in expected[:600]
    sizes = watch_itk(monkeypatch)
    WRITERS[suffix](image, tmp_path / f"again{suffix}", 1)
    assert sizes == ([352 + 6 * 5 * 4 * 2] if suffix == ".nii.gz" else [-1])  # no twin


@pytest.fixture
def two_itk_threads():
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(2)
    yield
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(before)


def test_a_large_image_packs_on_threads_into_one_member_the_same_each_time(
    two_itk_threads, monkeypatch, tmp_path
):
    """From THREADED_MIN_BYTES on, ISA-L's threaded writer, on ITK's threads: still one gzip
    member, whose trailer gives the size that the truncation check of a later read uses."""
    threaded = []
    real_open = gzip_writing.igzip_threaded.open

    def watched_open(*args, **kwargs):
        threaded.append(kwargs["threads"])
        return real_open(*args, **kwargs)

    monkeypatch.setattr(gzip_writing.igzip_threaded, "open", watched_open)
    shape = (gzip_writing.THREADED_MIN_BYTES // (64 * 64) + 2, 64, 64)
    values = (np.indices(shape).sum(axis=0) % 7).astype(np.uint8)
    image = image_of(values)
    plain = itk_file(image, tmp_path, ".nii")
    first = fileio.write_image(image, tmp_path / "first.nii.gz").read_bytes()
    again = fileio.write_image(image, tmp_path / "again.nii.gz").read_bytes()
    assert threaded == [2, 2]
    assert first == again
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert reader.decompress(first) == plain
    assert reader.unused_data == b""  # one member
    assert struct.unpack("<I", first[-4:])[0] == len(plain) % 2**32
    assert len(first) < len(plain) / 5
    assert fileio._nifti_truncation(tmp_path / "first.nii.gz") is None


@pytest.mark.parametrize("deflate", ["isal", "zlib"])
def test_nii_gz_holds_itks_nifti_gzipped_the_same_each_time(deflate, monkeypatch, tmp_path):
    """ISA-L packs .nii.gz, .nrrd and .mha images where installed (pip installs it); zlib, in
    Pythons without it (Slicer's own), writes the same format. A float field is stored in a
    .nii.gz, not packed (and written by ITK uncompressed as an .nrrd)."""
    if deflate == "zlib":
        monkeypatch.setattr(gzip_writing, "fast_deflate", zlib)
        monkeypatch.setattr(gzip_writing, "igzip_threaded", None)
    else:
        assert gzip_writing.fast_deflate.__name__ == "isal.isal_zlib"  # a declared dependency
    brain, labels = phantom(demo_grid(3, 32))
    field = sitk.Compose([brain] * 3)  # a float32 vector image, as displacement fields are
    for name, image, most in (
        ("brain", brain, 1),
        ("labels", labels, 0.1),
        ("field", field, 1.001),
    ):
        plain = tmp_path / f"{name}.nii"
        sitk.WriteImage(image, str(plain))
        packed = fileio.write_image(image, tmp_path / f"{name}.nii.gz")
        assert gzip.decompress(packed.read_bytes()) == plain.read_bytes()
        assert packed.stat().st_size < most * plain.stat().st_size + 1024
        again = fileio.write_image(image, tmp_path / f"{name}-again.nii.gz")
        assert again.read_bytes() == packed.read_bytes()
        nrrd = fileio.write_image(image, tmp_path / f"{name}.nrrd")
        mha = fileio.write_image(image, tmp_path / f"{name}.mha")
        for read_back in (packed, nrrd, mha):
            np.testing.assert_array_equal(
                sitk.GetArrayFromImage(sitk.ReadImage(str(read_back))),
                sitk.GetArrayFromImage(image),
            )


@pytest.mark.parametrize("sizes", [[], [0], [3], [0xFFFF], [0xFFFF + 1, 5], [200_000, 0, 70_001]])
def test_stored_blocks_are_one_gzip_member_of_the_data(sizes, tmp_path):
    """A field's stored blocks, however its chunks fall across deflate's 65 535-byte limit."""
    chunks = [RNG.integers(0, 256, size, dtype=np.uint8).tobytes() for size in sizes]
    path = tmp_path / "stored.gz"
    with path.open("wb") as out:
        gzip_writing._store(iter(chunks), out)
    raw = path.read_bytes()
    reader = zlib.decompressobj(16 + zlib.MAX_WBITS)
    assert reader.decompress(raw) == b"".join(chunks)
    assert reader.eof
    assert reader.unused_data == b""
    assert gzip.decompress(raw) == b"".join(chunks)
    blocks = sum(-(-size // 0xFFFF) for size in sizes)
    assert len(raw) == 10 + 5 * blocks + sum(sizes) + 5 + 8  # header, blocks, the last, trailer
