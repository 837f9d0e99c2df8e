"""LaTen: logit lens vs the model, exact neuron scores vs brute force, translator shapes, inject == fold, end to end."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from semalign.config import make_config
from semalign.errors import SemalignError
from semalign.methods.laten.attribution import (Lens, Locator, attribution_input, capture, kv_row_scores,
                                                lens_scale, neuron_counts, neuron_scores)
from semalign.methods.laten.translator import Translator, fold, gather_teacher, inject, penalty
from semalign.models.arch import internals
from semalign.testing import save_tiny_pair, tiny_model, tiny_pair, tiny_tokenizer

EX = {"id": "x", "messages": [{"role": "user", "content": "What is 2 + 3?\nA. 5\nB. 6\nAnswer:"},
                              {"role": "assistant", "content": "The answer is: A."}]}


def _caps(arch, tok, n=2, original=False):
    out = []
    for i in range(n):
        ex = {"messages": [EX["messages"][0], {"role": "assistant", "content": f"The answer is: {'AB'[i % 2]}"}]}
        ids, y = attribution_input(tok, ex)
        out.append(capture(arch, ids, y, original_scaling=original))
    return out


def test_target_strips_trailing_punctuation():
    tok = tiny_tokenizer()
    ids, y = attribution_input(tok, EX)
    assert tok.decode([y]).strip().endswith("A")
    ex = {"messages": [EX["messages"][0], {"role": "assistant", "content": ". )"}]}  # punctuation only: no crash
    ids2, y2 = attribution_input(tok, ex)
    assert len(ids2) >= 1


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_lens_reproduces_model_at_last_layer(family):
    teacher, _, tok = tiny_pair(family)
    arch = internals(teacher)
    cap = _caps(arch, tok, 1)[0]
    lens = Lens(arch)
    lp = lens.logprob(cap.h_out[-1:], torch.tensor([cap.scale]), torch.tensor([cap.target]))
    assert float(lp[0]) == pytest.approx(cap.logprob, abs=1e-4)
    assert torch.allclose(cap.h_mid, cap.h_out - (cap.h_out - cap.h_mid))  # h_mid is between h_in and h_out
    # the official scaling (bug B3) is a different temperature
    bad = lens_scale(cap.h_out[-1], 1e-6, original=True)
    assert abs(bad - cap.scale) > 1e-3


def test_contribution_scores_equal_brute_force():
    teacher, _, tok = tiny_pair("qwen2")
    arch = internals(teacher)
    caps = _caps(arch, tok, 2)
    lens = Lens(arch)
    k = 2
    got = neuron_scores(arch, lens, caps, [k], "ffn")[:, 0]            # [E, d_ff]
    W = arch.projection(k, "down_proj").weight.detach()
    for e, c in enumerate(caps):
        base = c.h_mid[k - 1]
        vecs = base[None, :] + c.coeff[k - 1][:, None] * W.T               # one residual vector per neuron
        n = vecs.shape[0]
        lp = lens.logprob(vecs, torch.full((n,), c.scale), torch.full((n,), c.target))
        lp0 = lens.logprob(base[None], torch.tensor([c.scale]), torch.tensor([c.target]))
        assert torch.allclose(got[e], lp - lp0, atol=1e-5)
    att = neuron_scores(arch, lens, caps, [1], "attn")[:, 0]
    Wo = arch.projection(1, "o_proj").weight.detach()
    c = caps[0]
    vecs = c.h_in[0][None] + c.z_o[0][:, None] * Wo.T
    lp = lens.logprob(vecs, torch.full((vecs.shape[0],), c.scale), torch.full((vecs.shape[0],), c.target))
    lp0 = lens.logprob(c.h_in[0][None], torch.tensor([c.scale]), torch.tensor([c.target]))
    assert torch.allclose(att[0], lp - lp0, atol=1e-5)


def test_restricted_vocab_scores():
    """vocab=K: top-K base tokens (+ targets) exact, the rest of the normaliser to first order (mean shift)."""
    teacher, _, tok = tiny_pair("qwen2")
    arch = internals(teacher)
    caps = _caps(arch, tok, 2)
    lens = Lens(arch)
    k = 3
    exact = neuron_scores(arch, lens, caps, [k], "ffn")
    assert torch.allclose(neuron_scores(arch, lens, caps, [k], "ffn", vocab=10_000), exact, atol=1e-6)
    approx = neuron_scores(arch, lens, caps, [k], "ffn", vocab=64)[:, 0]
    W = arch.projection(k, "down_proj").weight.detach()
    x0 = torch.stack([c.h_mid[k - 1] * lens.g / c.scale for c in caps])
    z0 = x0 @ lens.W.T
    ids = torch.unique(torch.cat([torch.topk(z0, 64, -1).indices.flatten(), torch.tensor([c.target for c in caps])]))
    inside = torch.zeros(z0.shape[1], dtype=torch.bool)
    inside[ids] = True
    for e, c in enumerate(caps):
        delta = (c.coeff[k - 1][:, None] * (lens.W @ (lens.g[:, None] * W)).T) / c.scale   # [n, V]
        z = z0[e][None, :] + delta
        p_tail = torch.softmax(z0[e].masked_fill(inside, -float("inf")), -1)
        lse = torch.logaddexp(torch.logsumexp(z.masked_fill(~inside, -float("inf")), -1),
                              torch.logsumexp(z0[e].masked_fill(inside, -float("inf")), -1) + delta @ p_tail)
        ref = (z[:, c.target] - lse) - (z0[e, c.target] - torch.logsumexp(z0[e], -1))
        assert torch.allclose(approx[e], ref, atol=1e-5)


def test_neuron_counts_and_rate_errors():
    _, student, _ = tiny_pair("qwen2")
    s = internals(student)
    assert neuron_counts(s, 0.5) == {"ffn": s.intermediate_size // 2, "attn": 16, "v": 8}
    for bad in (0.0, 1.5, -0.1):
        with pytest.raises(SemalignError, match=r"\(0, 1\]"):
            neuron_counts(s, bad)
    with pytest.raises(SemalignError, match="raise it"):
        neuron_counts(s, 0.01)
    with pytest.raises(SemalignError, match="transfer rate"):
        make_config({"laten": {"transfer_rate": 1.2}})
    with pytest.raises(SemalignError, match="transfer rate"):
        make_config({"laten": {"transfer_rate": 0}})


def test_kv_row_scores_gqa():
    _, student, _ = tiny_pair("qwen2")
    s = internals(student)  # 4 heads, 2 KV heads, head_dim 8
    ch = torch.arange(32, dtype=torch.float32)
    rows = kv_row_scores(ch, s)
    assert rows.shape == (16,)
    assert float(rows[0]) == 0 + 8  # KV head 0 row 0 is read by query heads 0 and 1 (channels 0 and 8)


SIZE_PAIRS = [  # (teacher kwargs, student kwargs): widths, FFN, heads and head_dims all differ
    (dict(hidden=64, layers=4, ffn=128, heads=4, kv_heads=2), dict(hidden=32, layers=2, ffn=96, heads=4, kv_heads=2)),
    (dict(hidden=96, layers=3, ffn=160, heads=6, kv_heads=2), dict(hidden=48, layers=3, ffn=64, heads=3, kv_heads=1)),
    (dict(hidden=48, layers=2, ffn=64, heads=4, kv_heads=4), dict(hidden=64, layers=4, ffn=48, heads=8, kv_heads=2)),
]


@pytest.mark.parametrize("tk,sk", SIZE_PAIRS)
def test_translator_shapes_and_inject_equals_fold(tk, sk):
    tok = tiny_tokenizer()
    t = internals(tiny_model("qwen2", tokenizer=tok, **tk))
    s_model = tiny_model("qwen2", tokenizer=tok, seed=3, **sk)
    s = internals(s_model)
    modules = ["up_proj", "down_proj", "v_proj", "o_proj"]
    loc = Locator(t, s, _caps(t, tok), _caps(s, tok), 0.25, modules).locate([0])
    N = min(t.num_layers, s.num_layers)
    assert len(loc.attn_pairs) == len(loc.ffn_pairs) == N
    tr = Translator.for_pair(t, s, modules, init_std=0.05)
    assert tr.sizes == {"d_teacher": tk["hidden"], "hidden": tk["hidden"], "d_student": sk["hidden"]}
    n_params = sum(p.numel() for p in tr.parameters())
    assert n_params == 4 * (tk["hidden"] ** 2 + tk["hidden"] * sk["hidden"])
    X = {m: gather_teacher(t, loc, m) for m in modules}
    k = neuron_counts(s, 0.25)
    assert X["up_proj"].shape == (N, k["ffn"], tk["hidden"])
    assert X["o_proj"].shape == (N, k["attn"], tk["hidden"])
    assert X["v_proj"].shape == (N, k["v"], tk["hidden"])
    with torch.no_grad():
        G = {m: tr(m, X[m]) for m in modules}
    assert G["down_proj"].shape == (N, k["ffn"], sk["hidden"])
    assert float(penalty(G)) > 0
    ids = torch.randint(0, len(tok), (2, 9))
    with torch.no_grad():
        plain = s_model(input_ids=ids).logits
        with inject(s, loc, G):
            hooked = s_model(input_ids=ids).logits
        stats = fold(s, loc, G)
        folded = s_model(input_ids=ids).logits
    assert not torch.allclose(plain, hooked)
    assert torch.allclose(hooked, folded, atol=1e-5)
    assert all(v["changed_weights"] > 0 and v["delta_rel_norm"] > 0 for v in stats.values())


def _cfg(t, s, data_dir, out, **laten):
    return make_config({"method": "laten", "teacher": str(t), "student": str(s), "task": "mmlu",
                        "data_dir": str(data_dir), "output": str(out), "steps": 2, "micro_batch": 4,
                        "nll_examples": 2, "dtype": "fp32",
                        "laten": {"samples_per_step": 4, "transfer_rate": 0.25, "init_std": 0.02, **laten}})


@pytest.mark.parametrize("family,extra", [("qwen2", {}), ("llama", {"modules": "up_proj,down_proj,v_proj,o_proj",
                                                                     "original_scaling": True,
                                                                     "locate_examples": 2})])
def test_laten_end_to_end_export_roundtrip(family, extra, data_dir, tmp_path):
    from semalign.transfer import run_transfer

    t, s = save_tiny_pair(tmp_path / "m", family)
    out = tmp_path / "run"
    summ = run_transfer(_cfg(t, s, data_dir, out, **extra))
    assert summ["status"] == "completed"
    assert summ["roundtrip"]["equal"]  # the reloaded export equals the in-memory fused student
    info = summ["laten"]
    assert info["original_scaling"] is bool(extra.get("original_scaling"))
    assert all(v["changed_weights"] > 0 for v in info["fold"].values())
    assert abs(info["lens_check_max_abs"]) < 1e-4 or extra.get("original_scaling")
    fused = AutoModelForCausalLM.from_pretrained(out / "student")
    plain = AutoModelForCausalLM.from_pretrained(s)
    ids = torch.randint(0, plain.config.vocab_size, (1, 8))
    with torch.no_grad():
        assert not torch.allclose(fused(input_ids=ids).logits, plain(input_ids=ids).logits)
    pairs = info["inference_location"]["ffn_pairs"]
    changed = {ls for _, ls in pairs}
    for k in range(plain.config.num_hidden_layers):
        same = torch.equal(fused.model.layers[k].mlp.up_proj.weight, plain.model.layers[k].mlp.up_proj.weight)
        assert same != (k + 1 in changed)
    assert (out / "laten" / "location.json").is_file()
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert all(set(m["delta_rel_norm"]) == set(info["modules"]) for m in metrics)


def test_laten_shallow_teacher_uses_min_depth(data_dir, tmp_path):
    from semalign.transfer import run_transfer

    tok = tiny_tokenizer()
    for name, kw in (("t", dict(hidden=64, layers=2, ffn=128)), ("s", dict(hidden=32, layers=3, ffn=64, seed=1))):
        m = tiny_model("qwen2", tokenizer=tok, **kw)
        m.save_pretrained(tmp_path / name)
        tok.save_pretrained(tmp_path / name)
    summ = run_transfer(_cfg(tmp_path / "t", tmp_path / "s", data_dir, tmp_path / "run"))
    loc = summ["laten"]["inference_location"]
    assert len(loc["ffn_pairs"]) == 2 and len({s for _, s in loc["ffn_pairs"]}) == 2
