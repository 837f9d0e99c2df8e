"""Test-only fault injection, inert unless ``SEMALIGN_FAULT_AT`` is set (docs/reliability.md).

``SEMALIGN_FAULT_AT=<phase>:<n>`` makes the process fail the ``n``-th time (1-based) it passes the named point;
``SEMALIGN_FAULT_ACTION`` says how: ``kill`` (SIGKILL itself, the default: no cleanup runs), ``int`` (SIGINT:
the Ctrl-C path) or ``enospc`` (raise ``OSError(ENOSPC)``, as a full disk would). Points in the package:

* ``attribution``  after each teacher attribution example
* ``step``         after a training step's update, before its checkpoint is written
* ``checkpoint``   inside the checkpoint write, after the state file, before the directory is published
* ``export``       inside the student export, after the weights, before the directory is published
* ``eval``         before each benchmark of each evaluated model

Counting is per process, so a resumed run counts from zero again (and normally runs with the variable unset).
"""

from __future__ import annotations

import errno
import os
import signal

ENV = "SEMALIGN_FAULT_AT"
ACTION_ENV = "SEMALIGN_FAULT_ACTION"
_counts: dict[str, int] = {}


def fault_point(phase: str) -> None:
    """Count a pass through ``phase``; trigger the configured fault when it is the configured pass."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    want, _, n = spec.partition(":")
    if want != phase:
        return
    _counts[phase] = _counts.get(phase, 0) + 1
    if _counts[phase] != int(n or 1):
        return
    action = os.environ.get(ACTION_ENV, "kill")
    if action == "enospc":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f"<injected at {spec}>")
    os.kill(os.getpid(), signal.SIGINT if action == "int" else signal.SIGKILL)
