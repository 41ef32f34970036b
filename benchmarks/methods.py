"""The registration methods the benchmark compares, and how each one is scored.

Every (method, pair) runs in a fresh child process (:func:`run_task`), so its peak memory is its
own. A method gets the pair's images as SimpleITK images and returns the moving label map warped
onto the fixed grid plus, where it has one, the total fixed → moving displacement field (LPS mm)
on the fixed grid. Timing covers the method only: registration plus warping the labels — not
reading files and not scoring. Scoring is the same code for every method (:func:`score`).

Heavy baselines import their package inside the function, so the benchmark runs (and reports
them as skipped) when ``antspyx`` or ``itk-elastix`` is not installed.
"""

from __future__ import annotations

import hashlib
import math
import os
import resource
import shutil
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

#: ``fast`` with this diffusion weight (``--regularization``) instead of 1: on the 20 fs-dev
#: pairs SDlogJ 0.17 and Dice 0.802 against ANTs SyN's 0.20 and 0.793 (weight 1: 0.48, 0.831).
SMOOTH_REGULARIZATION = 10.0

#: Display names, in table order.
METHOD_LABELS: dict[str, str] = {
    "identity": "identity (no registration)",
    "affine": "affine only (DeepRegister)",
    "network-only": "DeepRegister network only",
    "fast": "DeepRegister fast",
    "fast-smooth": f"DeepRegister fast, regularization {SMOOTH_REGULARIZATION:g}",
    "balanced": "DeepRegister balanced",
    "accurate": "DeepRegister accurate",
    "ants": "ANTs SyN (antspyx)",
    "elastix": "elastix affine+B-spline",
    "demons": "SimpleITK demons (2 mm)",
}
ALL_METHODS: tuple[str, ...] = tuple(METHOD_LABELS)
DEEPREGISTER_PRESETS = ("fast", "balanced", "accurate")
#: Which optional package each heavy baseline needs (import name, pip name).
PACKAGES: dict[str, tuple[str, str]] = {
    "ants": ("ants", "antspyx"),
    "elastix": ("itk", "itk-elastix"),
}


@dataclass(frozen=True)
class PairSpec:
    """One registration problem, as files (children read them; nothing big is pickled)."""

    name: str
    fixed: str
    moving: str
    fixed_labels: str
    moving_labels: str
    region: str | None = None  # fixed-grid mask for the det J statistics
    labels: tuple[int, ...] | None = None  # scored labels; None: those in the fixed map


@dataclass(frozen=True)
class Settings:
    """How every method of one benchmark run is configured."""

    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    cross_contrast: bool = False
    smoke: bool = False
    elastix_iterations: int | None = None  # None: elastix's default (256 per resolution)
    demons_iterations: int = 100
    model: str = "default"  # DeepRegister model for the presets and the network-only row
    regularization: float | None = None  # the presets' diffusion weight; None: each preset's own


@dataclass(frozen=True)
class Task:
    method: str
    pair: PairSpec
    settings: Settings


@dataclass
class Output:
    """What a method hands back, all on the fixed grid.

    ``displacement`` may be a function that builds the field: it is called after the clock
    and the memory reading stop, because sampling a baseline's transform as a dense field is
    part of scoring it, not of the method.
    """

    warped_labels: sitk.Image
    displacement: sitk.Image | Callable[[], sitk.Image] | None = None  # None: identity
    notes: dict[str, Any] = field(default_factory=dict)


# --- child process ------------------------------------------------------------------------


def _peak_rss_bytes() -> int:
    """High-water resident set size of this process (VmHWM; ru_maxrss where /proc is absent)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if os.uname().sysname == "Darwin" else int(peak) * 1024


def library_fingerprint() -> str:
    """SHA-256 (12 hex digits) of DeepRegisterLib's sources and shipped model files, so a
    report can tell whether the library changed while a long benchmark was running."""
    import DeepRegisterLib

    package = Path(DeepRegisterLib.__file__).resolve().parent
    models = package.parent / "Resources" / "Models"
    digest = hashlib.sha256()
    files = sorted(package.glob("*.py")) + (sorted(models.glob("*")) if models.is_dir() else [])
    for path in files:
        if path.is_file():
            digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


def _configure_threads(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)


def _reset_peak_rss() -> bool:
    """Restart the VmHWM count (Linux ≥ 4.0: ``5 > /proc/self/clear_refs``)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def run_tasks(tasks: list[Task], connection: Connection) -> None:
    """Child-process entry point: run each task in turn, sending one JSON-able dict per task.

    Normally the list holds one task (a fresh process per method and pair). When it holds
    several (``--smoke``, to save interpreter start-ups) the peak-memory count is reset before
    each task where the kernel allows it, and the rows say whether it was.
    """
    for number, task in enumerate(tasks):
        reset = _reset_peak_rss() if number else True
        result = run_task(task)
        result["peak_rss_own_process"] = len(tasks) == 1
        result["peak_rss_reset"] = reset
        connection.send(result)
    connection.close()


def run_task(task: Task) -> dict[str, Any]:
    """Run one method on one pair: timings, peak memory and scores, or the error."""
    result: dict[str, Any] = {"method": task.method, "pair": task.pair.name}
    try:
        _configure_threads(task.settings.threads)
        import torch

        result["torch_threads"] = torch.get_num_threads()
        result["library_fingerprint"] = library_fingerprint()
        pair = task.pair
        fixed = sitk.ReadImage(pair.fixed)
        moving = sitk.ReadImage(pair.moving)
        fixed_labels = sitk.ReadImage(pair.fixed_labels)
        moving_labels = sitk.ReadImage(pair.moving_labels)
        region = None if pair.region is None else sitk.ReadImage(pair.region)
        result["baseline_rss_bytes"] = _peak_rss_bytes()
        runner = METHODS[task.method]
        started = time.perf_counter()
        output = runner(fixed, moving, moving_labels, fixed_labels, task.settings)
        result["time_s"] = time.perf_counter() - started
        result["peak_rss_bytes"] = _peak_rss_bytes()
        if callable(output.displacement):
            output.displacement = output.displacement()
        result["notes"] = output.notes
        result.update(score(fixed_labels, output, region, pair.labels))
        result["status"] = "ok"
    except Exception as error:  # a failed baseline is a row in the table, not a crash
        result["status"] = "error"
        result["error"] = f"{type(error).__name__}: {error}"
        result["traceback"] = traceback.format_exc()
    return result


def score(
    fixed_labels: sitk.Image,
    output: Output,
    region: sitk.Image | None,
    labels: tuple[int, ...] | None,
) -> dict[str, Any]:
    """Dice and HD95 per label, and the det J statistics, identical for every method."""
    from DeepRegisterLib.imaging import metrics

    warped = output.warped_labels
    if warped.GetPixelID() != fixed_labels.GetPixelID():
        warped = sitk.Cast(warped, fixed_labels.GetPixelID())
    dice = metrics.dice_per_label(fixed_labels, warped, labels)
    hd95 = {label: metrics.hd95(fixed_labels, warped, label) for label in dice}
    scores: dict[str, Any] = {
        "dice": {str(k): _finite_or_none(v) for k, v in dice.items()},
        "hd95_mm": {str(k): _finite_or_none(v) for k, v in hd95.items()},
        "mean_dice": _finite_or_none(metrics.mean_dice(dice)),
    }
    finite_hd = [v for v in hd95.values() if math.isfinite(v)]
    scores["mean_hd95_mm"] = float(np.mean(finite_hd)) if finite_hd else None
    if output.displacement is None:
        scores.update(folding_percent=0.0, folding_percent_grid=0.0, sdlogj=0.0)
        return scores
    assert isinstance(output.displacement, sitk.Image)
    jacobian = metrics.jacobian_determinant(output.displacement)
    region = region if region is not None and sitk.GetArrayViewFromImage(region).any() else None
    scores["folding_percent"] = metrics.folding_percent(jacobian, region)
    scores["folding_percent_grid"] = metrics.folding_percent(jacobian)
    scores["sdlogj"] = metrics.sdlogj(jacobian, region)
    det = sitk.GetArrayViewFromImage(jacobian)
    scores["jacobian_min"] = float(det.min())
    return scores


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# --- helpers ----------------------------------------------------------------------------------


def _identity(dim: int) -> sitk.Transform:
    return sitk.Transform(dim, sitk.sitkIdentity)


def _warp_labels(
    moving_labels: sitk.Image, fixed_labels: sitk.Image, transform: sitk.Transform
) -> sitk.Image:
    return sitk.Resample(moving_labels, fixed_labels, transform, sitk.sitkNearestNeighbor, 0)


def _displacement(transform: sitk.Transform, reference: sitk.Image) -> sitk.Image:
    to_field = sitk.TransformToDisplacementFieldFilter()
    to_field.SetReferenceImage(reference)
    to_field.SetOutputPixelType(sitk.sitkVectorFloat64)
    return to_field.Execute(transform)


def _label_array_to_image(array: np.ndarray, reference: sitk.Image) -> sitk.Image:
    """A label array (float from ANTs / elastix) as an image of the reference's pixel type."""
    image = sitk.GetImageFromArray(np.rint(array).astype(np.int32))
    image.CopyInformation(reference)
    return sitk.Cast(image, reference.GetPixelID())


def _agreement(a: sitk.Image, b: sitk.Image) -> float:
    """Fraction of non-background voxels on which two label maps agree."""
    va, vb = sitk.GetArrayViewFromImage(a), sitk.GetArrayViewFromImage(b)
    inside = (va != 0) | (vb != 0)
    return float(np.count_nonzero((va == vb) & inside) / max(np.count_nonzero(inside), 1))


# --- methods ----------------------------------------------------------------------------------


def run_identity(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
) -> Output:
    """No registration: the moving labels as they lie in physical space."""
    warped = _warp_labels(moving_labels, fixed_labels, _identity(fixed.GetDimension()))
    return Output(warped)


def _run_deepregister(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    settings: Settings,
    **options: Any,
) -> Output:
    from DeepRegisterLib.registration.engine import register

    result = register(
        fixed,
        moving,
        moving_labels={"labels": moving_labels},
        similarity="mind" if settings.cross_contrast else None,
        device=settings.device,
        seed=settings.seed,
        compute_jacobian=False,  # scored below, the same way for every method
        **options,
    )
    report = result.report
    notes = {
        "timings": report.get("timings"),
        "model": report.get("model"),
        "device": report.get("device"),
        "similarity": report.get("similarity"),
        "regularization": report.get("regularization"),
        "network_grid": report.get("network_grid"),
        "optimisation_steps": report.get("optimisation_steps"),
    }
    return Output(result.warped_labels["labels"], result.displacement, notes)


def run_affine(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
) -> Output:
    """DeepRegister's affine stage alone (default preset's affine iterations, no network)."""
    return _run_deepregister(fixed, moving, moving_labels, settings, iterations=0, model="none")


def _preset_runner(preset: str, **options: Any) -> Callable[..., Output]:
    def runner(
        fixed: sitk.Image,
        moving: sitk.Image,
        moving_labels: sitk.Image,
        fixed_labels: sitk.Image,
        settings: Settings,
    ) -> Output:
        weight = settings.regularization
        chosen = {} if weight is None else {"regularization": weight}
        return _run_deepregister(
            fixed,
            moving,
            moving_labels,
            settings,
            preset=preset,
            model=settings.model,
            **{**chosen, **options},  # a method's own weight (fast-smooth) wins
        )

    runner.__doc__ = f"DeepRegister preset {preset!r} with ``--model`` (default: the default)."
    return runner


def _to_ants(image: sitk.Image) -> Any:
    """SimpleITK → ANTsImage (float32); both use ITK's LPS geometry, arrays are transposed."""
    import ants

    dim = image.GetDimension()
    array = sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32))
    return ants.from_numpy(
        np.ascontiguousarray(array.transpose()),
        origin=tuple(image.GetOrigin()),
        spacing=tuple(image.GetSpacing()),
        direction=np.asarray(image.GetDirection()).reshape(dim, dim),
    )


def _read_ants_transform(path: str) -> sitk.Transform:
    """One file of ANTs' ``fwdtransforms``: a .mat affine or a displacement-field image."""
    if path.endswith((".nii.gz", ".nii", ".nrrd")):
        field_image = sitk.Cast(sitk.ReadImage(path), sitk.sitkVectorFloat64)
        return sitk.DisplacementFieldTransform(field_image)
    return sitk.ReadTransform(path)


def run_ants(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
) -> Output:
    """``ants.registration(type_of_transform="SyN")`` with antspyx's defaults.

    The defaults are Mattes MI for the affine and the SyN stage, SyN iterations (40, 20, 0) at
    shrink factors 4, 2, 1. ``--cross-contrast`` passes the same metrics explicitly. The labels
    are warped by ANTs itself (nearest neighbour); det J comes from the forward transforms read
    into a SimpleITK composite. ``fwdtransforms`` is ``[warp, affine]`` and a fixed point goes
    through the warp first, then the affine: ``T(x) = A(W(x))``, which is
    ``sitk.CompositeTransform([affine, warp])`` (ITK applies the last-added transform first).
    The notes record how many label voxels ANTs' own warping and this composite agree on.
    """
    import ants

    if hasattr(ants, "config") and hasattr(ants.config, "_random_seed"):
        ants.config._random_seed = settings.seed + 1  # best effort: antspyx has no public seed
    options: dict[str, Any] = {}
    if settings.cross_contrast:
        options.update(aff_metric="mattes", syn_metric="mattes")
    if settings.smoke:
        options.update(reg_iterations=(10, 5, 0))
    folder = Path(tempfile.mkdtemp(prefix="deepregister-bench-ants-"))
    registration = ants.registration(
        _to_ants(fixed),
        _to_ants(moving),
        type_of_transform="SyN",
        outprefix=str(folder / "syn_"),
        **options,
    )
    transforms = list(registration["fwdtransforms"])
    warped_ants = ants.apply_transforms(
        fixed=_to_ants(fixed_labels),
        moving=_to_ants(moving_labels),
        transformlist=transforms,
        interpolator="nearestNeighbor",
    )
    warped = _label_array_to_image(warped_ants.numpy().transpose(), fixed_labels)
    notes: dict[str, Any] = {
        "transforms": [Path(p).name for p in transforms],
        "options": {k: list(v) if isinstance(v, tuple) else v for k, v in options.items()},
    }

    def displacement() -> sitk.Image:
        try:
            # ITK applies a composite's list last-first: [affine, warp] is A(W(x)).
            composite = sitk.CompositeTransform(
                [_read_ants_transform(p) for p in reversed(transforms)]
            )
            check = _warp_labels(moving_labels, fixed_labels, composite)
            notes["label_agreement_with_composite"] = _agreement(warped, check)
            return _displacement(composite, fixed)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    return Output(warped, displacement, notes)


def _to_itk(image: sitk.Image) -> Any:
    import itk

    dim = image.GetDimension()
    converted = itk.image_from_array(
        np.ascontiguousarray(sitk.GetArrayFromImage(sitk.Cast(image, sitk.sitkFloat32)))
    )
    converted.SetOrigin(tuple(image.GetOrigin()))
    converted.SetSpacing(tuple(image.GetSpacing()))
    converted.SetDirection(
        itk.matrix_from_array(np.asarray(image.GetDirection()).reshape(dim, dim))
    )
    return converted


def run_elastix(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
) -> Output:
    """itk-elastix with its default "affine" then "bspline" parameter maps.

    Changes to the defaults: centre-of-gravity initialisation of the affine stage (the fs-dev
    subjects lie in different native spaces), ``MaximumNumberOfIterations`` when
    ``--elastix-iterations`` is given, no result image written. Both maps already use
    AdvancedMattesMutualInformation (so ``--cross-contrast`` changes nothing). Labels go through
    transformix with ``FinalBSplineInterpolationOrder 0`` (nearest neighbour).
    """
    import itk

    # Not ElastixRegistrationMethod.SetNumberOfThreads: with itk-elastix 0.25.4 it makes the
    # B-spline stage segfault. The global ITK default is honoured and safe.
    itk.MultiThreaderBase.SetGlobalDefaultNumberOfThreads(settings.threads)
    parameters = itk.ParameterObject.New()
    for name in ("affine", "bspline"):
        parameter_map = parameters.GetDefaultParameterMap(name)
        parameter_map["WriteResultImage"] = ["false"]
        if name == "affine":
            parameter_map["AutomaticTransformInitialization"] = ["true"]
            parameter_map["AutomaticTransformInitializationMethod"] = ["CenterOfGravity"]
        iterations = 30 if settings.smoke else settings.elastix_iterations
        if iterations is not None:
            parameter_map["MaximumNumberOfIterations"] = [str(iterations)]
        if settings.cross_contrast:
            metric = list(parameter_map["Metric"])
            metric[0] = "AdvancedMattesMutualInformation"
            parameter_map["Metric"] = metric
        parameters.AddParameterMap(parameter_map)
    fixed_itk, moving_itk = _to_itk(fixed), _to_itk(moving)
    elastix = itk.ElastixRegistrationMethod.New(fixed_itk, moving_itk)
    elastix.SetParameterObject(parameters)
    elastix.SetLogToConsole(False)
    elastix.UpdateLargestPossibleRegion()
    transform_parameters = elastix.GetTransformParameterObject()
    for index in range(transform_parameters.GetNumberOfParameterMaps()):
        transform_parameters.SetParameter(index, "FinalBSplineInterpolationOrder", "0")
    warped_itk = itk.transformix_filter(_to_itk(moving_labels), transform_parameters)
    warped = _label_array_to_image(itk.array_from_image(warped_itk), fixed_labels)

    def displacement() -> sitk.Image:
        field_itk = itk.transformix_deformation_field(moving_itk, transform_parameters)
        field_array = itk.array_from_image(field_itk).astype(np.float64)
        image = sitk.GetImageFromArray(field_array, isVector=True)
        image.CopyInformation(fixed)
        return image

    notes = {
        "iterations": "default (256)"
        if settings.elastix_iterations is None
        else settings.elastix_iterations,
    }
    return Output(warped, displacement, notes)


def _coarse_reference(image: sitk.Image, spacing_mm: float) -> sitk.Image:
    """A grid over the same extent and orientation as ``image`` at ``spacing_mm``."""
    dim = image.GetDimension()
    old_spacing = np.asarray(image.GetSpacing())
    size = np.maximum(np.ceil(np.asarray(image.GetSize()) * old_spacing / spacing_mm), 1)
    direction = np.asarray(image.GetDirection()).reshape(dim, dim)
    # Keep the grid's outer corner: first voxel centre moves inwards by half the size change.
    shift = direction @ ((spacing_mm - old_spacing) / 2.0)
    reference = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    reference.SetSpacing([spacing_mm] * dim)
    reference.SetOrigin(tuple(np.asarray(image.GetOrigin()) + shift))
    reference.SetDirection(image.GetDirection())
    return reference


def run_demons(
    fixed: sitk.Image,
    moving: sitk.Image,
    moving_labels: sitk.Image,
    fixed_labels: sitk.Image,
    settings: Settings,
) -> Output:
    """SimpleITK FastSymmetricForcesDemons on 2 mm images after DeepRegister's affine stage.

    Both images are normalised (1st–99th percentile → [0, 1]), smoothed and resampled onto a
    2 mm grid over the fixed image (the moving one through the affine), the moving histogram is
    matched to the fixed one, then demons runs ``--demons-iterations`` steps (Gaussian
    smoothing of the field, σ = 1 voxel). Total transform: ``T(x) = A(x + d(x))``.
    """
    from DeepRegisterLib.registration.affine import register_affine
    from DeepRegisterLib.registration.preprocessing import normalised_for_registration

    dim = fixed.GetDimension()
    affine = register_affine(fixed, moving, seed=settings.seed)
    reference = _coarse_reference(fixed, 2.0)

    def coarse(image: sitk.Image, transform: sitk.Transform) -> sitk.Image:
        sigma = [0.4 * math.sqrt(max(4.0 - s * s, 0.0)) for s in image.GetSpacing()]
        smooth = normalised_for_registration(image)
        if max(sigma) > 0:
            smooth = sitk.SmoothingRecursiveGaussian(smooth, sigma)
        return sitk.Resample(smooth, reference, transform, sitk.sitkLinear, 0.0, sitk.sitkFloat32)

    fixed_2mm = coarse(fixed, _identity(dim))
    moving_2mm = coarse(moving, affine)
    matched = sitk.HistogramMatching(
        moving_2mm,
        fixed_2mm,
        numberOfHistogramLevels=256,
        numberOfMatchPoints=15,
        thresholdAtMeanIntensity=True,
    )
    demons = sitk.FastSymmetricForcesDemonsRegistrationFilter()
    demons.SetNumberOfIterations(5 if settings.smoke else settings.demons_iterations)
    demons.SetSmoothDisplacementField(True)
    demons.SetStandardDeviations(1.0)
    demons.SetNumberOfThreads(settings.threads)
    field_2mm = demons.Execute(fixed_2mm, matched)
    composite = sitk.CompositeTransform(
        [affine, sitk.DisplacementFieldTransform(sitk.Cast(field_2mm, sitk.sitkVectorFloat64))]
    )
    warped = _warp_labels(moving_labels, fixed_labels, composite)
    notes = {
        "iterations": demons.GetElapsedIterations(),
        "rms_change": demons.GetRMSChange(),
        "grid": list(reference.GetSize()),
    }
    return Output(warped, lambda: _displacement(composite, fixed), notes)


METHODS: dict[str, Callable[..., Output]] = {
    "identity": run_identity,
    "affine": run_affine,
    # The default preset, as in the "affine" row: the two rows then share their affine stage.
    "network-only": _preset_runner("balanced", iterations=0),
    "fast": _preset_runner("fast"),
    "fast-smooth": _preset_runner("fast", regularization=SMOOTH_REGULARIZATION),
    "balanced": _preset_runner("balanced"),
    "accurate": _preset_runner("accurate"),
    "ants": run_ants,
    "elastix": run_elastix,
    "demons": run_demons,
}


def settings_dict(settings: Settings) -> dict[str, Any]:
    return asdict(settings)
