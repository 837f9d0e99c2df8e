"""Frozen-prefix training (issue 10 item 3) gives the full path's layer map, losses and trained student.

Each case runs the same seeded transfer twice on a tiny pair, ``--fast-path`` (default) and ``--no-fast-path``,
and compares layer maps, per-step losses and gradient norms, and the exported student tensor by tensor.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from semalign.cli.main import main
from semalign.testing import save_tiny_pair

GEMMA3 = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
          "sliding_window": 8}


@pytest.fixture(scope="module")
def deep_pairs(tmp_path_factory):
    """Tiny pairs with a 4-block student, so the paired block usually has a frozen prefix below it."""
    out = {}
    for fam in ("llama", "qwen2"):
        out[fam] = save_tiny_pair(tmp_path_factory.mktemp(f"deep-{fam}"), fam, teacher_layers=6, student_layers=4)
    return out


def _transfer(pair, data_dir, out, *extra) -> tuple[dict, list[dict], dict]:
    t, s = pair
    rc = main(["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir", str(data_dir),
               "--output", str(out), "--steps", "3", "--batch-size", "4", "--micro-batch", "2", "--nll-examples", "2",
               "--lr", "1e-3", "--dtype", "fp32", "--seed", "3", "-q", *extra])
    assert rc == 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return (json.loads((out / "layer_map.json").read_text()), metrics,
            load_file(str(out / "student" / "model.safetensors")))


def _compare(fast, full, tol=2e-5):
    (lm_a, m_a, w_a), (lm_b, m_b, w_b) = fast, full
    assert lm_a["pairs"] == lm_b["pairs"]
    assert len(m_a) == len(m_b)
    for a, b in zip(m_a, m_b):
        for key in ("loss", "layer_loss", "output_loss", "grad_norm"):
            assert abs(a[key] - b[key]) <= tol * max(1.0, abs(b[key])), (key, a[key], b[key])
    assert w_a.keys() == w_b.keys()
    worst = max(float((w_a[n].float() - w_b[n].float()).abs().max()) for n in w_a)
    assert worst < 1e-5, worst
    return worst


@pytest.mark.parametrize("fam", ["llama", "qwen2"])
def test_v1_fast_equals_full(deep_pairs, data_dir, tmp_path, fam, one_thread):
    fast = _transfer(deep_pairs[fam], data_dir, tmp_path / "fast")
    full = _transfer(deep_pairs[fam], data_dir, tmp_path / "full", "--no-fast-path")
    _compare(fast, full)
    info = fast[1][-1]["fast_path"]
    assert info["active"] and info["k"] == fast[0]["pairs"][0]["student_layer"]
    assert info["computed"] + info["hits"] == 4 * 3  # every example's prefix came from the store or was computed
    assert not full[1][-1]["fast_path"]["active"]


def test_v1_fast_equals_full_gemma3(tmp_path, data_dir, one_thread):
    from semalign.testing import tiny_pair

    teacher, student, tok = tiny_pair("gemma3", teacher_layers=6, student_layers=4)
    student = type(student)(type(student.config)(**{**student.config.to_dict(), **GEMMA3}))
    root = tmp_path / "pair"
    for name, m in (("teacher", teacher), ("student", student)):
        m.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    pair = (root / "teacher", root / "student")
    _compare(_transfer(pair, data_dir, tmp_path / "fast", "--semalign-layer-positions", "response"),
             _transfer(pair, data_dir, tmp_path / "full", "--semalign-layer-positions", "response", "--no-fast-path"))


def test_frontier_fast_equals_full(deep_pairs, data_dir, tmp_path, one_thread):
    """Every stage has its own boundary (k = 1..4); kl_source reads teacher logits at the response rows only."""
    args = ("--method", "semalign-frontier", "--frontier-steps-per-stage", "1", "--frontier-output-loss", "kl_source")
    fast = _transfer(deep_pairs["qwen2"], data_dir, tmp_path / "fast", *args)
    full = _transfer(deep_pairs["qwen2"], data_dir, tmp_path / "full", *args, "--no-fast-path")
    _compare(fast, full)
    assert [m["fast_path"]["k"] for m in fast[1]] == [1, 2, 3, 4]


def test_transfer_eval_incremental_equals_full(deep_pairs, data_dir, tmp_path, one_thread):
    """`make demo`'s shape: MMLU before/after; the after-evaluation reuses the before-states (item 4)."""
    import shutil
    from pathlib import Path

    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    shutil.copytree(Path(__file__).resolve().parents[1] / "fixtures" / "eval" / "mmlu", data / "mmlu")
    extra = ("--eval-tasks", "mmlu", "--eval-limit", "8")
    _transfer(deep_pairs["qwen2"], data, tmp_path / "fast", *extra)
    _transfer(deep_pairs["qwen2"], data, tmp_path / "full", *extra, "--no-fast-path")
    fast = json.loads((tmp_path / "fast" / "summary.json").read_text())
    full = json.loads((tmp_path / "full" / "summary.json").read_text())
    paired = json.loads((tmp_path / "fast" / "layer_map.json").read_text())["pairs"][0]["student_layer"]
    inc = fast["incremental_eval"]
    assert inc["lowest_changed_block"] == inc["start_block"] == paired  # read from the weights, not the map
    assert inc["suffix_batches"] > 0 and inc["full_batches"] == 0 and "incremental_eval" not in full

    def samples(run):
        rows = (run / "eval" / "student_after" / "samples_mmlu.jsonl").read_text().splitlines()
        return [(r["id"], r["pred"], r["logprobs"]) for r in map(json.loads, rows)]

    assert samples(tmp_path / "fast") == samples(tmp_path / "full")
