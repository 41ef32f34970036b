"""The Slicer module's own parts beside its widget: parameter node, logic, PyTorch set-up, the
result views and the self-test. They need Slicer (qt, slicer); the registration itself is
DeepRegisterLib's, which runs without it.

A package rather than files beside DeepRegister.py, because Slicer takes every .py file in a
module folder for a module of its own (as DICOMLib and MONAIAuto3DSegLib are packages).
"""
