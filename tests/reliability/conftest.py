"""Helpers for the reliability suite (docs/reliability.md): every case asserts its exact outcome.

An outcome is either success with correct output, or: exit status 2, one ``error:`` line naming the problem and
the fix, no traceback, and nothing that looks complete when it is not (no completed summary.json, no reloadable
student/, no valid cache entry).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from semalign.cli.main import main
from tests.conftest import mmlu_like, write_protocol_dir


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every case gets its own SEMALIGN_CACHE (never the user's ~/.cache/semalign)."""
    monkeypatch.setenv("SEMALIGN_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SEMALIGN_FAULT_AT", raising=False)


def cli(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err.strip()


def incomplete(out: Path | None) -> bool:
    """True when ``out`` holds nothing that looks like a finished run."""
    if out is None or not Path(out).exists():
        return True
    s = Path(out) / "summary.json"
    if s.is_file() and json.loads(s.read_text()).get("status") == "completed":
        return False
    return not (Path(out) / "student" / "config.json").is_file()


def refused(rc: int, err: str, *needles: str, out: Path | None = None) -> bool:
    """Exit 2, exactly one ``error:`` line containing every needle, no traceback, no complete-looking output."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    errs = [ln for ln in lines if ln.startswith("error: ")]
    ok = (rc == 2 and len(errs) == 1 and "Traceback" not in err and all(n in errs[0] for n in needles)
          and incomplete(out))
    if not ok:
        print(f"rc={rc} err={err!r} needles={needles}")
    return ok


def transfer_args(teacher, student, data_dir, out, *extra, task: str = "mmlu") -> list[str]:
    return ["transfer", "--teacher", str(teacher), "--student", str(student), "--task", task,
            "--data-dir", str(data_dir), "--output", str(out), "--steps", "2", "--batch-size", "4",
            "--micro-batch", "2", "--nll-examples", "2", "--lr", "1e-3", "-q", *[str(e) for e in extra]]


@pytest.fixture
def fresh_data(tmp_path) -> Path:
    return write_protocol_dir(tmp_path / "data", "mmlu", mmlu_like)


def split_file(root: Path, name: str = "align") -> Path:
    return root / "pkt-splits" / "mmlu" / f"mmlu_{name}_split.jsonl"


def can_mount_tmpfs() -> bool:
    return os.geteuid() == 0 and Path("/proc/filesystems").is_file() and "tmpfs" in Path("/proc/filesystems").read_text()
