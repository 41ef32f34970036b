"""Same inputs + seed + device → bit-identical outputs, also when registrations run in threads."""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import grid_centre, make_phantom, oblique_grid

from DeepRegisterLib.registration.engine import register
from DeepRegisterLib.registration.result import RegistrationResult

TIMING_KEYS = {"runtime_s", "timings"}


def a_pair(dim: int, seed: int) -> tuple[sitk.Image, sitk.Image]:
    """A phantom and a shifted, bent copy of it (so the affine stage and the optimiser work)."""
    grid = oblique_grid(dim, size=(32, 30, 28)[:dim])
    centre = grid_centre(grid)
    phantom = make_phantom(dim, centre, scale_mm=11.0, seed=seed)
    shift = np.array([2.0, -1.5, 1.0][:dim])

    def inverse_map(y: np.ndarray) -> np.ndarray:
        return y - shift + 1.5 * np.sin((y - centre)[..., ::-1] / 7.0)

    return phantom.image(grid), phantom.image(grid, through=inverse_map)


def run(fixed: sitk.Image, moving: sitk.Image, seed: int = 0) -> RegistrationResult:
    return register(
        fixed, moving, preset="fast", iterations=15, model=None, device="cpu", seed=seed
    )


def assert_bit_identical(a: RegistrationResult, b: RegistrationResult) -> None:
    for name in ("displacement", "warped", "jacobian"):
        array_a = sitk.GetArrayFromImage(getattr(a, name))
        array_b = sitk.GetArrayFromImage(getattr(b, name))
        assert array_a.tobytes() == array_b.tobytes(), f"{name} differs"
    assert a.affine.GetParameters() == b.affine.GetParameters()
    assert a.affine.GetFixedParameters() == b.affine.GetFixedParameters()
    report_a = {k: v for k, v in a.report.items() if k not in TIMING_KEYS}
    report_b = {k: v for k, v in b.report.items() if k not in TIMING_KEYS}
    assert report_a == report_b


@pytest.mark.parametrize("dim", [2, 3])
def test_the_same_inputs_seed_and_device_give_bit_identical_results(dim: int) -> None:
    fixed, moving = a_pair(dim, seed=0)
    first, second = run(fixed, moving), run(fixed, moving)
    assert_bit_identical(first, second)
    assert first.report["optimisation_steps"] > 0  # the stochastic parts really ran
    assert first.report["ncc_after"] > first.report["ncc_before"]


def test_a_registration_leaves_the_global_torch_random_state_as_it_was() -> None:
    fixed, moving = a_pair(2, seed=0)
    torch.manual_seed(1234)
    state = torch.random.get_rng_state()
    run(fixed, moving)
    assert torch.equal(torch.random.get_rng_state(), state)


def test_a_registration_leaves_simpleitks_global_thread_count_as_it_was() -> None:
    """The affine stage runs ITK single-threaded (for reproducibility) and must restore it."""
    fixed, moving = a_pair(2, seed=0)
    before = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    run(fixed, moving)
    assert sitk.ProcessObject.GetGlobalDefaultNumberOfThreads() == before


def test_registrations_in_concurrent_threads_equal_sequential_ones() -> None:
    pairs = [a_pair(3, seed=0), a_pair(3, seed=1)]
    sequential = [run(*pair) for pair in pairs]

    start = threading.Barrier(len(pairs))

    def in_thread(pair):
        start.wait()  # make the two runs overlap
        return run(*pair)

    with ThreadPoolExecutor(max_workers=len(pairs)) as pool:
        concurrent = list(pool.map(in_thread, pairs))

    for alone, together in zip(sequential, concurrent, strict=True):
        assert_bit_identical(alone, together)
    # The two pairs differ, so identical results are not an artefact of sharing one output.
    assert not np.array_equal(
        sitk.GetArrayFromImage(concurrent[0].displacement),
        sitk.GetArrayFromImage(concurrent[1].displacement),
    )
