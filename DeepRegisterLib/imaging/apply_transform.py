"""A saved transform applied to more images, as ``register`` warps its own.

A user registers one scan and later needs others of the same subject (another sequence, a new
segmentation, a dose map) on the fixed grid. ITK's Resample applies our transforms exactly, but
it truncates integer images; here they are rounded, labels are sampled by nearest neighbour and
keep their type, and everything else comes back float32, as in ``register --warped``. ITK alone
does it (no torch): for a single 256³ image that is faster than loading the engine. A 4D series
is warped volume by volume (ITK resamples only with a transform of the image's own dimension),
colour pictures and the layers of a Slicer segmentation component by component.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import InputError
from .geometry import Grid, ImageHeader
from .intensity_window import IntensityWindow
from .resampling import resample
from .segmentation_file import carry_segments, is_slicer_segmentation
from .volumes import allocate, paste_rows, rows_per_slab

#: A 4D series' volumes keep the 3D block of its direction matrix.
_SUBMATRIX = sitk.ExtractImageFilter.DIRECTIONCOLLAPSETOSUBMATRIX
#: The transform sampled into a field on the grid holds float64 vectors, as ITK computes them.
_FIELD_VALUE_BYTES = 8


def check_applicable(
    image: sitk.Image | ImageHeader, transform: sitk.Transform, grid: Grid, what: str
) -> None:
    """Refuse, before any work, an image (or its header) that ``transform`` cannot carry onto
    ``grid``."""
    if transform.GetDimension() != grid.dim:
        raise InputError(
            f"the transform is {transform.GetDimension()}D and the reference {grid.dim}D: give "
            "the transform and the reference (its fixed image) of one registration"
        )
    if image.GetDimension() != grid.dim and not is_series(image, grid):
        series = " and 4D series of 3D volumes" if grid.dim == 3 else ""
        raise InputError(
            f"{what} is {image.GetDimension()}D and the reference {grid.dim}D: a transform "
            f"carries {grid.dim}D images{series} onto its reference"
        )


def is_series(image: sitk.Image | ImageHeader, grid: Grid) -> bool:
    """A 4D image (fMRI, DWI, perfusion, 4D CT) to warp volume by volume onto a 3D grid."""
    return grid.dim == 3 and image.GetDimension() == 4


def warped_bytes(image: sitk.Image | ImageHeader, grid: Grid, labels: bool = False) -> int:
    """The memory ``apply_transform`` needs beyond ``image``: its result on ``grid`` (the
    image's type for labels and integers, float32 otherwise), twice where it is joined from
    pieces (components, volumes); an integer piece's float32 warp before it is rounded; and,
    when the transform is sampled into a field (see :func:`_sampler`), that field and the
    piece cast for its warp. ``image`` may be a header that answers SimpleITK's ``Get…``
    questions (batch plans with headers). Within 10 % of the peaks measured: a CT's int16
    scan, a 20-volume series onto a 1 mm grid."""
    voxels, value = int(np.prod(grid.size)), _value_bytes(image, labels)
    needed = result_bytes(image, grid, labels) * (2 if _pieces(image, grid) > 1 else 1)
    if not labels and _is_integer(image):  # its float32 warp, then rounded
        needed += 4 * voxels
    if _field_pays(image, grid, labels):
        piece = int(np.prod(image.GetSize()[: grid.dim]))
        needed += voxels * _FIELD_VALUE_BYTES * grid.dim + piece * (value if labels else 4)
    return needed


def result_bytes(image: sitk.Image | ImageHeader, grid: Grid, labels: bool = False) -> int:
    """The bytes of ``image`` warped onto ``grid``, as both warps give it: the image's type for
    labels and integers, float32 otherwise, each component and volume."""
    return int(np.prod(grid.size)) * _pieces(image, grid) * _value_bytes(image, labels)


def stored_bytes(image: sitk.Image | ImageHeader) -> int:
    """The bytes ``image``'s voxels take in memory, read from a header or an image."""
    per_voxel = image.GetNumberOfComponentsPerPixel() * _probe(image).GetSizeOfPixelComponent()
    return int(np.prod(image.GetSize())) * per_voxel


def apply_transform(
    image: sitk.Image, transform: sitk.Transform, reference: Grid | sitk.Image, labels: bool = False
) -> sitk.Image:
    """``image(T(x))`` at each voxel ``x`` of the reference grid; outside the image, zero, or
    the image's background where that is bright (a photograph on white, see
    :class:`IntensityWindow`), as ``register --warped`` pads.

    ``transform`` maps the reference's points to ``image``'s (ITK's convention, and that of
    ``register --transform``; its ``--inverse-transform`` goes the other way, onto the moving
    grid). Intensities are sampled linearly: an integer image keeps its type, rounded to the
    nearest value (ties to even, as ``register`` does), anything else becomes float32. With
    ``labels``, nearest neighbour, type and values kept. Each component of a multi-component
    image (a colour picture, the layers of a Slicer segmentation) and each volume of a 4D
    series is warped alike; a Slicer segmentation keeps its segments (names, colours, layers);
    a DWI's gradient directions are the command line's to turn and carry
    (:mod:`.diffusion`, :mod:`.fsl_gradients`).
    """
    grid = reference if isinstance(reference, Grid) else Grid.of(reference)
    check_applicable(image, transform, grid, "the label map" if labels else "the image")
    sample = _sampler(transform, grid, _field_pays(image, grid, labels))
    paddings = _paddings(image, grid, labels)
    if not is_series(image, grid):
        warped = _warp_components(image, sample, labels, paddings)
        if labels and is_slicer_segmentation(image):
            carry_segments(image, warped)
        return warped
    size = list(image.GetSize())
    volumes = [
        _warp_components(_volume(image, t), sample, labels, paddings) for t in range(size[3])
    ]
    return sitk.JoinSeries(volumes, image.GetOrigin()[3], image.GetSpacing()[3])


#: ``sample(image, interpolator, output pixel type, padding)``: one scalar image onto the grid.
Sampler = Callable[[sitk.Image, int, int, float], sitk.Image]


def _volume(series: sitk.Image, t: int) -> sitk.Image:
    size = series.GetSize()
    return sitk.Extract(series, [*size[:3], 0], [0, 0, 0, t], _SUBMATRIX)


def _paddings(image: sitk.Image, grid: Grid, labels: bool) -> list[float]:
    """The value outside each component: 0 for labels, else that of the component's
    background (a series' first volume speaks for all: a hundred windows would cost 0.5 s)."""
    components = image.GetNumberOfComponentsPerPixel()
    if labels:
        return [0.0] * components
    first = _volume(image, 0) if is_series(image, grid) else image
    if components == 1:
        return [IntensityWindow.of(first).padding]
    return [
        IntensityWindow.of(sitk.VectorIndexSelectionCast(first, c)).padding
        for c in range(components)
    ]


def _pieces(image: sitk.Image, grid: Grid) -> int:
    """How many scalar images ``image`` is warped as: components × volumes."""
    volumes = image.GetSize()[3] if is_series(image, grid) else 1
    return volumes * image.GetNumberOfComponentsPerPixel()


def _value_bytes(image: sitk.Image, labels: bool) -> int:
    """Bytes of one warped value: the image's own type for labels and integers, else float32."""
    if labels or _is_integer(image):
        return _probe(image).GetSizeOfPixelComponent()
    return 4


def _is_integer(image: sitk.Image) -> bool:
    return bool(np.issubdtype(sitk.GetArrayViewFromImage(_probe(image)).dtype, np.integer))


def _probe(image: sitk.Image) -> sitk.Image:
    """A one-voxel image of ``image``'s pixel type, which answers for it, header or image."""
    return sitk.Image([1, 1], image.GetPixelID(), image.GetNumberOfComponentsPerPixel())


def _field_pays(image: sitk.Image, grid: Grid, labels: bool) -> bool:
    """Whether to sample the transform once into a field: for several pieces, when the field
    is no larger than the result it speeds up (a 100-volume series, not the two layers of a
    segmentation, whose field would cost a big CT gigabytes)."""
    pieces = _pieces(image, grid)
    return pieces > 1 and _FIELD_VALUE_BYTES * grid.dim <= pieces * _value_bytes(image, labels)


def _sampler(transform: sitk.Transform, grid: Grid, through_field: bool) -> Sampler:
    """ITK's Resample, or, ``through_field``, the transform evaluated once as a displacement
    field on the grid and each piece warped through it: ITK's Warp reads that field at each
    voxel where Resample evaluates the transform again (a composite ``.h5`` holds a field to
    interpolate): half the time a volume, the same values (a float64 image's to float32)."""
    if not through_field:
        return lambda image, interpolator, output_type, padding: resample(
            image, grid, transform, interpolator, output_type, padding=padding
        )
    geometry = (list(grid.size), grid.origin, grid.spacing, grid.direction)
    field = sitk.TransformToDisplacementField(transform, sitk.sitkVectorFloat64, *geometry)

    def warp(image: sitk.Image, interpolator: int, output_type: int, padding: float) -> sitk.Image:
        cast = sitk.Cast(image, output_type)
        return sitk.Warp(cast, field, interpolator, *geometry, padding)

    return warp


def _warp_components(
    image: sitk.Image, sample: Sampler, labels: bool, paddings: list[float]
) -> sitk.Image:
    if len(paddings) == 1:
        return _warp(image, sample, labels, paddings[0])
    return sitk.Compose(
        [
            _warp(sitk.VectorIndexSelectionCast(image, c), sample, labels, padding)
            for c, padding in enumerate(paddings)
        ]
    )


def _warp(image: sitk.Image, sample: Sampler, labels: bool, padding: float) -> sitk.Image:
    """One scalar image onto the grid."""
    if labels:
        return sample(image, sitk.sitkNearestNeighbor, image.GetPixelID(), 0.0)
    return in_type_of(sample(image, sitk.sitkLinear, sitk.sitkFloat32, padding), image)


def in_type_of(warped: sitk.Image, image: sitk.Image) -> sitk.Image:
    """``image`` warped linearly (``warped``, float32) in the type DeepRegister gives it: its
    own for integers, rounded to the nearest (ties to even) where ITK's cast truncates; float32
    otherwise. Linear interpolation stays between the image's values and the padding (0 or one
    of them), which the type holds: rounding is all the cast needs."""
    kept = sitk.GetArrayViewFromImage(image).dtype
    if not np.issubdtype(kept, np.integer):
        return warped
    grid = Grid.of(warped)
    rounded = allocate(grid, image.GetPixelID())
    rounded.CopyInformation(warped)  # to the bit, as the warp set it
    values = sitk.GetArrayViewFromImage(warped)
    rows = rows_per_slab(grid)
    for start in range(0, values.shape[0], rows):
        paste_rows(rounded, np.rint(values[start : start + rows]).astype(kept), start)
    return rounded
