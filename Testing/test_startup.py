"""``deepregister --help`` and argument errors answer at once: no heavy library is imported;
and ``register`` ends as soon as its outputs are written.

Timing would be flaky on a shared machine, so the tests look at what a fresh interpreter has
imported after the command line answered: none of torch, matplotlib, SimpleITK or numpy.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from DeepRegisterLib.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
heavy = ("torch", "matplotlib", "SimpleITK", "numpy")
print(json.dumps({"code": code, "heavy": [m for m in heavy if m in sys.modules]}))
"""


def imported_after(*argv: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["register", "--help"],
        ["evaluate", "--help"],
        ["train", "--help"],
        ["demo", "--help"],
        ["apply", "--help"],
    ],
)
def test_help_imports_no_heavy_library(argv):
    outcome = imported_after(*argv)
    assert outcome == {"code": 0, "heavy": []}


@pytest.mark.parametrize(
    "argv",
    [
        ["register", "--fixed", "f.nii.gz"],  # argparse: --moving missing
        ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--preset", "fastest"],
        ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz"],  # nothing to write
        ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--warped", "w.jpg"],
        ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--report", "r.txt"],
        ["apply", "--transform", "t.h5", "--reference", "f.nii.gz"],  # nothing to warp
        ["apply", "--transform", "t.h5", "--reference", "f.nii.gz", "--image", "m.nrrd", "w.jpg"],
    ],
)
def test_argument_errors_exit_2_without_a_heavy_library(argv):
    outcome = imported_after(*argv)
    assert outcome == {"code": 2, "heavy": []}


EXITING = """
import atexit, pathlib, sys
marker = pathlib.Path(sys.argv.pop(1))
atexit.register(lambda: marker.write_text("finalised"))
from DeepRegisterLib.cli import main
keep = main.keep_freed_memory  # the real one, called; its answer is left beside the marker
main.keep_freed_memory = lambda: marker.with_suffix(".kept").write_text(str(keep()))
main.run()
"""


def test_register_ends_without_finalisation_once_everything_is_written(tmp_path):
    """``register`` skips Python's finalisation (torch's alone takes 0.3 s): the atexit handler
    does not run, yet the outputs are complete and the last JSON event reached the pipe. It
    keeps the memory it frees (glibc agrees on Linux). Other commands end as Python ends, and
    leave the allocator as it was."""
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

    pair = phantom_pair(demo_grid(3, 16), amplitude_mm=2.0)
    inputs = {key: tmp_path / f"{key}.mha" for key in ("fixed", "moving")}
    for key, path in inputs.items():
        sitk_write(getattr(pair, key), path)
    marker, warped = tmp_path / "finalised.txt", tmp_path / "warped.nrrd"
    kept = marker.with_suffix(".kept")
    argv = [
        "register", "--fixed", inputs["fixed"], "--moving", inputs["moving"],
        "--warped", warped, "--preset", "fast", "--iterations", "0", "--model", "none",
        "--device", "cpu", "--progress", "json",
    ]  # fmt: skip
    completed = subprocess.run(
        [sys.executable, "-c", EXITING, marker, *map(str, argv)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    assert json.loads(completed.stdout.strip().splitlines()[-1])["event"] == "done"
    assert not marker.exists()
    assert sitk_read(warped).GetSize() == pair.fixed.GetSize()
    assert kept.read_text() == str(platform.libc_ver()[0] == "glibc")

    refused = subprocess.run(
        [sys.executable, "-c", EXITING, marker, *map(str, argv[:-2]), "--moving", "absent.mha"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert refused.returncode == 2
    assert "absent.mha" in refused.stderr
    assert not marker.exists()

    kept.unlink()
    listed = subprocess.run(
        [sys.executable, "-c", EXITING, marker, "models"], capture_output=True, timeout=300
    )
    assert listed.returncode == 0
    assert marker.read_text() == "finalised"
    assert not kept.exists()


TORCH_FIRST = """
import importlib.abc, sys, threading
torch_asked = threading.Event()

class SimpleItkWaitsForTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        thread = threading.current_thread().name
        if name in ("torch", "SimpleITK"):
            print(f"import {name} on {thread}", file=sys.stderr, flush=True)
        if name == "torch":
            torch_asked.set()
        elif name == "SimpleITK" and thread == "MainThread":
            torch_asked.wait(30)
        return None

sys.meta_path.insert(0, SimpleItkWaitsForTorch())
from DeepRegisterLib.cli.main import run
run()
"""


def test_register_starts_torch_before_simpleitk(tmp_path):
    """torch's import (about a second of one core) is the command line's longest wait before
    the affine search: it begins as soon as the output paths and settings pass, before the
    main thread imports SimpleITK to read headers and images. Here the main thread's SimpleITK
    import waits (up to 30 s) for torch's to be asked for; argument errors still import neither
    (test_argument_errors_exit_2_without_a_heavy_library)."""
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

    pair = phantom_pair(demo_grid(3, 16), amplitude_mm=2.0)
    inputs = {key: tmp_path / f"{key}.mha" for key in ("fixed", "moving")}
    for key, path in inputs.items():
        sitk_write(getattr(pair, key), path)
    argv = [
        "register", "--fixed", inputs["fixed"], "--moving", inputs["moving"],
        "--transform", tmp_path / "t.h5", "--preset", "fast", "--iterations", "0",
        "--model", "none", "--device", "cpu", "--quiet",
    ]  # fmt: skip
    completed = subprocess.run(
        [sys.executable, "-c", TORCH_FIRST, *map(str, argv)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    asked = [line for line in completed.stderr.splitlines() if line.startswith("import ")]
    assert asked[0] == "import torch on deepregister-load-torch"
    assert "import SimpleITK on MainThread" in asked
    assert (tmp_path / "t.h5").exists()


def sitk_write(image, path) -> None:
    import SimpleITK as sitk

    sitk.WriteImage(image, str(path))


def sitk_read(path):
    import SimpleITK as sitk

    return sitk.ReadImage(str(path))


WHILE_READING = """
import importlib.abc, json, sys, threading, time
reading, order = threading.Event(), []

class TorchWaitsForTheReading(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch":
            order.append(("torch", threading.current_thread().name))
            reading.wait(60)
        return None

sys.meta_path.insert(0, TorchWaitsForTheReading())
from DeepRegisterLib.registration import engine, inputs
assert "torch" not in sys.modules, "importing the engine loaded torch"
read_image = inputs.read_image

def read_and_tell(path, what="image"):
    order.append(("read", threading.current_thread().name))
    reading.set()
    return read_image(path, what)

inputs.read_image = read_and_tell
started = time.perf_counter()
engine.register(sys.argv[1], sys.argv[2], preset="fast", iterations=2, model=None, device="cpu")
print(json.dumps({"order": order, "seconds": time.perf_counter() - started}))
"""


def test_torch_loads_on_a_thread_while_the_inputs_are_read(tmp_path):
    """A fresh process (the command line, Slicer's child) would otherwise read its images
    only after torch's import (about a second). Here that import cannot finish until an image
    is being read: the run completes at once only if the two overlap."""
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair

    pair = phantom_pair(demo_grid(3, 16), amplitude_mm=2.0)
    paths = [tmp_path / "fixed.mha", tmp_path / "moving.mha"]
    for image, path in zip((pair.fixed, pair.moving), paths, strict=True):
        sitk_write(image, path)
    completed = subprocess.run(
        [sys.executable, "-c", WHILE_READING, *map(str, paths)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert completed.returncode == 0, completed.stderr
    outcome = json.loads(completed.stdout.strip().splitlines()[-1])
    threads = dict(outcome["order"])  # the first of each, and on which thread
    assert threads["read"] == "MainThread"
    assert threads["torch"] == "deepregister-load-torch"
    assert outcome["seconds"] < 60  # torch's import did not wait out its 60 s
