"""A saved transform carried to more images: by the engine's own warp where that pays, by ITK
otherwise (:func:`~DeepRegisterLib.imaging.apply_transform.apply_transform`).

``deepregister apply`` resamples with ITK, which needs no torch: for a 256³ image that is faster
than loading the engine. On a 512² × 600 CT, though, ITK evaluated the composite transform at
every voxel in 8.1–9.3 s for the scan and 5.4–6.3 s for its labels, where the engine's warp took
4.9–5.4 s for the scan. And the engine's warp is ``register --warped``'s: the CT's scan
through its own ``.h5`` came out the same to the bit, where ITK's float64 placed 47 124 points
of its border on the other side of it (0 against −1024). Its labels, warped alone, differ from
those ``register`` warped beside the scan at 71 of 157 million voxels, ties of the nearest
neighbour that a crop around other voxels rounds the other way (ITK's at 44).

The engine takes transforms of the form ``register`` writes: a linear transform after a
displacement field (``T(x) = A(x + v(x))``, ANTs' form too) or a field alone, whose grid shares
the reference's axis directions. Beyond the field's last nodes ITK keeps their value and the
engine fades it to zero, so the field must be zero on its faces, as ``register``'s ``v`` is. A
dense field on the fixed grid (``--transform t.nii.gz``) holds the affine too, so it is not: ITK
applies it, without the engine's float32 copy of its gigabytes.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass

import numpy as np
import SimpleITK as sitk

from ..imaging.apply_transform import apply_transform, result_bytes, stored_bytes, warped_bytes
from ..imaging.geometry import Grid, ImageHeader, affine_parameters
from ..imaging.intensity_window import IntensityWindow
from ..imaging.segmentation_file import carry_segments, is_slicer_segmentation
from ..imaging.volumes import SHARED_SLICES_BYTES, rows_per_slab, shared_slices_bytes

#: Bytes a voxel of the slab the engine's warp works on at a time: where its voxels land,
#: whether inside, their values (measured: 25–33).
SLAB_WORKING_BYTES = 32
#: Output voxels from which the engine warps a scalar image: ITK took 51–59 ns a voxel for a
#: CT's scan and 35–40 for its labels, the engine 31–34 and 7–18, after torch's import (about
#: 1.2 s): a 256³ brain's 17 million stay with ITK.
ENGINE_MIN_VOXELS = 2**26


@dataclass(frozen=True)
class EngineForm:
    """``T(x) = A(x + v(x))``: the linear part and ``v`` on its own grid (LPS mm)."""

    affine: sitk.AffineTransform
    field: sitk.Image


class SavedTransformWarp:
    """Each image onto ``grid`` through ``transform`` as ``register`` warps: intensities
    linearly into their own type, rounded (float32 for others), labels by nearest neighbour;
    by the engine for a scalar image onto ``min_voxels`` or more (:data:`ENGINE_MIN_VOXELS`
    unless given), zero outside it, when ``transform`` has the engine's form and torch is
    installed, by ITK otherwise. Where torch is loaded already (a batch worker), the engine
    pays at any size: a brain's scan took 0.23–0.33 s and its labels 0.14–0.16 s, where ITK
    took 0.65–0.73 and 0.54–0.59 s (``benchmarks/warp_in_process.py``)."""

    def __init__(self, transform: sitk.Transform, grid: Grid, min_voxels: int | None = None):
        self.transform, self._grid = transform, grid
        least = ENGINE_MIN_VOXELS if min_voxels is None else min_voxels
        large = int(np.prod(grid.size)) >= least
        # A Python without torch (Slicer's, before its PyTorch extension) still has ITK.
        usable = large and importlib.util.find_spec("torch") is not None
        self._form = engine_form(transform, grid) if usable else None
        self._engine: _EngineWarp | None = None
        self._making = threading.Lock()  # a batch job's writers warp side by side

    @property
    def may_use_engine(self) -> bool:
        """Whether an image may go to the engine (the caller can start torch's import)."""
        return self._form is not None

    @property
    def field_bytes(self) -> int:
        """What the engine's warp keeps of the field beside the images it warps: the field's
        slices interpolated onto the grid's fast axes, made once where they take
        :data:`SHARED_SLICES_BYTES` or less (a brain's: 77 MB), a few at a time otherwise."""
        if self._form is None:
            return 0
        slices = self._form.field.GetSize()[-1]  # the field's slowest axis, float32 components
        size = shared_slices_bytes(self._grid, slices, self._grid.dim, 4, SHARED_SLICES_BYTES)
        return size or 0

    def __call__(self, image: sitk.Image, labels: bool) -> sitk.Image:
        if self._form is None or not self.engine_takes(image, labels):
            return apply_transform(image, self.transform, self._grid, labels)
        with self._making:
            if self._engine is None:
                self._engine = _EngineWarp(self._form, self._grid)
        warped = self._engine(image, labels)
        if labels and is_slicer_segmentation(image):
            carry_segments(image, warped)
        return warped

    def engine_takes(self, image: sitk.Image, labels: bool) -> bool:
        """One scalar volume of the grid's dimension, padded with zero as the engine pads (a
        bright background pads with its own value: ITK)."""
        return (
            image.GetDimension() == self._grid.dim
            and image.GetNumberOfComponentsPerPixel() == 1
            and (labels or IntensityWindow.of(image).padding == 0.0)
        )


def warp_bytes(
    image: sitk.Image | ImageHeader, grid: Grid, labels: bool, engine: bool = True
) -> int:
    """The memory to warp ``image`` (or its header) onto ``grid`` beyond the image itself, by
    whichever warp takes it: ITK's (:func:`warped_bytes`), or, where ``engine`` may take it
    (:attr:`SavedTransformWarp.may_use_engine`; unknown, it may), the engine's, which copies the
    box around the non-zero voxels (at most the image), and a scan's box as float32, beside
    the result, and works a slab of the grid at a time (:data:`SLAB_WORKING_BYTES` a voxel).
    The field the engine keeps is :attr:`SavedTransformWarp.field_bytes`, once for all
    images. Measured (``benchmarks/warp_memory.py``), the CT's scan took 1.13 GB above the
    read image by the engine and 0.96 by ITK, 1.32 counted; its labels 0.39 and 0.16, 0.37
    counted; a brain's labels by ITK 36 MB, 34 counted where ITK alone warps them."""
    itk = warped_bytes(image, grid, labels)
    if not engine or image.GetNumberOfComponentsPerPixel() > 1 or image.GetDimension() != grid.dim:
        return itk  # ITK's alone
    crop = stored_bytes(image) + (0 if labels else 4 * int(np.prod(image.GetSize())))
    rows = min(rows_per_slab(grid), grid.size[-1])
    slab = rows * int(np.prod(grid.size[:-1])) * SLAB_WORKING_BYTES
    return max(itk, result_bytes(image, grid, labels) + crop + slab)


def engine_form(transform: sitk.Transform, grid: Grid) -> EngineForm | None:
    """``transform`` in the engine's form for warping onto ``grid``; None where only ITK
    applies it as written (another composition, a B-spline, a field turned against the grid
    or not zero on its faces)."""
    parts = _parts(transform)
    if parts is None:
        return None
    linear, field_transform = parts
    field = field_transform.GetDisplacementField()
    if field.GetDimension() != grid.dim or not _zero_faces(field):
        return None
    to_field_index, _ = Grid.of(field).physical_to_index_affine()
    across = to_field_index @ grid.index_to_physical  # diagonal where the axes agree
    if not np.allclose(across, np.diag(np.diag(across)), atol=1e-9):
        return None
    return EngineForm(_as_affine(linear, grid.dim), field)


def _as_affine(linear: sitk.Transform, dim: int) -> sitk.AffineTransform:
    """``linear`` as an affine: itself where it is one (its parameters, centre and all, as
    ``register`` used them), else the matrix and offset it maps with."""
    if linear.GetName() == "AffineTransform":
        return sitk.AffineTransform(linear)
    affine = sitk.AffineTransform(dim)
    matrix, translation = affine_parameters(linear, dim)
    affine.SetMatrix(tuple(matrix.ravel()))
    affine.SetTranslation(tuple(translation))
    return affine


def _parts(
    transform: sitk.Transform,
) -> tuple[sitk.Transform, sitk.DisplacementFieldTransform] | None:
    """(linear part, field) of ``[linear, field]`` (ITK applies the field first) or of a
    field alone."""
    if transform.GetName() == "DisplacementFieldTransform":
        identity = sitk.AffineTransform(transform.GetDimension())
        return identity, sitk.DisplacementFieldTransform(transform)
    if transform.GetName() != "CompositeTransform":
        return None
    composite = sitk.CompositeTransform(transform)
    if composite.GetNumberOfTransforms() != 2:
        return None
    linear, field = (composite.GetNthTransform(n) for n in range(2))
    if not linear.IsLinear() or field.GetName() != "DisplacementFieldTransform":
        return None
    return linear, sitk.DisplacementFieldTransform(field)


def _zero_faces(field: sitk.Image) -> bool:
    values = sitk.GetArrayViewFromImage(field)
    return not any(
        np.take(values, end, axis=axis).any()
        for axis in range(field.GetDimension())
        for end in (0, -1)
    )


class _EngineWarp:
    """The engine's warp through one :class:`EngineForm`, the field read once for them all."""

    def __init__(self, form: EngineForm, grid: Grid):
        import torch  # the engine's modules load torch: only once an image goes to them

        from ..nn import forked_children
        from .image_warping import Reach
        from .warping import Displacement

        forked_children.guard()
        values = sitk.GetArrayViewFromImage(form.field)  # (…, dim), LPS mm
        flow = torch.from_numpy(np.ascontiguousarray(np.moveaxis(values, -1, 0), np.float32))
        flow = flow[None]
        self._grid = grid
        self._field = Displacement(form.affine, flow, Grid.of(form.field), grid)
        self._reach = Reach.of(form.affine, flow)

    def __call__(self, image: sitk.Image, labels: bool) -> sitk.Image:
        from .image_warping import warp_images

        (warped,) = warp_images([(image, labels)], self._field, self._grid, reach=self._reach)
        return warped
