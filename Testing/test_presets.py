"""What each preset hands the optimiser: the settings that are data, not branches, reach it."""

from __future__ import annotations

import pytest

from DeepRegisterLib import engine
from DeepRegisterLib.optimisation import optimise_velocity
from DeepRegisterLib.phantoms import demo_grid, phantom_pair


@pytest.fixture(scope="module")
def pair():
    return phantom_pair(demo_grid(3, size=32), amplitude_mm=2.0)


@pytest.mark.parametrize(
    ("preset", "similarity", "folding_weight", "window"),
    [
        ("fast", "lncc", 0.0, 5),
        ("balanced", "lncc", 0.0, 5),
        ("accurate", "lncc", 10.0, 5),  # its 2 mm control grid folds without the penalty
        ("balanced", "mind", 0.0, 3),  # MIND's own patch size
    ],
)
def test_the_optimiser_gets_the_presets_folding_weight_and_window(
    pair, monkeypatch: pytest.MonkeyPatch, preset, similarity, folding_weight, window
) -> None:
    given: list[dict] = []

    def optimise(*args, **kwargs):
        given.append(kwargs)
        return optimise_velocity(*args, **kwargs)

    monkeypatch.setattr(engine, "optimise_velocity", optimise)
    result = engine.register(
        pair.fixed, pair.moving, preset=preset, similarity=similarity, model=None,
        device="cpu", iterations=2,
    )  # fmt: skip
    assert [(k["folding_weight"], k["window"]) for k in given] == [(folding_weight, window)]
    assert result.report["folding_weight"] == folding_weight
