"""How long PyTorch's OpenMP threads spin after an operation, waiting for the next one.

GNU OpenMP, PyTorch's on Linux, keeps each worker spinning for 300 000 rounds after every
parallel operation: about 14 ms on the two-core benchmark machine. The compiled grid sampler
(``nn.trilinear_sampler``) runs its ranges on threads of its own, which then share their cores
with spinning workers: its two threads ran no faster than one (13.5 ms a 2 mm forward pass
after any PyTorch operation, against 6.4 ms). With 10 000 rounds, `fast`'s optimisation took
1.5 s on two fs-dev pairs instead of 2.0–2.3 s; PyTorch's own sampler gained nothing either way,
and no wait at all (0 or 100 rounds) cost more than it saved (docs/history.md, forty-second
round).

OpenMP reads its environment once, when torch loads it, so the wait is set before torch is
imported, and only in processes that exist to register (as ``process_memory``): the
``deepregister`` command (Slicer's child process runs it too) and the workers of the local Dask
cluster that ``deepregister batch`` starts. Never a caller's process, nor a wait its user chose.
Where OpenMP spins long (a caller's process, macOS, Windows), the compiled sampler is not used:
in a loop of registrations in one such process its optimisation took 2.22 s against PyTorch's
1.96 s.
"""

from __future__ import annotations

import os
import sys

#: The wait, for this process or one about to start.
SHORT_WAIT_ENVIRONMENT = {"GOMP_SPINCOUNT": "10000"}
# Variables through which a user chooses OpenMP's wait: any of them set, ours is not.
_USERS_CHOICE = ("GOMP_SPINCOUNT", "OMP_WAIT_POLICY")


def wait_briefly() -> bool:
    """Set SHORT_WAIT_ENVIRONMENT for this process; whether it can take effect. It cannot once
    torch is imported (OpenMP has read its environment), nor where the user chose a wait."""
    if "torch" in sys.modules or _user_chose():
        return False
    os.environ.update(SHORT_WAIT_ENVIRONMENT)
    return True


def waits_briefly() -> bool:
    """Whether this process's OpenMP threads wait briefly between operations, as far as its
    environment tells: GNU OpenMP (Linux) with a spin count of at most SHORT_WAIT_ENVIRONMENT's,
    or a passive wait. Elsewhere, and in a caller's process that chose nothing, they spin long."""
    if not sys.platform.startswith("linux"):
        return False
    if os.environ.get("OMP_WAIT_POLICY", "").strip().lower() == "passive":
        return True
    spins = os.environ.get("GOMP_SPINCOUNT", "").strip()
    return spins.isdigit() and int(spins) <= int(SHORT_WAIT_ENVIRONMENT["GOMP_SPINCOUNT"])


def short_wait_environment() -> dict[str, str]:
    """SHORT_WAIT_ENVIRONMENT for processes about to start, unless the user chose a wait."""
    return {} if _user_chose() else dict(SHORT_WAIT_ENVIRONMENT)


def _user_chose() -> bool:
    return any(name in os.environ for name in _USERS_CHOICE)
