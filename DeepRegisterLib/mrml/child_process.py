"""The child processes that run registrations for the Slicer module, each started before its job.

A child is ``python -m DeepRegisterLib.cli.standby`` in a private temporary folder: it loads
Python, the library and torch (a second or more; several on some Slicer installs), then waits for
its command line on stdin. :func:`startStandby` starts one while the user is still choosing
volumes, so that Apply finds it loaded; :func:`takeChild` hands it to a run, or starts a child
then. Its stdout (progress JSON lines) and stderr go to files in its folder, where the run also
writes its inputs and the child its outputs; :meth:`ChildProcess.end` removes the folder.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

#: How long a child asked to end may take after SIGTERM before it is killed.
CANCEL_GRACE_S = 0.5
PROGRESS_FILE, STDERR_FILE = "progress.jsonl", "stderr.txt"
_LIBRARY_PARENT = str(Path(__file__).resolve().parents[2])  # the folder holding DeepRegisterLib


class ChildProcess:
    """One child: started at once, waiting for the command line :meth:`run` sends it."""

    def __init__(self, python: str):
        self.python = python
        self.folder = Path(tempfile.mkdtemp(prefix="DeepRegister-"))
        try:
            with (
                open(self.folder / PROGRESS_FILE, "wb") as stdout,
                open(self.folder / STDERR_FILE, "wb") as stderr,
            ):
                self.process = subprocess.Popen(
                    [python, "-m", "DeepRegisterLib.cli.standby"],
                    stdin=subprocess.PIPE,
                    stdout=stdout,
                    stderr=stderr,
                    cwd=self.folder,
                    env=_childEnvironment(),
                    creationflags=getattr(subprocess, "CREATE_NO_WINDOW", 0),
                )
        except BaseException:
            shutil.rmtree(self.folder, ignore_errors=True)
            raise
        self.sent = False

    @property
    def waiting(self) -> bool:
        """Alive and not yet given a command line."""
        return not self.sent and self.process.poll() is None

    def run(self, arguments: list[str]) -> None:
        """Send ``deepregister``'s arguments. A child that has ended meanwhile (killed, or its
        interpreter failed) cannot take them: its exit code and stderr then say why."""
        self.sent = True
        with contextlib.suppress(OSError):  # a broken pipe: the child has ended
            self.process.stdin.write((json.dumps(arguments) + "\n").encode("utf-8"))
            self.process.stdin.close()

    def end(self) -> None:
        """End the child (terminate, then kill after CANCEL_GRACE_S) and remove its folder."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(CANCEL_GRACE_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        with contextlib.suppress(OSError):  # the pipe of a child that never got its line
            self.process.stdin.close()
        shutil.rmtree(self.folder, ignore_errors=True)


_standby: dict[str, ChildProcess] = {}  # interpreter → its waiting child


def startStandby(python: str) -> ChildProcess:
    """The waiting child of ``python``, started now unless one is already waiting."""
    child = _standby.get(python)
    if child is None or not child.waiting:
        if child is not None:
            child.end()
        child = _standby[python] = ChildProcess(python)
    return child


def takeChild(python: str) -> ChildProcess:
    """A child of ``python`` for a run: the waiting one if there is one, else a new one."""
    child = _standby.pop(python, None)
    if child is not None and child.waiting:
        return child
    if child is not None:
        child.end()
    return ChildProcess(python)


def endStandby() -> None:
    """End every waiting child: the module is closed, or Slicer is."""
    while _standby:
        _standby.popitem()[1].end()


atexit.register(endStandby)


def _childEnvironment() -> dict[str, str]:
    """This environment, with the folder holding DeepRegisterLib first on the Python path."""
    env = dict(os.environ)
    paths = [_LIBRARY_PARENT, *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env
