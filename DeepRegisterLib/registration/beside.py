"""One worker thread for work that can run beside the main thread's stage.

The work beside needs neither the affine nor det J: planning the run and smoothing the
network's inputs beside the affine search, warping beside numpy's det J (one core).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent import futures
from typing import Any

from ..errors import stop_if_cancelled


class Beside:
    """The work is told to stop (the ``is_cancelled`` it is given as its last argument) only
    when the main thread leaves the block with an error, a cancel included; the main thread
    itself asks the user's cancel token while it waits for a result. Leaving always waits for
    the worker, so no work outlives the run.
    """

    def __init__(self, is_cancelled: Callable[[], bool], waiting_for: str):
        self._is_cancelled = is_cancelled
        self._waiting_for = waiting_for
        self._failed = threading.Event()
        self._pool = futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="deepregister")

    def __enter__(self) -> Beside:
        return self

    def submit(self, function: Callable[..., Any], *args: Any) -> futures.Future:
        return self._pool.submit(function, *args, self._failed.is_set)

    def failed(self, job: futures.Future) -> bool:
        """Whether ``job`` has ended in an error, for work on the main thread to stop on."""
        return job.done() and not job.cancelled() and job.exception() is not None

    def result(self, job: futures.Future) -> Any:
        while True:
            try:
                return job.result(timeout=0.1)
            except futures.TimeoutError:  # not the built-in one before Python 3.11
                stop_if_cancelled(self._is_cancelled, self._waiting_for)

    def __exit__(self, error_type, *_: object) -> None:
        if error_type is not None:
            self._failed.set()
        self._pool.shutdown(wait=True, cancel_futures=error_type is not None)
