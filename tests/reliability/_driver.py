"""Run ``semalign`` CLI invocations in child processes forked from a warm forkserver (imports done once).

A real separate process is needed to SIGKILL a run; forking from a server that already imported torch,
transformers and semalign keeps each run at about a second on the tiny models.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
from pathlib import Path

_CTX = None


def _child(args: list[str], env: dict[str, str], log: str) -> None:
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    sys.stdout = open(1, "w", closefd=False, buffering=1)
    sys.stderr = open(2, "w", closefd=False, buffering=1)
    os.environ.update(env)
    for k in ("SEMALIGN_FAULT_AT", "SEMALIGN_FAULT_ACTION"):
        if k not in env:
            os.environ.pop(k, None)
    import torch

    torch.set_num_threads(1)
    from semalign.cli.main import main

    rc = main(args)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(rc)




def context():
    global _CTX
    if _CTX is None:
        _CTX = mp.get_context("forkserver")
        _CTX.set_forkserver_preload(["tests.reliability._warm"])
    return _CTX


def run_cli(args: list[str], env: dict[str, str], log: Path, timeout: float = 240) -> tuple[int, str]:
    """(exit code, combined output); a negative exit code is the signal that ended the process."""
    p = context().Process(target=_child, args=([str(a) for a in args], env, str(log)))
    p.start()
    p.join(timeout)
    if p.is_alive():
        p.kill()
        p.join()
        raise TimeoutError(f"run did not finish in {timeout}s: {args}")
    return p.exitcode, Path(log).read_text(errors="replace") if Path(log).exists() else ""
