"""Evaluating transforms over whole grids, in index space (images are warped through them in
:mod:`image_warping`).

Every map between two grids here is affine in the voxel index, so sampling coordinates are built
by broadcasting three 1-D ramps rather than materialising float64 point clouds, and the network
grid (which shares the fixed image's direction) is upsampled separably, one axis at a time.
That keeps a 256³ composition to a few seconds on two CPU cores and memory to a few copies.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Callable
from typing import NamedTuple

import numpy as np
import SimpleITK as sitk
import torch

from ..imaging.geometry import Grid, affine_parameters
from ..imaging.volumes import (
    SHARED_SLICES_BYTES,
    allocate,
    paste_rows,
    rows_per_slab,
    shared_slices_bytes,
    stop_if,
)
from ..nn.filters import grid_sample

#: Voxels of a field evaluated at a time: its few arrays (1 MB each) stay in the CPU's cache.
CACHE_VOXELS = 2**18
#: Slices of a field interpolated along its fast axes that each thread keeps (a row reads two).
KEPT_SLICES = 4


def index_map(
    grid_out: Grid, grid_in: Grid, point_map: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """(L, c): continuous (I, J, K) index on ``grid_in`` of the voxel ``idx`` of ``grid_out``,
    ``L @ idx + c``, optionally through a linear point map ``x ↦ M x + t`` between the two."""
    matrix, offset = point_map if point_map is not None else (np.eye(grid_out.dim), 0.0)
    to_index, index_offset = grid_in.physical_to_index_affine()
    linear = to_index @ matrix @ grid_out.index_to_physical
    constant = to_index @ (matrix @ np.asarray(grid_out.origin) + offset) + index_offset
    return linear, constant


Block = tuple[slice, ...]  # array-order slices with explicit starts and stops


def row_block(grid: Grid, start: int, stop: int) -> Block:
    """Array rows [start, stop) of ``grid``, whole along the other axes."""
    return (slice(start, stop), *[slice(0, n) for n in grid.shape[1:]])


def _ramps(block: Block, device, dtype=torch.float64) -> list[torch.Tensor]:
    """Index ramps per ITK axis (I, J[, K]), shaped to broadcast over ``block``."""
    dim = len(block)
    ramps = []
    for axis in range(dim):
        part = block[dim - 1 - axis]
        ramp = torch.arange(part.start, part.stop, device=device, dtype=dtype)
        shape = [1] * dim
        shape[dim - 1 - axis] = ramp.numel()
        ramps.append(ramp.view(*shape, 1))
    return ramps


def affine_field(
    linear: np.ndarray,
    constant: np.ndarray,
    grid: Grid,
    start: int,
    stop: int,
    device,
    dtype=torch.float64,
) -> torch.Tensor:
    """``linear @ idx + constant`` for the voxels of rows [start, stop): (rows, …, dim)."""
    return block_field(linear, constant, row_block(grid, start, stop), device, dtype)


def block_field(
    linear: np.ndarray, constant: np.ndarray, block: Block, device, dtype=torch.float64
) -> torch.Tensor:
    """``linear @ idx + constant`` for the voxels of ``block``: (…, dim)."""
    lin = torch.as_tensor(linear, device=device, dtype=dtype)
    out = torch.as_tensor(np.asarray(constant), device=device, dtype=dtype)
    for axis, ramp in enumerate(_ramps(block, device, dtype)):
        out = out + ramp * lin[:, axis]
    return out


def sample(volume: torch.Tensor, index_ijk: torch.Tensor) -> torch.Tensor:
    """Sample ``volume`` (1, C, *shape) linearly at continuous (I, J, K) indices (…, dim) →
    (C, …); zero outside, as a flow is."""
    spatial = volume.shape[2:]
    sizes = torch.tensor(spatial[::-1], dtype=index_ijk.dtype, device=index_ijk.device)
    grid = 2.0 * index_ijk / (sizes - 1).clamp_min(1) - 1.0
    batch_shape = index_ijk.shape[:-1]
    grid = grid.reshape(1, *batch_shape, len(spatial)).to(volume.dtype)
    return grid_sample(volume, grid)[0]


def _interpolation_weights(coords: torch.Tensor, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """1-D linear interpolation at ``coords`` over ``n`` samples: (index, weight) of the lower
    and the upper neighbour; indices are clamped into range, weights are 0 outside it."""
    low = torch.floor(coords)
    weight = coords - low
    low = low.long()
    return [
        (index.clamp(0, n - 1), torch.where((index >= 0) & (index < n), w, torch.zeros_like(w)))
        for index, w in ((low, 1.0 - weight), (low + 1, weight))
    ]


def _interpolation_matrix(coords: torch.Tensor, n: int) -> torch.Tensor:
    """(n_out × n) weights of 1-D linear interpolation at ``coords``; rows outside are 0."""
    matrix = torch.zeros((coords.numel(), n), dtype=torch.float64, device=coords.device)
    rows = torch.arange(coords.numel(), device=coords.device)
    for index, weight in _interpolation_weights(coords, n):
        matrix.index_put_((rows, index), weight, accumulate=True)
    return matrix


class FieldOnGrid:
    """A vector field (1, C, *field_grid.shape) linearly resampled onto ``grid``, by blocks.

    Interpolation separates by axis because the two grids share axis directions (the network
    grid is built that way). Along the fast axes it is matrix products with their interpolation
    matrices, one slice of the field's slowest axis at a time: a BLAS call is far faster than
    gathering along a middle axis of a large tensor. Each output row is then a weighted sum of
    two such slices. A brain's slices (70 MB) are made once, for every thread; a 512² × 600
    CT's would take 660 MB and 0.4–0.7 s before its first row, so there a slice is made when a
    row first reads it, and each thread (the warp's, det J's beside it) keeps its last few: rows
    are read in increasing order. Each voxel's value depends on that voxel alone, whichever
    block holds it.
    """

    def __init__(self, field: torch.Tensor, field_grid: Grid, grid: Grid):
        linear, constant = index_map(grid, field_grid)
        if not np.allclose(linear, np.diag(np.diag(linear)), atol=1e-9):
            raise ValueError("FieldOnGrid needs grids with the same axis directions")
        dim = grid.dim

        def coords(axis: int) -> torch.Tensor:  # ITK axis I, J, K ↔ tensor axis dim, dim-1, …
            steps = torch.arange(grid.size[axis], dtype=torch.float64, device=field.device)
            return constant[axis] + linear[axis, axis] * steps

        self._field = field[0]
        self._matrices = [
            _interpolation_matrix(coords(axis), field_grid.size[axis]).to(field.dtype)
            for axis in range(dim - 1)
        ]
        # Per output row: its two neighbouring slices and their weights (the field's type, as
        # plain numbers).
        (low, w_low), (high, w_high) = (
            (index.tolist(), weight.to(field.dtype).tolist())
            for index, weight in _interpolation_weights(coords(dim - 1), field_grid.size[dim - 1])
        )
        self._rows = list(zip(low, w_low, high, w_high, strict=True))
        self._kept = threading.local()  # each thread's last slices: {index: (C, fast axes)}
        count = field_grid.shape[0]
        size = shared_slices_bytes(
            grid, count, field.shape[1], field.element_size(), SHARED_SLICES_BYTES
        )
        self._shared = None if size is None else [self._made(k) for k in range(count)]

    def block(self, block: Block) -> torch.Tensor:
        """The resampled field over the array slices ``block``: (C, …).

        Row by row into the result: gathering the block's neighbour rows first took 6 times as
        long (1.1 s over a 512² × 600 CT), for the same values."""
        rows, *across = block
        part = (slice(None), *across)
        shape = (len(self._field), *(piece.stop - piece.start for piece in across))
        out = self._field.new_empty((shape[0], rows.stop - rows.start, *shape[1:]))
        upper = self._field.new_empty(shape)
        for row, (low, w_low, high, w_high) in zip(out.unbind(1), self._rows[rows], strict=True):
            torch.mul(self._slice(low)[part], w_low, out=row)
            torch.mul(self._slice(high)[part], w_high, out=upper)
            row += upper
        return out

    def _slice(self, index: int) -> torch.Tensor:
        """Slice ``index`` of the field's slowest axis on the grid's fast axes: (C, …)."""
        if self._shared is not None:
            return self._shared[index]
        kept = self._kept.__dict__.setdefault("slices", {})
        if index not in kept:
            if len(kept) >= KEPT_SLICES:
                del kept[next(iter(kept))]  # the oldest
            kept[index] = self._made(index)
        return kept[index]

    def _made(self, index: int) -> torch.Tensor:
        volume = self._field[:, index]  # (C, fast axes of the field)
        dim = volume.dim()
        for axis, matrix in enumerate(self._matrices):
            moved = torch.movedim(volume, dim - 1 - axis, -1) @ matrix.T
            volume = torch.movedim(moved, -1, dim - 1 - axis)
        return volume.contiguous()


class _Terms(NamedTuple):
    """A field ``A v(x) + B idx + c`` over a grid's voxels (rows as lists: plain floats)."""

    of_v: list[list[float]]
    of_index: list[list[float]]
    constant: list[float]

    @classmethod
    def of(cls, of_v: np.ndarray, of_x: np.ndarray, constant: np.ndarray, grid: Grid) -> _Terms:
        """``of_v @ v + of_x @ x + constant`` with ``x`` the voxel's LPS point on ``grid``."""
        index = of_x @ grid.index_to_physical
        total = of_x @ np.asarray(grid.origin) + constant
        return cls(np.asarray(of_v).tolist(), index.tolist(), np.asarray(total).tolist())


class Displacement:
    """``u(x) = A(x + v(x)) − x`` on ``grid`` in LPS mm, evaluated where it is read, block by
    block, as float32 (about 1e-5 mm on a ±200 mm field of view).

    ``v`` is (1, dim, *network_grid.shape) in LPS mm components, zero outside the network grid,
    where the transform is the affine alone. Warping reads only the box that can land on the
    moving image, det J only where ``v`` is non-zero: a whole 1 mm field built first took 0.8 s
    of a fresh `fast` run on a brain (new memory), for values mostly never read. Each voxel's
    value depends on that voxel alone, whichever block holds it.
    """

    def __init__(
        self,
        affine: sitk.Transform,
        flow_mm: torch.Tensor,
        network_grid: Grid,
        grid: Grid,
        is_cancelled: Callable[[], bool] = lambda: False,
    ):
        dim = grid.dim
        matrix, translation = affine_parameters(affine, dim)
        stop_if(is_cancelled)
        self.grid = grid
        self.shape = (*grid.shape, dim)  # as the (…, dim) array it stands for
        self._device = flow_mm.device
        self._v = FieldOnGrid(flow_mm, network_grid, grid)
        self._affine = matrix, translation
        # u = M v + (M − I) x + t, with x = P idx + o.
        self._u = _Terms.of(matrix, matrix - np.eye(dim), translation, grid)
        self._is_cancelled = is_cancelled

    def image(self) -> sitk.Image:
        """The whole field as a float32 vector image, filled in place slab by slab: every bit
        of ``u`` in half the bytes and time of float64 (ITK's transforms take a float64 copy,
        :func:`~.result.displacement_transform`)."""
        grid = self.grid
        field = allocate(grid, sitk.sitkVectorFloat32, grid.dim, self._is_cancelled)
        rows = rows_per_slab(grid)
        for start in range(0, grid.shape[0], rows):
            stop_if(self._is_cancelled)
            u = self.tensor(row_block(grid, start, min(start + rows, grid.shape[0])))
            paste_rows(field, u.cpu().numpy(), start)
        return field

    def tensor(self, block: Block) -> torch.Tensor:
        """``u`` over the array slices ``block``: (…, dim) float32 on the flow's device."""
        return self._evaluated(self._u, block)

    def mapped(self, linear: np.ndarray, constant: np.ndarray, block: Block) -> torch.Tensor:
        """``linear @ (x + u(x)) + constant`` over ``block`` (x and u in LPS mm), such as where
        each voxel lands in another image's index, in one pass: built from ``u``, the same
        values took three passes, which cost more than sampling there (3.8 s of a 512² × 600
        CT's 10 s warp)."""
        matrix, translation = self._affine
        # x + u(x) = M v + M x + t, with x = P idx + o.
        of_v = linear @ matrix
        terms = _Terms.of(of_v, of_v, linear @ translation + constant, self.grid)
        return self._evaluated(terms, block)

    def _evaluated(self, terms: _Terms, block: Block) -> torch.Tensor:
        """``terms`` over the array slices ``block``: (…, dim) float32 on the flow's device.

        Component by component on contiguous arrays, element-wise only (no BLAS, whose
        rounding can depend on the block's size): half the time of broadcasting into the
        interleaved (…, dim) layout. A few rows at a time, so that the terms' arrays stay in
        the CPU's cache: 40 % less time over a 512² × 600 CT, for the same values."""
        rows, *across = block
        shape = tuple(part.stop - part.start for part in block)
        out = torch.empty((*shape, len(shape)), dtype=torch.float32, device=self._device)
        step = max(1, CACHE_VOXELS // max(int(np.prod(shape[1:])), 1))
        for start in range(rows.start, rows.stop, step):
            stop = min(start + step, rows.stop)
            part = out[start - rows.start : stop - rows.start]
            self._evaluate_into(part, terms, (slice(start, stop), *across))
        return out

    def _evaluate_into(self, out: torch.Tensor, terms: _Terms, block: Block) -> None:
        v = self.deformation(block)
        ramps = [ramp[..., 0] for ramp in _ramps(block, v.device, torch.float32)]
        value, term = torch.empty_like(v[0]), torch.empty_like(v[0])
        for k, (row, linear, constant) in enumerate(
            zip(terms.of_v, terms.of_index, terms.constant, strict=True)
        ):
            torch.mul(v[0], row[0], out=value)
            for component, weight in zip(v[1:], row[1:], strict=True):
                value += torch.mul(component, weight, out=term)
            for ramp, weight in zip(ramps, linear, strict=True):
                value += ramp * weight
            torch.add(value, constant, out=out[..., k])

    def deformation(self, block: Block) -> torch.Tensor:
        """``v`` over the array slices ``block``: (dim, …) float32, LPS mm components."""
        return self._v.block(block).to(torch.float32)


def deformed_box(network_grid: Grid, grid: Grid, margin: int = 2) -> tuple[slice, ...]:
    """The array slices of ``grid`` holding every voxel where ``v`` is non-zero (it fades to
    zero over one network voxel outside the network grid), and ``margin`` voxels more."""
    linear, constant = index_map(network_grid, grid)
    corners = np.array(list(itertools.product(*[(-1, n) for n in network_grid.size])))
    indices = corners @ linear.T + constant  # where v has faded to zero
    low = np.floor(indices.min(axis=0)).astype(int) + 1 - margin
    high = np.ceil(indices.max(axis=0)).astype(int) + margin
    sizes = np.asarray(grid.size)
    low, high = np.clip(low, 0, sizes), np.clip(high, 0, sizes)
    return tuple(slice(int(a), int(b)) for a, b in zip(low[::-1], high[::-1], strict=True))


def deformation_field(flow_mm: torch.Tensor, network_grid: Grid) -> sitk.Image:
    """``v`` as the float64 field of an ITK displacement-field transform, so that the composite
    ``[affine, field]`` is the transform :meth:`Displacement.image` holds, at a fraction of
    its size (2 mm over the foreground, against 1 mm over the whole image).

    The network grid is grown by one voxel of zeros on every side: ITK holds a field's edge
    value for half a voxel outside it and is zero beyond, while ``v`` fades linearly to zero
    over the voxel outside the grid; on the grown grid ITK's interpolation does exactly that.
    """
    dim = network_grid.dim
    padded = torch.nn.functional.pad(flow_mm[0], (1, 1) * dim)
    array = torch.movedim(padded, 0, -1).to(torch.float64).cpu().numpy()
    one_voxel = network_grid.index_to_physical @ np.ones(dim)
    grown = Grid(
        tuple(size + 2 for size in network_grid.size),
        network_grid.spacing,
        tuple(float(o) for o in np.asarray(network_grid.origin) - one_voxel),
        network_grid.direction,
    )
    return grown.apply_to(sitk.GetImageFromArray(array, isVector=True))


def inverse_displacement(
    affine: sitk.Transform,
    inverse_flow_mm: torch.Tensor,
    network_grid: Grid,
    moving: Grid,
    is_cancelled: Callable[[], bool] = lambda: False,
) -> sitk.Image:
    """Moving → fixed on the moving grid: ``T⁻¹(y) = z + w(z)`` with ``z = A⁻¹ y`` and
    ``w = exp(−v)`` (LPS mm on the network grid); a float32 vector image, as the forward field
    (summed in float64: about 1e-5 mm on a ±200 mm field of view), in half float64's bytes."""
    dim = moving.dim
    matrix, translation = affine_parameters(affine, dim)
    inv = np.linalg.inv(matrix)
    inv_offset = -inv @ translation
    device = inverse_flow_mm.device
    sample_linear, sample_constant = index_map(moving, network_grid, (inv, inv_offset))
    shift = inv - np.eye(dim)
    linear = shift @ moving.index_to_physical
    constant = shift @ np.asarray(moving.origin) + inv_offset
    field = allocate(moving, sitk.sitkVectorFloat32, dim, is_cancelled)
    rows = rows_per_slab(moving)
    for start in range(0, moving.shape[0], rows):
        stop = min(start + rows, moving.shape[0])
        stop_if(is_cancelled)
        index = affine_field(sample_linear, sample_constant, moving, start, stop, device)
        w = sample(inverse_flow_mm, index)  # (dim, rows, …)
        w = torch.movedim(w, 0, -1).to(torch.float64)
        chunk = affine_field(linear, constant, moving, start, stop, device) + w
        paste_rows(field, chunk.to(torch.float32).cpu().numpy(), start)
    return field
