"""Warping images through a dense displacement, as ITK's resampling would, in one pass per grid.

The moving image and its label maps share their sampling coordinates, which cost more to build
than the sampling itself; intensities are sampled linearly, labels by nearest neighbour from
their own integers (``nearest_values``: no float copy, a third of the sampler's time). When
the caller knows how far the displacement strays from an affine map (:class:`Reach`), only the
box of the output grid that can land near a non-zero moving voxel is sampled: a skull-stripped
brain and its labels are zero over most of their field of view, and so is everything the rest
of the output grid would sample. For the same reason only the box of the moving voxels around
the non-zero ones is read (a scan's converted to a float tensor), whatever the caller knows.
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk
import torch

from ..imaging.geometry import Grid, affine_parameters
from ..imaging.resampling import nonzero_box
from ..imaging.volumes import allocate, paste_block, rows_per_slab, stop_if
from ..nn.filters import grid_sample
from .warping import Block, Displacement, block_field, index_map

# Voxels of margin around a moving image's non-zero box: a linear sample at index p reads
# floor(p) and floor(p) + 1, so one voxel would do; the second absorbs any rounding.
SUPPORT_MARGIN = 2.0
# Labels are gathered at int32 flat indices below this many voxels: half int64's bytes to make
# and read, 15.5 → 11.4 ms for 2 million points of a 512² × 600 CT's labels.
INT32_INDEX_VOXELS = 2**31


@dataclass(frozen=True)
class Reach:
    """What is known of a displacement ``u`` beyond its values: ``x + u(x)`` lies within
    ``mm`` of ``matrix @ x + translation`` (LPS mm) at every voxel."""

    matrix: np.ndarray
    translation: np.ndarray
    mm: float

    @classmethod
    def of(cls, affine: sitk.Transform, flow_mm: torch.Tensor) -> Reach:
        """``T(x) = A(x + v(x))`` strays from ``A x`` by at most ‖A‖ · max |v| (``v``:
        ``flow_mm``, (1, dim, …) in LPS mm): where a warp can skip what cannot land on the
        moving image."""
        matrix, translation = affine_parameters(affine, flow_mm.shape[1])
        largest = float(flow_mm.square().sum(dim=1).sqrt().max()) if flow_mm.numel() else 0.0
        return cls(matrix, translation, float(np.linalg.norm(matrix, 2)) * largest)


# Pixel types whose every value float32 holds exactly: no pass over their voxels to find out.
_SMALL_INTEGERS = (sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16)


def _beyond_float32(image: sitk.Image) -> bool:
    """Whether a value of ``image`` is 2**24 or more in magnitude: labels that were sampled as
    float64, with float64 coordinates, whose results nearest_values keeps."""
    if image.GetPixelID() in _SMALL_INTEGERS:
        return False
    statistics = sitk.MinimumMaximumImageFilter()
    statistics.Execute(image)
    return max(abs(statistics.GetMinimum()), abs(statistics.GetMaximum())) >= 2**24


def warp_image(
    moving: sitk.Image,
    displacement: sitk.Image | np.ndarray | Displacement,
    grid: Grid | None = None,
    nearest: bool = False,
    device: torch.device | str = "cpu",
    is_cancelled: Callable[[], bool] = lambda: False,
) -> sitk.Image:
    """``moving(x + u(x))`` on the displacement's grid, as ITK's Resample computes it.

    Linear for intensities (float32 out; an integer image keeps its type, rounded to the
    nearest value, where ITK's Resample truncates); nearest for label maps (pixel type kept,
    labels exact). ``displacement`` is a vector image, a (K, J, I, dim) array with ``grid``,
    or a :class:`Displacement`.
    """
    return warp_images([(moving, nearest)], displacement, grid, device, is_cancelled)[0]


def warp_images(
    movings: Sequence[tuple[sitk.Image, bool]],
    displacement: sitk.Image | np.ndarray | Displacement,
    grid: Grid | None = None,
    device: torch.device | str = "cpu",
    is_cancelled: Callable[[], bool] = lambda: False,
    reach: Reach | None = None,
) -> list[sitk.Image]:
    """:func:`warp_image` of each ``(image, nearest)`` through one displacement, in one pass:
    the field is read once, and images on the same grid (a scan and its label maps) share
    their sampling coordinates, which cost more to build than the sampling itself. With
    ``reach``, voxels that cannot land near a non-zero moving voxel are left at zero unread
    (and a :class:`Displacement` is not evaluated there)."""
    device = torch.device(device)
    grid, landing = _reader(displacement, grid, device)
    groups: dict[Grid, list[int]] = {}
    for index, (image, _) in enumerate(movings):
        groups.setdefault(Grid.of(image), []).append(index)
    warped: dict[int, sitk.Image] = {}
    rows = rows_per_slab(grid)
    for moving, indices in groups.items():
        supports = [_nonzero_box(sitk.GetArrayViewFromImage(movings[i][0])) for i in indices]
        # Only the voxels around the non-zero ones become a float tensor (a brain's box is
        # about a third of its scan): with a zero voxel of margin, a point beyond it samples
        # zeros from the crop as from the whole image.
        union = _union(supports)
        crop = _grown(union, moving.shape)
        whole = crop == tuple(slice(0, n) for n in moving.shape)  # no copy of a full scan
        sources = [
            _Source(
                image if whole else image[_itk_region(crop)], nearest, grid, device, is_cancelled
            )
            for image, nearest in (movings[i] for i in indices)
        ]
        # Non-zero voxels short of the image's border on every side leave the crop zero faces.
        zero_faces = union is None or all(
            part.start > 0 and part.stop < n for part, n in zip(union, moving.shape, strict=True)
        )
        mapping = _ItkCoordinates(grid, sources[0].grid, device, zero_faces)
        box = sampled_box(grid, moving, reach, union)
        for start in range(box[0].start, box[0].stop, rows):
            stop_if(is_cancelled)
            block = (slice(start, min(start + rows, box[0].stop)), *box[1:])
            coordinates, outside = landing(mapping, block)
            for source in sources:
                values = source.sample(coordinates)
                if outside is not None:
                    values.masked_fill_(outside, 0)
                source.paste(values.cpu().numpy(), block)
        warped.update((i, source.image) for i, source in zip(indices, sources, strict=True))
    return [warped[i] for i in range(len(movings))]


def _union(supports: Sequence[Block | None]) -> Block | None:
    """The box around every support (array slices); None when every image is zero."""
    boxes = [box for box in supports if box is not None]
    if not boxes:
        return None
    return tuple(
        slice(min(box[axis].start for box in boxes), max(box[axis].stop for box in boxes))
        for axis in range(len(boxes[0]))
    )


def _grown(union: Block | None, shape: tuple[int, ...]) -> Block:
    """``union`` one voxel wider on each side within ``shape``; a single (zero) voxel when
    every image is zero."""
    if union is None:
        return tuple(slice(0, 1) for _ in shape)
    return tuple(
        slice(max(part.start - 1, 0), min(part.stop + 1, n))
        for part, n in zip(union, shape, strict=True)
    )


def _itk_region(block: Block) -> tuple[slice, ...]:
    """Array-order slices as SimpleITK's (I, J, K) image slicing takes them."""
    return tuple(reversed(block))


def _reader(
    displacement: sitk.Image | np.ndarray | Displacement, grid: Grid | None, device: torch.device
) -> tuple[Grid, Callable[[_ItkCoordinates, Block], tuple[torch.Tensor, torch.Tensor | None]]]:
    """The displacement's grid, and where the voxels of a block land (``_ItkCoordinates``):
    for a :class:`Displacement` in one pass, otherwise from ``u`` as float32 on ``device``."""
    if isinstance(displacement, Displacement):
        return displacement.grid, lambda mapping, block: mapping.through(displacement, block)
    if isinstance(displacement, sitk.Image):
        grid, array = Grid.of(displacement), sitk.GetArrayViewFromImage(displacement)
    elif grid is None:
        raise ValueError("an array displacement needs its grid")
    else:
        array = displacement

    def landing(mapping: _ItkCoordinates, block: Block):
        return mapping.at(torch.tensor(array[block], device=device, dtype=torch.float32), block)

    return grid, landing


def sampled_box(grid: Grid, moving: Grid, reach: Reach | None, union: Block | None) -> Block:
    """The array slices of ``grid`` whose voxels can land within SUPPORT_MARGIN voxels of
    ``union`` (array slices of ``moving`` around every image's non-zero voxels; None when all
    are zero); the whole grid without ``reach``. The rest samples only zeros."""
    whole = tuple(slice(0, n) for n in grid.shape)
    if reach is None or not np.isfinite(reach.mm):
        return whole
    if union is None:
        return tuple(slice(0, 0) for _ in grid.shape)
    linear, constant = index_map(grid, moving, (reach.matrix, reach.translation))
    to_index = moving.physical_to_index_affine()[0]
    # Index units (I, J, K) the moving point can stray from the affine's, and the margin.
    slack = reach.mm * np.linalg.norm(to_index, axis=1) + SUPPORT_MARGIN
    low = np.array([part.start for part in union[::-1]]) - slack
    high = np.array([part.stop - 1 for part in union[::-1]]) + slack
    corners = np.array(list(itertools.product(*zip(low, high, strict=True))))
    try:
        indices = (corners - constant) @ np.linalg.inv(linear).T
    except np.linalg.LinAlgError:  # a degenerate affine: no box to trust
        return whole
    sizes = np.asarray(grid.size)
    first = np.clip(np.floor(indices.min(axis=0)).astype(int) - 1, 0, sizes)
    last = np.clip(np.ceil(indices.max(axis=0)).astype(int) + 2, first, sizes)
    return tuple(slice(int(a), int(b)) for a, b in zip(first[::-1], last[::-1], strict=True))


class _Source:
    """One image to warp: its voxels as a tensor, and the output image being filled."""

    def __init__(self, moving: sitk.Image, nearest: bool, grid: Grid, device, is_cancelled):
        self.grid = Grid.of(moving)
        kept = sitk.GetArrayViewFromImage(moving).dtype
        if nearest:
            # Gathered from the labels' own integers: no float copy (a torso CT's: 630 MB).
            # Coordinates in float64 for labels above 2**24, as when they were sampled as floats.
            self._moving = moving  # the tensor is a view of its buffer
            self.volume = _raw_bits(moving).to(device)
            self._precision = torch.float64 if _beyond_float32(moving) else torch.float32
        else:
            self.volume = _as_tensor(moving, is_cancelled)[None, None].to(device)
        self.nearest = nearest
        # Labels keep their pixel type, and so do integer intensities, rounded: linear
        # interpolation stays between the image's values and the zero outside it, which the
        # type holds. A quarter of float32's bytes for an 8-bit scan, to fill and to write.
        self.rounds = not nearest and np.issubdtype(kept, np.integer)
        self.dtype = kept if nearest or self.rounds else np.dtype(np.float32)
        pixel_id = moving.GetPixelID() if nearest or self.rounds else sitk.sitkFloat32
        self.image = allocate(grid, pixel_id, is_cancelled=is_cancelled)

    def sample(self, coordinates: torch.Tensor) -> torch.Tensor:
        """The values at grid_sample's ``coordinates`` (1, …, dim), (…)."""
        if self.nearest:
            return nearest_values(self.volume, coordinates[0].to(self._precision))
        return grid_sample(self.volume, coordinates, "bilinear", "border")[0, 0]

    def paste(self, values: np.ndarray, block: Block) -> None:
        if self.rounds:
            np.rint(values, out=values)
        if self.nearest:
            values = values.view(self.dtype)  # the raw bits back in the labels' own type
        paste_block(self.image, values.astype(self.dtype, copy=False), block)


def nearest_values(volume: torch.Tensor, coordinates: torch.Tensor) -> torch.Tensor:
    """``F.grid_sample(volume, coordinates, "nearest", "border", align_corners=True)`` of one
    channel, gathered from ``volume``'s own values (any type): the same unnormalising in the
    coordinates' precision, clipping (NaN to the far border, as ATen's clip leaves it) and
    rounding half to even. On a torso CT's labels a third of the sampler's time, with no float
    copy of the volume. ``coordinates`` (…, dim) in (x, y[, z]) order; the values (…)."""
    volume = volume.contiguous()
    index_type = torch.int32 if volume.numel() < INT32_INDEX_VOXELS else torch.int64
    flat = None
    for axis, (size, stride) in enumerate(
        zip(volume.shape[::-1], volume.stride()[::-1], strict=True)
    ):
        last = float(size - 1)
        index = coordinates[..., axis].add(1).div_(2).mul_(last)
        index.nan_to_num_(nan=last, posinf=last, neginf=0.0).clamp_(0.0, last).round_()
        index = index.to(index_type).mul_(stride)
        flat = index if flat is None else flat.add_(index)
    return volume.reshape(-1)[flat]


class _ItkCoordinates:
    """Where the voxels of ``grid`` displaced by ``u`` fall in ``moving``, in grid_sample's
    normalised coordinates, and which of them ITK's resampling counts as outside.

    The index map and the normalisation are one affine map, applied once: ITK's half-voxel
    bounds ``[−0.5, n − 0.5)`` become bounds on the normalised coordinates. When the images'
    outermost voxels are all zero (``zero_faces``), sampling with border padding already gives
    zero beyond them, as ITK does outside, and no mask is made (a sixth of a brain's warp).
    """

    def __init__(self, grid: Grid, moving: Grid, device: torch.device, zero_faces: bool):
        linear, constant = index_map(grid, moving)
        sizes = np.asarray(moving.size, dtype=np.float64)
        scale = moving.index_to_sampler_scale
        self._device, self._zero_faces = device, zero_faces
        self._linear, self._constant = scale[:, None] * linear, scale * constant - 1.0
        to_index, index_offset = moving.physical_to_index_affine()
        # Physical points to the same coordinates, for Displacement.mapped.
        self._point_map = scale[:, None] * to_index, scale * index_offset - 1.0

        self._from_mm = torch.as_tensor(self._point_map[0].T, dtype=torch.float32, device=device)
        # ITK's bounds in the same coordinates, as float32 numbers (what they are compared in).
        bounds = (-0.5 * scale - 1.0, (sizes - 0.5) * scale - 1.0)
        self._bounds = [limits.astype(np.float32).tolist() for limits in bounds]

    def at(self, u: torch.Tensor, block: Block) -> tuple[torch.Tensor, torch.Tensor | None]:
        """For the voxels of ``block`` displaced by ``u`` (…, dim) in mm: the coordinates
        (1, …, dim) and the outside mask (…), None where it would change no value."""
        coordinates = block_field(self._linear, self._constant, block, self._device, torch.float32)
        dim = coordinates.shape[-1]
        coordinates = torch.addmm(coordinates.view(-1, dim), u.reshape(-1, dim), self._from_mm)
        return self._outside(coordinates.view(u.shape))

    def through(
        self, displacement: Displacement, block: Block
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`at` for the ``u`` of ``displacement``, built with the coordinates."""
        return self._outside(displacement.mapped(*self._point_map, block).to(self._device))

    def _outside(self, coordinates: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The coordinates (1, …, dim) and the points ITK counts outside (…), compared one
        component at a time: comparing the interleaved (…, dim) array and reducing over its
        last axis took three to four times as long (1.2 s over a 512² × 600 CT)."""
        if self._zero_faces:
            return coordinates[None], None
        inside = None
        for axis, (low, high) in enumerate(zip(*self._bounds, strict=True)):
            component = coordinates[..., axis]
            within = (component >= low).logical_and_(component < high)
            inside = within if inside is None else inside.logical_and_(within)
        return coordinates[None], inside.logical_not_()


def _as_tensor(image: sitk.Image, is_cancelled: Callable[[], bool]) -> torch.Tensor:
    """The image's voxels as a new float32 tensor, converted slab by slab on torch's threads:
    a 512² × 600 CT's int16 in 0.2 s, where NumPy's one thread took 0.7 s."""
    source = _viewed(sitk.GetArrayViewFromImage(image))
    out = torch.empty(source.shape, dtype=torch.float32)
    rows = rows_per_slab(Grid.of(image))
    for start in range(0, len(source), rows):
        stop_if(is_cancelled)
        out[start : start + rows].copy_(source[start : start + rows])
    return out


def _raw_bits(image: sitk.Image) -> torch.Tensor:
    """The image's voxels as a tensor viewing its buffer, an unsigned type as the signed one of
    its width (torch indexes no uint16 or uint32): gathered, then read back as the type."""
    view = sitk.GetArrayViewFromImage(image)
    if view.dtype.kind == "u" and view.dtype.itemsize > 1:
        view = view.view(np.dtype(f"int{8 * view.dtype.itemsize}"))
    return _viewed(view)


def _viewed(view: np.ndarray) -> torch.Tensor:
    """A tensor over SimpleITK's read-only array view, without a copy; it is only read."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's warning for read-only arrays
        return torch.from_numpy(view)


def _nonzero_box(volume: np.ndarray) -> Block | None:
    """The array slices holding every non-zero (or NaN) voxel; None if there is none."""
    box = nonzero_box(volume != 0)
    if box is None:
        return None
    first, last = box  # I, J, K order
    return tuple(slice(int(a), int(b) + 1) for a, b in zip(first[::-1], last[::-1], strict=True))
