"""Checks that run before any work, so bad input fails fast with a message that says what to do."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import InputError, ResourceError
from ..nn.filters import MAX_GRADIENT_CHUNKS

MIN_SIZE = 4
INTEGER_PIXEL_TYPES = {
    sitk.sitkUInt8, sitk.sitkInt8, sitk.sitkUInt16, sitk.sitkInt16,
    sitk.sitkUInt32, sitk.sitkInt32, sitk.sitkUInt64, sitk.sitkInt64,
}  # fmt: skip
COMPLEX_PIXEL_TYPES = {sitk.sitkComplexFloat32, sitk.sitkComplexFloat64}


def check_geometry(image: sitk.Image, what: str) -> None:
    dim = image.GetDimension()
    if dim == 4 or (dim > 3):
        raise InputError(
            f"{what} is {dim}D; DeepRegister registers 2D or 3D images. For a time series, "
            "extract one volume (e.g. with SimpleITK's Extract) and register that."
        )
    if dim not in (2, 3):
        raise InputError(f"{what} is {dim}D; only 2D and 3D images can be registered")
    size = image.GetSize()
    if min(size) < MIN_SIZE:
        hint = (
            " A single-slice 3D image should be saved as a 2D image."
            if dim == 3 and min(size) == 1
            else ""
        )
        raise InputError(
            f"{what} is too small ({'×'.join(map(str, size))} voxels); each axis needs at "
            f"least {MIN_SIZE} voxels.{hint}"
        )
    spacing = np.asarray(image.GetSpacing())
    if not np.all(np.isfinite(spacing)) or np.any(spacing <= 0):
        raise InputError(
            f"{what} has invalid voxel spacing {tuple(spacing)}: spacing must be positive. "
            "Fix the file header (e.g. in Slicer's Volumes module) and try again."
        )
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)
    if not np.all(np.isfinite(direction)) or abs(np.linalg.det(direction)) < 1e-6:
        raise InputError(
            f"{what} has a singular or invalid direction matrix {tuple(direction.ravel())}; "
            "its axes must be independent. Fix the file header and try again."
        )
    subnormal = (direction != 0) & (np.abs(direction) < np.finfo(np.float64).tiny)
    if subnormal.any():
        # ITK's SVD of such a matrix fails, and its resampling then returns zeros silently.
        raise InputError(
            f"{what} has direction cosines too small for ITK to handle "
            f"({direction[subnormal][0]:.3g}, a subnormal number; it means 0). Round the "
            "direction matrix, e.g. image.SetDirection(numpy.round(image.GetDirection(), 12)), "
            "and try again."
        )
    if not np.all(np.isfinite(image.GetOrigin())):
        raise InputError(f"{what} has a non-finite origin {image.GetOrigin()}")


def check_intensity_image(image: sitk.Image, what: str) -> None:
    """A registrable image: scalar, real, finite, not constant."""
    if image.GetPixelID() in COMPLEX_PIXEL_TYPES:
        raise InputError(
            f"{what} has complex pixels; register the magnitude image instead "
            "(SimpleITK's ComplexToModulus)."
        )
    components = image.GetNumberOfComponentsPerPixel()
    if components != 1:
        kind = "an RGB/colour" if components in (3, 4) else f"a {components}-component vector"
        raise InputError(
            f"{what} is {kind} image; DeepRegister needs a scalar (grey-level) image. "
            "Convert it to grey levels or pick one component first."
        )
    check_geometry(image, what)
    array = sitk.GetArrayViewFromImage(image)
    if np.issubdtype(array.dtype, np.floating) and not np.all(np.isfinite(array)):
        bad = int(np.size(array) - np.count_nonzero(np.isfinite(array)))
        raise InputError(
            f"{what} contains {bad} NaN or infinite voxels; replace them (e.g. with 0) first."
        )
    low, high = array.min(), array.max()
    if low == high:
        raise InputError(
            f"{what} is constant (every voxel is {low}); it has no structure to register."
        )


def check_same_dimension(fixed: sitk.Image, moving: sitk.Image) -> None:
    if fixed.GetDimension() != moving.GetDimension():
        raise InputError(
            f"the fixed image is {fixed.GetDimension()}D but the moving image is "
            f"{moving.GetDimension()}D; both must be 2D or both 3D."
        )


def mask_on_grid(mask: sitk.Image, reference: sitk.Image, what: str) -> sitk.Image:
    """The mask resampled (nearest) onto the reference grid, as uint8 0/1; refuses empty masks."""
    check_geometry(mask, what)
    if mask.GetDimension() != reference.GetDimension():
        raise InputError(f"{what} is {mask.GetDimension()}D but its image is not")
    if mask.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a scalar (binary) image")
    binary = sitk.Cast(sitk.NotEqual(mask, 0), sitk.sitkUInt8)
    if not np.any(sitk.GetArrayViewFromImage(binary)):
        raise InputError(f"{what} has no voxels set; draw the region of interest or omit the mask")
    on_grid = sitk.Resample(binary, reference, sitk.Transform(), sitk.sitkNearestNeighbor, 0)
    if not np.any(sitk.GetArrayViewFromImage(on_grid)):
        raise InputError(
            f"{what} does not overlap its image: none of its voxels fall inside the image. "
            "Check that the mask belongs to this image."
        )
    return on_grid


def check_label_map(labels: sitk.Image, what: str) -> sitk.Image:
    """Integer label map (float maps with integer values are accepted and cast)."""
    check_geometry(labels, what)
    if labels.GetNumberOfComponentsPerPixel() != 1:
        raise InputError(f"{what} must be a scalar label map, not a vector image")
    if labels.GetPixelID() in INTEGER_PIXEL_TYPES:
        return labels
    array = sitk.GetArrayViewFromImage(labels)
    if not np.all(np.isfinite(array)) or not np.all(np.equal(np.mod(array, 1), 0)):
        raise InputError(
            f"{what} has non-integer values; a label map must hold whole-number labels "
            "(did you pass an intensity image as labels?)"
        )
    if array.min() < 0 or array.max() > np.iinfo(np.int32).max:
        raise InputError(f"{what} has labels outside 0…2³¹−1")
    return sitk.Cast(labels, sitk.sitkInt32)


def available_memory_bytes() -> int | None:
    """MemAvailable from the kernel (Linux), else None (then no estimate is enforced)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    if hasattr(os, "sysconf") and "SC_AVPHYS_PAGES" in os.sysconf_names:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    return None


def estimate_peak_bytes(fixed: sitk.Image, moving: sitk.Image, network_voxels: int) -> int:
    """A deliberately generous estimate of the engine's peak memory.

    Calibrated on measured peaks (256³ brain pair: 1.3 GiB; 512² × 600 CT pair: 6.9 GiB, of
    which 6.0 GiB above the two images: 0.6 × this estimate) as ≈ 48 bytes per fixed voxel
    (the float64 displacement, built in place, plus the normalised copy, warped image, det J),
    16 per moving voxel (float copies), 160 per network voxel (images, fields, optimiser
    state, autograd) and 512 MiB for the libraries themselves. Each CPU thread after the first
    adds 12 per network voxel, up to ``MAX_GRADIENT_CHUNKS``: the threaded grid sampler's
    gradient copy of a float32 flow.
    """
    scale = fixed.GetDimension() / 3.0
    fixed_voxels = int(np.prod(fixed.GetSize()))
    moving_voxels = int(np.prod(moving.GetSize()))
    chunks = min(torch.get_num_threads(), MAX_GRADIENT_CHUNKS)
    per_network_voxel = 160 + 12 * (chunks - 1)
    return int(
        fixed_voxels * 48 * scale + moving_voxels * 16 + network_voxels * per_network_voxel + 2**29
    )


@dataclass(frozen=True)
class MemoryPlan:
    """Where and how finely the deformable stages run, chosen so that the run fits in memory."""

    spacing_mm: float
    use_model: bool
    device: str
    estimated_bytes: int
    notes: tuple[str, ...] = ()


COARSER_FACTORS = (1.5, 2.0, 3.0, 4.0)
MAX_COARSE_SPACING_MM = 8.0
GPU_BYTES_PER_NETWORK_VOXEL = 160
GPU_FIXED_BYTES = 2**28  # CUDA context and kernels


def memory_budget(limit_bytes: int | None = None) -> int | None:
    """What a run may use: 90 % of the memory available now, and at most ``limit_bytes``."""
    available = available_memory_bytes()
    budget = None if available is None else int(0.9 * available)
    if limit_bytes is not None:
        budget = limit_bytes if budget is None else min(budget, limit_bytes)
    return budget


def plan_memory(
    fixed: sitk.Image,
    moving: sitk.Image,
    network_voxels: Callable[[float], int],
    spacing_mm: float,
    *,
    model_name: str | None = None,
    device: str = "cpu",
    budget_bytes: int | None = None,
    gpu_free_bytes: int | None = None,
) -> MemoryPlan:
    """The requested plan if it fits, else the first safe one, with notes saying what changed.

    RAM: the deformable stages move to coarser grids (a model trained for one spacing is left
    out then), up to 8 mm; if even that does not fit, ``ResourceError``. The fixed-grid outputs
    are always built in chunks, so their cost is the outputs themselves. GPU: if the network
    grid does not fit in the free GPU memory, the deformable stages run on the CPU instead.
    """
    gib = 2**30
    needed = estimate_peak_bytes(fixed, moving, network_voxels(spacing_mm))
    plan = MemoryPlan(spacing_mm, model_name is not None, device, needed)
    if budget_bytes is not None and needed > budget_bytes:
        plan = None
        coarse, coarse_needed = spacing_mm, needed
        for factor in COARSER_FACTORS:
            if spacing_mm * factor > max(MAX_COARSE_SPACING_MM, spacing_mm):
                break
            coarse = spacing_mm * factor
            coarse_needed = estimate_peak_bytes(fixed, moving, network_voxels(coarse))
            if coarse_needed <= budget_bytes:
                without = (
                    f" without model {model_name!r} (it needs {spacing_mm:g} mm)"
                    if model_name is not None else ""
                )  # fmt: skip
                note = (
                    f"memory: the {spacing_mm:g} mm grid needs about {needed / gib:.1f} GiB but "
                    f"{budget_bytes / gib:.1f} GiB is available, so the deformable stages run on "
                    f"a coarser {coarse:g} mm grid{without} (about {coarse_needed / gib:.1f} GiB)"
                )
                plan = MemoryPlan(coarse, False, device, coarse_needed, (note,))
                break
        if plan is None:
            raise ResourceError(
                f"this registration needs about {needed / gib:.1f} GiB of memory (still "
                f"{coarse_needed / gib:.1f} GiB on a {coarse:g} mm grid) but only "
                f"{budget_bytes / gib:.1f} GiB is available. Crop or downsample the images "
                "(e.g. resample the fixed image to a coarser spacing), or close other programs."
            )
    if device != "cpu" and gpu_free_bytes is not None:
        gpu_needed = network_voxels(plan.spacing_mm) * GPU_BYTES_PER_NETWORK_VOXEL + GPU_FIXED_BYTES
        if gpu_needed > 0.9 * gpu_free_bytes:
            note = (
                f"memory: the GPU has {gpu_free_bytes / gib:.1f} GiB free but the deformable "
                f"stages need about {gpu_needed / gib:.1f} GiB there, so they run on the CPU"
            )
            plan = replace(plan, device="cpu", notes=(*plan.notes, note))
    return plan
