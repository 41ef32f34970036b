"""What the batch tests share: a jobs CSV written from rows, and this process's environment
kept across a LocalCluster (which writes its workers' variables, OMP_NUM_THREADS=1 and more,
into the process that starts it; later tests' child processes must not inherit them)."""

from __future__ import annotations

import csv
import os
from pathlib import Path

import pytest


def write_csv(path: Path, rows: list[dict[str, str]]) -> Path:
    """A jobs CSV whose header is every key of ``rows``, in first-seen order."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    with path.open("w", newline="") as stream:
        writer = csv.DictWriter(stream, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    return path


@pytest.fixture(autouse=True)
def environment_kept():
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)
