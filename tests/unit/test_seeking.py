"""Seeking: window search vs brute force, sensitivity vs autograd, layer choice, SVD, errors, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from semalign.config import make_config
from semalign.errors import SemalignError
from semalign.methods.seeking.extract import (accumulate_sensitivity, best_window, resolve_targets, select_layers,
                                              svd_factors, window_sums)
from semalign.models.arch import internals
from semalign.testing import save_tiny_pair, tiny_model, tiny_pair, tiny_tokenizer


def brute(S: torch.Tensor, shape, stride=(1, 1)):
    n, m = S.shape
    best = None
    for a in range(0, n - shape[0] + 1, stride[0]):
        for b in range(0, m - shape[1] + 1, stride[1]):
            v = float(S[a:a + shape[0], b:b + shape[1]].double().sum())
            if best is None or v > best[2] + 1e-12:
                best = (a, b, v)
    return best


@pytest.mark.parametrize("n,m,ns,ms,stride", [(7, 9, 3, 4, (1, 1)), (12, 10, 12, 5, (1, 1)), (11, 6, 4, 6, (1, 1)),
                                              (16, 16, 8, 8, (4, 1)), (16, 12, 5, 8, (1, 4)), (5, 5, 5, 5, (1, 1)),
                                              (20, 3, 1, 1, (1, 1))])
def test_window_equals_brute_force(n, m, ns, ms, stride):
    g = torch.Generator().manual_seed(n * 100 + m)
    for _ in range(5):
        S = torch.rand(n, m, generator=g)
        a, b, v = best_window(S, (ns, ms), stride)
        ra, rb, rv = brute(S, (ns, ms), stride)
        assert (a, b) == (ra, rb)
        assert v == pytest.approx(rv, rel=1e-12)
        assert a % stride[0] == 0 and b % stride[1] == 0


def test_window_sums_all_offsets():
    S = torch.rand(6, 7, dtype=torch.float64)
    W = window_sums(S, (2, 3))
    ref = torch.tensor([[S[a:a + 2, b:b + 3].sum() for b in range(5)] for a in range(5)], dtype=torch.float64)
    assert torch.allclose(W, ref)
    with pytest.raises(SemalignError):
        window_sums(S, (7, 1))


def test_select_layers_depth_order_and_shallow_teacher():
    assert select_layers([0.1, 5.0, 0.2, 3.0, 4.0], 3) == [2, 4, 5]
    assert select_layers([1.0, 1.0, 1.0], 3) == [1, 2, 3]
    # teacher shallower than the student: documented many-to-one depth-proportional map
    assert select_layers([1.0, 2.0], 4) == [1, 1, 1, 2]


def test_svd_factors_and_rank_error():
    W = torch.randn(12, 9, dtype=torch.float64).float()
    B, A, ev = svd_factors(W, 4)
    U, s, Vh = torch.linalg.svd(W, full_matrices=False)
    ref = (U[:, :4] * s[:4]) @ Vh[:4]
    assert torch.allclose(B @ A, ref, atol=1e-5)
    assert ev == pytest.approx(float((s[:4] ** 2).sum() / (s ** 2).sum()), rel=1e-5)
    B, A, ev = svd_factors(W, 9)
    assert torch.allclose(B @ A, W, atol=1e-5) and ev == pytest.approx(1.0)
    with pytest.raises(SemalignError, match="rank 10"):
        svd_factors(W, 10)


def test_sensitivity_matches_autograd():
    teacher, _, tok = tiny_pair("qwen2")
    arch = internals(teacher)
    g = torch.Generator().manual_seed(0)
    batches = []
    for _ in range(3):
        x = torch.randint(0, len(tok), (1, 12), generator=g)
        batches.append({"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x})
    sens = accumulate_sensitivity(arch, batches, ["up_proj", "o_proj", "lm_head", "embed_tokens"])
    params = dict(teacher.named_parameters())
    ref_up = torch.zeros_like(params["model.layers.1.mlp.up_proj.weight"])
    ref_layer = torch.zeros(arch.num_layers, dtype=torch.float64)
    ref_head = torch.zeros_like(params["lm_head.weight"])
    for b in batches:
        teacher.zero_grad()
        for p in teacher.parameters():
            p.requires_grad_(True)
        teacher(**b).loss.backward()
        ref_up += (params["model.layers.1.mlp.up_proj.weight"] * params["model.layers.1.mlp.up_proj.weight"].grad).abs()
        ref_head += (params["lm_head.weight"] * params["lm_head.weight"].grad).abs()
        for n, p in params.items():
            if n.startswith("model.layers."):
                ref_layer[int(n.split(".")[2])] += float((p * p.grad).detach().abs().sum())
    for p in teacher.parameters():
        p.grad = None
        p.requires_grad_(False)
    assert torch.allclose(sens.maps["2.up_proj"], ref_up, rtol=1e-4, atol=1e-8)
    assert torch.allclose(sens.maps["0.lm_head"], ref_head, rtol=1e-4, atol=1e-8)
    assert sens.maps["0.embed_tokens"].shape == params["model.embed_tokens.weight"].t().shape
    assert sens.layer_scores == pytest.approx(ref_layer.tolist(), rel=1e-4)
    assert sens.n_examples == 3
    assert not any(p.requires_grad for p in teacher.parameters())


def test_resolve_targets_errors():
    tok = tiny_tokenizer()
    t = internals(tiny_model("qwen2", tokenizer=tok, hidden=64, layers=3, ffn=128))
    s = internals(tiny_model("qwen2", tokenizer=tok, hidden=32, layers=2, ffn=64))
    assert resolve_targets("all", t, s, rank=4, window="independent")[-2:] == ["embed_tokens", "lm_head"]
    with pytest.raises(SemalignError, match="larger than the student's"):
        resolve_targets("k_proj", t, s, rank=17, window="independent")
    with pytest.raises(SemalignError, match="head_dim differs"):
        resolve_targets("q_proj", t, s, rank=4, window="head_aligned")
    with pytest.raises(SemalignError, match="unknown matrix"):
        resolve_targets("up,down", t, s, rank=4, window="independent")
    tied = internals(tiny_model("qwen2", tokenizer=tok, hidden=32, layers=2, tie=True))
    with pytest.raises(SemalignError, match="ties"):
        resolve_targets("lm_head", t, tied, rank=4, window="independent")
    wide = internals(tiny_model("qwen2", tokenizer=tok, hidden=32, layers=2, ffn=256))
    with pytest.raises(SemalignError, match="smaller than the student"):
        resolve_targets("up_proj", t, wide, rank=4, window="independent")
    # equal head_dim (64/4 = 16 = 32/2): head-aligned windows are allowed
    same_hd = internals(tiny_model("qwen2", tokenizer=tok, hidden=32, layers=2, heads=2, kv_heads=1))
    assert resolve_targets("q_proj,o_proj", t, same_hd, rank=4, window="head_aligned") == ["q_proj", "o_proj"]


def _cfg(t, s, data_dir, out, **kw):
    base = {"method": "seeking", "teacher": str(t), "student": str(s), "task": "mmlu", "data_dir": str(data_dir),
            "output": str(out), "steps": 2, "micro_batch": 4, "nll_examples": 2, "dtype": "fp32",
            "seeking": {"seed_examples": 3, "rank": 4, "batch_size": 4}}
    for k, v in kw.items():
        if isinstance(v, dict):
            base.setdefault(k, {}).update(v)
        else:
            base[k] = v
    return make_config(base)


@torch.no_grad()
def _logits(model, ids):
    return model(input_ids=ids).logits.float()


@pytest.mark.parametrize("family,targets", [("qwen2", "up_proj,down_proj,v_proj,o_proj"), ("llama", "all")])
def test_seeking_end_to_end(family, targets, data_dir, tmp_path):
    from peft import PeftModel

    from semalign.transfer import run_transfer

    t, s = save_tiny_pair(tmp_path / "m", family)
    out = tmp_path / "run"
    summ = run_transfer(_cfg(t, s, data_dir, out, seeking={"targets": targets}))
    assert summ["status"] == "completed" and summ["roundtrip"]["equal"]
    info = summ["seeking"]
    assert info["start_max_abs_logit_diff"] < 1e-4  # the LoRA init leaves the student's function unchanged
    ext = json.loads((out / "seeking" / "extraction.json").read_text())
    assert all(0 < m["explained_variance"] <= 1 + 1e-6 and m["rank"] == 4 for m in ext["matrices"])
    assert sorted(int(v) for v in ext["layer_map"].values()) == list(ext["layer_map"].values())
    if targets == "all":
        assert {m["name"] for m in ext["matrices"]} >= {"embed_tokens", "lm_head", "q_proj", "gate_proj"}
    merged = AutoModelForCausalLM.from_pretrained(out / "student")
    base = AutoModelForCausalLM.from_pretrained(s)
    ids = torch.randint(0, base.config.vocab_size, (1, 10))
    ref = _logits(merged, ids)
    assert not torch.allclose(ref, _logits(base, ids))
    adapted = PeftModel.from_pretrained(base, out / "adapter")  # the adapter applies to the ORIGINAL student
    assert torch.allclose(_logits(adapted, ids), ref, atol=1e-4)
    cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert cfg["r"] == 8 and cfg["lora_alpha"] == 32.0


def test_seeking_shallow_teacher(data_dir, tmp_path):
    from semalign.transfer import run_transfer

    tok = tiny_tokenizer()
    t = tiny_model("qwen2", tokenizer=tok, hidden=64, layers=2, ffn=128)
    s = tiny_model("qwen2", tokenizer=tok, hidden=32, layers=3, ffn=64, seed=1)
    for name, m in (("t", t), ("s", s)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    summ = run_transfer(_cfg(tmp_path / "t", tmp_path / "s", data_dir, tmp_path / "run", steps=1))
    assert summ["seeking"]["layer_map"] == {"1": 1, "2": 1, "3": 2}


def test_tied_embeddings(data_dir, tmp_path):
    """Tied teacher: one sensitivity map serves embed and head; tied student: projection targets work end to end."""
    from semalign.transfer import run_transfer

    tok = tiny_tokenizer()
    t = tiny_model("qwen2", tokenizer=tok, hidden=64, layers=3, ffn=128, tie=True)
    s = tiny_model("qwen2", tokenizer=tok, hidden=32, layers=2, ffn=64, tie=True, seed=1)
    arch = internals(t)
    x = torch.randint(0, len(tok), (1, 10))
    sens = accumulate_sensitivity(arch, [{"input_ids": x, "attention_mask": torch.ones_like(x), "labels": x}],
                                  ["lm_head", "embed_tokens"])
    assert torch.equal(sens.maps["0.lm_head"], sens.maps["0.embed_tokens"].t())
    for name, m in (("t", t), ("s", s)):
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    summ = run_transfer(_cfg(tmp_path / "t", tmp_path / "s", data_dir, tmp_path / "run", steps=1))
    assert summ["roundtrip"]["equal"] and summ["student"]["tied_embeddings"]
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "student")
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
