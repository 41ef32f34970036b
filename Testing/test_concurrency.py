"""Registrations side by side: in threads and in processes they give what they give alone, and a
registration leaves the process's global state as it found it.

(test_determinism covers two threads registering two pairs, and the torch RNG after a
successful run; here: processes, a cancelled neighbour, and every other piece of global state.)
"""

from __future__ import annotations

import multiprocessing
import os
import random
import sys
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import grid_centre, make_phantom, oblique_grid

from DeepRegisterLib.errors import InputError, RegistrationCancelled
from DeepRegisterLib.registration.engine import register

OPTIONS = dict(preset="fast", model=None, device="cpu", iterations=8)


def a_pair(dim: int, seed: int = 0) -> tuple[sitk.Image, sitk.Image]:
    grid = oblique_grid(dim, size=(28, 26, 24)[:dim])
    centre = grid_centre(grid)
    phantom = make_phantom(dim, centre, scale_mm=10.0, seed=seed)
    shift = np.array([1.5, -2.0, 1.0][:dim])
    return phantom.image(grid), phantom.image(
        grid, through=lambda y: y - shift + 1.2 * np.sin((y - centre)[..., ::-1] / 6.0)
    )


def displacement(image: sitk.Image) -> np.ndarray:
    return sitk.GetArrayFromImage(image)


def register_in_a_child(dim: int, seed: int) -> tuple[bytes, int]:
    """Run in a spawned process: the displacement's bytes and the child's torch thread count."""
    result = register(*a_pair(dim, seed), **OPTIONS)
    return displacement(result.displacement).tobytes(), torch.get_num_threads()


def test_registrations_in_spawned_processes_equal_the_one_in_this_process() -> None:
    here = displacement(register(*a_pair(2), **OPTIONS).displacement)
    context = multiprocessing.get_context("spawn")
    with context.Pool(2) as pool:
        children = pool.starmap(register_in_a_child, [(2, 0), (2, 0)])
    for field, _ in children:
        assert field == here.tobytes()
    assert np.abs(here).max() > 0.5  # a real deformation, not two zero fields


def test_cancelling_one_of_two_concurrent_registrations_leaves_the_other_intact() -> None:
    """Cancel tokens, progress and results are per call: no cross-talk between threads."""
    pair_2d, pair_3d = a_pair(2), a_pair(3, seed=1)
    alone = register(*pair_3d, **OPTIONS)
    start = threading.Barrier(2)
    cancel = threading.Event()
    seen = {"cancelled": [], "kept": []}

    def cancelled_run():
        start.wait()
        with pytest.raises(RegistrationCancelled):
            register(*pair_2d, cancel=cancel, progress=lambda f, m: (
                seen["cancelled"].append(m), m.startswith("optimising") and cancel.set()),
                **OPTIONS)  # fmt: skip

    def kept_run():
        start.wait()
        return register(*pair_3d, progress=lambda f, m: seen["kept"].append(m), **OPTIONS)

    with ThreadPoolExecutor(max_workers=2) as pool:
        cancelled = pool.submit(cancelled_run)
        kept = pool.submit(kept_run)
        cancelled.result()
        together = kept.result()

    assert (
        displacement(together.displacement).tobytes() == displacement(alone.displacement).tobytes()
    )
    assert seen["kept"][-1] == "done"
    assert "done" not in seen["cancelled"]


def global_state() -> dict:
    """Everything a library could change behind its caller's back."""
    return {
        "torch threads": torch.get_num_threads(),
        "torch interop threads": torch.get_num_interop_threads(),
        "torch rng": torch.random.get_rng_state().clone(),
        "torch grad": torch.is_grad_enabled(),
        "torch inference": torch.is_inference_mode_enabled(),
        "torch dtype": torch.get_default_dtype(),
        "torch deterministic": torch.are_deterministic_algorithms_enabled(),
        "torch matmul precision": torch.get_float32_matmul_precision(),
        "numpy rng": np.random.get_state()[1].copy(),  # noqa: NPY002 (the global one)
        "numpy errors": np.geterr(),
        "numpy print": np.get_printoptions(),
        "python rng": random.getstate(),
        "sitk threads": sitk.ProcessObject.GetGlobalDefaultNumberOfThreads(),
        "sitk debug": sitk.ProcessObject.GetGlobalDefaultDebug(),
        "sitk warnings": sitk.ProcessObject.GetGlobalWarningDisplay(),
        "environment": dict(os.environ),
        "cwd": os.getcwd(),
        "sys.path": list(sys.path),
        "warning filters": list(warnings.filters),
    }


def assert_same_state(before: dict, after: dict) -> None:
    for key, value in before.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(value, after[key]), key
        elif isinstance(value, np.ndarray):
            assert np.array_equal(value, after[key]), key
        else:
            assert value == after[key], key


@pytest.mark.parametrize("outcome", ["success", "cancelled", "refused"])
def test_a_registration_leaves_every_global_setting_as_it_was(outcome: str) -> None:
    """Also when it is cancelled mid-way or refused after the seed was set."""
    torch.manual_seed(4321)
    np.random.seed(4321)  # noqa: NPY002 (the global generator is what is watched)
    random.seed(4321)
    fixed, moving = a_pair(2)
    before = global_state()
    if outcome == "success":
        register(fixed, moving, **OPTIONS)
    elif outcome == "cancelled":
        cancel = threading.Event()
        with pytest.raises(RegistrationCancelled):
            register(fixed, moving, cancel=cancel, **OPTIONS,
                     progress=lambda f, m: m.startswith("optimising") and cancel.set())  # fmt: skip
    else:  # fields of view 10 m apart: refused after the seed was set, before optimising
        far = sitk.Image(moving)
        far.SetOrigin(tuple(np.asarray(moving.GetOrigin()) + 10_000.0))
        with pytest.raises(InputError, match="do not overlap"):
            register(fixed, far, affine=False, **OPTIONS)
    assert_same_state(before, global_state())
