"""DeepRegister: deep-learning deformable registration of medical images.

``register(fixed, moving, ...)`` is the entry point for Python users; ``deepregister`` is the
command line; :mod:`DeepRegisterLib.mrml` bridges results into a Slicer (MRML) scene.
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``registerVolumes`` (the Slicer console API) on first use, so that importing the package
    never needs ``slicer``."""
    if name == "registerVolumes":
        from .mrml.bridge import registerVolumes

        return registerVolumes
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
