"""Which network a run starts from: a model the user named, or the first default one that
suits the images."""

from __future__ import annotations

import os
from collections.abc import Sequence

from ..errors import ModelError
from ..nn.models import DEFAULT_MODELS, ModelInfo, available_models, find_model


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


def suited_default_model(
    candidates: Sequence[ModelInfo], similarity: str, extent_mm: float
) -> tuple[ModelInfo | None, tuple[str, ...]]:
    """The first default model that suits the run; else none, and a note that says why.

    A cross-contrast (MIND) run prefers a model trained for any contrast; a same-contrast one
    serves it through a contrast map (``network_stage.in_fixed_contrast``).
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
