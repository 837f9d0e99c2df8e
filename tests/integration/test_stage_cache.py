"""The stage cache end to end: a second transfer reuses attribution and the held-out NLL; --no-cache stores
nothing; `semalign cache ls | du | clear`."""

from __future__ import annotations

import json
import os
import time

import pytest

from semalign.cache import stage_cache
from semalign.cli.main import main


def _args(tiny_dirs, data_dir, out, *extra):
    t, s = tiny_dirs
    return ["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir", str(data_dir),
            "--output", str(out), "--steps", "1", "--batch-size", "4", "--micro-batch", "2", "--nll-examples", "4",
            "--lr", "1e-3", "-q", *extra]


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_second_transfer_reuses_attribution_and_nll(tiny_dirs, data_dir, tmp_path, private_cache, monkeypatch):
    import semalign.methods.semalign.common as common
    import semalign.transfer as transfer

    calls = {"nll": 0}
    real_nll = transfer.measure_nll

    def counting_nll(*a, **k):
        calls["nll"] += 1
        return real_nll(*a, **k)

    monkeypatch.setattr(transfer, "measure_nll", counting_nll)
    assert main(_args(tiny_dirs, data_dir, tmp_path / "a")) == 0
    assert calls["nll"] == 3  # teacher, student before, student after
    assert {r["stage"] for r in stage_cache().ls()} == {"attribution", "nll", "teacher_targets"}
    n_entries = len(stage_cache().ls())

    def no_attribution(*a, **k):
        raise AssertionError("attribution recomputed despite the cache")

    real_attr = common.attribute_layers
    monkeypatch.setattr(common, "attribute_layers", no_attribution)
    assert main(_args(tiny_dirs, data_dir, tmp_path / "b")) == 0
    assert calls["nll"] == 4  # only the transferred student
    assert len(stage_cache().ls()) == n_entries
    a, b = (json.loads((tmp_path / r / "results.json").read_text())["nll"] for r in "ab")
    assert a["teacher"] == b["teacher"] and a["student_before"] == b["student_before"]
    sa, sb = (json.loads((tmp_path / r / "attribution" / "teacher.json").read_text()) for r in "ab")
    assert sa["scores"] == sb["scores"]

    # --no-cache: everything recomputed, nothing stored
    monkeypatch.setattr(common, "attribute_layers", real_attr)
    assert main(_args(tiny_dirs, data_dir, tmp_path / "c", "--no-cache")) == 0
    assert calls["nll"] == 7 and len(stage_cache().ls()) == n_entries


def test_cache_cli_ls_du_clear(private_cache, capsys):
    c = stage_cache()
    old = c.put("nll", c.key("nll", "1", {"i": 0}), None, {"inputs": {"i": 0}}, {"nll": 1.0})
    os.utime(old.path, (time.time() - 30 * 86400,) * 2)
    new = c.put("eval", c.key("eval", "1", {"i": 1}), None, {"inputs": {"i": 1}}, {"result": {}})
    capsys.readouterr()
    assert main(["cache", "ls"]) == 0
    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[1].endswith(new.key) and lines[2].endswith(old.key) and "2 entries" in out  # whole, newest first
    assert main(["cache", "ls", "--json", "--stage", "nll"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["key"] for r in rows] == [old.key] and rows[0]["inputs"] == {"i": 0}
    assert main(["cache", "du"]) == 0
    out = capsys.readouterr().out
    assert "total" in out and "SEMALIGN_CACHE_MAX_GB" in out and str(c.root) in out
    assert main(["cache", "clear", "--older-than", "7d"]) == 0
    assert "deleted 1 entries" in capsys.readouterr().out
    assert [r["key"] for r in c.ls()] == [new.key]
    assert main(["cache", "clear", "--older-than", "soon"]) == 2
    assert "7d" in capsys.readouterr().err
    assert main(["cache", "clear"]) == 0 and c.ls() == []
