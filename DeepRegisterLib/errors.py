"""Exceptions that carry a message a user can act on.

Every error raised for bad input is an :class:`InputError` (a ``ValueError``) whose text says what
is wrong and what to do; callers (CLI, Slicer module) show it verbatim.
"""

from __future__ import annotations

from collections.abc import Callable


class DeepRegisterError(Exception):
    """Base class of every error this package raises on purpose."""


class InputError(DeepRegisterError, ValueError):
    """An input image, mask, label map, transform or option cannot be used as given."""


class ModelError(DeepRegisterError):
    """A model is missing, corrupt, tampered with, or does not fit the images."""


class ResourceError(DeepRegisterError, MemoryError):
    """The run would not fit in the memory available; the message says how to proceed."""


class RegistrationCancelled(DeepRegisterError):
    """The caller asked to stop; nothing was written or changed."""


def stop_if_cancelled(is_cancelled: Callable[[], bool] | None, where: str) -> None:
    """Raise :class:`RegistrationCancelled` ("registration cancelled <where>") when asked to."""
    if is_cancelled is not None and is_cancelled():
        raise RegistrationCancelled(f"registration cancelled {where}")
