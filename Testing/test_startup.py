"""``deepregister --help`` and argument errors answer at once: no heavy library is imported.

Timing would be flaky on a shared machine, so the tests look at what a fresh interpreter has
imported after the command line answered: none of torch, matplotlib, SimpleITK or numpy.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = """
import json, sys
from DeepRegisterLib.cli.main import main
try:
    code = main(sys.argv[1:])
except SystemExit as stop:
    code = stop.code
heavy = ("torch", "matplotlib", "SimpleITK", "numpy")
print(json.dumps({"code": code, "heavy": [m for m in heavy if m in sys.modules]}))
"""


def imported_after(*argv: str) -> dict:
    completed = subprocess.run(
        [sys.executable, "-c", PROBE, *argv], capture_output=True, text=True, timeout=120
    )
    return json.loads(completed.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["register", "--help"],
        ["evaluate", "--help"],
        ["train", "--help"],
        ["demo", "--help"],
    ],
)
def test_help_imports_no_heavy_library(argv):
    outcome = imported_after(*argv)
    assert outcome == {"code": 0, "heavy": []}


@pytest.mark.parametrize(
    "argv",
    [
        ["register", "--fixed", "f.nii.gz"],  # argparse: --moving missing
        ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--preset", "fastest"],
        ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz"],  # nothing to write
        ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--warped", "w.jpg"],
        ["register", "--fixed", "f.nii.gz", "--moving", "m.nii.gz", "--report", "r.txt"],
    ],
)
def test_argument_errors_exit_2_without_a_heavy_library(argv):
    outcome = imported_after(*argv)
    assert outcome == {"code": 2, "heavy": []}
