"""Torch's CPU threads in a process forked from one that has run them.

GNU OpenMP cannot start a team of threads in a child forked after its parent ran one: the
child's first parallel operation, PyTorch's own or the compiled sampler's, waits for ever
(pytorch/pytorch#41197). A script that registers a pair and then maps the rest over a
``multiprocessing`` pool started by fork (Linux's default before Python 3.14) hung at 0 % CPU.
So once a process has begun a run, the children it forks later set torch to one thread, which
runs no team, and their runs say so in a note. A pool of processes on the cores wants one
thread each anyway; children started by 'spawn' or 'forkserver' keep what they are given.
"""

from __future__ import annotations

import os
from functools import cache

import torch

_forked_after_a_run = False


@cache
def guard() -> None:
    """From now on (once a process), a child forked from this one runs torch on one thread."""
    if hasattr(os, "register_at_fork"):  # not on Windows, which cannot fork
        os.register_at_fork(after_in_child=_one_thread)


def _one_thread() -> None:
    global _forked_after_a_run
    _forked_after_a_run = True
    torch.set_num_threads(1)


def note() -> str | None:
    """The note for a run in such a child (while it keeps one thread), or None."""
    if not _forked_after_a_run or torch.get_num_threads() != 1:
        return None
    return (
        "threads: this process was forked from one that had run torch's OpenMP threads, "
        "which cannot start again in a forked child, so it runs on one thread; start worker "
        "processes with 'spawn' or 'forkserver' to give each more"
    )
