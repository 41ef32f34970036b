"""DeepRegister: deep-learning deformable registration of medical images.

``register(fixed, moving, ...)`` is the entry point for Python users; ``deepregister`` is the
command line; :mod:`DeepRegisterLib.mrml` bridges results into a Slicer (MRML) scene.
"""

__version__ = "0.1.0"
