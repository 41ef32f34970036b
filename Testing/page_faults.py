"""What a process takes afresh from the system: the minor page faults of allocating 64 MB again
after freeing them (test_process_memory in a fresh interpreter, test_batch in a Dask worker)."""

from __future__ import annotations

import platform
import resource

import pytest

BLOCK = 2**26  # 64 MB: above glibc's largest mmap threshold
PAGES = BLOCK // 4096  # at 4 KiB
only_glibc = pytest.mark.skipif(
    platform.libc_ver()[0] != "glibc", reason="only glibc's allocator can be asked to keep memory"
)


def reallocation_faults() -> int:
    """Minor page faults of allocating BLOCK bytes (zeroed: touched) again after freeing them."""
    first = bytearray(BLOCK)
    del first
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    again = bytearray(BLOCK)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    del again
    return faults
