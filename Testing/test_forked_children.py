"""A process forked after a registration registers too, on one thread, where GNU OpenMP left
it hanging (nn/forked_children.py); after training or the engine's warp a forked child gets one
thread as well.

Each scenario runs in a fresh interpreter, as a user's script would: it registers (or runs a
torch operation) in its own process, forks a child with ``multiprocessing``, and gives the child
a time (15 s for one torch operation, two minutes for a registration) before calling it hung
and killing it, so that no hung process outlives the test.
"""

from __future__ import annotations

import json
import multiprocessing
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.skipif(
    "fork" not in multiprocessing.get_all_start_methods(), reason="this platform cannot fork"
)

#: Runs ``work`` in a child forked from the script's process; prints its JSON, or "hung".
FORKED = """
import json, multiprocessing

def in_child(work, pipe):
    pipe.send(work())

def forked(work, seconds):
    receiving, sending = multiprocessing.Pipe(duplex=False)
    child = multiprocessing.get_context("fork").Process(target=in_child, args=(work, sending))
    child.start()
    child.join(seconds)
    if child.is_alive():
        child.kill()
        child.join()
        return "hung"
    return receiving.recv() if receiving.poll() else f"exit code {child.exitcode}"
"""

#: A small 3D pair, large enough for torch and the compiled sampler to run a team of threads.
REGISTER = """
import hashlib
import numpy as np, SimpleITK as sitk, torch
from DeepRegisterLib import register

def pair():
    z, y, x = np.mgrid[:40, :48, :44].astype(np.float32)
    def blob(cx, cy, cz):
        return 100 * np.exp(-((x - cx) / 9) ** 2 - ((y - cy) / 11) ** 2 - ((z - cz) / 8) ** 2)
    return sitk.GetImageFromArray(blob(22, 24, 20)), sitk.GetImageFromArray(blob(24, 23, 21))

def registration():
    result = register(*pair(), preset="fast", model="none", device="cpu", iterations=8)
    field = sitk.GetArrayViewFromImage(result.displacement)
    return {"threads": torch.get_num_threads(), "notes": result.report["notes"],
            "field": hashlib.sha256(field.tobytes()).hexdigest(), "moved": float(abs(field).max())}
"""


def run_script(*parts: str) -> str:
    """The last line a script of ``FORKED`` and ``parts`` prints."""
    script = "".join(textwrap.dedent(part) for part in (FORKED, *parts))
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=False
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip().splitlines()[-1]


@pytest.mark.skipif(
    sys.platform != "linux" or torch.get_num_threads() < 2,
    reason="the hang is GNU OpenMP's (Linux) and needs a team of two threads or more",
)
def test_a_child_forked_after_torchs_threads_ran_hangs_in_plain_torch() -> None:
    """The property the guard answers: PyTorch alone, its threads run before the fork, hangs
    the child's first parallel operation."""
    outcome = run_script(
        """
        import torch
        work = lambda: float(torch.ones(1 << 21).exp().sum())
        work()
        print(json.dumps(forked(work, 15)))
        """
    )
    assert json.loads(outcome) == "hung"


def test_a_child_forked_after_a_registration_registers_on_one_thread() -> None:
    """A script registers, then forks: the child registers on one thread, says so in a note,
    and gives the field a one-thread registration here gives, to the bit."""
    outcome = run_script(
        REGISTER,
        """
        torch.set_num_threads(2)
        first = registration()  # a team of threads: the parent has run one
        torch.set_num_threads(1)
        one_thread = registration()
        torch.set_num_threads(2)
        print(json.dumps({"first": first, "one_thread": one_thread,
                          "child": forked(registration, 120)}))
        """,
    )
    runs = json.loads(outcome)
    child = runs["child"]
    assert child != "hung", "the forked child's registration hung"
    assert child["threads"] == 1
    assert any("forked from one that had run torch's OpenMP threads" in n for n in child["notes"])
    assert child["field"] == runs["one_thread"]["field"]
    assert child["moved"] > 0.5  # a real registration, not an empty field
    assert runs["first"]["threads"] == 2
    assert runs["first"]["notes"] == []


#: Other runs that start torch's threads: training, and ``apply``'s engine warp.
OTHER_RUNS = {
    "training": """
        import sys, tempfile
        sys.path.insert(0, TESTING)
        from tiny_training import _config
        from DeepRegisterLib.training.loop import train
        train(_config(steps=1), tempfile.mkdtemp(), progress=None)
        """,
    "the engine's warp": """
        import numpy as np, SimpleITK as sitk
        from DeepRegisterLib.imaging.geometry import Grid
        from DeepRegisterLib.registration.saved_transforms import SavedTransformWarp
        reference = Grid((20, 18, 16), (1.0,) * 3, (0.0,) * 3, tuple(np.eye(3).ravel()))
        values = np.zeros((6, 7, 8, 3))
        values[2:4, 2:5, 3:6] = (0.4, -0.7, 1.1)
        coarse = Grid((8, 7, 6), (3.0,) * 3, (-2.0, -1.0, 0.5), tuple(np.eye(3).ravel()))
        field = coarse.apply_to(sitk.GetImageFromArray(values, isVector=True))
        transform = sitk.DisplacementFieldTransform(sitk.Cast(field, sitk.sitkVectorFloat64))
        image = reference.apply_to(sitk.GetImageFromArray(np.ones((16, 18, 20), np.float32)))
        SavedTransformWarp(transform, reference, min_voxels=0)(image, False)
        """,
}


@pytest.mark.parametrize("run", sorted(OTHER_RUNS))
def test_other_runs_leave_their_forked_children_one_thread_too(run: str) -> None:
    """A child forked after any run that starts torch's threads gets one thread; before any
    run, a child keeps its parent's."""
    outcome = run_script(
        f"TESTING = {str(Path(__file__).parent)!r}\n",
        """
        import torch
        torch.set_num_threads(2)
        threads = lambda: torch.get_num_threads()
        before = forked(threads, 60)
        """,
        OTHER_RUNS[run],
        """
        print(json.dumps({"before": before, "after": forked(threads, 60)}))
        """,
    )
    assert json.loads(outcome) == {"before": 2, "after": 1}
