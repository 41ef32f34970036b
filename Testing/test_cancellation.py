"""Cancellation: a request stops ``register`` within a second at every stage, raises
RegistrationCancelled, and leaves nothing behind (no MRML change). What an interrupted command
line leaves on disk is test_interrupted_outputs.py's."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from conftest import bent_pair

from DeepRegisterLib.errors import ModelError, RegistrationCancelled
from DeepRegisterLib.registration import affine_search, engine, job, network_grid

LATENCY_LIMIT_S = 1.0
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def a_3d_pair() -> tuple[sitk.Image, sitk.Image]:
    return bent_pair(3, (32, 30, 28))


@pytest.fixture(scope="module")
def a_2d_pair() -> tuple[sitk.Image, sitk.Image]:
    return bent_pair(2, (32, 28))


class CancelFromAnotherThread:
    """Progress callback + cancel token: when a progress message starting with ``prefix``
    arrives for the ``nth`` time, a helper thread sets the event (the callback waits for it,
    so the request lands inside that stage); ``set_at`` is when it was set."""

    def __init__(self, prefix: str, nth: int = 1):
        self.prefix, self.nth, self.seen = prefix, nth, 0
        self.event = threading.Event()
        self.messages: list[str] = []
        self.set_at: float | None = None
        self._reached = threading.Event()
        self._helper = threading.Thread(target=self._cancel, daemon=True)
        self._helper.start()

    def _cancel(self) -> None:
        self._reached.wait()
        self.set_at = time.perf_counter()
        self.event.set()

    def __call__(self, fraction: float, message: str) -> None:
        self.messages.append(message)
        if message.startswith(self.prefix) and not self._reached.is_set():
            self.seen += 1
            if self.seen >= self.nth:
                self._reached.set()
                self._helper.join()


@pytest.mark.parametrize(
    ("prefix", "nth", "where"),
    [
        ("affine", 2, "during the affine stage"),
        ("optimising", 2, "during optimisation"),
        ("composing the transform", 1, "while writing outputs"),
        ("warping the moving image", 1, "while writing outputs"),
        ("computing the Jacobian determinant", 1, "while writing outputs"),
    ],
    ids=["affine", "optimisation", "outputs-compose", "outputs-warp", "outputs-jacobian"],
)
def test_a_cancel_request_stops_each_stage_within_a_second(
    a_3d_pair, prefix: str, nth: int, where: str
) -> None:
    canceller = CancelFromAnotherThread(prefix, nth)
    with pytest.raises(RegistrationCancelled, match=where):
        engine.register(
            *a_3d_pair, preset="fast", model=None, device="cpu", iterations=8, compute_inverse=True,
            progress=canceller, cancel=canceller.event,
        )  # fmt: skip
    latency = time.perf_counter() - canceller.set_at
    assert latency < LATENCY_LIMIT_S, f"took {latency:.2f} s to stop"
    assert canceller.messages[-1] != "done"
    assert _worker_threads() == []  # the det J beside the warps stopped with the run


def test_a_cancel_request_stops_the_network_between_its_layers(a_3d_pair) -> None:
    """The forward pass takes seconds on a head-sized grid (2.8 s on 256³ at 2 mm, 2 threads)."""
    canceller = CancelFromAnotherThread("running model")
    with pytest.raises(RegistrationCancelled, match="while running the network"):
        engine.register(
            *a_3d_pair, preset="fast", model="brain3d", device="cpu",
            progress=canceller, cancel=canceller.event,
        )  # fmt: skip
    assert time.perf_counter() - canceller.set_at < LATENCY_LIMIT_S


def _worker_threads() -> list[str]:
    return [t.name for t in threading.enumerate() if t.name.startswith("deepregister")]


def test_the_smoothing_beside_the_affine_stage_stops_with_a_cancel(
    a_3d_pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The network inputs are smoothed on a worker thread (once the run is planned, in a
    process where torch has loaded) while the affine stage runs. On a large CT that can
    outlast the affine stage: the wait for it still answers a cancel within a second, the
    worker is told to stop, and no thread is left running."""
    affine_done, event = threading.Event(), threading.Event()
    seen: dict[str, object] = {}
    real_affine = affine_search.search_copies

    def affine_then_flag(*args, **kwargs):
        transform = real_affine(*args, **kwargs)
        affine_done.set()
        return transform

    def slow_smoothing(image, target_mm, is_cancelled, voxels):
        seen["thread"] = threading.current_thread().name
        affine_done.wait(30)
        seen["set_at"] = time.perf_counter()
        event.set()  # the user cancels while the main thread waits for this work
        deadline = time.perf_counter() + 30
        while not is_cancelled() and time.perf_counter() < deadline:
            time.sleep(0.01)
        seen["told_to_stop"] = is_cancelled()
        raise RegistrationCancelled("smoothing stopped")

    monkeypatch.setattr(affine_search, "search_copies", affine_then_flag)
    monkeypatch.setattr(network_grid, "smoothed_for_grid", slow_smoothing)
    with pytest.raises(RegistrationCancelled, match="while preparing the images"):
        engine.register(*a_3d_pair, preset="fast", model=None, device="cpu", cancel=event)
    latency = time.perf_counter() - seen["set_at"]
    assert latency < LATENCY_LIMIT_S, f"took {latency:.2f} s to stop"
    assert seen["thread"].startswith("deepregister")
    assert seen["told_to_stop"] is True
    assert _worker_threads() == []


def test_a_failed_affine_stage_stops_the_smoothing_beside_it(
    a_3d_pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    smoothing_stopped = threading.Event()

    def smoothing_until_stopped(fixed_norm, reference, is_cancelled, voxels):
        deadline = time.perf_counter() + 30
        while not is_cancelled() and time.perf_counter() < deadline:
            time.sleep(0.01)
        smoothing_stopped.set()
        raise RegistrationCancelled("smoothing stopped")

    def failing_affine(*args, **kwargs):
        raise RuntimeError("the affine stage failed")

    monkeypatch.setattr(network_grid, "fixed_on_grid", smoothing_until_stopped)
    monkeypatch.setattr(affine_search, "search_copies", failing_affine)
    started = time.perf_counter()
    with pytest.raises(RuntimeError, match="the affine stage failed"):
        engine.register(*a_3d_pair, preset="fast", model=None, device="cpu")
    assert time.perf_counter() - started < 10
    assert smoothing_stopped.is_set()
    assert _worker_threads() == []


def test_a_plan_refused_beside_the_affine_stage_stops_it_with_the_plans_error(
    a_3d_pair, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The run is planned (device, model, memory) on the worker while the affine stage runs:
    a refusal there stops the affine stage at its next iteration, and the user gets the
    refusal, not a cancel. Here the plan refuses once the search has begun."""
    searching, stopped = threading.Event(), threading.Event()

    def affine_until_stopped(*args, is_cancelled, **kwargs):
        searching.set()
        deadline = time.perf_counter() + 30
        while not is_cancelled() and time.perf_counter() < deadline:
            time.sleep(0.01)
        stopped.set()
        raise RegistrationCancelled("during the affine stage")

    def plan_once_searching(*args, **kwargs):
        searching.wait(30)
        return plan_job(*args, **kwargs)

    plan_job = job.plan_job
    monkeypatch.setattr(affine_search, "search_copies", affine_until_stopped)
    monkeypatch.setattr(job, "plan_job", plan_once_searching)
    started = time.perf_counter()
    with pytest.raises(ModelError, match="no-such-model"):
        engine.register(*a_3d_pair, preset="fast", model="no-such-model", device="cpu")
    assert time.perf_counter() - started < 10
    assert stopped.is_set()
    assert _worker_threads() == []


class FlipsAfter:
    """A cancel token whose ``is_set()`` turns true on call ``n + 1``; records every call with
    the last progress message, to name the check that fired."""

    def __init__(self, n: int | None):
        self.n, self.calls, self.where = n, 0, []
        self.last_message = ""

    def progress(self, fraction: float, message: str) -> None:
        self.last_message = message

    def is_set(self) -> bool:
        self.calls += 1
        self.where.append(self.last_message)
        return self.n is not None and self.calls > self.n


def test_a_cancel_at_any_check_raises_cleanly_and_a_late_one_is_harmless(a_2d_pair) -> None:
    """Cancelling at the first check, the first of each stage and each of the last six raises
    RegistrationCancelled (nothing else) within that stage, and a request after the last check
    returns a whole result. ITK's StopRegistration ends only the current pyramid level, so in
    the affine stage the next level's first iteration asks once more (2 extra checks)."""
    options = dict(preset="fast", model=None, device="cpu", iterations=4, compute_inverse=True)
    probe = FlipsAfter(None)
    complete = engine.register(*a_2d_pair, progress=probe.progress, cancel=probe, **options)
    total = probe.calls
    first_in = {stage: next(i for i, m in enumerate(probe.where) if m.startswith(stage))
                for stage in ("affine", "optimising")}  # fmt: skip
    points = sorted({0, first_in["affine"], first_in["optimising"], *range(total - 6, total)})
    assert len(points) >= 7

    for n in points:
        token = FlipsAfter(n)
        with pytest.raises(RegistrationCancelled):
            engine.register(*a_2d_pair, progress=token.progress, cancel=token, **options)
        assert token.calls - (n + 1) <= 2, f"{token.calls - n - 1} checks after the request"
        stage = token.where[n].split(" ")[0]
        assert all(w.split(" ")[0] == stage for w in token.where[n:]), token.where[n:]

    late = FlipsAfter(total)
    result = engine.register(*a_2d_pair, progress=late.progress, cancel=late, **options)
    np.testing.assert_array_equal(sitk.GetArrayFromImage(result.displacement),
                                  sitk.GetArrayFromImage(complete.displacement))  # fmt: skip


def test_the_first_registration_in_a_process_stops_within_a_second(tmp_path: Path) -> None:
    """A fresh interpreter: the cancel arrives as optimisation starts; how long until it stops,
    and whether a module import ran inside the stage."""
    script = textwrap.dedent(f"""
        import json, sys, threading, time
        sys.path[:0] = [{str(REPO)!r}, {str(REPO / "Testing")!r}]
        from conftest import bent_pair
        from DeepRegisterLib.registration import engine, optimisation_stage
        from DeepRegisterLib.errors import RegistrationCancelled
        fixed, moving = bent_pair(2, (24, 20))
        cancel, state = threading.Event(), {{}}
        real = optimisation_stage.optimise_velocity
        def cancelled_at_start(*args, **kwargs):
            state["modules"], state["set_at"] = set(sys.modules), time.perf_counter()
            cancel.set()
            return real(*args, **kwargs)
        optimisation_stage.optimise_velocity = cancelled_at_start
        try:
            engine.register(fixed, moving, preset="fast", model=None, device="cpu", cancel=cancel)
        except RegistrationCancelled:
            latency = time.perf_counter() - state["set_at"]
        imported = sorted(m for m in set(sys.modules) - state["modules"] if m.count(".") < 2)
        print(json.dumps({{"latency": latency, "imported": imported}}))
    """)  # fmt: skip
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120, check=True, cwd=tmp_path)  # fmt: skip
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert "torch._dynamo" not in measured["imported"], measured["imported"]
    assert measured["latency"] < LATENCY_LIMIT_S


# --- the MRML bridge ----------------------------------------------------------------------------


def test_a_console_run_cancelled_mid_run_leaves_the_scene_unchanged(tmp_path: Path) -> None:
    """The console's in-process path, cancelled while optimising (test_mrml covers a request
    made before the start; test_process_runner the module's child process)."""
    mrml_scenes = pytest.importorskip("mrml_scenes")  # skips without slicer-core
    from DeepRegisterLib import mrml

    scene = mrml_scenes._new_scene(tmp_path / "cache").scene
    fixed, moving = mrml_scenes._pair(scene)
    before = mrml_scenes._snapshot(scene)
    cancel = threading.Event()

    def cancel_when_optimising(fraction: float, message: str) -> None:
        if message.startswith("optimising") and not cancel.is_set():
            cancel.set()

    with pytest.raises(RegistrationCancelled):
        mrml.registerVolumes(
            fixed, moving, "fast", createOutputVolume=True, device="cpu", model="none",
            compute_inverse=True, progress=cancel_when_optimising, cancel=cancel,
        )  # fmt: skip
    assert cancel.is_set()
    assert mrml_scenes._snapshot(scene) == before
    assert moving.GetTransformNodeID() is None
