"""Register one image pair: pre-flight → affine → network → instance optimisation → outputs.

The deformable part runs on a "network grid": isotropic, the fixed image's orientation, cropped
to the fixed foreground. Its displacement is composed with the affine into ONE field sampled on
the fixed image's own grid, in LPS millimetres: ``T(x) = A(x + v(x))``, ``u(x) = T(x) − x``.
"""

from __future__ import annotations

import os
import platform
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent import futures
from dataclasses import dataclass
from typing import Any, ClassVar, Protocol

import numpy as np
import SimpleITK as sitk
import torch

from .. import __version__
from ..errors import InputError, ModelError, stop_if_cancelled
from ..imaging import metrics
from ..imaging.fileio import read_image
from ..imaging.geometry import Grid, flow_voxels_to_mm, is_linear
from ..imaging.resampling import antialiased, fixed_on_grid, moving_on_grid, resample
from ..nn.devices import resolve_device
from ..nn.losses import similarity_to
from ..nn.models import DEFAULT_MODELS, ModelInfo, available_models, find_model, load_model
from ..nn.networks import integrate_velocity, warp
from .affine import register_normalised, to_affine
from .contrast import in_contrast_of
from .optimisation import level_shape, optimise_velocity
from .preflight import (
    check_intensity_image,
    check_label_map,
    check_same_dimension,
    mask_on_grid,
    memory_budget,
    plan_memory,
)
from .preprocessing import foreground_box, normalised_for_registration
from .presets import Preset
from .result import RegistrationResult
from .settings import RegistrationSettings
from .warping import compose_displacement, inverse_displacement, warp_image

ProgressCallback = Callable[[float, str], None]
ImageLike = sitk.Image | str | os.PathLike

MIN_LEVEL_VOXELS = 16
MAX_NETWORK_VOXELS = 160**3


class CancelToken(Protocol):
    def is_set(self) -> bool: ...


@dataclass
class _Stages:
    """Maps each stage's own 0→1 progress onto one overall 0→1 bar."""

    callback: ProgressCallback | None
    cancel: CancelToken | None

    BOUNDS: ClassVar[dict[str, tuple[float, float]]] = {
        "checks": (0.0, 0.02),
        "affine": (0.02, 0.35),
        "network": (0.35, 0.45),
        "optimisation": (0.45, 0.88),
        "outputs": (0.88, 1.0),
    }

    def report(self, stage: str, fraction: float, message: str) -> None:
        if self.callback is not None:
            low, high = self.BOUNDS[stage]
            self.callback(low + (high - low) * min(max(fraction, 0.0), 1.0), message)

    def reporter(self, stage: str) -> ProgressCallback:
        return lambda fraction, message: self.report(stage, fraction, message)

    def cancelled(self) -> bool:
        return self.cancel is not None and self.cancel.is_set()

    def check(self, where: str) -> None:
        stop_if_cancelled(self.cancelled, where)


def default_models(dim: int) -> list[ModelInfo]:
    """The installed default models for ``dim``, in order of preference."""
    available = available_models()
    return [available[name] for name in DEFAULT_MODELS.get(dim, ()) if name in available]


def resolve_model(model: str | os.PathLike | None, dim: int) -> ModelInfo | None:
    """A model named by the user; ``None``/"none": no network (instance optimisation from
    identity). "default" is not a name: ``suited_default_model`` chooses for the run."""
    if model is None or str(model) == "none":
        return None
    info = find_model(model)
    model_dim = info.network.dim
    if model_dim != dim:
        raise ModelError(
            f"model {info.name!r} is {model_dim}D but the images are {dim}D; choose a "
            f"{dim}D model (or 'default')"
        )
    return info


def _network_grid(
    fixed_grid: Grid, spacing_mm: float, lower: np.ndarray, upper: np.ndarray, multiple: int
) -> Grid:
    """The isotropic grid of the deformable stages, over the fixed foreground box."""
    extent = float(min(fixed_grid.extent_mm))
    spacing = max(min(spacing_mm, extent / MIN_LEVEL_VOXELS), min(fixed_grid.spacing))
    # Very anisotropic images (e.g. 0.2 × 5 × 5 mm) would otherwise get a huge isotropic grid.
    volume = float(np.prod(fixed_grid.extent_mm))
    spacing = max(spacing, (volume / MAX_NETWORK_VOXELS) ** (1.0 / fixed_grid.dim))
    return fixed_grid.with_spacing_cropped_to(spacing, lower, upper, multiple)


def _gpu_free_bytes(device: torch.device) -> int | None:
    return torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None


def _as_image(image: ImageLike, what: str) -> sitk.Image:
    return image if isinstance(image, sitk.Image) else read_image(image, what)


def _to_tensor(image: sitk.Image, device: torch.device, dtype=torch.float32) -> torch.Tensor:
    array = sitk.GetArrayFromImage(image)
    return torch.as_tensor(array.astype(np.float64 if dtype == torch.float64 else np.float32))[
        None, None
    ].to(device)


def _global_ncc(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor | None) -> float:
    weight = torch.ones_like(a) if mask is None else mask
    n = weight.sum().clamp_min(1)
    ma, mb = (a * weight).sum() / n, (b * weight).sum() / n
    cov = ((a - ma) * (b - mb) * weight).sum()
    var = ((a - ma) ** 2 * weight).sum() * ((b - mb) ** 2 * weight).sum()
    return float(cov / var.sqrt().clamp_min(1e-12))


def _network_levels(preset: Preset, grid: Grid, shape: tuple[int, ...]):
    """Each level's grid shape, coarse first; never fewer than 16 voxels across the box."""
    extent = float(min(np.asarray(grid.size) * np.asarray(grid.spacing)))
    levels = []
    for level in preset.levels:
        if level.iterations <= 0:
            continue
        spacing = min(level.spacing_mm, extent / MIN_LEVEL_VOXELS)
        factor = max(spacing / grid.spacing[0], 1.0)
        levels.append((level_shape(shape, factor), level))
    return levels


def register(
    fixed: ImageLike,
    moving: ImageLike,
    settings: RegistrationSettings | None = None,
    *,
    fixed_mask: ImageLike | None = None,
    moving_mask: ImageLike | None = None,
    moving_labels: Mapping[str, ImageLike] | None = None,
    fixed_labels: ImageLike | None = None,
    initial_transform: sitk.Transform | None = None,
    progress: ProgressCallback | None = None,
    cancel: CancelToken | None = None,
    **options: Any,
) -> RegistrationResult:
    """Register ``moving`` to ``fixed``; everything returned lives on the fixed image's grid.

    ``settings`` says how (default :class:`RegistrationSettings()`); keyword ``options`` are
    its field names and override it, for the console: ``register(f, m, preset="fast")``.
    Images may be SimpleITK images or file paths. ``initial_transform`` (linear, fixed → moving)
    seeds the affine stage, or replaces it when ``affine=False``. ``cancel`` is anything with
    ``is_set()`` (e.g. ``threading.Event``); a cancelled run raises ``RegistrationCancelled``.
    Bad input raises ``InputError`` before any work is done.

    When the run would not fit in memory (90 % of what is available, and at most
    ``max_memory_gib``), the deformable stages run on a coarser grid, or on the CPU when the
    GPU is short or runs out; each such choice is a progress message and a line in
    ``report["notes"]``. ``ResourceError`` only when no such path fits.
    """
    started = time.perf_counter()
    settings = (settings or RegistrationSettings()).replace(**options)
    stages = _Stages(progress, cancel)
    stages.report("checks", 0.0, "checking inputs")

    # --- pre-flight: everything that can be refused is refused here ---------------------
    fixed_image = _as_image(fixed, "fixed image")
    moving_image = _as_image(moving, "moving image")
    check_intensity_image(fixed_image, "the fixed image")
    check_intensity_image(moving_image, "the moving image")
    stages.check("during the input checks")
    check_same_dimension(fixed_image, moving_image)
    dim = fixed_image.GetDimension()
    preset = settings.resolved_preset()
    if initial_transform is not None and not is_linear(initial_transform, dim):
        raise InputError(
            "the initial transform must be linear (rigid/affine); apply a deformable initial "
            "transform to the moving image first"
        )
    torch_device = resolve_device(settings.device)
    default_model = settings.model == "default"
    model_info = None if default_model else resolve_model(settings.model, dim)
    fixed_mask_img = (
        None if fixed_mask is None
        else mask_on_grid(_as_image(fixed_mask, "fixed mask"), fixed_image, "the fixed mask")
    )  # fmt: skip
    moving_mask_img = (
        None if moving_mask is None
        else mask_on_grid(_as_image(moving_mask, "moving mask"), moving_image, "the moving mask")
    )  # fmt: skip
    label_maps = {
        name: check_label_map(_as_image(image, f"label map {name!r}"), f"label map {name!r}")
        for name, image in (moving_labels or {}).items()
    }
    for name, labels in label_maps.items():
        if labels.GetDimension() != dim:
            raise InputError(f"label map {name!r} is {labels.GetDimension()}D, images are {dim}D")
    fixed_label_img = (
        None if fixed_labels is None
        else check_label_map(_as_image(fixed_labels, "fixed labels"), "the fixed label map")
    )  # fmt: skip

    fixed_grid = Grid.of(fixed_image)
    stages.check("during the input checks")
    # Normalised once: it gives both the foreground box and the network's fixed input.
    fixed_norm = normalised_for_registration(fixed_image, stages.cancelled)
    stages.check("during the input checks")
    foreground = fixed_mask_img if fixed_mask_img is not None else fixed_norm > 0.05
    lower, upper = foreground_box(fixed_image, foreground)
    notes: tuple[str, ...] = ()
    extent_mm = float(np.max((upper - lower + 1) * np.asarray(fixed_grid.spacing)))
    if default_model:
        model_info, notes = suited_default_model(
            default_models(dim), settings.similarity, extent_mm
        )
    elif model_info is not None:
        model_info.check()
    spacing = (
        model_info.spacing_mm if model_info is not None
        else min(level.spacing_mm for level in preset.levels)
    )  # fmt: skip
    multiple = model_info.network.multiple if model_info is not None else 2

    def network_grid_at(spacing_mm: float) -> Grid:
        return _network_grid(fixed_grid, spacing_mm, lower, upper, multiple)

    plan = plan_memory(
        fixed_image, moving_image, lambda mm: int(np.prod(network_grid_at(mm).size)), spacing,
        model_name=None if model_info is None else model_info.name, device=torch_device.type,
        budget_bytes=memory_budget(settings.max_memory_bytes),
        gpu_free_bytes=_gpu_free_bytes(torch_device),
    )  # fmt: skip
    notes = (*notes, *plan.notes)
    for note in notes:
        stages.report("checks", 0.5, note)
    if not plan.use_model:
        model_info = None
    if plan.device == "cpu":
        torch_device = torch.device("cpu")
    network_grid = network_grid_at(plan.spacing_mm)
    stages.report("checks", 1.0, "inputs checked")
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(settings.seed)

    job = _Job(
        fixed_image=fixed_image, fixed_norm=fixed_norm, moving_image=moving_image,
        fixed_mask=fixed_mask_img, moving_mask=moving_mask_img, label_maps=label_maps,
        fixed_labels=fixed_label_img, initial_transform=initial_transform, settings=settings,
        preset=preset, model_info=model_info, default_model=default_model,
        network_grid=network_grid, started=started, estimated_bytes=plan.estimated_bytes,
    )  # fmt: skip

    def run(device: torch.device, notes: tuple[str, ...]) -> RegistrationResult:
        return _run(stages, job, device, notes)

    try:
        try:
            return run(torch_device, notes)
        except torch.OutOfMemoryError:
            if torch_device.type == "cpu":
                raise
            note = "memory: the GPU ran out of memory, so the registration was run again on the CPU"
            stages.report("checks", 1.0, note)
            torch.cuda.empty_cache()
            torch.manual_seed(settings.seed)
            return run(torch.device("cpu"), (*notes, note))
    finally:
        torch.random.set_rng_state(generator_state)


@dataclass(frozen=True)
class _Job:
    """A checked registration: its inputs and every choice made before the heavy work."""

    fixed_image: sitk.Image
    fixed_norm: sitk.Image  # normalised_for_registration(fixed_image)
    moving_image: sitk.Image
    fixed_mask: sitk.Image | None
    moving_mask: sitk.Image | None
    label_maps: dict[str, sitk.Image]
    fixed_labels: sitk.Image | None
    initial_transform: sitk.Transform | None
    settings: RegistrationSettings
    preset: Preset  # the settings' preset, iterations applied
    model_info: ModelInfo | None
    default_model: bool  # model_info was chosen by model="default", not named by the user
    network_grid: Grid
    started: float  # perf_counter() at the call
    estimated_bytes: int


def _affine_stage(stages: _Stages, job: _Job, moving_norm: sitk.Image) -> sitk.AffineTransform:
    dim = job.fixed_image.GetDimension()
    if job.settings.affine:
        return register_normalised(
            job.fixed_norm, moving_norm,
            fixed_mask=job.fixed_mask, moving_mask=job.moving_mask,
            initial_transform=job.initial_transform, iterations=job.preset.affine_iterations,
            finest_mm=job.preset.affine_finest_mm, seed=job.settings.seed,
            progress=stages.reporter("affine"), is_cancelled=stages.cancelled,
        )  # fmt: skip
    if job.initial_transform is not None:
        return to_affine(job.initial_transform, dim)
    return sitk.AffineTransform(dim)


class _AlongsideAffine:
    """One worker thread for work that can run beside the affine stage.

    The work is told to stop (its ``is_cancelled``) only when the main thread leaves the block
    with an error, a cancel included; the main thread itself asks the user's cancel token while
    it waits for a result. Leaving always waits for the worker, so no work outlives the run.
    """

    def __init__(self, is_cancelled: Callable[[], bool]):
        self._is_cancelled = is_cancelled
        self._failed = threading.Event()
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepregister")

    def __enter__(self) -> _AlongsideAffine:
        return self

    def submit(self, function: Callable[..., Any], *args: Any) -> futures.Future:
        return self._pool.submit(function, *args, self._failed.is_set)

    def result(self, job: futures.Future) -> Any:
        while True:
            try:
                return job.result(timeout=0.1)
            except futures.TimeoutError:  # not the built-in one before Python 3.11
                stop_if_cancelled(self._is_cancelled, "while preparing the images")

    def __exit__(self, error_type, *_: object) -> None:
        if error_type is not None:
            self._failed.set()
        self._pool.shutdown(wait=True, cancel_futures=error_type is not None)


def _run(
    stages: _Stages, job: _Job, device: torch.device, notes: tuple[str, ...]
) -> RegistrationResult:
    dim = job.fixed_image.GetDimension()
    fixed_grid = Grid.of(job.fixed_image)
    timings: dict[str, float] = {}

    # --- affine stage -------------------------------------------------------------------
    tick = time.perf_counter()
    stop = stages.cancelled
    # Normalised once, for the affine stage and the network inputs; dropped after them.
    moving_norm = normalised_for_registration(job.moving_image, stop)
    reference = job.network_grid.reference_image()
    with _AlongsideAffine(stop) as alongside:
        # ITK's affine stage runs on one thread (for determinism, see affine.py): the network
        # inputs' smoothing, which does not depend on the affine, takes another meanwhile.
        fixed_net_job = alongside.submit(fixed_on_grid, job.fixed_norm, reference)
        moving_smooth_job = alongside.submit(antialiased, moving_norm, reference.GetSpacing()[0])
        affine_tx = _affine_stage(stages, job, moving_norm)
        fixed_net = alongside.result(fixed_net_job)
        moving_smooth = alongside.result(moving_smooth_job)
    del moving_norm
    timings["affine_s"] = time.perf_counter() - tick
    stages.check("after the affine stage")

    # --- images on the network grid -------------------------------------------------------
    tick = time.perf_counter()
    identity = sitk.Transform(dim, sitk.sitkIdentity)
    moving_net, moving_before = moving_on_grid(moving_smooth, reference, affine_tx, stop)
    del moving_smooth
    moving_domain = resample(
        _domain_image(job.moving_image), reference, affine_tx, sitk.sitkNearestNeighbor,
        sitk.sitkUInt8, stop,
    )  # fmt: skip
    _check_overlap(fixed_net, moving_domain)
    f_t = _to_tensor(fixed_net, device)
    m_t = _to_tensor(moving_net, device)
    mask_t = (
        None if job.fixed_mask is None
        else _to_tensor(
            resample(
                job.fixed_mask, reference, identity, sitk.sitkNearestNeighbor, sitk.sitkUInt8,
                stop,
            ),
            device,
        )
    )  # fmt: skip

    velocity, model_info = None, job.model_info
    network_passes = 0
    if job.model_info is not None:
        network_passes = job.model_info.passes
        if job.preset.network_passes is not None:
            network_passes = min(network_passes, job.preset.network_passes)
        stages.report("network", 0.0, f"running model {job.model_info.name}")
        network = load_model(job.model_info, device)
        m_in = m_t
        if job.settings.similarity == "mind" and job.model_info.contrast == "same":
            m_in, note = _in_fixed_contrast(m_t, f_t, job.model_info.name)
            stages.report("network", 0.1, note)
            notes = (*notes, note)
        # The forward pass takes seconds on a head-sized grid: asked before every layer.
        for layer in network.modules():
            if not any(layer.children()):
                layer.register_forward_pre_hook(
                    lambda *_: stages.check("while running the network")
                )
        with torch.inference_mode():
            velocity = network.recursive_velocity(f_t, m_in, network_passes).clone()
        del m_in
        stages.check("after the network")
        if not bool(torch.isfinite(velocity).all()):
            raise ModelError(
                f"model {job.model_info.name!r} produced non-finite (NaN or infinite) output: its "
                "weights are corrupt or it was trained badly; reinstall or retrain it"
            )
        if job.default_model:
            steps = job.model_info.network.integration_steps
            before, after = _similarity_change(
                job, f_t, m_t, mask_t, velocity, steps, stages.cancelled
            )
            if not after < before:
                # A model chosen for the user must not make things worse: images unlike its
                # training data (another anatomy or contrast) can mislead it.
                note = (
                    f"model: the default model {job.model_info.name!r} made the "
                    f"{job.settings.similarity} "
                    f"loss worse than the affine alone ({before:.4f} → {after:.4f}), so its "
                    "output was not used; these images may be unlike its training data"
                )
                stages.report("network", 1.0, note)
                notes, velocity, model_info = (*notes, note), None, None
        stages.report("network", 1.0, "network done")
    timings["network_s"] = time.perf_counter() - tick
    stages.check("after the network")

    # --- instance optimisation ---------------------------------------------------------
    tick = time.perf_counter()
    levels = _network_levels(job.preset, job.network_grid, tuple(f_t.shape[2:]))
    trace: list[float] = []
    if levels:
        velocity, trace = optimise_velocity(
            f_t, m_t, mask_t, levels,
            similarity=job.settings.similarity, regularization=job.settings.regularization_weight,
            learning_rate=job.preset.learning_rate,
            window=job.preset.window_for(job.settings.similarity),
            folding_weight=job.preset.folding_weight,
            initial_velocity=velocity, progress=stages.reporter("optimisation"),
            is_cancelled=stages.cancelled,
        )  # fmt: skip
    if velocity is None:
        velocity = torch.zeros((1, dim, *f_t.shape[2:]), device=device)
    steps = max((level.integration_steps for _, level in levels), default=7)
    with torch.inference_mode():
        flow = integrate_velocity(velocity, steps)
        warped_net = warp(m_t, flow)
        flow_mm = flow_voxels_to_mm(flow, job.network_grid)
    timings["optimisation_s"] = time.perf_counter() - tick
    stages.check("after optimisation")

    # --- outputs on the fixed grid -------------------------------------------------------
    tick = time.perf_counter()
    stages.report("outputs", 0.0, "composing the transform")
    with torch.inference_mode():
        displacement = compose_displacement(
            affine_tx, flow_mm, job.network_grid, fixed_grid, stages.cancelled
        )
        stages.report("outputs", 0.3, "warping the moving image")
        warped = warp_image(
            job.moving_image, displacement, device=device, is_cancelled=stages.cancelled
        )
        warped_labels = {
            name: warp_image(
                labels, displacement, nearest=True, device=device, is_cancelled=stages.cancelled
            )
            for name, labels in job.label_maps.items()
        }
        inverse = None
        if job.settings.compute_inverse:
            stages.report("outputs", 0.6, "inverting the transform")
            inverse_mm = flow_voxels_to_mm(integrate_velocity(-velocity, steps), job.network_grid)
            inverse = inverse_displacement(
                affine_tx, inverse_mm, job.network_grid, Grid.of(job.moving_image),
                stages.cancelled,
            )  # fmt: skip
    stages.check("while writing outputs")
    jacobian = None
    report: dict[str, Any] = {}
    if job.settings.compute_jacobian:
        stages.report("outputs", 0.8, "computing the Jacobian determinant")
        jacobian = metrics.jacobian_determinant(displacement, stages.cancelled)
        region = job.fixed_mask
        report["folding_percent"] = metrics.folding_percent(jacobian, region, stages.cancelled)
        report["sdlogj"] = metrics.sdlogj(jacobian, region, stages.cancelled)
        stages.check("while writing outputs")
    timings["outputs_s"] = time.perf_counter() - tick

    net_mask = mask_t if mask_t is not None else (f_t > 0.05).to(f_t.dtype)
    report.update(
        {
            "similarity": job.settings.similarity,
            "ncc_before": _global_ncc(f_t, _to_tensor(moving_before, device), net_mask),
            "ncc_affine": _global_ncc(f_t, m_t, net_mask),
            "ncc_after": _global_ncc(f_t, warped_net, net_mask),
            "optimisation_loss_first": trace[0] if trace else None,
            "optimisation_loss_last": trace[-1] if trace else None,
            "optimisation_steps": len(trace),
        }
    )
    if job.fixed_labels is not None and warped_labels:
        report["dice"] = {}
        for name, labels in warped_labels.items():
            per_label = metrics.dice_per_label(job.fixed_labels, labels)
            report["dice"][name] = {str(k): v for k, v in per_label.items()}
            report.setdefault("mean_dice", metrics.mean_dice(per_label))
    report.update(
        {
            "runtime_s": time.perf_counter() - job.started,
            "timings": timings,
            "device": str(device),
            "preset": job.preset.name,
            "model": None if model_info is None else model_info.name,
            "model_sha256": None if model_info is None else model_info.sha256,
            "network_passes": 0 if model_info is None else network_passes,
            "seed": job.settings.seed,
            "regularization": job.settings.regularization_weight,
            "folding_weight": job.preset.folding_weight,
            "network_grid": {
                "size": list(job.network_grid.size),
                "spacing_mm": job.network_grid.spacing[0],
            },
            "estimated_peak_bytes": job.estimated_bytes,
            "settings": job.settings.to_dict(),
            "notes": list(notes),
            "versions": {
                "deepregister": __version__,
                "torch": torch.__version__,
                "simpleitk": sitk.Version_VersionString(),
                "numpy": np.__version__,
                "python": platform.python_version(),
            },
        }
    )
    stages.report("outputs", 1.0, "done")
    return RegistrationResult(
        fixed_grid=fixed_grid,
        displacement=displacement,
        warped=warped,
        affine=affine_tx,
        warped_labels=warped_labels,
        jacobian=jacobian,
        inverse_displacement=inverse,
        report=report,
    )


def suited_default_model(
    candidates: Sequence[ModelInfo], similarity: str, extent_mm: float
) -> tuple[ModelInfo | None, tuple[str, ...]]:
    """The first default model that suits the run; else none, and a note that says why.

    A cross-contrast (MIND) run prefers a model trained for any contrast; a same-contrast one
    serves it through a contrast map (``_in_fixed_contrast``).
    """
    if similarity == "mind":
        candidates = sorted(candidates, key=lambda info: info.contrast != "any")
    reasons = []
    for info in candidates:
        reason = _unsuited_model(info.check(), extent_mm)
        if reason is None:
            return info, ()
        reasons.append(f"the default model {info.name!r} {reason}")
    if not reasons:
        return None, ()
    return None, (
        f"model: {'; '.join(reasons)}, so the run starts from the affine alone; name a model "
        "to use it",
    )


def _unsuited_model(info: ModelInfo, extent_mm: float) -> str | None:
    """Why a model does not suit this run, if it does not (a default one is then left out)."""
    limit_mm = info.max_extent_mm
    if limit_mm is not None and extent_mm > limit_mm:
        return f"is for fields of view up to {limit_mm:g} mm and this one spans {extent_mm:.0f} mm"
    return None


def _in_fixed_contrast(
    moving: torch.Tensor, fixed: torch.Tensor, model_name: str
) -> tuple[torch.Tensor, str]:
    """The network's moving input for a cross-contrast run, and the note that says so.

    A same-contrast model fed an unrelated contrast deforms at random (measured: worse than the
    affine alone on 20 of 20 T1 → T2-like fs-dev pairs), so it sees the moving image mapped into
    the fixed image's contrast; the MIND loss that follows still compares the images as they are.
    """
    mapped = in_contrast_of(fixed, moving)
    if mapped is None:
        return moving, "contrast: the moving image is constant here, so it was not remapped"
    return mapped, (
        f"contrast: model {model_name!r} is trained for same-contrast pairs, so its moving input "
        "was mapped into the fixed image's contrast (joint histogram after the affine stage)"
    )


def _similarity_change(
    job: _Job,
    fixed: torch.Tensor,
    moving: torch.Tensor,
    mask: torch.Tensor | None,
    velocity: torch.Tensor,
    integration_steps: int,
    is_cancelled: Callable[[], bool],
) -> tuple[float, float]:
    """The optimisation's loss on the network grid after the affine alone, and after the
    network's deformation as well (lower is better)."""
    similarity = job.settings.similarity
    loss = similarity_to(similarity, fixed, mask, job.preset.window_for(similarity))
    with torch.inference_mode():
        before = float(loss(moving))
        stop_if_cancelled(is_cancelled, "after the network")
        flow = integrate_velocity(velocity, integration_steps)
        stop_if_cancelled(is_cancelled, "after the network")
        return before, float(loss(warp(moving, flow)))


def _domain_image(image: sitk.Image) -> sitk.Image:
    """Ones over the image's extent: resampled, it shows where the image has data."""
    ones = sitk.Image(image.GetSize(), sitk.sitkUInt8) + 1
    ones.CopyInformation(image)
    return ones


def _check_overlap(fixed_net: sitk.Image, moving_domain: sitk.Image) -> None:
    """After the affine stage the moving image must cover a useful part of the fixed one."""
    fg = sitk.GetArrayViewFromImage(fixed_net) > 0.05
    covered = sitk.GetArrayViewFromImage(moving_domain) > 0
    if fg.sum() == 0:
        return
    fraction = float((fg & covered).sum() / fg.sum())
    if fraction < 0.1:
        raise InputError(
            f"after the affine stage the moving image covers only {100 * fraction:.0f}% of the "
            "fixed image's foreground: the fields of view do not overlap. Check that both "
            "images show the same anatomy, or give an initial transform that brings them close."
        )
