"""A network's architecture as data: checked, counted and stored as JSON beside its weights.

Kept apart from :mod:`.networks` so that reading or validating a configuration (model files,
``deepregister train --help``) does not import torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# Refuse configs that would allocate absurd amounts before any tensor exists.
MAX_FEATURES = 512
MAX_LEVELS = 7
MAX_PARAMETERS = 50_000_000


@dataclass(frozen=True)
class NetworkConfig:
    """Architecture of a :class:`VxmDense`; stored as JSON next to the weights."""

    dim: int = 3
    encoder: tuple[int, ...] = (16, 32, 32, 32)
    decoder: tuple[int, ...] = (32, 32, 32, 32, 16, 16)
    integration_steps: int = 7
    in_channels: int = 2
    extra: dict = field(default_factory=dict)

    @property
    def multiple(self) -> int:
        """Input sizes must be divisible by this (one halving per encoder level)."""
        return 2 ** len(self.encoder)

    def validate(self) -> None:
        if self.dim not in (2, 3):
            raise ValueError(f"network dimension must be 2 or 3, got {self.dim}")
        if not 1 <= len(self.encoder) <= MAX_LEVELS:
            raise ValueError(f"encoder must have 1..{MAX_LEVELS} levels, got {len(self.encoder)}")
        if len(self.decoder) < len(self.encoder):
            raise ValueError("decoder needs at least one stage per encoder level")
        if any(not 1 <= f <= MAX_FEATURES for f in (*self.encoder, *self.decoder)):
            raise ValueError(f"feature counts must be within 1..{MAX_FEATURES}")
        if not 0 <= self.integration_steps <= 12:
            raise ValueError("integration_steps must be within 0..12")
        if self.parameter_count() > MAX_PARAMETERS:
            raise ValueError(f"network would have {self.parameter_count():,} parameters")

    def parameter_count(self) -> int:
        """Counted from the config alone, so an absurd config is refused before allocation."""
        k = 3**self.dim
        count, prev = 0, self.in_channels
        for f in self.encoder:
            count += prev * f * k + f
            prev = f
        skips = [self.in_channels, *self.encoder[:-1]][::-1]
        for i, f in enumerate(self.decoder):
            extra = skips[i] if i < len(skips) else 0
            count += (prev + extra) * f * k + f
            prev = f
        return count + prev * self.dim * k + self.dim

    def to_json(self) -> dict:
        data = asdict(self)
        data["encoder"], data["decoder"] = list(self.encoder), list(self.decoder)
        return data

    @classmethod
    def from_json(cls, data: dict) -> NetworkConfig:
        known = {k: data[k] for k in ("dim", "integration_steps", "in_channels") if k in data}
        config = cls(
            encoder=tuple(int(f) for f in data.get("encoder", cls.encoder)),
            decoder=tuple(int(f) for f in data.get("decoder", cls.decoder)),
            **{k: int(v) for k, v in known.items()},
        )
        config.validate()
        return config
