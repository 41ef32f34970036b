"""Torch's import begun on a thread as soon as a process knows it will register.

Every stage after the affine one needs torch, and in a fresh process (the command line,
Slicer's child) its import is about a second of one core, which the affine stage (compiled,
without torch) and the reads spend beside it: the longest wait before the network. Nothing
here imports more than the standard library, so a command line can start that import before it
imports SimpleITK and numpy; its header checks and reads overlap it, as ITK releases the
interpreter lock while it works.
"""

from __future__ import annotations

import gc
import importlib
import threading

_loader: threading.Thread | None = None  # once a process


def load_torch_beside() -> None:
    """Start importing torch and the engine's torch half (once a process) on a daemon thread.
    Nothing waits for the thread: the first stage that needs a module imports it as usual,
    which waits for this import to end, or raises its error."""
    global _loader
    if _loader is not None:
        return

    def load() -> None:
        # The cyclic garbage collector paused meanwhile: the import makes some 220 000 objects
        # and little garbage, and each full collection walks them all (and SimpleITK's),
        # holding the interpreter lock. Three full and thirty partial ones took 0.19 s of a
        # `fast` command's critical path.
        collecting = gc.isenabled()
        gc.disable()
        try:
            # torch first: the engine's modules would import numpy and SimpleITK before it,
            # which the main thread is importing anyway.
            for name in ("torch", f"{__package__}.deformable"):
                importlib.import_module(name)
        except Exception:  # the stage's own import raises it, where it can be handled
            pass
        finally:
            if collecting:
                gc.enable()

    _loader = threading.Thread(target=load, name="deepregister-load-torch", daemon=True)
    _loader.start()


def torch_is_loading() -> bool:
    """Whether :func:`load_torch_beside`'s import is still running: until it ends, work that
    needs no torch has a core to itself (a warm process has none of this to wait for)."""
    return _loader is not None and _loader.is_alive()
