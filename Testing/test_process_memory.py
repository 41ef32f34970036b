"""Memory a registration frees is reused, not taken again as fresh pages from the system.

A ``register`` process keeps what it frees (see process_memory.py): measured the way the cost
arises, as minor page faults while a fresh interpreter allocates 64 MB, frees them and allocates
them again, with and without asking glibc to keep them. And the engine frees its full-resolution
working images before the deformable stages, which then reuse that memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

from page_faults import PAGES, only_glibc

from DeepRegisterLib.process_memory import keep_freed_memory

REALLOCATE = """
import json, sys
sys.path.insert(0, sys.argv[2])
from page_faults import reallocation_faults
from DeepRegisterLib.process_memory import keep_freed_memory
agreed = keep_freed_memory() if sys.argv[1] == "keep" else None
print(json.dumps({"agreed": agreed, "faults": reallocation_faults()}))
"""


def reallocate(mode: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", REALLOCATE, mode, str(Path(__file__).parent)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@only_glibc
def test_kept_memory_is_reused_without_fresh_pages():
    default, kept = reallocate("default"), reallocate("keep")
    assert default["faults"] > PAGES // 2, "glibc returned the freed block and mapped a new one"
    assert kept == {"agreed": True, "faults": kept["faults"]}
    assert kept["faults"] < PAGES // 20


def test_other_systems_are_left_as_they_are(monkeypatch):
    """macOS and Windows have no mallopt to ask: nothing is called, the answer is False."""
    for system in ("darwin", "win32"):
        monkeypatch.setattr(sys, "platform", system)
        assert keep_freed_memory() is False


def test_full_resolution_working_images_end_before_the_deformable_stages(monkeypatch):
    """The normalised images and the smoothed moving image (64 MB each at 256³) serve the
    affine search and the network grid; none is alive once the network stage begins."""
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
    from DeepRegisterLib.registration import deformable, engine, network_grid, preprocessing

    made: list[weakref.ref] = []

    def tracked(function):
        def call(*args, **kwargs):
            image = function(*args, **kwargs)
            made.append(weakref.ref(image))
            return image

        return call

    alive_at_network: list[list[bool]] = []

    def network_stage(*args, **kwargs):
        alive_at_network.append([ref() is not None for ref in made])
        return original_network_stage(*args, **kwargs)

    original_network_stage = deformable.network_stage
    monkeypatch.setattr(
        preprocessing,
        "normalised_for_registration",
        tracked(preprocessing.normalised_for_registration),
    )
    monkeypatch.setattr(network_grid, "smoothed_for_grid", tracked(network_grid.smoothed_for_grid))
    monkeypatch.setattr(deformable, "network_stage", network_stage)
    pair = phantom_pair(demo_grid(3, size=32), amplitude_mm=2.0)
    result = engine.register(pair.fixed, pair.moving, preset="fast", iterations=0, model=None)
    assert result.warped.GetSize() == pair.fixed.GetSize()
    assert alive_at_network == [[False, False, False]]


def test_the_worker_beside_the_affine_stage_copies_no_normalised_image(monkeypatch):
    """While the affine stage's filters read the normalised images, the worker planning the run
    reads them too. A view SimpleITK gives while another reference holds an image's buffer is of
    a fresh copy of the whole image (0.6 GB for a 512² × 600 CT): here the affine stage holds
    such references (as a filter running does) until the worker is done, and both images must
    keep the buffers they were made with."""
    import threading

    import numpy as np
    import SimpleITK as sitk

    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
    from DeepRegisterLib.registration import affine, engine

    prepared = threading.Event()
    kept: list[bool] = []

    def prepare_then_flag(*args, **kwargs):
        try:
            return original_prepare(*args, **kwargs)
        finally:
            prepared.set()

    class CopiesHoldingTheImages(affine.WorkingCopies):
        def at(self, spacing_mm: float) -> tuple[sitk.Image, sitk.Image]:
            if not kept:  # the affine stage's first copies
                views = [sitk.GetArrayViewFromImage(image) for image in self.images]
                held = [sitk.Image(image) for image in self.images]  # as a filter's input does
                assert prepared.wait(60)
                del held
                after = [sitk.GetArrayViewFromImage(image) for image in self.images]
                kept.extend(np.shares_memory(a, b) for a, b in zip(views, after, strict=True))
            return super().at(spacing_mm)

    original_prepare = engine._prepare
    monkeypatch.setattr(engine, "_prepare", prepare_then_flag)
    monkeypatch.setattr(engine, "WorkingCopies", CopiesHoldingTheImages)
    pair = phantom_pair(demo_grid(3, size=32), amplitude_mm=2.0)
    mask = sitk.Cast(pair.fixed > 0, sitk.sitkUInt8)
    engine.register(pair.fixed, pair.moving, fixed_mask=mask, iterations=0, model=None)
    assert kept == [True, True]
