"""The registration methods the benchmark compares, and how each one is scored.

Every (method, pair) runs in a fresh child process (:func:`run_task`), so its peak memory is its
own. A method gets the pair's images as SimpleITK images and returns the moving label map warped
onto the fixed grid plus, where it has one, the total fixed → moving displacement field (LPS mm)
on the fixed grid. Timing covers the method only: registration plus warping the labels — not
reading files and not scoring. Scoring is the same code for every method (:func:`score`).

The DeepRegister rows are :class:`RegistrationSettings` (the run's, then each row's own fields,
recorded in the row); the classical baselines live in :mod:`benchmarks.baselines`.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import math
import os
import resource
import time
import traceback
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk

from DeepRegisterLib import RegistrationSettings

from . import baselines
from .tasks import Output, Settings, Task

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
    "ants-syns": "ANTs antsRegistrationSyN[s] (CC)",
    "elastix": "elastix affine+B-spline",
    "demons": "SimpleITK demons (2 mm)",
}
ALL_METHODS: tuple[str, ...] = tuple(METHOD_LABELS)
#: Run only when named in ``--methods``: antsRegistrationSyN[s] takes ~46 min a brain pair.
SLOW_METHODS = ("ants-syns",)
DEFAULT_METHODS: tuple[str, ...] = tuple(m for m in ALL_METHODS if m not in SLOW_METHODS)
#: Which optional package each heavy baseline needs (import name, pip name).
PACKAGES: dict[str, tuple[str, str]] = {
    "ants": ("ants", "antspyx"),
    "ants-syns": ("ants", "antspyx"),
    "elastix": ("itk", "itk-elastix"),
}


# --- which methods run ---------------------------------------------------------------------


def available_methods(requested: Sequence[str], notes: list[str]) -> list[str]:
    """The requested methods whose packages are installed; a note for each one skipped."""
    chosen = []
    for method in requested:
        if method in PACKAGES:
            module, package = PACKAGES[method]
            if importlib.util.find_spec(module) is None or not _installed(package):
                notes.append(
                    f"{METHOD_LABELS[method]} skipped: `{package}` is not installed "
                    f"(`pip install {package}`, or `pip install -e .[bench]`)."
                )
                continue
        chosen.append(method)
    return chosen


def _installed(distribution: str) -> bool:
    try:
        importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def model_note(
    dim: int, model: str, similarity: str, methods: list[str], notes: list[str]
) -> list[str]:
    """Say which network the presets start from; drop "network-only" when there is none.

    For ``default`` the engine's own choice for this similarity, so the network-only row never
    silently runs without a network.
    """
    from DeepRegisterLib.registration.model_choice import (
        default_models,
        resolve_model,
        suited_default_model,
    )

    try:
        if model == "default":
            info, _ = suited_default_model(default_models(dim), similarity, extent_mm=0.0)
        else:
            info = resolve_model(model, dim)
    except Exception as error:  # a named model that is missing or does not fit
        notes.append(f"`--model {model}` cannot be used: {error}")
        info = None
    if info is not None:
        notes.append(
            f"DeepRegister presets start from the {dim}D model `{info.name}` (`--model {model}`, "
            f"SHA-256 {info.sha256[:12]}…); the network-only row is that model alone."
        )
        return methods
    notes.append(
        f"No {dim}D network for `--model {model}`: the DeepRegister presets run instance "
        "optimisation from the identity after the affine stage, and the network-only row is "
        "left out."
    )
    return [m for m in methods if m != "network-only"]


# --- machine and versions -----------------------------------------------------------------------


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
    # Every subpackage's sources: the pipeline lives in registration/, nn/, imaging/ …
    sources = sorted(package.rglob("*.py"))
    files = sources + (sorted(models.glob("*")) if models.is_dir() else [])
    for path in files:
        if path.is_file() and "__pycache__" not in path.parts:
            name = path.relative_to(package.parent).as_posix()
            digest.update(name.encode() + b"\0" + path.read_bytes())
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
        if task.method in DEEPREGISTER_ROWS:
            result["settings"] = deepregister_settings(task.method, task.settings).to_dict()
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
    from DeepRegisterLib.imaging import distances, metrics

    warped = output.warped_labels
    if warped.GetPixelID() != fixed_labels.GetPixelID():
        warped = sitk.Cast(warped, fixed_labels.GetPixelID())
    dice = metrics.dice_per_label(fixed_labels, warped, labels)
    hd95 = {label: distances.hd95(fixed_labels, warped, label) for label in dice}
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
    within = metrics.determinant_statistics(jacobian, region)
    scores["folding_percent"], scores["sdlogj"] = within.folding_percent, within.sdlogj
    scores["folding_percent_grid"] = metrics.folding_percent(jacobian)
    det = sitk.GetArrayViewFromImage(jacobian)
    scores["jacobian_min"] = float(det.min())
    return scores


def _finite_or_none(value: float) -> float | None:
    return float(value) if math.isfinite(value) else None


# --- DeepRegister rows ---------------------------------------------------------------------

#: Each DeepRegister row's own settings fields, over the run's (:attr:`Settings.registration`).
DEEPREGISTER_ROWS: dict[str, dict[str, Any]] = {
    # `accurate` runs the model as it was trained: every pass its JSON asks for, each in both
    # orders (`fast` and `balanced` run one pass in one order, to refine it). The "affine" row
    # takes the same preset, so that the two rows share their affine stage.
    "affine": {"preset": "accurate", "iterations": 0, "model": "none", "regularization": None},
    "network-only": {"preset": "accurate", "iterations": 0},
    "fast": {"preset": "fast"},
    "fast-smooth": {"preset": "fast", "regularization": SMOOTH_REGULARIZATION},
    "balanced": {"preset": "balanced"},
    "accurate": {"preset": "accurate"},
}

#: What a DeepRegister row's notes keep of the engine's report.
DEEPREGISTER_NOTES = (
    "timings", "model", "device", "similarity", "regularization", "network_grid",
    "optimisation_steps",
)  # fmt: skip


def deepregister_settings(method: str, settings: Settings) -> RegistrationSettings:
    """A DeepRegister row's settings; the det J is scored apart, the same way for every method."""
    return settings.registration.replace(**DEEPREGISTER_ROWS[method], compute_jacobian=False)


def _deepregister_runner(method: str) -> Callable[..., Output]:
    def runner(
        fixed: sitk.Image,
        moving: sitk.Image,
        moving_labels: sitk.Image,
        fixed_labels: sitk.Image,
        settings: Settings,
    ) -> Output:
        from DeepRegisterLib import register

        registration = deepregister_settings(method, settings)
        result = register(fixed, moving, registration, moving_labels={"labels": moving_labels})
        notes = {key: result.report.get(key) for key in DEEPREGISTER_NOTES}
        return Output(result.warped_labels["labels"], result.displacement, notes)

    runner.__doc__ = f"DeepRegister with {DEEPREGISTER_ROWS[method]} over the run's settings."
    return runner


METHODS: dict[str, Callable[..., Output]] = {
    "identity": baselines.run_identity,
    **{method: _deepregister_runner(method) for method in DEEPREGISTER_ROWS},
    "ants": baselines.run_ants,
    "ants-syns": baselines.run_ants_syns,
    "elastix": baselines.run_elastix,
    "demons": baselines.run_demons,
}
