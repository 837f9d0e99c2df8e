"""End to end: `semalign transfer` on the tiny pair -> export -> stock reload -> equal logits; resume; errors."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from semalign.cli.main import main


def _args(tiny_dirs, data_dir, out, *extra):
    t, s = tiny_dirs
    return ["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir", str(data_dir),
            "--output", str(out), "--steps", "2", "--batch-size", "4", "--micro-batch", "2", "--nll-examples", "4",
            "--lr", "1e-3", "-q", *extra]


def test_transfer_export_reload(tiny_dirs, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_dirs, data_dir, out)) == 0
    for name in ("config.resolved.yaml", "command.txt", "env.json", "data_manifest.json", "layer_map.json",
                 "attribution/teacher.json", "metrics.jsonl", "summary.json", "results.json", "report.md",
                 "student/config.json", "student/model.safetensors", "semantic_map/M.safetensors",
                 "plots/loss.png", "plots/layer_map.png"):
        assert (out / name).exists(), name
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert summary["roundtrip"]["equal"]
    lm = json.loads((out / "layer_map.json").read_text())
    assert lm["pairs"] and 1 <= lm["pairs"][0]["student_layer"] <= 2
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    # stock reload differs from the original student (the paired layer moved) and loads without semalign
    reloaded = AutoModelForCausalLM.from_pretrained(out / "student")
    original = AutoModelForCausalLM.from_pretrained(tiny_dirs[1])
    k = lm["pairs"][0]["student_layer"] - 1
    w_new = reloaded.model.layers[k].mlp.down_proj.weight
    w_old = original.model.layers[k].mlp.down_proj.weight
    assert not torch.equal(w_new, w_old.to(w_new.dtype))
    other = 1 - k
    assert torch.equal(reloaded.model.layers[other].mlp.down_proj.weight, original.model.layers[other].mlp.down_proj.weight.to(w_new.dtype))
    nll = json.loads((out / "results.json").read_text())["nll"]
    assert set(nll) == {"teacher", "student_before", "student_after"}


def test_existing_output_refused_then_resume(tiny_dirs, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(tiny_dirs, data_dir, out)) == 0
    capsys.readouterr()
    assert main(_args(tiny_dirs, data_dir, out)) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err and len(err.strip().splitlines()) == 1
    # resume of a finished run redoes nothing harmful and keeps 2 steps of metrics
    assert main(_args(tiny_dirs, data_dir, out, "--resume")) == 0
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]


def test_resume_equals_uninterrupted(tiny_dirs, data_dir, tmp_path, monkeypatch):
    full = tmp_path / "full"
    assert main(_args(tiny_dirs, data_dir, full, "--steps", "3")) == 0
    # interrupt after step 2
    from semalign.methods.semalign import recipe

    calls = {"n": 0}
    orig = recipe.save_checkpoint

    def boom(*a, **k):
        orig(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(recipe, "save_checkpoint", boom)
    part = tmp_path / "part"
    assert main(_args(tiny_dirs, data_dir, part, "--steps", "3")) == 130
    monkeypatch.setattr(recipe, "save_checkpoint", orig)
    assert json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    assert main(_args(tiny_dirs, data_dir, part, "--steps", "3", "--resume")) == 0
    a = [json.loads(line)["loss"] for line in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(line)["loss"] for line in (part / "metrics.jsonl").read_text().splitlines()]
    assert a == pytest.approx(b, rel=1e-5)
    wa = AutoModelForCausalLM.from_pretrained(full / "student").state_dict()
    wb = AutoModelForCausalLM.from_pretrained(part / "student").state_dict()
    assert all(torch.allclose(wa[k], wb[k], atol=1e-6) for k in wa)


def test_transfer_with_benchmark_table(tiny_dirs, tmp_path, capsys, monkeypatch):
    """--eval-tasks evaluates teacher / before / after and prints the gap-closed table (fixture MMLU)."""
    import shutil
    from pathlib import Path

    from tests.conftest import mmlu_like, write_protocol_dir

    monkeypatch.setenv("SEMALIGN_CACHE", str(tmp_path / "cache"))
    root = write_protocol_dir(tmp_path / "data", "mmlu", mmlu_like)
    fx = Path(__file__).resolve().parents[1] / "fixtures" / "eval" / "mmlu"
    shutil.copytree(fx, root / "mmlu")
    out = tmp_path / "run"
    t, s = tiny_dirs
    rc = main(["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir", str(root),
               "--output", str(out), "--steps", "1", "--batch-size", "4", "--micro-batch", "2", "--nll-examples", "2",
               "--eval-tasks", "mmlu", "--eval-limit", "4"])
    printed = capsys.readouterr().out
    assert rc == 0
    results = json.loads((out / "results.json").read_text())
    assert set(results["eval"]) == {"teacher", "student_before", "student_after"}
    assert results["eval"]["teacher"]["results"]["mmlu"]["n"] == 4
    report = (out / "report.md").read_text()
    assert "gap closed" in report.lower() and "gap closed" in printed.lower()
    for who in ("teacher", "student_before", "student_after"):
        assert (out / "eval" / who / "results.json").is_file()
    # paired statistics of after vs before on the same questions, in results.json, report and the printout
    p = results["paired"]["mmlu"]
    assert p["n"] == 4 and p["fixed"] + p["broken"] + p["both_correct"] + p["both_wrong"] == 4
    assert 0 <= p["mcnemar_p"] <= 1 and len(p["ci95"]) == 2 and "prior_corrected" in p
    assert "McNemar p" in report and "prior-corrected" in report and "knowledge vs format" in report
    assert "McNemar p" in printed
