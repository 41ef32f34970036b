"""Keep the memory a registration frees inside its process, for its next stage to reuse.

glibc's allocator gives large blocks (above a threshold of 128 KiB, rising to 32 MiB) back to the
system as soon as they are freed, and trims the free top of its heap. Each stage of a registration
frees its working images and the next allocates new ones, so a ``fast`` run took about 280 000
fresh pages (1.1 GB) from the system, each zeroed by the kernel on first touch, for a peak of
about 0.9 GB. Where freed guest memory goes back to a virtual machine's host, a fresh page costs
far more: 6 s per GiB on the two-core benchmark machine. Kept, a run takes about 150 000; on
three fs-dev pairs its engine ran 0.7–1.4 s faster on two threads (see docs/history.md).

Only a process that lives for one registration may do this: the command line's ``register``
(and Slicer's child process, which runs it). Never in a caller's process (Slicer's own, a
notebook), whose memory is not ours to hold.
"""

from __future__ import annotations

import ctypes
import sys

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # mallopt's parameters, from glibc's <malloc.h>
_INT_MAX = 2**31 - 1  # mallopt takes an int: blocks above 2 GiB are still mapped apart


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
