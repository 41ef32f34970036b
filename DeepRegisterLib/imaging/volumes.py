"""Whole-volume ITK images filled slab by slab, answering cancel requests throughout.

An output built as a NumPy array and converted at the end needs its memory twice, and the
conversion is one long copy nothing can interrupt (seconds for a 512² × 600 displacement field).
These images are allocated once and written in place. ITK zero-fills a new image with Python's
GIL released, so the allocation runs in a helper thread while the caller keeps asking for a
cancel.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import SimpleITK as sitk

from ..errors import stop_if_cancelled
from .geometry import Grid

IsCancelled = Callable[[], bool] | None
SLAB_VOXELS = 2_000_000  # per slab: bounds working memory, and the wait for a cancel
THREADED_ALLOCATION_VALUES = 2**25  # 256 MiB of float64: about a tenth of a second to zero
#: A field's slices interpolated onto an output grid's fast axes (``registration.warping``) are
#: made once, shared by the threads that read them, up to this size (a brain's: 77 MB).
SHARED_SLICES_BYTES = 256 * 2**20


def shared_slices_bytes(
    grid: Grid, slices: int, channels: int, value_bytes: int, bound: int
) -> int | None:
    """The bytes of a field's ``slices`` interpolated onto ``grid``'s fast axes, where they
    are made once for every reader (``bound`` or less, :data:`SHARED_SLICES_BYTES`); None
    where they would take more and are made a few at a time."""
    size = value_bytes * channels * slices * int(np.prod(grid.shape[1:]))
    return size if size <= bound else None


def stop_if(is_cancelled: IsCancelled) -> None:
    stop_if_cancelled(is_cancelled, "while writing outputs")


def rows_per_slab(grid: Grid) -> int:
    """Array rows (slowest axis) per slab of about SLAB_VOXELS voxels."""
    return max(1, SLAB_VOXELS // max(int(np.prod(grid.shape[1:])), 1))


def allocate(
    grid: Grid, pixel_id: int, components: int = 1, is_cancelled: IsCancelled = None
) -> sitk.Image:
    """A zeroed image on ``grid`` (a vector image when ``components`` > 1)."""
    stop_if(is_cancelled)
    size = list(grid.size)

    def make() -> sitk.Image:
        return (
            sitk.Image(size, pixel_id, components) if components > 1 else sitk.Image(size, pixel_id)
        )

    if int(np.prod(size)) * components < THREADED_ALLOCATION_VALUES:
        return grid.apply_to(make())  # quick: asked once, as many times on every run
    made: list[sitk.Image | BaseException] = []

    def make_in_thread() -> None:
        try:
            made.append(make())
        except BaseException as error:  # handed to the caller's thread
            made.append(error)

    worker = threading.Thread(target=make_in_thread, name="deepregister-allocate", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(0.05)
        stop_if(is_cancelled)
    if isinstance(made[0], BaseException):
        raise made[0]
    return grid.apply_to(made[0])


def paste_rows(image: sitk.Image, rows: np.ndarray, start: int) -> None:
    """Write ``rows`` (array order; a trailing component axis for vector images) into
    ``image`` from array row ``start`` on, in place."""
    rest = (slice(None),) * (image.GetDimension() - 1)
    paste_block(image, rows, (slice(start, start + len(rows)), *rest))


def paste_block(image: sitk.Image, values: np.ndarray, block: tuple[slice, ...]) -> None:
    """Write ``values`` into the array-order slices ``block`` of ``image``, in place."""
    vector = image.GetNumberOfComponentsPerPixel() > 1
    image[tuple(reversed(block))] = sitk.GetImageFromArray(values, isVector=vector)
