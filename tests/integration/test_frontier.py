"""semalign-frontier (reconstruction) on the tiny pair: every layer trained in order, each objective runs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from semalign.cli.main import main


@pytest.mark.parametrize("layer_loss,output_loss", [("relgeom", "kl_source"), ("fisher_logits", "kl_source"),
                                                    ("cosine", "cos_label")])
def test_frontier_runs_all_stages(tiny_dirs, data_dir, tmp_path, layer_loss, output_loss):
    t, s = tiny_dirs
    out = tmp_path / "run"
    rc = main(["transfer", "--method", "semalign-frontier", "--teacher", str(t), "--student", str(s), "--task", "mmlu",
               "--data-dir", str(data_dir), "--output", str(out), "--batch-size", "4", "--micro-batch", "2",
               "--frontier-steps-per-stage", "2", "--frontier-layer-loss", layer_loss,
               "--frontier-output-loss", output_loss, "--nll-examples", "2", "--lr", "1e-3", "-q"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["reconstruction"] is True
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["stage"] for m in metrics] == ["stage01", "stage01", "stage02", "stage02"]
    assert [m["step"] for m in metrics] == [1, 2, 3, 4]
    lm = json.loads((out / "layer_map.json").read_text())
    assert [p["student_layer"] for p in lm["pairs"]] == [1, 2]
    assert "RECONSTRUCTION" in (out / "report.md").read_text() or "Reconstruction" in (out / "report.md").read_text()
    new = AutoModelForCausalLM.from_pretrained(out / "student")
    old = AutoModelForCausalLM.from_pretrained(s)
    for k in range(2):  # every student layer moved
        a = new.model.layers[k].mlp.down_proj.weight
        assert not torch.equal(a, old.model.layers[k].mlp.down_proj.weight.to(a.dtype))
