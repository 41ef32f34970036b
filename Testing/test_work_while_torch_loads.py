"""In a fresh process torch's import holds one core for about a second; the work that needs no
torch (the whole affine stage, the network's inputs smoothed for their grid) is done
meanwhile, and gives what it gives once torch has loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
import SimpleITK as sitk

from DeepRegisterLib.imaging.geometry import Grid
from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
from DeepRegisterLib.registration import affine_descent, engine, network_grid

# A child's script starts with this: ``before_torch()``, which the script defines, runs just
# before torch's module code, holding torch's own import lock only, not the import system's.
HOOK_BEFORE_TORCH = """
import importlib.abc, importlib.machinery, sys

class BeforeTorch(importlib.abc.Loader):
    def __init__(self, loader):
        self.loader = loader
    def create_module(self, spec):
        return self.loader.create_module(spec)
    def exec_module(self, module):
        before_torch()
        self.loader.exec_module(module)

class HookTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name != "torch":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        spec.loader = BeforeTorch(spec.loader)
        return spec

sys.meta_path.insert(0, HookTorch())
"""

WHILE_TORCH_LOADS = (
    HOOK_BEFORE_TORCH
    + """
import json, threading
import numpy as np, SimpleITK as sitk
torch_free_work_done, order = threading.Event(), []

def before_torch():
    order.append(["torch waited", torch_free_work_done.wait(30)])

from DeepRegisterLib.registration import affine_search, engine, torch_loading
smoothed_inputs, search_copies, done = engine.smoothed_inputs, affine_search.search_copies, []

def tell(what):
    done.append(what)
    if len(done) == 2:
        torch_free_work_done.set()

def smoothing(*args, **kwargs):
    order.append(["smoothed", torch_loading.torch_is_loading()])
    smoothed = smoothed_inputs(*args, **kwargs)
    tell("smoothed")
    return smoothed

def affine_stage(*args, **kwargs):
    order.append(["affine", torch_loading.torch_is_loading()])
    found = search_copies(*args, **kwargs)
    tell("affine")
    return found

engine.smoothed_inputs, affine_search.search_copies = smoothing, affine_stage
pair = [sitk.ReadImage(path) for path in sys.argv[1:]]
runs = [engine.register(*pair, preset="fast", iterations=2, model=None) for _ in range(2)]
warped = [sitk.GetArrayFromImage(run.warped) for run in runs]
print(json.dumps({
    "order": order,
    "same_warped": bool(np.array_equal(*warped)),
    "same_affine": runs[0].affine.GetParameters() == runs[1].affine.GetParameters(),
}))
"""
)


@pytest.mark.skipif(
    not affine_descent.available(), reason="without the compiled descent the search needs torch"
)
def test_a_fresh_process_makes_the_torch_free_work_while_torch_loads(tmp_path) -> None:
    """Here torch's import cannot begin before the affine stage has found its affine and the
    network's inputs are smoothed: the first run completes only if both are done without
    torch. A second run in the same process, torch loaded, plans first and makes the same
    images and affine."""
    pair = phantom_pair(demo_grid(3, 24), amplitude_mm=2.0)
    paths = [str(tmp_path / "fixed.mha"), str(tmp_path / "moving.mha")]
    for image, path in zip((pair.fixed, pair.moving), paths, strict=True):
        sitk.WriteImage(image, path)
    completed = subprocess.run(
        [sys.executable, "-c", WHILE_TORCH_LOADS, *paths], capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    first, torch_waited, second = outcome["order"][:2], outcome["order"][2], outcome["order"][3:]
    assert sorted(first) == [["affine", True], ["smoothed", True]]
    assert torch_waited == ["torch waited", True]  # not its 30 s out
    assert sorted(second) == [["affine", False], ["smoothed", False]]
    assert outcome["same_warped"]
    assert outcome["same_affine"]


@pytest.fixture(scope="module")
def pair() -> tuple[sitk.Image, sitk.Image]:
    made = phantom_pair(demo_grid(3, 24), amplitude_mm=2.0)
    return made.fixed, made.moving


def _run(pair) -> engine.RegistrationResult:
    return engine.register(*pair, preset="fast", iterations=2, model=None, device="cpu")


@pytest.mark.parametrize("guess", ["the plan's grid", "another grid"])
def test_inputs_made_while_torch_loads_serve_only_the_grid_they_were_made_for(
    pair, guess: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """While torch loads, the inputs are smoothed for the grid a plan most likely chooses;
    when the plan chose another (a model of another spacing, a memory limit), they are made
    again for the plan's. Either way the run is the one made without the guess."""
    plain = _run(pair)
    made_for: list[Grid] = []

    def counted(grid, *args, **kwargs):
        made_for.append(grid)
        return network_grid.smoothed_inputs(grid, *args, **kwargs)

    def guessed(inputs, limits):
        grid = network_grid.expected_grid(inputs, limits)
        if guess == "the plan's grid":
            return grid
        return replace(grid, size=tuple(n - 2 for n in grid.size))

    monkeypatch.setattr(engine, "torch_is_loading", lambda: True)
    monkeypatch.setattr(engine, "expected_grid", guessed)
    monkeypatch.setattr(engine, "smoothed_inputs", counted)
    with_guess = _run(pair)
    planned = with_guess.report["network_grid"]
    assert list(made_for[-1].size) == planned["size"]
    assert made_for[-1].spacing[0] == planned["spacing_mm"]
    assert len(made_for) == (1 if guess == "the plan's grid" else 2)
    assert (made_for[0] == made_for[-1]) == (guess == "the plan's grid")
    warped = [sitk.GetArrayFromImage(run.warped) for run in (plain, with_guess)]
    assert np.array_equal(*warped)
    assert plain.affine.GetParameters() == with_guess.affine.GetParameters()


COLLECTOR_WHILE_TORCH_LOADS = (
    HOOK_BEFORE_TORCH
    + """
import gc, json
seen = []

def before_torch():
    seen.append(gc.isenabled())
    if sys.argv[2] == "fails":
        raise ImportError("no torch here")

if sys.argv[1] == "off":
    gc.disable()
from DeepRegisterLib.registration import torch_loading
torch_loading.load_torch_beside()
torch_loading._loader.join(120)
print(json.dumps({"during": seen, "after": gc.isenabled(), "torch": "torch" in sys.modules}))
"""
)


@pytest.mark.parametrize(
    ("collector", "torch_import"), [("on", "works"), ("off", "works"), ("on", "fails")]
)
def test_the_collector_pauses_while_torch_loads_and_is_left_as_it_was(
    collector: str, torch_import: str
) -> None:
    """A fresh process imports torch with the cyclic collector paused (its full collections
    walk every object the import makes), and afterwards collects as before: on again, or still
    off where the process had turned it off, also when the import fails."""
    completed = subprocess.run(
        [sys.executable, "-c", COLLECTOR_WHILE_TORCH_LOADS, collector, torch_import],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    assert outcome["during"] == [False]
    assert outcome["after"] == (collector == "on")
    assert outcome["torch"] == (torch_import == "works")
