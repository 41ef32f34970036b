"""Keep the memory a registration frees inside its process, for its next stage (or job) to reuse.

glibc gives large freed blocks (above 128 KiB, rising to 32 MiB) straight back to the system and
trims its heap's free top, so each stage of a run took its working images from fresh pages, which
the kernel zeroes on first touch and a virtual machine's host may first have to supply again
(6 s per GiB on the two-core benchmark machine). Kept, a ``fast`` run takes about 150 000 fresh
pages instead of 240 000–320 000, and its engine 5.9–6.9 s instead of 6.6–7.6 s on one fs-dev
pair; a process registering one pair after another, about 100 000 a pair instead of 300 000
(docs/history.md).

Only processes that exist to register may ask: ``deepregister register``'s (Slicer's child
process runs it too) and the workers of the local Dask cluster that ``deepregister batch``
starts. Never a caller's process (Slicer's own, a notebook, a cluster we were handed): its
memory is not ours to hold.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's <malloc.h>
_INT_MAX = 2**31 - 1  # mallopt takes an int: blocks above 2 GiB are still mapped apart
#: The same request to glibc, for a process about to start (glibc reads it at start-up).
KEPT_MEMORY_ENVIRONMENT = {
    "MALLOC_MMAP_THRESHOLD_": str(_INT_MAX),
    "MALLOC_TRIM_THRESHOLD_": str(_INT_MAX),
}


def keep_freed_memory() -> bool:
    """Ask the C library to keep freed memory for reuse; whether it agreed. Only glibc can be
    asked: elsewhere (macOS, Windows, musl) nothing changes and this is False."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's own C library
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    # Both, or neither takes effect as meant: a fixed trim threshold alone also stops the mmap
    # threshold rising, and every block above 128 KiB is then mapped anew (3.5 M faults a run).
    kept_blocks = mallopt(M_MMAP_THRESHOLD, _INT_MAX) == 1
    return kept_blocks and mallopt(M_TRIM_THRESHOLD, _INT_MAX) == 1
