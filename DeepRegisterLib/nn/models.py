"""Finding, verifying and loading registration models.

A model is a folder entry ``<name>.pt`` (a tensors-only state dict) + ``<name>.json`` (config)
+ ``<name>.sha256`` (hex digest of the .pt). Weights are checksummed before they are read and
loaded with ``torch.load(weights_only=True)``, which refuses arbitrary pickled objects.
Models are searched, by name, in ``$DEEPREGISTER_MODEL_PATH`` (``os.pathsep``-separated),
``~/.deepregister/models`` and the shipped ``Resources/Models``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError
from .network_config import MAX_PARAMETERS, NetworkConfig
from .networks import VxmDense

# The models "default" means, per dimension, in order of preference: the engine takes the first
# installed one that suits the run (engine.register), and none when none does. On the 20
# ordered fs-dev pairs brain3d lifts the network-only result by about 0.1 Dice over the affine
# stage and the presets slightly (its card).
DEFAULT_MODELS: dict[int, tuple[str, ...]] = {2: ("slice2d",), 3: ("brain3d",)}
CONTRASTS = ("same", "any")  # a model's "contrast": what pairs it was trained for
MAX_PASSES = 8  # recursive network passes a model may ask for: each costs two forward passes
# The largest permitted network in float64, plus room for the archive's own records.
MAX_WEIGHTS_BYTES = 8 * MAX_PARAMETERS + (16 << 20)


def shipped_models_dir() -> Path:
    """Resources/Models in a source checkout; the installed copy in a wheel install."""
    source_tree = Path(__file__).resolve().parents[2] / "Resources" / "Models"
    if source_tree.is_dir():
        return source_tree
    from .. import shipped_models

    return Path(shipped_models.__file__).parent


def search_path() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("DEEPREGISTER_MODEL_PATH", "").split(os.pathsep) if p]
    return [*extra, Path.home() / ".deepregister" / "models", shipped_models_dir()]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    weights: Path
    config: dict

    @property
    def network(self) -> NetworkConfig:
        """The validated architecture; an absurd or malformed config is a :class:`ModelError`
        (raised before any tensor is allocated), not a bare ``ValueError``."""
        try:
            return NetworkConfig.from_json(self.config["network"])
        except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as error:
            raise ModelError(f"model {self.name!r}: invalid network config: {error}") from None

    @property
    def spacing_mm(self) -> float:
        return self._positive("input_spacing_mm", 2.0)

    @property
    def max_extent_mm(self) -> float | None:
        """The largest field of view (fixed foreground box, mm) the model was trained for, if
        it says: above it the images are not what it has seen (a body CT for a brain model)."""
        if self.config.get("max_extent_mm") is None:
            return None
        return self._positive("max_extent_mm", math.nan)

    @property
    def passes(self) -> int:
        """How many times the engine runs the network on a pair (``recursive_velocity``)."""
        value = self.config.get("passes", 1)
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_PASSES:
            raise ModelError(
                f"model {self.name!r}: passes must be a whole number from 1 to {MAX_PASSES}, "
                f"got {value!r}"
            )
        return value

    @property
    def contrast(self) -> str:
        """The pairs it was trained for: "same" (the default) contrast, or "any", unrelated
        contrasts too. A "same" model in a cross-contrast (MIND) run is given the moving image
        mapped into the fixed image's contrast; an "any" model is given it as it is."""
        value = self.config.get("contrast", "same")
        if value not in CONTRASTS:
            raise ModelError(
                f"model {self.name!r}: contrast must be one of {', '.join(CONTRASTS)}, "
                f"got {value!r}"
            )
        return value

    def check(self) -> ModelInfo:
        """Itself, once the fields that decide how a run uses it are validated: a bad JSON
        is refused before any work, even where this run would not have read the bad field."""
        _ = self.max_extent_mm, self.contrast, self.passes
        return self

    def _positive(self, key: str, default: float) -> float:
        value = self.config.get(key, default)
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = math.nan
        if not math.isfinite(number) or number <= 0:
            raise ModelError(f"model {self.name!r}: {key} must be a positive number, got {value!r}")
        return number

    @property
    def sha256(self) -> str:
        """The expected digest from ``<name>.sha256`` (``sha256sum`` format)."""
        checksum_file = self.weights.with_suffix(".sha256")
        words = checksum_file.read_text(errors="replace").split()
        digest = words[0].lower() if words else ""
        if len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
            raise ModelError(
                f"model {self.name!r}: {checksum_file.name} does not hold a SHA-256 digest; "
                "reinstall the model"
            )
        return digest


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def available_models() -> dict[str, ModelInfo]:
    """Every model found on the search path; earlier folders shadow later ones."""
    found: dict[str, ModelInfo] = {}
    for folder in reversed(search_path()):
        if not folder.is_dir():
            continue
        for config_path in sorted(folder.glob("*.json")):
            weights = config_path.with_suffix(".pt")
            if weights.exists():
                found[config_path.stem] = _model_info(config_path.stem, weights)
    return found


def _model_info(name: str, weights: Path) -> ModelInfo:
    config_path = weights.with_suffix(".json")
    try:
        config = json.loads(config_path.read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ModelError(f"model {name!r}: cannot read its config {config_path}: {error}") from None
    if not isinstance(config, dict) or "network" not in config:
        raise ModelError(f"model {name!r}: {config_path} has no 'network' section")
    return ModelInfo(name, weights, config)


def find_model(name_or_path: str | os.PathLike) -> ModelInfo:
    """A model by name (search path) or by the path of its .pt file or its folder."""
    candidate = Path(name_or_path)
    if candidate.suffix == ".pt" and candidate.exists():
        return _model_info(candidate.stem, candidate)
    if candidate.is_dir():
        configs = sorted(candidate.glob("*.json"))
        if len(configs) != 1:
            raise ModelError(f"model folder {candidate} must hold exactly one <name>.json")
        return _model_info(configs[0].stem, configs[0].with_suffix(".pt"))
    models = available_models()
    if str(name_or_path) not in models:
        names = ", ".join(sorted(models)) or "none installed"
        raise ModelError(
            f"no model named {str(name_or_path)!r} (available: {names}). Give a model name, "
            "a .pt file with its .json and .sha256 beside it, or a model folder."
        )
    return models[str(name_or_path)]


def load_model(info: ModelInfo, device: torch.device | str = "cpu") -> VxmDense:
    """Verify the checksum, then build the network and load its tensors (no unpickling)."""
    checksum_file = info.weights.with_suffix(".sha256")
    if not info.weights.exists():
        raise ModelError(f"model {info.name!r}: weights file {info.weights} is missing")
    if not info.weights.is_file():  # a FIFO or device (/dev/zero) would be hashed forever
        raise ModelError(f"model {info.name!r}: weights {info.weights} is not a regular file")
    if info.weights.stat().st_size > MAX_WEIGHTS_BYTES:
        raise ModelError(
            f"model {info.name!r}: weights file {info.weights} is larger than any permitted "
            f"network ({info.weights.stat().st_size:,} bytes)"
        )
    if not checksum_file.exists():
        raise ModelError(
            f"model {info.name!r}: {checksum_file.name} is missing; refusing to load weights "
            "that cannot be verified"
        )
    actual = sha256_of(info.weights)
    if actual != info.sha256:
        raise ModelError(
            f"model {info.name!r}: checksum mismatch for {info.weights.name} (expected "
            f"{info.sha256[:12]}…, got {actual[:12]}…). The file is corrupt or was modified; "
            "reinstall the model."
        )
    try:
        network_config = info.network
    except (ValueError, TypeError) as error:
        raise ModelError(f"model {info.name!r}: invalid network config: {error}") from None
    try:
        state = torch.load(info.weights, map_location="cpu", weights_only=True)
    except Exception as error:  # torch raises many types for bad files
        raise ModelError(f"model {info.name!r}: cannot read weights: {error}") from None
    network = VxmDense(network_config)
    try:
        network.load_state_dict(state)
    except (RuntimeError, TypeError) as error:
        raise ModelError(f"model {info.name!r}: weights do not fit its config: {error}") from None
    network = network.to(device).eval()
    if network_config.dim == 3 and torch.device(device).type == "cpu":
        # oneDNN's 3D convolutions run about a quarter faster on channels-last weights
        # (brain3d, one pass on a 2 mm brain grid, 2 threads: 0.61 → 0.44 s).
        network = network.to(memory_format=torch.channels_last_3d)
    return network


def save_model(
    network: VxmDense, folder: Path, name: str, extra_config: dict | None = None
) -> ModelInfo:
    """Write weights, config and checksum (used by training)."""
    folder.mkdir(parents=True, exist_ok=True)
    weights = folder / f"{name}.pt"
    state = {key: value.detach().cpu().contiguous() for key, value in network.state_dict().items()}
    torch.save(state, weights)
    config = {"network": network.config.to_json(), **(extra_config or {})}
    weights.with_suffix(".json").write_text(json.dumps(config, indent=2) + "\n")
    weights.with_suffix(".sha256").write_text(f"{sha256_of(weights)}  {weights.name}\n")
    return ModelInfo(name, weights, config)
