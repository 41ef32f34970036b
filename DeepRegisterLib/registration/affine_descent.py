"""The affine search's inner loop in C (``affine_descent.c``): a level's descent, from any
number of poses, in one call that needs no torch and holds no interpreter lock.

In a fresh process torch's import takes about a second of one core, and the search in PyTorch
waited for it; this one runs beside it, on the other core. Where the module was not built (no C
compiler at install), ``affine_torch`` runs the same search in PyTorch.
"""

from __future__ import annotations

import ctypes
import importlib.util
import weakref
from functools import lru_cache

import numpy as np

from .affine_levels import BINS, LOG_FLOOR, Level, Pose, Steps, parameter_count

_DOUBLE_POINTER = ctypes.POINTER(ctypes.c_double)


class _NativeLevel(ctypes.Structure):
    """``DrLevel`` in affine_descent.c: a level in three dimensions (a 2D one a voxel deep)."""

    _fields_ = (
        ("offsets", ctypes.c_void_p),
        ("rows", ctypes.c_void_p),
        ("samples", ctypes.c_int64),
        ("moving", ctypes.c_void_p),
        ("mask", ctypes.c_void_p),
        ("depth", ctypes.c_int64),
        ("height", ctypes.c_int64),
        ("width", ctypes.c_int64),
        ("to_sampler", ctypes.c_double * 9),
        ("sampler_offset", ctypes.c_double * 3),
        ("centre", ctypes.c_double * 3),
        ("bins", ctypes.c_int64),
        ("log_floor", ctypes.c_double),
    )


class _NativeSteps(ctypes.Structure):
    """``DrSteps``: a level's descent (affine_levels.Steps)."""

    _fields_ = (
        ("iterations", ctypes.c_int64),
        ("first_step", ctypes.c_double),
        ("radius_mm", ctypes.c_double),
        ("relaxation", ctypes.c_double),
        ("min_step", ctypes.c_double),
    )


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL | None:
    """The compiled module beside this one (built by pip's install or Slicer's extension
    build), or None where it was not built or is from another version (without a function
    this one calls)."""
    spec = importlib.util.find_spec(f"{__package__}._affine_descent")
    if spec is None or spec.origin is None:
        return None
    try:
        return loaded(spec.origin)
    except (OSError, AttributeError):
        return None


def loaded(path: str) -> ctypes.CDLL:
    """The descent's library at ``path``, its functions' arguments declared."""
    library = ctypes.CDLL(path)
    descend_c, information_c = library.dr_affine_descend, library.dr_affine_information
    level = ctypes.POINTER(_NativeLevel)
    descend_c.argtypes = [level, ctypes.c_int64, *[_DOUBLE_POINTER] * 3, ctypes.c_int]
    descend_c.argtypes += [ctypes.c_int, ctypes.POINTER(_NativeSteps)]
    information_c.argtypes = [level, ctypes.c_int64, *[_DOUBLE_POINTER] * 5]
    descend_c.restype = information_c.restype = ctypes.c_int
    return library


def available() -> bool:
    """Whether the compiled descent was built with this install."""
    return _library() is not None


_native_levels: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _native(level: Level) -> tuple[_NativeLevel, tuple[np.ndarray, ...]]:
    """The level as the C code reads it, and the arrays that must live as long."""
    if level not in _native_levels:
        pad = 3 - level.dim
        offsets = np.ascontiguousarray(np.pad(level.offsets, ((0, 0), (0, pad))), np.float32)
        rows = np.ascontiguousarray(level.fixed_bins * BINS, dtype=np.int32)
        moving = np.ascontiguousarray(level.moving.reshape((1,) * pad + level.moving.shape))
        mask = level.moving_mask
        if mask is not None:
            mask = np.ascontiguousarray(mask.reshape(moving.shape))
        to_sampler = np.zeros((3, 3))
        to_sampler[: level.dim, : level.dim] = level.to_sampler
        native = _NativeLevel(
            offsets.ctypes.data, rows.ctypes.data, len(rows), moving.ctypes.data,
            None if mask is None else mask.ctypes.data, *moving.shape,
            (ctypes.c_double * 9)(*to_sampler.ravel()),
            (ctypes.c_double * 3)(*_padded(level.sampler_offset)),
            (ctypes.c_double * 3)(*_padded(level.centre)), BINS, LOG_FLOOR,
        )  # fmt: skip
        _native_levels[level] = (native, (offsets, rows, moving, mask))
    return _native_levels[level]


def _padded(vectors: np.ndarray) -> np.ndarray:
    """Vectors (..., dim) as (..., 3), a zero third axis in 2D."""
    return np.pad(vectors, [(0, 0)] * (vectors.ndim - 1) + [(0, 3 - vectors.shape[-1])])


def _padded_pose(pose: Pose) -> tuple[np.ndarray, np.ndarray]:
    """A pose's matrices (poses, 3, 3) and shifts (poses, 3): a 2D pose leaves z alone."""
    dim = pose.matrix.shape[-1]
    matrices = np.tile(np.eye(3), (len(pose), 1, 1))
    matrices[:, :dim, :dim] = pose.matrix
    return np.ascontiguousarray(matrices), np.ascontiguousarray(_padded(pose.shift))


def _checked(status: int) -> None:
    """affine_descent.c's status: 0, -1 where memory ran out, -2 for bins it cannot hold."""
    if status == -1:
        raise MemoryError("the affine search ran out of memory")
    if status != 0:
        raise ValueError(f"{BINS} histogram bins: more than affine_descent.c's MAX_BINS")


def _pointer(array: np.ndarray):
    return array.ctypes.data_as(_DOUBLE_POINTER)


def similarity(level: Level, pose: Pose) -> np.ndarray:
    """The mutual information under each of the poses, (poses,)."""
    values, _, _ = information(level, pose, gradient=False)
    return values


def information(
    level: Level, pose: Pose, gradient: bool = True
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None]:
    """The mutual information under each pose and, with ``gradient``, its gradient in each
    pose's matrix (poses, dim, dim) and shift (poses, dim)."""
    native, _ = _native(level)
    matrices, shifts = _padded_pose(pose)
    values = np.empty(len(pose))
    d_matrices = np.empty_like(matrices) if gradient else None
    d_shifts = np.empty_like(shifts) if gradient else None
    status = _library().dr_affine_information(
        ctypes.byref(native), len(pose), _pointer(matrices), _pointer(shifts), _pointer(values),
        None if d_matrices is None else _pointer(d_matrices),
        None if d_shifts is None else _pointer(d_shifts),
    )  # fmt: skip
    _checked(status)
    if not gradient:
        return values, None, None
    dim = level.dim
    return values, d_matrices[:, :dim, :dim], d_shifts[:, :dim]


def descend(level: Level, start: Pose, parameters: np.ndarray, rigid: bool, steps: Steps) -> Pose:
    """Each of ``start``'s poses changed by its ``parameters`` (poses,
    ``affine_levels.parameter_count``: a rigid change's angles or an affine one's matrix
    entries, then a shift), descended on ``level`` from where they are (affine_search.py): the
    poses they end at, their parameters updated in place."""
    expected = (len(start), parameter_count(level.dim, rigid))
    if parameters.shape != expected or parameters.dtype != np.float64:
        raise ValueError(f"parameters must be float64 of shape {expected}, the C code's layout")
    if not parameters.flags.c_contiguous:
        raise ValueError("parameters must be C-contiguous: the C code updates them in place")
    native, _ = _native(level)
    starts = np.concatenate([part.ravel() for part in _padded_pose(start)])
    ends = np.empty_like(starts)
    schedule = _NativeSteps(
        steps.iterations, steps.first, steps.radius_mm, steps.relaxation, steps.min_step
    )
    status = _library().dr_affine_descend(
        ctypes.byref(native), len(start), _pointer(starts), _pointer(parameters),
        _pointer(ends), level.dim, int(rigid), ctypes.byref(schedule),
    )  # fmt: skip
    _checked(status)
    poses, dim = len(start), level.dim
    matrices, shifts = ends[: 9 * poses].reshape(poses, 3, 3), ends[9 * poses :].reshape(poses, 3)
    return Pose(matrices[:, :dim, :dim].copy(), shifts[:, :dim].copy())
