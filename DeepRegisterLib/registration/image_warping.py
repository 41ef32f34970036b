"""Warping images through a dense displacement, as ITK's resampling would, in one pass per grid.

The moving image and its label maps share their sampling coordinates, which cost more to build
than the sampling itself; intensities are sampled linearly, labels by nearest neighbour.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import SimpleITK as sitk
import torch

from ..imaging.geometry import Grid
from ..imaging.volumes import allocate, as_array, paste_rows, rows_per_slab, stop_if
from ..nn.filters import grid_sample
from .warping import affine_field, index_map


def _max_abs(image: sitk.Image) -> float:
    statistics = sitk.MinimumMaximumImageFilter()
    statistics.Execute(image)
    return max(abs(statistics.GetMinimum()), abs(statistics.GetMaximum()))


def warp_image(
    moving: sitk.Image,
    displacement: sitk.Image | np.ndarray,
    grid: Grid | None = None,
    nearest: bool = False,
    device: torch.device | str = "cpu",
    is_cancelled: Callable[[], bool] = lambda: False,
) -> sitk.Image:
    """``moving(x + u(x))`` on the displacement's grid, as ITK's Resample computes it.

    Linear for intensities (float32 out); nearest for label maps (pixel type kept, labels
    exact). ``displacement`` is a vector image, or a (K, J, I, dim) array with ``grid``.
    """
    return warp_images([(moving, nearest)], displacement, grid, device, is_cancelled)[0]


def warp_images(
    movings: Sequence[tuple[sitk.Image, bool]],
    displacement: sitk.Image | np.ndarray,
    grid: Grid | None = None,
    device: torch.device | str = "cpu",
    is_cancelled: Callable[[], bool] = lambda: False,
) -> list[sitk.Image]:
    """:func:`warp_image` of each ``(image, nearest)`` through one displacement, in one pass:
    the field is read once, and images on the same grid (a scan and its label maps) share
    their sampling coordinates, which cost more to build than the sampling itself."""
    device = torch.device(device)
    if isinstance(displacement, sitk.Image):
        grid = Grid.of(displacement)
        u_array = sitk.GetArrayViewFromImage(displacement)
    elif grid is None:
        raise ValueError("an array displacement needs its grid")
    else:
        u_array = displacement
    sources = [_Source(image, nearest, grid, device, is_cancelled) for image, nearest in movings]
    by_grid: dict[Grid, list[_Source]] = {}
    for source in sources:
        by_grid.setdefault(source.grid, []).append(source)
    mappings = [(_ItkCoordinates(grid, key, device), group) for key, group in by_grid.items()]
    rows = rows_per_slab(grid)
    for start in range(0, grid.shape[0], rows):
        stop = min(start + rows, grid.shape[0])
        stop_if(is_cancelled)
        u = torch.tensor(u_array[start:stop], device=device, dtype=torch.float32)
        for mapping, group in mappings:
            coordinates, inside = mapping.at(u, start, stop)
            for source in group:
                at = coordinates.to(source.volume.dtype)  # float64 for labels above 2**24
                values = grid_sample(source.volume, at, source.mode, "border")[0]
                values = (values[0] * inside).cpu().numpy()
                paste_rows(source.image, values.astype(source.dtype, copy=False), start)
    return [source.image for source in sources]


class _Source:
    """One image to warp: its voxels as a tensor, and the output image being filled."""

    def __init__(self, moving: sitk.Image, nearest: bool, grid: Grid, device, is_cancelled):
        self.grid = Grid.of(moving)
        self.mode = "nearest" if nearest else "bilinear"
        # float32 holds integer labels exactly below 2**24; larger label values need float64.
        exact_in_float32 = not nearest or _max_abs(moving) < 2**24
        dtype = np.float32 if exact_in_float32 else np.float64
        self.volume = torch.as_tensor(as_array(moving, dtype, is_cancelled))[None, None].to(device)
        # Labels keep their pixel type (their values are exact); intensities become float32.
        self.dtype = sitk.GetArrayViewFromImage(moving).dtype if nearest else np.float32
        pixel_id = moving.GetPixelID() if nearest else sitk.sitkFloat32
        self.image = allocate(grid, pixel_id, is_cancelled=is_cancelled)


class _ItkCoordinates:
    """Where the voxels of ``grid`` displaced by ``u`` fall in ``moving``, in grid_sample's
    normalised coordinates, and which of them ITK's resampling counts as inside.

    The index map and the normalisation are one affine map, applied once: ITK's half-voxel
    bounds ``[−0.5, n − 0.5)`` become bounds on the normalised coordinates.
    """

    def __init__(self, grid: Grid, moving: Grid, device: torch.device):
        linear, constant = index_map(grid, moving)
        sizes = np.asarray(moving.size, dtype=np.float64)
        scale = moving.index_to_sampler_scale
        self._grid, self._device = grid, device
        self._linear, self._constant = scale[:, None] * linear, scale * constant - 1.0
        to_index = moving.physical_to_index_affine()[0]

        def on_device(values: np.ndarray) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.float32, device=device)

        self._from_mm = on_device((scale[:, None] * to_index).T)
        self._low = on_device(-0.5 * scale - 1.0)
        self._high = on_device((sizes - 0.5) * scale - 1.0)

    def at(self, u: torch.Tensor, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """For rows [start, stop) with displacement ``u`` (rows, …, dim) in mm: the
        coordinates (1, rows, …, dim) and the inside mask (rows, …)."""
        coordinates = affine_field(
            self._linear, self._constant, self._grid, start, stop, self._device, torch.float32
        )
        coordinates = coordinates + u @ self._from_mm
        inside = (coordinates >= self._low) & (coordinates < self._high)
        return coordinates[None], inside.all(dim=-1).to(coordinates.dtype)
