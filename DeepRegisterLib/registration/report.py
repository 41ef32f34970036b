"""The run's report: what was done, how well it went, how long it took, with what versions."""

from __future__ import annotations

import platform
import time
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch

from .. import __version__
from ..imaging import metrics
from .grid_images import GridImages, to_tensor
from .job import Job
from .network_stage import NetworkOutcome
from .optimisation_stage import Deformation
from .outputs import Outputs


def build_report(
    job: Job,
    images: GridImages,
    network: NetworkOutcome,
    deformation: Deformation,
    outputs: Outputs,
    device: torch.device,
    timings: dict[str, float],
) -> dict[str, Any]:
    report = {**outputs.qa, **_similarity_report(job, images, deformation, device)}
    report.update(_dice_report(job, outputs.warped_labels))
    model_info = network.model_info
    report.update(
        {
            "runtime_s": time.perf_counter() - job.started,
            "timings": timings,
            "device": str(device),
            "preset": job.preset.name,
            "model": None if model_info is None else model_info.name,
            "model_sha256": None if model_info is None else model_info.sha256,
            "network_passes": 0 if model_info is None else network.passes,
            "seed": job.settings.seed,
            "regularization": job.settings.regularization_weight,
            "folding_weight": job.preset.folding_weight,
            "folding_margin": job.preset.folding_margin,
            "network_grid": {
                "size": list(job.network_grid.size),
                "spacing_mm": job.network_grid.spacing[0],
            },
            "estimated_peak_bytes": job.estimated_bytes,
            "settings": job.settings.to_dict(),
            "notes": list(network.notes),
            "versions": versions(),
        }
    )
    return report


def versions() -> dict[str, str]:
    """What a result depends on, so that a report says how to reproduce it."""
    return {
        "deepregister": __version__,
        "torch": torch.__version__,
        "simpleitk": sitk.Version_VersionString(),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def _similarity_report(
    job: Job, images: GridImages, deformation: Deformation, device: torch.device
) -> dict[str, Any]:
    """Global NCC on the network grid before, after the affine and after the deformation, over
    the fixed foreground where the moving image has data, and the optimisation's loss trace."""
    fixed, trace, mask = images.fixed, deformation.trace, images.region
    return {
        "similarity": job.settings.similarity,
        "ncc_before": _global_ncc(fixed, to_tensor(images.moving_before, device), mask),
        "ncc_affine": _global_ncc(fixed, images.moving, mask),
        "ncc_after": _global_ncc(fixed, deformation.warped, mask),
        "optimisation_loss_first": trace[0] if trace else None,
        "optimisation_loss_last": trace[-1] if trace else None,
        "optimisation_steps": len(trace),
    }


def _dice_report(job: Job, warped_labels: dict[str, sitk.Image]) -> dict[str, Any]:
    """Per-label and mean Dice of each warped label map against the fixed labels, if given."""
    if job.fixed_labels is None or not warped_labels:
        return {}
    report: dict[str, Any] = {"dice": {}}
    for name, labels in warped_labels.items():
        per_label = metrics.dice_per_label(job.fixed_labels, labels)
        report["dice"][name] = {str(k): v for k, v in per_label.items()}
        report.setdefault("mean_dice", metrics.mean_dice(per_label))
    return report


def _global_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> float:
    weight = torch.ones_like(a) if mask is None else mask
    n = weight.sum().clamp_min(1)
    ma, mb = (a * weight).sum() / n, (b * weight).sum() / n
    cov = ((a - ma) * (b - mb) * weight).sum()
    var = ((a - ma) ** 2 * weight).sum() * ((b - mb) ** 2 * weight).sum()
    return float(cov / var.sqrt().clamp_min(1e-12))
