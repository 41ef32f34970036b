"""DeepRegister: deep-learning deformable registration of medical images.

``register(fixed, moving, settings)`` is the entry point for Python users, with
:class:`RegistrationSettings` saying how, and ``apply_transform`` warps more images with its
transform; ``deepregister`` is the command line; :mod:`DeepRegisterLib.mrml` bridges results
into a Slicer (MRML) scene.

The packages follow the data flow, every import pointing down: applications (``cli``, ``mrml``)
→ the registration pipeline and its neighbours (``registration``, ``evaluation``, ``training``)
→ foundations (``nn``, ``imaging``, ``errors``).
"""

from .registration.settings import RegistrationSettings

__version__ = "0.1.0"
__all__ = ["RegistrationSettings", "__version__", "apply_transform", "register"]


def __getattr__(name: str):
    """``register`` and ``apply_transform`` on first use: importing the package (and so
    ``deepregister --help``) must import neither torch nor SimpleITK."""
    if name == "register":
        from .registration.engine import register

        return register
    if name == "apply_transform":
        from .imaging.apply_transform import apply_transform

        return apply_transform
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
