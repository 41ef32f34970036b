"""Shared fixtures: oblique anisotropic grids and an analytic synthetic phantom.

The phantom is a *function of physical position* (LPS mm): smooth-edged ellipsoids with distinct
intensities (0…255) painted over each other, and the matching integer label map (the last
ellipsoid containing a point wins, as in the painting). Because it is analytic it can be sampled
on any grid — and through any known point map ``S`` — without interpolation error:

    ``phantom.image(grid, through=S)`` is the image ``y ↦ f(S(y))``.

So a moving image ``moving(y) = f(S⁻¹(y))`` registered to ``fixed(x) = f(x)`` must give
``warped(x) = moving(T(x)) = f(S⁻¹(T(x))) = f(x)``, i.e. ``T = S`` and ``u(x) = S(x) − x``.
"""

from __future__ import annotations

import importlib.machinery
import math
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.imaging.geometry import Grid

PointMap = Callable[[np.ndarray], np.ndarray]


def rotation_matrix(axis: tuple[float, ...], degrees: float) -> np.ndarray:
    """Rotation by ``degrees`` about ``axis`` (3D, Rodrigues) or in the plane (2D: axis ignored).

    Entries below 1e-15 are 0, as in any file: vanishing angles or axis components would
    otherwise give subnormal direction cosines, which the pre-flight check refuses."""
    angle = math.radians(degrees)
    if len(axis) == 2:
        c, s = math.cos(angle), math.sin(angle)
        matrix = np.array([[c, -s], [s, c]])
    else:
        k = np.asarray(axis, dtype=np.float64)
        k = k / np.linalg.norm(k)
        cross = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
        matrix = np.eye(3) + math.sin(angle) * cross + (1 - math.cos(angle)) * cross @ cross
    return np.where(np.abs(matrix) < 1e-15, 0.0, matrix)


def oblique_grid(
    dim: int,
    size: tuple[int, ...] | None = None,
    spacing: tuple[float, ...] | None = None,
    origin: tuple[float, ...] | None = None,
    degrees: float = 20.0,
    axis: tuple[float, ...] = (1.0, 2.0, 3.0),
    centre: np.ndarray | None = None,
) -> Grid:
    """A grid whose direction is a rotation of ``degrees`` about an oblique axis, anisotropic.

    ``centre`` (LPS mm), when given, places the grid's middle there instead of using ``origin``.
    """
    size = size or ((40, 44, 32) if dim == 3 else (48, 40))
    spacing = spacing or ((1.3, 0.9, 1.7) if dim == 3 else (1.3, 0.9))
    origin = origin or ((-31.0, 12.5, 7.25) if dim == 3 else (-31.0, 12.5))
    direction = rotation_matrix(axis[:dim], degrees)
    if centre is not None:
        half = (np.asarray(size, dtype=np.float64) - 1) / 2 * np.asarray(spacing)
        origin = tuple(np.asarray(centre, dtype=np.float64) - direction @ half)
    return Grid(
        tuple(size), tuple(spacing), tuple(float(o) for o in origin), tuple(direction.ravel())
    )


def grid_centre(grid: Grid) -> np.ndarray:
    """LPS position of the grid's central (continuous) index."""
    centre_index = (np.asarray(grid.size, dtype=np.float64) - 1) / 2
    return grid.index_to_physical_points(centre_index[None])[0]


def grid_points(grid: Grid) -> np.ndarray:
    """LPS position of every voxel, shaped ``(*grid.shape, dim)`` — array order (K, J, I)."""
    axes = [np.arange(n, dtype=np.float64) for n in grid.shape]  # K, J, I
    kji = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    return grid.index_to_physical_points(kji[..., ::-1].reshape(-1, grid.dim)).reshape(
        *grid.shape, grid.dim
    )


def image_on(grid: Grid, array: np.ndarray, vector: bool = False) -> sitk.Image:
    image = sitk.GetImageFromArray(array, isVector=vector)
    return grid.apply_to(image)


@dataclass(frozen=True)
class Ellipsoid:
    centre: np.ndarray  # LPS mm
    radii: np.ndarray  # semi-axes, mm
    rotation: np.ndarray  # columns: the semi-axes' directions
    intensity: float
    label: int

    def radius_at(self, points: np.ndarray) -> np.ndarray:
        """Ellipsoidal radius: < 1 inside, 1 on the surface."""
        local = (points - self.centre) @ self.rotation / self.radii
        return np.linalg.norm(local, axis=-1)


@dataclass(frozen=True)
class Phantom:
    """Ellipsoids painted in order over a zero background, with edges ``edge_mm`` wide.

    The first ellipsoid (the body) carries a gentle smooth texture (±``texture`` grey levels)
    so that local similarity measures see structure inside it, not only at its edges.
    """

    dim: int
    ellipsoids: tuple[Ellipsoid, ...]
    edge_mm: float = 1.5
    texture: float = 20.0
    texture_period_mm: float = 19.0

    @property
    def labels(self) -> set[int]:
        return {0, *(e.label for e in self.ellipsoids)}

    def intensity_at(self, points: np.ndarray) -> np.ndarray:
        value = np.zeros(points.shape[:-1])
        for number, e in enumerate(self.ellipsoids):
            depth = (1.0 - e.radius_at(points)) * float(np.mean(e.radii))  # ≈ mm inside
            weight = 0.5 * (1.0 + np.tanh(depth / self.edge_mm))
            intensity = e.intensity
            if number == 0 and self.texture:
                phase = 2 * np.pi * (points - e.centre) / self.texture_period_mm
                intensity = intensity + self.texture * np.prod(np.cos(phase + 0.7), axis=-1)
            value = value * (1.0 - weight) + intensity * weight
        return value

    def labels_at(self, points: np.ndarray) -> np.ndarray:
        labels = np.zeros(points.shape[:-1], dtype=np.uint8)
        for e in self.ellipsoids:
            labels[e.radius_at(points) < 1.0] = e.label
        return labels

    def image(self, grid: Grid, through: PointMap | None = None) -> sitk.Image:
        """Float32 image ``y ↦ f(through(y))`` on ``grid`` (``f`` when ``through`` is None)."""
        points = grid_points(grid)
        if through is not None:
            points = through(points)
        return image_on(grid, self.intensity_at(points).astype(np.float32))

    def label_map(self, grid: Grid, through: PointMap | None = None) -> sitk.Image:
        """UInt8 label map ``y ↦ labels(through(y))`` on ``grid``."""
        points = grid_points(grid)
        if through is not None:
            points = through(points)
        return image_on(grid, self.labels_at(points))


def make_phantom(dim: int, centre: np.ndarray, scale_mm: float = 15.0, seed: int = 0) -> Phantom:
    """A body ellipsoid (label 1) holding five separate inner blobs (labels 2…6).

    ``scale_mm`` is the body's largest semi-axis. Blobs are placed at random (``seed``) inside
    the body without touching each other, and no two share an intensity, so every label has its
    own grey level and no blob is hidden by another.
    """
    rng = np.random.default_rng(seed)
    centre = np.asarray(centre, dtype=np.float64)
    body_radii = scale_mm * np.array([1.0, 0.85, 0.75][:dim])
    body_rotation = rotation_matrix((0.3, -1.0, 0.5)[:dim], 10.0)
    ellipsoids = [Ellipsoid(centre, body_radii, body_rotation, intensity=70.0, label=1)]
    blobs: list[Ellipsoid] = []
    intensities = (250.0, 150.0, 200.0, 110.0, 20.0)
    shrink, attempts = 1.0, 0
    while len(blobs) < len(intensities):
        attempts += 1
        if attempts % 100 == 0:  # crowded (2D): make the remaining blobs a little smaller
            shrink *= 0.93
        radii = shrink * scale_mm * rng.uniform(0.2, 0.3, size=dim)
        offset = rng.uniform(-1, 1, size=dim) * body_radii
        candidate_centre = centre + body_rotation @ offset
        inside = np.linalg.norm(offset / body_radii) + radii.max() / body_radii.min() < 0.95
        apart = all(
            np.linalg.norm(candidate_centre - b.centre) > radii.max() + b.radii.max() + 1.0
            for b in blobs
        )
        if inside and apart:
            axis = tuple(rng.normal(size=3)[:dim]) if dim == 3 else (1.0, 0.0)
            blobs.append(
                Ellipsoid(
                    candidate_centre,
                    radii,
                    rotation_matrix(axis, rng.uniform(0, 180)),
                    intensity=intensities[len(blobs)],
                    label=len(blobs) + 2,
                )
            )
    return Phantom(dim, (*ellipsoids, *blobs))


def bent_pair(dim: int, size: tuple[int, ...]) -> tuple[sitk.Image, sitk.Image]:
    """A phantom and a shifted, bent copy: every stage has work to do."""
    grid = oblique_grid(dim, size=size)
    centre = grid_centre(grid)
    phantom = make_phantom(dim, centre, scale_mm=0.3 * min(np.asarray(size) * grid.spacing))
    shift = np.array([2.0, -1.5, 1.0][:dim])

    def inverse_map(y: np.ndarray) -> np.ndarray:
        return y - shift + 1.5 * np.sin((y - centre)[..., ::-1] / 7.0)

    return phantom.image(grid), phantom.image(grid, through=inverse_map)


@pytest.fixture(params=[2, 3], ids=["2d", "3d"])
def a_dimension(request: pytest.FixtureRequest) -> int:
    return request.param


@pytest.fixture
def an_oblique_grid(a_dimension: int) -> Grid:
    """Direction = 20° about the oblique axis (1, 2, 3); spacing (1.3, 0.9[, 1.7]) mm."""
    return oblique_grid(a_dimension)


@pytest.fixture
def a_phantom(an_oblique_grid: Grid) -> Phantom:
    """A phantom centred in ``an_oblique_grid``, with room around it for motion."""
    return make_phantom(an_oblique_grid.dim, grid_centre(an_oblique_grid))


@pytest.fixture
def an_oblique_3d_grid() -> Grid:
    return oblique_grid(3)


@pytest.fixture
def a_3d_phantom(an_oblique_3d_grid: Grid) -> Phantom:
    return make_phantom(3, grid_centre(an_oblique_3d_grid))


@pytest.fixture(scope="session")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A phantom pair registered once by the command line, with the files ``register`` wrote
    (``registered_phantom``): what ``deepregister apply``'s tests compare against."""
    from registered_phantom import registered_files

    return registered_files(tmp_path_factory.mktemp("registered"))


REPO_ROOT = Path(__file__).resolve().parents[1]
# The CMake builds a compiled module's test compares with pip's, to the bit: flags for this very
# CPU (FMA where it has it), -O2 (where GCC 12's basic-block vectoriser dropped roundings), and
# unoptimised, where the machine does what the C says.
EVERY_CMAKE_BUILD = pytest.mark.parametrize(
    "flags",
    ["-DCMAKE_C_FLAGS=-march=native", "-DCMAKE_C_FLAGS_RELEASE=-O2", "-DCMAKE_C_FLAGS_RELEASE=-O0"],
    ids=["this-cpu", "O2", "unoptimised"],
)


def built_by_cmake(tmp_path: Path, cmake_file: str, add: str, name: str, *options: str) -> Path:
    """The compiled module ``name`` built as the extension's CMakeLists.txt builds it: include
    ``cmake_file`` (relative to the repository) and call its ``add`` function."""
    source, build = tmp_path / "source", tmp_path / "build"
    source.mkdir()
    (source / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.16.3)\n"
        "project(OneModule C)\n"
        f'include("{(REPO_ROOT / cmake_file).as_posix()}")\n'
        f"{add}(${{CMAKE_BINARY_DIR}}/module module)\n"
    )
    for command in (
        ["cmake", "-S", str(source), "-B", str(build), "-DCMAKE_BUILD_TYPE=Release", *options],
        ["cmake", "--build", str(build)],
    ):
        completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
        assert completed.returncode == 0, completed.stdout + completed.stderr
    (built,) = (build / "module").iterdir()
    assert built.name in {f"{name}{suffix}" for suffix in importlib.machinery.EXTENSION_SUFFIXES}
    return built
