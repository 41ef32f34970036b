"""Image grids in physical space, and the conversions that must never drift.

Conventions (see README, "Conventions"):

* Physical space is LPS millimetres, as in ITK, SimpleITK and every file we write. MRML is RAS;
  :func:`lps_to_ras_matrix` converts origin, direction rows and vectors with ``diag(-1, -1, 1)``.
* Numpy/torch arrays are ``(K, J, I)`` (3D) or ``(J, I)`` (2D), exactly as
  ``SimpleITK.GetArrayFromImage`` and ``slicer.util.arrayFromVolume`` return them.
* A voxel-unit flow has one channel per *array* axis (channel 0 = K in 3D).
* ``index_to_physical = D · diag(spacing)`` with ``D`` the image direction (columns = I, J, K
  axis directions), so a vector ``d_ijk`` in voxels is ``D · diag(spacing) · d_ijk`` in mm.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import SimpleITK as sitk

if TYPE_CHECKING:  # torch is imported where flows are converted: the Slicer bridge reads grids
    import torch  # in Slicer's own process, which must not pay for (or pin) torch

LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0])


@dataclass(frozen=True)
class Grid:
    """Geometry of an image: size in ITK order (I, J[, K]), spacing, origin, direction (LPS)."""

    size: tuple[int, ...]
    spacing: tuple[float, ...]
    origin: tuple[float, ...]
    direction: tuple[float, ...]  # row-major dim×dim, as SimpleITK

    @classmethod
    def of(cls, image: sitk.Image) -> Grid:
        return cls(
            tuple(int(s) for s in image.GetSize()),
            tuple(float(s) for s in image.GetSpacing()),
            tuple(float(s) for s in image.GetOrigin()),
            tuple(float(s) for s in image.GetDirection()),
        )

    @property
    def dim(self) -> int:
        return len(self.size)

    def volume_grid(self) -> Grid:
        """The 3D grid of a 4D series' volumes: its first three axes."""
        block = tuple(map(float, self.direction_matrix[:3, :3].ravel()))
        return Grid(self.size[:3], self.spacing[:3], self.origin[:3], block)

    @property
    def shape(self) -> tuple[int, ...]:
        """Array shape, (K, J, I)."""
        return tuple(reversed(self.size))

    @property
    def direction_matrix(self) -> np.ndarray:
        return np.asarray(self.direction, dtype=np.float64).reshape(self.dim, self.dim)

    @property
    def index_to_physical(self) -> np.ndarray:
        """Linear part ``D · diag(spacing)`` mapping an (I, J, K) index step to LPS mm."""
        return self.direction_matrix @ np.diag(self.spacing)

    @property
    def extent_mm(self) -> np.ndarray:
        return np.asarray(self.size, dtype=np.float64) * np.asarray(self.spacing)

    def physical_to_index_affine(self) -> tuple[np.ndarray, np.ndarray]:
        """(A, b) with continuous index ``i = A @ x + b`` for an LPS point ``x``."""
        inv = np.linalg.inv(self.index_to_physical)
        return inv, -inv @ np.asarray(self.origin)

    @property
    def index_to_sampler_scale(self) -> np.ndarray:
        """Per (I, J, K) axis, ``s`` with grid_sample's coordinate ``s · i − 1`` for the
        continuous index ``i`` (``align_corners=True``; a one-voxel axis keeps ``s = 2``)."""
        return 2.0 / np.maximum(np.asarray(self.size, dtype=np.float64) - 1.0, 1.0)

    def index_to_physical_points(self, index_ijk: np.ndarray) -> np.ndarray:
        return index_ijk @ self.index_to_physical.T + np.asarray(self.origin)

    def reference_image(self, pixel_id: int = sitk.sitkUInt8) -> sitk.Image:
        """An empty image on this grid, to serve as a resampling reference."""
        image = sitk.Image([int(s) for s in self.size], pixel_id)
        self.apply_to(image)
        return image

    def apply_to(self, image: sitk.Image) -> sitk.Image:
        image.SetSpacing(self.spacing)
        image.SetOrigin(self.origin)
        image.SetDirection(self.direction)
        return image

    def with_spacing_cropped_to(
        self, spacing: float, lower_index: np.ndarray, upper_index: np.ndarray, multiple: int
    ) -> Grid:
        """An isotropic grid with this grid's direction covering the index box [lower, upper].

        The size is rounded up to a multiple of ``multiple`` (the network's 2**levels) and the
        box is grown evenly around its centre, so the network sees the region symmetrically.
        """
        lower = np.asarray(lower_index, dtype=np.float64) - 0.5
        upper = np.asarray(upper_index, dtype=np.float64) + 0.5
        extent = (upper - lower) * np.asarray(self.spacing)
        # 1e-9: 12 voxels × 0.2 mm is 12 network voxels of 0.2 mm, not 13 by round-off.
        size = np.maximum(np.ceil(extent / spacing - 1e-9), 1).astype(int)
        size = (np.ceil(size / multiple) * multiple).astype(int)
        centre_index = (lower + upper) / 2.0
        centre = self.index_to_physical_points(centre_index[None])[0]
        half = (size - 1) / 2.0 * spacing
        origin = centre - self.direction_matrix @ half
        return Grid(
            tuple(int(s) for s in size),
            tuple([float(spacing)] * self.dim),
            tuple(float(o) for o in origin),
            self.direction,
        )


def lps_to_ras_matrix(dim: int = 3) -> np.ndarray:
    """Diagonal flip between LPS and RAS (its own inverse); 2D images flip both axes."""
    return np.diag([-1.0, -1.0, 1.0][:dim]) if dim == 3 else np.diag([-1.0, -1.0])


def image_from_array(
    array: np.ndarray,
    spacing: tuple[float, ...] | None = None,
    origin: tuple[float, ...] | None = None,
    direction: tuple[float, ...] | None = None,
) -> sitk.Image:
    """Wrap a (K, J, I) or (J, I) array with LPS geometry, for callers holding arrays."""
    image = sitk.GetImageFromArray(np.asarray(array))
    dim = image.GetDimension()
    image.SetSpacing(spacing or (1.0,) * dim)
    image.SetOrigin(origin or (0.0,) * dim)
    image.SetDirection(direction or tuple(np.eye(dim).ravel()))
    return image


def affine_parameters(transform: sitk.Transform, dim: int) -> tuple[np.ndarray, np.ndarray]:
    """(M, t) with ``T(x) = M x + t``, read off any linear SimpleITK transform (also composites)."""
    origin = np.zeros(dim)
    t = np.asarray(transform.TransformPoint(tuple(origin)))
    matrix = np.empty((dim, dim))
    for axis in range(dim):
        unit = origin.copy()
        unit[axis] = 1.0
        matrix[:, axis] = np.asarray(transform.TransformPoint(tuple(unit))) - t
    return matrix, t


def nearest_rotation(matrix: np.ndarray) -> np.ndarray:
    """The proper rotation nearest ``matrix``: the rotation factor of its polar decomposition,
    without its stretch (and without a reflection, should it hold one)."""
    u, _, vt = np.linalg.svd(matrix)
    sign = np.ones(len(matrix))
    sign[-1] = np.linalg.det(u @ vt)
    return u @ np.diag(sign) @ vt


def rotation_degrees(matrix: np.ndarray) -> float:
    """How far :func:`nearest_rotation` turns, in degrees: about its axis in 3D, in the plane
    in 2D."""
    rotation = nearest_rotation(matrix)
    if len(rotation) == 2:
        return abs(float(np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0]))))
    return float(np.degrees(np.arccos(np.clip((np.trace(rotation) - 1) / 2, -1.0, 1.0))))


def is_linear(transform: sitk.Transform, dim: int) -> bool:
    """Whether the transform is affine: ITK's own category first (a displacement field or
    B-spline whose domain the probe points below all miss would otherwise look like the
    identity), then checked on a spread of points, not by its class name."""
    if not transform.IsLinear():
        return False
    matrix, t = affine_parameters(transform, dim)
    rng = np.random.default_rng(0)
    probe = rng.uniform(-200, 200, size=(8, dim))
    mapped = np.array([transform.TransformPoint(tuple(p)) for p in probe])
    return bool(np.allclose(mapped, probe @ matrix.T + t, atol=1e-4))


def flow_voxels_to_mm(flow: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Flow (N, dim, *shape) in voxels per array axis → LPS mm vectors (N, dim, *shape).

    Channel c of the flow is array axis c, i.e. ITK axis ``dim - 1 - c``.
    """
    import torch

    dim = grid.dim
    m = torch.as_tensor(grid.index_to_physical, dtype=flow.dtype, device=flow.device)
    flow_ijk = flow.flip(1)  # (K,J,I) channels → (I,J,K)
    return torch.einsum("pq,nq...->np...", m, flow_ijk).reshape(flow.shape[0], dim, *flow.shape[2:])


@dataclass(frozen=True)
class ImageHeader:
    """What a file's header says, read without its voxels.

    Its ``Get…`` methods let the engine's memory estimate
    (``registration.memory_plan.estimate_peak_bytes``), ``imaging.colour`` and
    ``imaging.apply_transform``'s checks read a header as they read an image.
    """

    dimension: int
    size: tuple[int, ...]
    spacing: tuple[float, ...]
    components: int
    pixel_id: int

    def GetDimension(self) -> int:  # noqa: N802 — SimpleITK's name, see the class docstring
        return self.dimension

    def GetSize(self) -> tuple[int, ...]:  # noqa: N802
        return self.size

    def GetNumberOfComponentsPerPixel(self) -> int:  # noqa: N802 — for imaging.colour
        return self.components

    def GetPixelID(self) -> int:  # noqa: N802
        return self.pixel_id

    @classmethod
    def of(cls, reader: sitk.ImageFileReader) -> ImageHeader:
        """The header a reader has read (``ReadImageInformation``)."""
        return cls(
            reader.GetDimension(),
            tuple(reader.GetSize()),
            tuple(reader.GetSpacing()),
            reader.GetNumberOfComponents(),
            reader.GetPixelID(),
        )
