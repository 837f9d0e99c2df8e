"""The efficacy-study factors (issue 11): maps, output loss, what trains, control data and prompt tokens."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from semalign.cli.main import main


def _run(tiny_dirs, data_dir, out, *extra):
    t, s = tiny_dirs
    rc = main(["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir", str(data_dir),
               "--output", str(out), "--steps", "2", "--batch-size", "4", "--micro-batch", "2", "--nll-examples", "2",
               "--lr", "1e-3", "-q", *extra])
    return rc, (json.loads((out / "summary.json").read_text()) if (out / "summary.json").is_file() else {})


def test_random_orthogonal_map_is_semi_orthogonal():
    from semalign.methods.semalign.maps import random_orthogonal_map

    m = random_orthogonal_map(8, 12, seed=3).M
    assert m.shape == (8, 12)
    assert torch.allclose(m @ m.T, torch.eye(8), atol=1e-5)
    assert torch.equal(m, random_orthogonal_map(8, 12, seed=3).M)
    assert not torch.equal(m, random_orthogonal_map(8, 12, seed=4).M)


@pytest.mark.parametrize("kind", ["ridge", "random_orthogonal"])
def test_alternative_maps_train_end_to_end(tiny_dirs, data_dir, tmp_path, kind):
    rc, summary = _run(tiny_dirs, data_dir, tmp_path / kind, "--semalign-map", kind)
    assert rc == 0 and summary["status"] == "completed"
    assert summary["map"]["kind"] == kind and summary["semantic_map"]["shape"] == summary["map"]["shape"]
    if kind == "ridge":
        assert 0.0 < summary["map"]["in_sample_r2_uncentred"] <= 1.0
        assert "extract split" in summary["map"]["fitted_on"]


def test_ridge_target_is_closer_to_the_student_than_the_closed_form(tiny_dirs, data_dir, tmp_path):
    """The ridge map is fitted to predict the student's own states: its first-step layer loss is lower."""
    first = {}
    for kind in ("closed_form", "ridge"):
        out = tmp_path / kind
        rc, _ = _run(tiny_dirs, data_dir, out, "--semalign-map", kind, "--steps", "1")
        assert rc == 0
        first[kind] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["layer_loss"]
    assert first["ridge"] < first["closed_form"]


def test_ce_output_loss_and_layer_term_off(tiny_dirs, data_dir, tmp_path):
    rc, summary = _run(tiny_dirs, data_dir, tmp_path / "ce", "--semalign-output-loss", "ce",
                       "--semalign-layer-weight", "0")
    assert rc == 0
    m = [json.loads(x) for x in (tmp_path / "ce" / "metrics.jsonl").read_text().splitlines()]
    assert m[0]["loss"] == pytest.approx(m[0]["output_loss"], rel=1e-6)
    assert m[0]["output_loss"] > 1.0  # a cross-entropy over a 384-token vocabulary, not 1 - cos


@pytest.mark.parametrize("mode", ["full_above", "lora_above"])
def test_trainable_from_the_paired_layer_up(tiny_dirs, data_dir, tmp_path, mode):
    """*_above trains every layer from the paired one up; layers below stay bit-identical."""
    rc, summary = _run(tiny_dirs, data_dir, tmp_path / mode, "--semalign-trainable", mode)
    assert rc == 0
    k = json.loads((tmp_path / mode / "layer_map.json").read_text())["pairs"][0]["student_layer"]
    new = AutoModelForCausalLM.from_pretrained(tmp_path / mode / "student").state_dict()
    old = AutoModelForCausalLM.from_pretrained(tiny_dirs[1]).state_dict()
    n_layers = 1 + max(int(n.split(".")[2]) for n in old if n.startswith("model.layers."))
    for layer in range(n_layers):
        key = f"model.layers.{layer}.mlp.down_proj.weight"
        changed = not torch.equal(new[key], old[key].to(new[key].dtype))
        assert changed == (layer + 1 >= k), (layer, k)


def test_controls_at_the_same_data_and_without_prompt_tokens(tiny_dirs, data_dir, tmp_path):
    rc, summary = _run(tiny_dirs, data_dir, tmp_path / "sft", "--method", "lora-sft", "--train-pool",
                       "extract_align", "--no-train-on-inputs", "--lora-sft-batch-size", "4")
    assert rc == 0 and summary["status"] == "completed"
    cfg = (tmp_path / "sft" / "config.resolved.yaml").read_text()
    assert "train_pool: extract_align" in cfg and "train_on_inputs: false" in cfg


def test_paper_preset_pins_the_recipe_and_flags_override_it(capsys, tmp_path):
    import yaml

    assert main(["transfer", "--preset", "paper-v1", "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["scheduler"] == "onecycle" and cfg["lr"] == 3e-5 and cfg["steps"] is None
    assert cfg["semalign"]["trainable"] == "lora" and cfg["semalign"]["map"] == "closed_form"
    assert cfg["semalign"]["output_loss"] == "cos_label"
    f = tmp_path / "c.yaml"
    f.write_text("lr: 1.0e-4\nsemalign:\n  lora_r: 8\n")
    assert main(["transfer", "--preset", "paper-v1", "--config", str(f), "--steps", "5", "--dry-run"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert (cfg["lr"], cfg["steps"], cfg["scheduler"]) == (1e-4, 5, "onecycle")
    assert cfg["semalign"]["lora_r"] == 8 and cfg["semalign"]["trainable"] == "lora"
    assert main(["transfer", "--preset", "nope", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'nope'" in err and len(err.strip().splitlines()) == 1
