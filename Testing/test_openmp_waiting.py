"""Processes that exist to register shorten OpenMP's spin between operations, before torch
loads it, and leave a caller's process and a user's own choice alone (see openmp_waiting)."""

from __future__ import annotations

import io
import os
import subprocess
import sys

import pytest

from DeepRegisterLib import openmp_waiting
from DeepRegisterLib.cli import standby
from DeepRegisterLib.openmp_waiting import SHORT_WAIT_ENVIRONMENT, short_wait_environment

CHOICES = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def fresh_python(code: str, **environment: str) -> subprocess.CompletedProcess:
    """``code`` in a new interpreter, with ``environment`` and no OpenMP wait of the user's."""
    env = {name: value for name, value in os.environ.items() if name not in CHOICES}
    env.update(environment)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120
    )


def test_torchs_openmp_reads_the_short_wait():
    """OpenMP reads its environment when torch loads it: set before, it is what OpenMP uses."""
    completed = fresh_python(
        "from DeepRegisterLib.openmp_waiting import wait_briefly\n"
        "print(wait_briefly())\n"
        "import torch\n"
        "torch.ones(4).sum()\n",
        OMP_DISPLAY_ENV="VERBOSE",
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == "True"
    if "GOMP_SPINCOUNT" not in completed.stderr:
        pytest.skip("torch's OpenMP here is not GNU OpenMP: it reads no GOMP_SPINCOUNT")
    assert f"GOMP_SPINCOUNT = '{SHORT_WAIT_ENVIRONMENT['GOMP_SPINCOUNT']}'" in completed.stderr


@pytest.mark.parametrize("choice", [("GOMP_SPINCOUNT", "300000"), ("OMP_WAIT_POLICY", "ACTIVE")])
def test_a_users_own_wait_is_kept(choice):
    name, value = choice
    completed = fresh_python(
        "import os\n"
        "from DeepRegisterLib.openmp_waiting import short_wait_environment, wait_briefly\n"
        "print(wait_briefly(), short_wait_environment(), os.environ.get('GOMP_SPINCOUNT'))\n",
        **{name: value},
    )
    assert completed.returncode == 0, completed.stderr
    expected = value if name == "GOMP_SPINCOUNT" else None
    assert completed.stdout.strip() == f"False {{}} {expected}"


def test_too_late_once_torch_is_loaded(monkeypatch):
    """This process has imported torch: its OpenMP has read its environment, which stays."""
    import torch  # noqa: F401

    for name in CHOICES:
        monkeypatch.delenv(name, raising=False)
    assert openmp_waiting.wait_briefly() is False
    assert "GOMP_SPINCOUNT" not in os.environ
    assert short_wait_environment() == SHORT_WAIT_ENVIRONMENT  # for a process still to start


@pytest.mark.parametrize(
    ("environment", "brief"),
    [
        ({}, False),
        ({"GOMP_SPINCOUNT": "10000"}, True),
        ({"GOMP_SPINCOUNT": "300000"}, False),
        ({"GOMP_SPINCOUNT": "lots"}, False),
        ({"OMP_WAIT_POLICY": "passive"}, True),
        ({"OMP_WAIT_POLICY": "ACTIVE"}, False),
    ],
)
def test_whether_openmp_waits_briefly_is_read_from_the_environment(environment, brief, monkeypatch):
    monkeypatch.setattr(sys, "platform", "linux")
    for name in CHOICES:
        monkeypatch.delenv(name, raising=False)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    assert openmp_waiting.waits_briefly() is brief


def test_other_openmps_are_taken_to_spin_long(monkeypatch):
    """macOS's and Windows' OpenMP read no GOMP_SPINCOUNT."""
    monkeypatch.setenv("GOMP_SPINCOUNT", "10000")
    for system in ("darwin", "win32"):
        monkeypatch.setattr(sys, "platform", system)
        assert openmp_waiting.waits_briefly() is False


def test_the_command_line_waits_briefly_before_anything_else():
    """``deepregister`` sets the wait before it even parses its arguments (``--version``)."""
    completed = fresh_python(
        "import atexit, os\n"
        "atexit.register(lambda: print(os.environ.get('GOMP_SPINCOUNT')))\n"
        "from DeepRegisterLib.cli.main import run\n"
        "run(['--version'])\n"
    )
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.splitlines()[-1] == SHORT_WAIT_ENVIRONMENT["GOMP_SPINCOUNT"]


def test_slicers_standby_child_waits_briefly_before_loading_torch(monkeypatch):
    """The Slicer module's child (``python -m DeepRegisterLib.cli.standby``) asks first."""
    from DeepRegisterLib.registration import torch_loading

    calls: list[str] = []
    monkeypatch.setattr(openmp_waiting, "wait_briefly", lambda: calls.append("wait"))
    monkeypatch.setattr(torch_loading, "load_torch_beside", lambda: calls.append("torch"))
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))  # its parent let it go: it ends
    standby.main()
    assert calls == ["wait", "torch"]
