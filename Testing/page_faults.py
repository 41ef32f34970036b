"""What a process takes afresh from the system: the minor page faults of allocating 64 MB, first or
again after freeing them, and the huge pages mapping them (test_process_memory in a fresh
interpreter, test_batch in a Dask worker)."""

from __future__ import annotations

import platform
import resource
from pathlib import Path

import pytest

BLOCK = 2**26  # 64 MB: above glibc's largest mmap threshold
PAGES = BLOCK // 4096  # at 4 KiB
only_glibc = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="only glibc's allocator can be asked to keep memory"
)

THP_MODES = Path("/sys/kernel/mm/transparent_hugepage/enabled")
only_huge_pages_on_request = pytest.mark.skipif(
    not THP_MODES.exists() or "[never]" in THP_MODES.read_text(),
    reason="this kernel maps no transparent huge pages, even on request",
)


def first_allocation() -> dict[str, int]:
    """Minor page faults, and kB of huge pages gained, while BLOCK bytes are allocated and
    touched (zeroed) for the first time."""
    before, huge = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, _anonymous_huge_kb()
    block = bytearray(BLOCK)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    gained = _anonymous_huge_kb() - huge
    del block
    return {"faults": faults, "huge_kb": gained}


def _anonymous_huge_kb() -> int:
    for line in Path("/proc/self/smaps_rollup").read_text().splitlines():
        if line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


def reallocation_faults() -> int:
    """Minor page faults of allocating BLOCK bytes (zeroed: touched) again after freeing them."""
    first = bytearray(BLOCK)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    again = bytearray(BLOCK)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del again
    return faults
