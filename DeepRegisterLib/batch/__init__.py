"""Many registrations at once, on this machine or a Dask cluster (``deepregister batch``).

An application package, beside ``cli/`` and ``mrml/``: it uses the registration pipeline and
never the command line. ``run_batch(jobs, out_dir, settings)`` is the Python entry point.
"""

from .jobs import BatchJob, check_jobs, jobs_from_csv, jobs_from_template
from .runner import BatchOutcome, run_batch

__all__ = [
    "BatchJob",
    "BatchOutcome",
    "check_jobs",
    "jobs_from_csv",
    "jobs_from_template",
    "run_batch",
]
