"""Memory a registration frees is reused, not taken again as fresh pages from the system.

A ``register`` process keeps what it frees (see process_memory.py): measured the way the cost
arises, as minor page faults while a fresh interpreter allocates 64 MB, frees them and allocates
them again, with and without asking glibc to keep them. Its heap is mapped in huge pages, so
even its first touch of 64 MB takes a few dozen faults, not 16 384. And the engine frees its
full-resolution working images before the deformable stages, which then reuse that memory.
"""

from __future__ import annotations

import json
import subprocess
import sys
import weakref
from pathlib import Path

from page_faults import PAGES, THP_MODES, only_glibc, only_huge_pages_on_request

from DeepRegisterLib.process_memory import keep_freed_memory

ALLOCATE = """
import json, sys
sys.path.insert(0, sys.argv[2])
import page_faults
from DeepRegisterLib.process_memory import keep_freed_memory
agreed = keep_freed_memory() if sys.argv[1] == "keep" else None
measured = getattr(page_faults, sys.argv[3])()
print(json.dumps({"agreed": agreed, "measured": measured}))
"""


def in_fresh_interpreter(mode: str, measure: str = "reallocation_faults") -> dict:
    """``page_faults.<measure>()`` in a fresh interpreter, after keep_freed_memory() if
    ``mode`` is "keep"."""
    completed = subprocess.run(
        [sys.executable, "-c", ALLOCATE, mode, str(Path(__file__).parent), measure],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@only_glibc
def test_kept_memory_is_reused_without_fresh_pages():
    default, kept = in_fresh_interpreter("default"), in_fresh_interpreter("keep")
    assert default["measured"] > PAGES // 2, "glibc returned the freed block and mapped a new one"
    assert kept == {"agreed": True, "measured": kept["measured"]}
    assert kept["measured"] < PAGES // 20


@only_glibc
@only_huge_pages_on_request
def test_the_kept_heap_is_mapped_in_huge_pages():
    """64 MB touched for the first time: 16 384 faults of 4 KiB on glibc's defaults (where the
    kernel maps huge pages only on request), a few dozen of 2 MiB once kept."""
    default = in_fresh_interpreter("default", "first_allocation")["measured"]
    kept = in_fresh_interpreter("keep", "first_allocation")["measured"]
    assert kept["faults"] < PAGES // 20
    assert kept["huge_kb"] >= 2**26 // 1024 // 2  # at least half of the block
    if "[madvise]" in THP_MODES.read_text():
        assert default["faults"] > PAGES // 2
        assert default["huge_kb"] < kept["huge_kb"]


def test_other_systems_are_left_as_they_are(monkeypatch):
    """macOS and Windows have no mallopt to ask: nothing is called, the answer is False."""
    for system in ("darwin", "win32"):
        monkeypatch.setattr(sys, "platform", system)
        assert keep_freed_memory() is False


def test_full_resolution_working_images_end_before_the_deformable_stages(monkeypatch):
    """The normalised images and the smoothed moving image (64 MB each at 256³) serve the
    affine search and the network grid; none is alive once the network stage begins."""
    from DeepRegisterLib.imaging.phantoms import demo_grid, phantom_pair
    from DeepRegisterLib.registration import deformable, engine

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
        engine, "normalised_for_registration", tracked(engine.normalised_for_registration)
    )
    monkeypatch.setattr(deformable, "smoothed_for_grid", tracked(deformable.smoothed_for_grid))
    monkeypatch.setattr(deformable, "network_stage", network_stage)
    pair = phantom_pair(demo_grid(3, size=32), amplitude_mm=2.0)
    result = engine.register(pair.fixed, pair.moving, preset="fast", iterations=0, model=None)
    assert result.warped.GetSize() == pair.fixed.GetSize()
    assert alive_at_network == [[False, False, False]]
