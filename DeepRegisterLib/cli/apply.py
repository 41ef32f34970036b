"""``deepregister apply``: a saved transform carried to more images, as ``register`` warps.

Every output is checked before any input is read, every input from its header before any is
warped; each is read when it is warped, and all are written or none, each atomically.
ITK resamples, without torch, so a 256³ image is on disk about a second after the command
starts; a scalar image onto 2²⁶ voxels or more (a CT) goes through the engine's own warp, about
twice as fast there and ``register --warped``'s to the bit (:mod:`..registration.saved_transforms`).
"""

from __future__ import annotations

import argparse
import contextlib
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from ..errors import InputError, ResourceError
from ..imaging import output_paths
from .exit_codes import EXIT_OK

if TYPE_CHECKING:  # geometry loads numpy and SimpleITK, which --help must not wait for
    from ..imaging.geometry import Grid, ImageHeader
    from ..registration.saved_transforms import SavedTransformWarp


def add_apply_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``apply`` subcommand to ``parser.add_subparsers()``'s result."""
    parser = subparsers.add_parser(
        "apply",
        help="warp more images (another sequence, a segmentation) with a saved transform",
        description=(
            "Warp images with a transform that 'register' wrote (or any ITK transform or "
            "displacement field mapping reference points to image points), onto the "
            "reference's grid, as 'register' warps: intensities linearly (an integer image "
            "keeps its type, rounded; others become float32), label maps by nearest neighbour "
            "(type and values kept). For --transform the reference is the fixed image; for "
            "--inverse-transform, the moving one. A 4D series (fMRI, DWI, perfusion) is warped "
            "volume by volume; a DWI's gradient directions (a DWI NRRD's header table, or the "
            ".bvec/.bval beside a NIfTI series) are turned by the rotation of the transform's "
            "affine and carried in the same form. Colour pictures and multi-layer Slicer "
            "segmentations (.seg.nrrd) are warped channel by channel, a segmentation keeping "
            "its segments' names and colours. ITK resamples; onto 2^26 voxels or more (a CT), "
            "a scalar image or label map through a transform in register's form goes through "
            "register's own warp instead, in about half ITK's time."
        ),
    )
    parser.add_argument(
        "--transform",
        type=Path,
        required=True,
        help="reference → image transform: an ITK transform file (.h5, .tfm, .txt, .mat) or a "
        "displacement-field image (.nii.gz, .nrrd, .mha) in LPS mm",
    )
    parser.add_argument(
        "--reference",
        type=Path,
        required=True,
        help="image whose grid the outputs take (a 4D series: the grid of its volumes)",
    )
    for option, what in (("--image", "an intensity image"), ("--labels", "a label map")):
        parser.add_argument(
            option, nargs=2, action="append", default=[], metavar=("IN", "OUT"),
            help=f"{what} and where to write it warped (repeat for more)",
        )  # fmt: skip
    parser.add_argument(
        "--spacing",
        type=float,
        metavar="MM",
        help="warp onto the reference's field of view at MM mm (isotropic, the reference's "
        "orientation) instead of its own grid: a series onto a 1 mm scan's grid at its own "
        "3 mm holds 27 times fewer voxels",
    )
    parser.add_argument(
        "--uncompressed", action="store_true", help="write the images without compression"
    )
    parser.set_defaults(run=run_apply)  # cli.main dispatches with args.run(args)
    return parser


def _jobs(args: argparse.Namespace) -> list[tuple[Path, Path, bool]]:
    """(input, output, is a label map) for every image to warp."""
    return [
        *((Path(source), Path(target), False) for source, target in args.image),
        *((Path(source), Path(target), True) for source, target in args.labels),
    ]


def _check_before_work(args: argparse.Namespace, jobs: list[tuple[Path, Path, bool]]) -> Grid:
    """Refuse every unusable output before reading an input; the output grid: the reference's
    (its header alone), or its field of view at ``--spacing``."""
    if not jobs:
        raise InputError(
            "nothing to warp: give --image IN OUT or --labels IN OUT (each may be repeated)"
        )
    if args.spacing is not None and not args.spacing > 0:
        raise InputError(f"--spacing must be a positive number of mm, not {args.spacing}")
    outputs = [
        ("--labels", "labels", out) if labels else ("--image", "image", out)
        for _, out, labels in jobs
    ]
    output_paths.check_outputs(outputs, [args.transform, args.reference, *(j[0] for j in jobs)])
    from ..imaging import fileio

    grid = fileio.read_grid(args.reference, "reference image")
    if grid.dim == 4:  # a series (labels into an fMRI run's space): the grid of its volumes
        grid = grid.volume_grid()
    output_paths.check_dimension(outputs, grid.dim)
    if args.spacing is None:
        return grid
    import numpy as np

    last = np.asarray(grid.size) - 1
    return grid.with_spacing_cropped_to(args.spacing, np.zeros(grid.dim), last, multiple=1)


class _Input(NamedTuple):
    header: ImageHeader  # what its file's header says: enough for every check
    source: Path
    target: Path
    labels: bool
    picture: bool  # written as PNG/TIFF
    label_type: int | None  # the 8- or 16-bit type of a label picture
    image: Any = None  # SimpleITK.Image, where a check needed the voxels (a label picture)

    @property
    def what(self) -> str:
        return "label map" if self.labels else "image"


def _checked_inputs(
    jobs: list[tuple[Path, Path, bool]], transform: Any, grid: Grid
) -> list[_Input]:
    """Every input checked against the transform and the reference before any warping, from
    its header: its voxels are read when it is warped, so that one input is held at a time
    (a label picture, whose labels choose its 8 or 16 bits, is read here)."""
    from ..imaging import fileio
    from ..imaging.apply_transform import check_applicable
    from ..imaging.image_2d import label_picture_type

    inputs = []
    for source, target, labels in jobs:
        what = "label map" if labels else "image"
        header = fileio.image_header(source, what)
        check_applicable(header, transform, grid, f"{what} {source}")
        picture = output_paths.full_suffix(target) in output_paths.IMAGE_2D_SUFFIXES
        image = fileio.read_image(source, what) if labels and picture else None
        label_type = label_picture_type(image, target) if image is not None else None
        inputs.append(_Input(header, source, target, labels, picture, label_type, image))
    return inputs


def _check_memory(inputs: list[_Input], grid: Grid, warp: SavedTransformWarp) -> None:
    """Refuse an input that would not fit in the memory available with its warped copy and
    the warp's working memory (each is read when it is warped, and written before the next;
    the engine's field is kept for all): a 4D series onto a fine grid is the usual way there
    (200 16-bit volumes onto a 1 mm brain's grid: 13.4 GB, its volumes and the series joined
    from them)."""
    import psutil

    from ..imaging.apply_transform import stored_bytes
    from ..registration.saved_transforms import warp_bytes

    engine = warp.may_use_engine
    needed = warp.field_bytes + max(
        stored_bytes(item.header) + warp_bytes(item.header, grid, item.labels, engine)
        for item in inputs
    )
    available = psutil.virtual_memory().available
    if needed > 0.9 * available:
        gb = 1e9
        raise ResourceError(
            f"warping an image would take {needed / gb:.1f} GB (the image, its warped copy "
            f"and the warp's working memory), more than the {available / gb:.1f} GB of "
            "memory available: give --spacing for a coarser grid "
            "over the reference's field of view (e.g. the series' own spacing), or warp a long "
            "series in parts"
        )


def _warped(item: _Input, warp: SavedTransformWarp, grid: Grid) -> tuple[Any, dict[Path, str]]:
    """The output image, ready to write (a 2D picture brought to 8 or 16 bits as ``register``
    does), and the text files that go beside it (a diffusion series' turned bvecs)."""
    import SimpleITK as sitk

    from ..imaging.gradient_tables import carried_gradients
    from ..imaging.image_2d import as_picture

    _, source, target, labels, picture, label_type, image = item
    volumes = f" ({item.header.size[3]} volumes)" if item.header.dimension > grid.dim else ""
    print(f"warping {source}{volumes}", flush=True)
    if image is None:
        from ..imaging import fileio

        image = fileio.read_image(source, item.what)
    result = warp(image, labels)
    _check_landed(image, result, source)
    if not labels and (note := _not_numbers(image, source)):
        print(f"note: {note}")
    carried = carried_gradients(image, source, target, warp.transform, grid)
    for key, value in carried.keys.items():
        result.SetMetaData(key, value)
    for note in carried.notes:
        print(f"note: {note}")
    if label_type is not None:
        result = sitk.Cast(result, label_type)
    elif picture:
        result, note = as_picture(result, image.GetPixelID(), target)
        if note:
            print(f"note: {note}")
    return result, carried.files


def _header_fields(warped: Any) -> dict[str, str] | None:
    """What ITK cannot write: the measurement frame of a DWI's carried gradient table."""
    from ..imaging import diffusion

    return diffusion.LPS_FRAME if diffusion.is_diffusion(warped) else None


def _check_landed(image, warped, source: Path) -> None:
    """Refuse an output that is one value (the padding: zero, or a bright background's) from
    an input that is not: the transform sent every point of the reference outside the image,
    which comes of mixing files from two spaces."""
    import SimpleITK as sitk

    def constant(volume) -> bool:  # each component alike
        values = sitk.GetArrayViewFromImage(volume)
        values = values.reshape(-1, volume.GetNumberOfComponentsPerPixel())
        return bool((values.min(axis=0) == values.max(axis=0)).all())

    if constant(warped) and not constant(image):
        raise InputError(
            f"nothing of {source} lands on the reference grid: the transform maps every point of "
            "the reference outside it. Give the transform and the reference of one registration "
            "(the fixed image for its --transform, the moving image for its --inverse-transform)"
        )


def _not_numbers(image, source: Path) -> str | None:
    """A note for an image with NaN or infinite voxels (a map that marks "no value" so), which
    ``register`` refuses but ``apply`` carries as ITK does: linear interpolation weighs all 8
    corners of a sample's cell, and a zero weight times NaN or infinity is NaN, so each makes
    up to 8 output voxels NaN."""
    from ..registration.image_checks import not_finite_voxels

    count = not_finite_voxels(image)
    if count == 0:
        return None
    many = "1 voxel" if count == 1 else f"{count} voxels"
    return (
        f"{source}: {many} not a number (NaN or infinite); the output is NaN wherever a "
        "sample's cell touches one"
    )


def run_apply(args: argparse.Namespace) -> int:
    """Warp and write each output in turn, all moved into place at the end or none (errors map
    to exit codes in cli.main): one warped image is held at a time, not all of them."""
    jobs = _jobs(args)
    grid = _check_before_work(args, jobs)
    from ..imaging import fileio
    from ..registration.saved_transforms import SavedTransformWarp
    from ..registration.torch_loading import load_torch_beside

    transform = fileio.read_transform(args.transform)
    warp = SavedTransformWarp(transform, grid)
    if warp.may_use_engine:  # torch loads while the inputs are checked and the first is read
        load_torch_beside()
    inputs = _checked_inputs(jobs, transform, grid)
    _check_memory(inputs, grid, warp)
    write = partial(fileio.write_image, compress=not args.uncompressed)
    written: list[Path] = []
    with contextlib.ExitStack() as staging:  # an error unwinds every staged file unmoved
        for item in inputs:
            warped, beside = _warped(item, warp, grid)
            staged = staging.enter_context(fileio.atomic_write_path(item.target))
            write(warped, staged, nrrd_fields=_header_fields(warped))
            del warped  # before the next is warped
            for path, text in beside.items():
                staging.enter_context(fileio.atomic_write_path(path)).write_text(text)
            written += [item.target, *beside]
    for path in written:
        print(f"wrote {path}")
    return EXIT_OK
