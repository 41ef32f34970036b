"""A ``register`` process keeps the memory it frees: a stage's freed images are reused by the
next, not returned to the system and taken again as fresh pages (see cli/process_memory.py).

Measured the way the cost arises: minor page faults while a fresh interpreter allocates 64 MB,
frees them and allocates them again, with and without asking glibc to keep them.
"""

from __future__ import annotations

import json
import platform
import subprocess
import sys

import pytest

from DeepRegisterLib.cli.process_memory import keep_freed_memory

REALLOCATE = """
import json, resource, sys
from DeepRegisterLib.cli.process_memory import keep_freed_memory
agreed = keep_freed_memory() if sys.argv[1] == "keep" else None
first = bytearray(2**26)  # 64 MB (zeroed: touched), above glibc's largest mmap threshold
del first
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
again = bytearray(2**26)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"agreed": agreed, "faults": faults}))
"""
PAGES = 2**26 // 4096  # of 64 MB, at 4 KiB


def reallocate(mode: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", REALLOCATE, mode], capture_output=True, text=True, timeout=120
    )
    assert completed.returncode == 0, completed.stderr
    return json.loads(completed.stdout)


@pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="only glibc's allocator can be asked to keep memory"
)
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
