"""The memory plan: what a run will need, against what there is, and the coarser grid or the CPU
when it would not fit (decided before any work)."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import SimpleITK as sitk
import torch

from ..errors import ResourceError
from ..nn.filters import MAX_GRADIENT_CHUNKS
from .settings import RegistrationSettings


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


def estimate_peak_bytes(
    fixed: sitk.Image,
    moving: sitk.Image,
    network_voxels: int,
    settings: RegistrationSettings | None = None,
) -> int:
    """A deliberately generous estimate of the engine's peak memory above the images, with the
    outputs ``settings`` keep (without them, the Python API's defaults).

    Measured on two threads, twice each (``benchmarks/memory.py --sweep``: the 512² × 600 CT
    pair, each image binned 1× or 2× along every axis), the run's own increase was 0.67–0.89 ×
    this estimate with the API's default outputs (the dense displacement and det J kept;
    4.20–4.30 GiB at full size) and 0.65–0.92 × with the command line's (the warped image and
    the transform; 1.77–1.89 GiB); a 256³ pair with the model 0.62–0.71 ×. That is ≈ 5 bytes
    per fixed voxel (the normalised copy, the warped image, the slabs the outputs are built
    in), 4 per component of the dense displacement and 4 for det J where kept; 5 per moving
    voxel (the affine stage's working copies) and 4 per component of a dense inverse; 160 per
    network voxel (images, fields, optimiser state, autograd) and 768 MiB besides. Each CPU thread
    after the first adds 12 per network voxel, up to ``MAX_GRADIENT_CHUNKS``: the threaded
    grid sampler's gradient copy of a float32 flow. A colour moving picture (``moving`` with
    its channels) adds, for each channel after the first, 5 bytes a fixed voxel and 5 a moving
    one: the channel as float32 to warp and its warped copy, then composed. (Calibrated in
    November at 48 and 16 bytes and 512 MiB whatever the outputs, when a CT took 6.0 GiB: a CT
    with 6 GiB to spend was refused, and sent to a coarser grid with 10.)
    """
    settings = settings if settings is not None else RegistrationSettings()
    dim = fixed.GetDimension()
    per_fixed = 5 * dim / 3.0
    per_fixed += 4 * dim * settings.compute_displacement
    per_fixed += 4 * (settings.compute_jacobian and settings.keep_jacobian)
    per_moving = 5 + 4 * dim * (settings.compute_inverse and settings.compute_inverse_displacement)
    fixed_voxels = int(np.prod(fixed.GetSize()))
    moving_voxels = int(np.prod(moving.GetSize()))
    chunks = min(torch.get_num_threads(), MAX_GRADIENT_CHUNKS)
    per_network_voxel = 160 + 12 * (chunks - 1)
    channels = 5 * (moving.GetNumberOfComponentsPerPixel() - 1) * (fixed_voxels + moving_voxels)
    return int(
        fixed_voxels * per_fixed + moving_voxels * per_moving
        + network_voxels * per_network_voxel + channels + 768 * 2**20
    )  # fmt: skip


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
    settings: RegistrationSettings | None = None,
) -> MemoryPlan:
    """The requested plan if it fits, else the first safe one, with notes saying what changed.

    RAM: the deformable stages move to coarser grids (a model trained for one spacing is left
    out then), up to 8 mm; if even that does not fit, ``ResourceError``. The fixed-grid outputs
    are always built in chunks, so their cost is the outputs themselves. GPU: if the network
    grid does not fit in the free GPU memory, the deformable stages run on the CPU instead.
    """
    gib = 2**30
    needed = estimate_peak_bytes(fixed, moving, network_voxels(spacing_mm), settings)
    plan = MemoryPlan(spacing_mm, model_name is not None, device, needed)
    if budget_bytes is not None and needed > budget_bytes:
        plan = None
        coarse, coarse_needed = spacing_mm, needed
        for factor in COARSER_FACTORS:
            if spacing_mm * factor > max(MAX_COARSE_SPACING_MM, spacing_mm):
                break
            coarse = spacing_mm * factor
            coarse_needed = estimate_peak_bytes(fixed, moving, network_voxels(coarse), settings)
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
