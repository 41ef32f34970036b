"""What each preset hands the optimiser: the settings that are data, not branches, reach it."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
from DeepRegisterLib.nn import models
from DeepRegisterLib.nn.networks import VxmDense, integrate_velocity
from DeepRegisterLib.registration import (
    engine,
    network_grid,
    optimisation,
    optimisation_stage,
    presets,
)
from DeepRegisterLib.registration.optimisation import level_shape, optimise_velocity
from DeepRegisterLib.registration.preprocessing import foreground_box, normalised_for_registration


@pytest.fixture(scope="module")
def pair():
    return phantom_pair(demo_grid(3, size=32), amplitude_mm=2.0)


def register_recording(pair, monkeypatch: pytest.MonkeyPatch, **options) -> tuple[list, dict]:
    """Register ``pair`` without a model, recording what the engine hands the optimiser."""
    given: list[dict] = []

    def optimise(*args, **kwargs):
        given.append(kwargs)
        return optimise_velocity(*args, **kwargs)

    monkeypatch.setattr(optimisation_stage, "optimise_velocity", optimise)
    result = engine.register(
        pair.fixed, pair.moving, model=None, device="cpu", iterations=2, **options
    )
    return given, result.report


@pytest.mark.parametrize(
    ("preset", "similarity", "window"),
    [
        ("fast", "lncc", 5),
        ("balanced", "lncc", 5),
        ("accurate", "lncc", 5),
        ("balanced", "mind", 3),  # MIND's own patch size
    ],
)
def test_the_optimiser_gets_the_presets_window_for_the_similarity(
    pair, monkeypatch: pytest.MonkeyPatch, preset, similarity, window
) -> None:
    given, _ = register_recording(pair, monkeypatch, preset=preset, similarity=similarity)
    assert [k["window"] for k in given] == [window]


def test_the_optimiser_and_the_report_get_the_presets_folding_weight_and_margin(
    pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    changed = replace(presets.PRESETS["fast"], folding_weight=3.5, folding_margin=0.25)
    monkeypatch.setitem(presets.PRESETS, "fast", changed)
    given, report = register_recording(pair, monkeypatch, preset="fast")
    assert [(k["folding_weight"], k["folding_margin"]) for k in given] == [(3.5, 0.25)]
    assert (report["folding_weight"], report["folding_margin"]) == (3.5, 0.25)


@pytest.mark.parametrize(
    ("preset", "passes", "symmetric"),
    [("fast", 1, False), ("balanced", 1, False), ("accurate", 2, True)],
)
def test_fast_and_balanced_cap_the_models_recursive_passes_at_one(
    pair, monkeypatch: pytest.MonkeyPatch, preset: str, passes: int, symmetric: bool
) -> None:
    # brain3d asks for two passes; a second lifts it alone, but not what `fast` and `balanced`
    # refine from it.
    assert models.find_model("brain3d").passes == 2
    run: list[tuple[int, bool]] = []
    recursive_velocity = VxmDense.recursive_velocity

    def recording(self, fixed, moving, count, both_orders):
        run.append((count, both_orders))
        return recursive_velocity(self, fixed, moving, count, both_orders)

    monkeypatch.setattr(VxmDense, "recursive_velocity", recording)
    result = engine.register(
        pair.fixed, pair.moving, preset=preset, model="brain3d", device="cpu", iterations=0
    )
    assert run == [(passes, symmetric)]
    assert result.report["network_passes"] == passes


@pytest.mark.parametrize("preset", list(presets.PRESETS))
def test_each_step_integrates_following_the_levels_differentiated_squarings(
    pair, monkeypatch: pytest.MonkeyPatch, preset: str
) -> None:
    integrated: list[tuple[int, int | None]] = []

    def recording(velocity, steps, differentiated=None):
        if velocity.requires_grad:  # a step's integration, not the final one
            integrated.append((steps, differentiated))
        return integrate_velocity(velocity, steps, differentiated)

    monkeypatch.setattr(optimisation, "integrate_velocity", recording)
    levels = presets.PRESETS[preset].with_iterations(2).levels
    engine.register(pair.fixed, pair.moving, preset=preset, model=None, device="cpu", iterations=2)
    expected = [
        (level.integration_steps, level.differentiated_squarings)
        for level in levels
        for _ in range(level.iterations)
    ]
    assert integrated == expected
    assert all(differentiated is not None for _, differentiated in integrated)


def test_each_preset_spends_more_steps_at_the_finest_level_than_the_one_before() -> None:
    """The 2 mm steps set both the time and the overlap (about 0.0002 Dice per 20 steps of
    `accurate` on the fs-dev pairs): the names promise fast < balanced < accurate."""

    def finest_steps(name: str) -> int:
        levels = presets.PRESETS[name].levels
        finest = min(level.spacing_mm for level in levels)
        return sum(level.iterations for level in levels if level.spacing_mm == finest)

    steps = [finest_steps(name) for name in ("fast", "balanced", "accurate")]
    assert steps == sorted(set(steps))


def test_the_deformable_grid_reaches_the_presets_margin_past_the_fixed_foreground() -> None:
    """Every preset optimises 5 mm past the foreground: a cube of 20 voxels (1 mm) in a 64 mm
    field of view gets a grid of 15 voxels across at 2 mm."""
    image = sitk.Image([64, 64, 64], sitk.sitkFloat32)
    image[22:42, 22:42, 22:42] = 100.0
    sizes = {}
    for name in ("fast", "balanced", "accurate"):
        result = engine.register(
            image, image, model=None, device="cpu", iterations=0, affine=False, preset=name
        )
        sizes[name] = tuple(result.report["network_grid"]["size"])
        margin = presets.get_preset(name).foreground_margin_mm
        normalised = normalised_for_registration(image)
        box = Grid.of(image).with_spacing_cropped_to(
            2.0,
            *foreground_box(image, sitk.GetArrayViewFromImage(normalised), margin, above=0.05),
            multiple=1,
        )
        assert sizes[name] == box.size
    assert set(sizes.values()) == {(15, 15, 15)}


def test_on_a_coarser_grid_each_level_keeps_its_spacing_and_says_where_it_ran(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A field of view held to fewer network voxels (a torso CT gets 2.86 mm): `fast`'s 4 mm
    level stays at 4 mm, its 2 mm level runs on the grid, and the progress says so (it said
    "at 2 mm" on a CT's 2.86 mm grid); on a 2 mm grid the preset's levels are used as they
    are. (Scaling the levels with a 3 mm grid lost Dice on the fs-dev brains.)"""
    monkeypatch.setattr(network_grid, "MAX_NETWORK_VOXELS", 64 * 64)  # over 192² mm: a 3 mm grid
    axes = np.meshgrid(*(np.linspace(-1.0, 1.0, 256),) * 2, indexing="ij")
    image = sitk.GetImageFromArray((2.0 + np.sin(5 * axes[0]) * np.cos(3 * axes[1])).astype("f4"))
    image.SetSpacing((0.75, 0.75))
    recorded: list[tuple[tuple[int, ...], list]] = []

    def optimise(fixed, *args, **kwargs):
        recorded.append((tuple(fixed.shape[2:]), args[2]))
        return optimise_velocity(fixed, *args, **kwargs)

    monkeypatch.setattr(optimisation_stage, "optimise_velocity", optimise)
    messages: list[str] = []
    engine.register(
        image, image, model=None, device="cpu", preset="fast", affine=False,
        progress=lambda fraction, message: messages.append(message),
    )  # fmt: skip
    [(shape, levels)] = recorded
    (coarse_shape, coarse), (fine_shape, fine) = levels
    assert shape == fine_shape == (64, 64)
    assert coarse_shape == level_shape(shape, 4.0 / 3.0)
    assert (coarse.spacing_mm, fine.spacing_mm) == pytest.approx((4.0, 3.0))
    assert (coarse.control_mm, fine.control_mm) == pytest.approx((4.0, 3.0))
    assert {"optimising at 4 mm", "optimising at 3 mm"} <= set(messages)

    fast = presets.get_preset("fast")
    brain = Grid((128, 128), (2.0, 2.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    at_finest = optimisation_stage._network_levels(fast, brain, (128, 128))
    assert [level for _, level in at_finest] == list(fast.levels)
    assert [shape for shape, _ in at_finest] == [level_shape((128, 128), 2.0), (128, 128)]
