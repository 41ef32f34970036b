"""Benchmarks of DeepRegister against classical baselines (not part of the package)."""
