"""Faults: SIGKILL at seeded points, SIGINT, and a full disk; ``--resume`` must equal an uninterrupted run.

The kill points come from the test-only hook ``SEMALIGN_FAULT_AT=<phase>:<n>`` (src/semalign/faults.py), which
is inert unless set. Each run is a real process (forked from a warm server, tests/reliability/_driver.py).
"""

from __future__ import annotations

import json
import random
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import mmlu_like, write_protocol_dir

from ._driver import run_cli
from .conftest import can_mount_tmpfs

STEPS = 5
SEED = 20260412
PHASES = {"attribution": 4, "step": STEPS, "checkpoint": STEPS, "export": 1, "eval": 3}  # passes per run


def kill_points(n: int = 11) -> list[str]:
    """Seeded: one point per phase, then random further points (no repeats)."""
    rng = random.Random(SEED)
    pool = [f"{ph}:{i}" for ph, k in PHASES.items() for i in range(1, k + 1)]
    chosen = [f"{ph}:{rng.randint(1, k)}" for ph, k in PHASES.items()]
    rest = [p for p in pool if p not in chosen]
    return chosen + rng.sample(rest, n - len(chosen))


@pytest.fixture(scope="module")
def env_(tmp_path_factory, tiny_dirs):
    root = tmp_path_factory.mktemp("faults")
    data = write_protocol_dir(root / "data", "mmlu", mmlu_like)
    (data / "mmlu").mkdir()
    rows = [{"id": f"ev{i}", "subject": "anatomy", "question": f"What is {i} + 1?",
             "choices": [str(i + 1), str(i + 2), str(i), str(i + 3)], "answer": "A"} for i in range(6)]
    (data / "mmlu" / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {"SEMALIGN_CACHE": str(root / "cache"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}

    def args(out: Path, *extra: str) -> list[str]:
        t, s = tiny_dirs
        return ["transfer", "--teacher", t, "--student", s, "--task", "mmlu", "--data-dir", data, "--output", out,
                "--steps", str(STEPS), "--batch-size", "4", "--micro-batch", "2", "--nll-examples", "3",
                "--lr", "1e-3", "--eval-tasks", "mmlu", "--eval-limit", "4", "-q",
                # one attribution pass per example (PHASES) and no stage cache, so every phase really runs
                "--semalign-attribution-batch", "1", "--no-cache", *extra]

    ref = root / "reference"
    rc, log = run_cli(args(ref), env, root / "reference.log")
    assert rc == 0, log
    return {"root": root, "args": args, "env": env, "ref": ref}


def _metrics(out: Path) -> list[dict]:
    keep = ("stage", "step", "loss", "layer_loss", "output_loss", "layer_loss_per_pair", "lr", "grad_norm", "tokens")
    return [{k: m.get(k) for k in keep} for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())]


def _results(out: Path) -> dict:
    r = json.loads((out / "results.json").read_text())
    scrub = ("wall_time_s", "cached", "date", "time", "timestamp", "output_dir", "path", "wall")

    def clean(x):
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if not any(s in k for s in scrub)}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x

    return {"nll": r["nll"], "eval": {m: clean(v.get("results", v)) for m, v in r["eval"].items()}}


def assert_same_as_reference(out: Path, ref: Path) -> None:
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert _metrics(out) == _metrics(ref)
    assert _results(out) == _results(ref)
    a, b = load_file(str(out / "student" / "model.safetensors")), load_file(str(ref / "student" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not list(out.rglob(".*.tmp-*")) and not list(out.rglob(".*.old"))


@pytest.mark.parametrize("point", kill_points())
def test_sigkill_then_resume_equals_uninterrupted(point, env_, tmp_path):
    out = tmp_path / "run"
    rc, log = run_cli(env_["args"](out), {**env_["env"], "SEMALIGN_FAULT_AT": point}, tmp_path / "killed.log")
    assert rc == -9, f"expected SIGKILL at {point}, got {rc}: {log[-2000:]}"
    summary = out / "summary.json"
    assert not summary.is_file() or json.loads(summary.read_text())["status"] != "completed"
    rc, log = run_cli(env_["args"](out, "--resume"), env_["env"], tmp_path / "resumed.log")
    assert rc == 0, log[-3000:]
    assert_same_as_reference(out, env_["ref"])


def test_sigint_leaves_interrupted_and_resumable(env_, tmp_path):
    out = tmp_path / "run"
    rc, log = run_cli(env_["args"](out), {**env_["env"], "SEMALIGN_FAULT_AT": "step:3", "SEMALIGN_FAULT_ACTION": "int"},
                      tmp_path / "int.log")
    assert rc == 130, log[-2000:]
    assert "Traceback" not in log and "--resume" in log
    assert json.loads((out / "summary.json").read_text())["status"] == "interrupted"
    assert json.loads((out / "checkpoints" / "v1" / "trainer_state.json").read_text())["step"] == 2
    assert not (out / "student").exists()
    rc, log = run_cli(env_["args"](out, "--resume"), env_["env"], tmp_path / "resumed.log")
    assert rc == 0, log[-3000:]
    assert_same_as_reference(out, env_["ref"])


@pytest.mark.parametrize("point", ["checkpoint:3", "export:1"])
def test_disk_full_keeps_last_good_state(point, env_, tmp_path):
    """ENOSPC injected while writing a checkpoint / the export: one line, status failed, last good state kept."""
    out = tmp_path / "run"
    rc, log = run_cli(env_["args"](out), {**env_["env"], "SEMALIGN_FAULT_AT": point, "SEMALIGN_FAULT_ACTION": "enospc"},
                      tmp_path / "full.log")
    errs = [ln for ln in log.splitlines() if ln.startswith("error: ")]
    assert rc == 2 and len(errs) == 1 and "no space left on device" in errs[0] and "Traceback" not in log, log[-2000:]
    assert json.loads((out / "summary.json").read_text())["status"] == "failed"
    assert not (out / "student").exists()
    step = json.loads((out / "checkpoints" / "v1" / "trainer_state.json").read_text())["step"]
    assert step == (2 if point.startswith("checkpoint") else STEPS)
    assert not list(out.rglob(".*.tmp-*"))
    rc, log = run_cli(env_["args"](out, "--resume"), env_["env"], tmp_path / "resumed.log")
    assert rc == 0, log[-3000:]
    assert_same_as_reference(out, env_["ref"])


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount a small tmpfs")
def test_real_full_disk_tmpfs(env_, tmp_path):
    """A 300 KB tmpfs as --output: the run fails with one line and never claims to be running or complete."""
    mnt = tmp_path / "small"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=300k", "tmpfs", str(mnt)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        out = mnt / "run"
        rc, log = run_cli(env_["args"](out), env_["env"], tmp_path / "tmpfs.log")
        errs = [ln for ln in log.splitlines() if ln.startswith("error: ")]
        assert rc == 2 and len(errs) == 1 and "no space left on device" in errs[0] and "Traceback" not in log, log[-2000:]
        s = out / "summary.json"
        assert not s.exists() or json.loads(s.read_text())["status"] == "failed"
        student = out / "student"
        if student.exists():  # only a complete, reloadable export may exist
            from transformers import AutoModelForCausalLM

            AutoModelForCausalLM.from_pretrained(student)
        assert not list(out.rglob(".*.tmp-*"))
    finally:
        subprocess.run(["umount", str(mnt)])
