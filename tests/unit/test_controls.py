"""Controls (lora-sft, logit-kd) and the shared PostPKT loop: chunked losses, data order, end to end, resume."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from semalign.config import make_config
from semalign.errors import SemalignError
from semalign.methods.base import METHODS, _load_builtin_methods
from semalign.methods.controls import (forward_kl, linear_warmup_decay, parse_targets, step_indices, token_nll)
from semalign.models.arch import internals
from semalign.testing import save_tiny_pair, tiny_pair


def test_registered_with_paper_and_summary():
    _load_builtin_methods()
    for name in ("seeking", "laten", "lora-sft", "logit-kd"):
        cls = METHODS.get(name)
        assert cls.name == name and "arXiv" in cls.paper and cls.summary_line


def test_step_indices_deterministic_epochs():
    a = [step_indices(10, 4, s, seed=1) for s in range(5)]
    assert a == [step_indices(10, 4, s, seed=1) for s in range(5)]
    flat = sum(a, [])
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert step_indices(3, 8, 0, seed=0).count(0) >= 2  # batch larger than the split wraps into the next epoch


def test_schedule_warmup_then_decay():
    f = linear_warmup_decay(10, 0.2)
    vals = [f(s) for s in range(10)]
    assert vals[0] < vals[1] < vals[2] == 1.0 and vals[-1] > 0 and vals == sorted(vals[:3]) + vals[3:]


def test_chunked_losses_equal_direct():
    torch.manual_seed(0)
    head_s, head_t = torch.nn.Linear(8, 50, bias=False), torch.nn.Linear(12, 50, bias=False)
    h_s, h_t = torch.randn(13, 8, requires_grad=True), torch.randn(13, 12)
    y = torch.randint(0, 50, (13,))
    assert torch.allclose(token_nll(head_s, h_s, y, 4), F.cross_entropy(head_s(h_s), y, reduction="none"), atol=1e-6)
    for tau in (1.0, 2.0):
        kl = forward_kl(head_s, h_s, head_t, h_t, tau=tau, chunk=5)
        ref = F.kl_div(F.log_softmax(head_s(h_s) / tau, -1), F.log_softmax(head_t(h_t) / tau, -1), log_target=True,
                       reduction="sum") * tau * tau
        assert float(kl.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    kl.backward()
    assert h_s.grad is not None and torch.isfinite(h_s.grad).all()
    same = forward_kl(head_s, h_s, head_s, h_s.detach(), tau=1.0, chunk=3).detach()
    assert float(same) == pytest.approx(0.0, abs=1e-5)


def test_parse_targets_errors():
    _, student, _ = tiny_pair("qwen2")
    arch = internals(student)
    assert parse_targets("up_proj, o_proj,up_proj", arch, "--x") == ["up_proj", "o_proj"]
    with pytest.raises(SemalignError, match="--x: unknown module"):
        parse_targets("mlp", arch, "--x")


def _cfg(method, t, s, data_dir, out, **kw):
    return make_config({"method": method, "teacher": str(t), "student": str(s), "task": "mmlu",
                        "data_dir": str(data_dir), "output": str(out), "steps": 2, "micro_batch": 2,
                        "nll_examples": 2, "dtype": "fp32", "lora_sft": {"batch_size": 4, "lr": 1e-2},
                        "logit_kd": {"batch_size": 4, "lr": 1e-2, "ce_weight": 0.5, "chunk_tokens": 7}, **kw})


@pytest.mark.parametrize("method,family", [("lora-sft", "qwen2"), ("logit-kd", "qwen2"), ("lora-sft", "llama"),
                                           ("logit-kd", "llama")])
def test_controls_end_to_end(method, family, data_dir, tmp_path):
    from semalign.transfer import run_transfer

    t, s = save_tiny_pair(tmp_path / "m", family)
    out = tmp_path / "run"
    summ = run_transfer(_cfg(method, t, s, data_dir, out))
    assert summ["status"] == "completed" and summ["roundtrip"]["equal"]
    info = summ[method.replace("-", "_")]
    assert info["steps"] == 2 and info["trainable_parameters"] > 0
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    if method == "logit-kd":
        assert all("kl" in m and "ce" in m for m in metrics)
    new, old = AutoModelForCausalLM.from_pretrained(out / "student"), AutoModelForCausalLM.from_pretrained(s)
    ids = torch.randint(0, old.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(new(input_ids=ids).logits, old(input_ids=ids).logits)


def test_epochs_budget_and_resume_equals_uninterrupted(tiny_dirs, data_dir, tmp_path, monkeypatch):
    from semalign.methods import controls
    from semalign.transfer import run_transfer

    t, s = tiny_dirs
    full = tmp_path / "full"
    cfg = _cfg("lora-sft", t, s, data_dir, full, steps=None)
    summ = run_transfer(cfg.model_copy(update={"lora_sft": cfg.lora_sft.model_copy(update={"epochs": 0.5})}))
    assert summ["lora_sft"]["steps"] == 2  # ceil(0.5 * 16 train examples / batch 4)
    monkeypatch.setattr(controls, "SAVE_EVERY", 1)
    full = tmp_path / "full3"
    run_transfer(_cfg("lora-sft", t, s, data_dir, full, steps=3))
    calls = {"n": 0}
    orig = controls.save_checkpoint

    def boom(*a, **k):
        orig(*a, **k)
        calls["n"] += 1
        if calls["n"] == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(controls, "save_checkpoint", boom)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        run_transfer(_cfg("lora-sft", t, s, data_dir, part, steps=3))
    monkeypatch.setattr(controls, "save_checkpoint", orig)
    run_transfer(_cfg("lora-sft", t, s, data_dir, part, steps=3), resume=True)
    a = [json.loads(x)["loss"] for x in (full / "metrics.jsonl").read_text().splitlines()]
    b = [json.loads(x)["loss"] for x in (part / "metrics.jsonl").read_text().splitlines()]
    assert a == pytest.approx(b, rel=1e-5)


@pytest.mark.parametrize("method", ["lora-sft", "logit-kd"])
def test_gradient_checkpointing_gives_the_same_training(method, tiny_dirs, data_dir, tmp_path, monkeypatch):
    """Recomputing activations in backward (less memory) must not change the losses or the exported weights."""
    import contextlib

    from safetensors.torch import load_file

    from semalign.methods import controls
    from semalign.transfer import run_transfer

    seen = []
    orig = controls.activation_checkpointing

    @contextlib.contextmanager
    def spy(model, enabled):
        with orig(model, enabled):
            seen.append(bool(model.get_base_model().is_activation_checkpointing))
            yield

    monkeypatch.setattr(controls, "activation_checkpointing", spy)
    t, s = tiny_dirs
    runs = {}
    for gc in (False, True):
        out = tmp_path / f"gc{int(gc)}"
        cfg = _cfg(method, t, s, data_dir, out).model_copy(update={"gradient_checkpointing": gc})
        summ = run_transfer(cfg)
        assert summ["status"] == "completed"
        runs[gc] = ([json.loads(x)["loss"] for x in (out / "metrics.jsonl").read_text().splitlines()],
                    load_file(str(out / "student" / "model.safetensors")))
        model = AutoModelForCausalLM.from_pretrained(out / "student")
        assert not getattr(model, "is_activation_checkpointing", False)  # switched off again before export
    assert seen == [False, True]  # the flag reached the model while it trained
    assert runs[True][0] == pytest.approx(runs[False][0], rel=1e-5)
    for k, v in runs[False][1].items():
        torch.testing.assert_close(runs[True][1][k], v, rtol=1e-5, atol=1e-6)
