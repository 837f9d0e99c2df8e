"""Layer Grad x Act: an analytic toy, Captum as reference, and one backward for all layers."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn
from transformers import LlamaConfig

from semalign.attribution.layers import attribute_layers
from semalign.data.prompts import batches
from semalign.models.arch import internals


class Scale(nn.Module):
    def __init__(self, c: float):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, h, **_):
        return self.c * h


class Toy(nn.Module):
    """h_l = c_l h_{l-1}; logits = W h_L. Every layer then has g_l . h_l = (p - e_y) . z (homogeneity)."""

    def __init__(self, V=11, D=6, L=3):
        super().__init__()
        self.config = LlamaConfig(vocab_size=V, hidden_size=D, num_hidden_layers=L, num_attention_heads=1,
                                  intermediate_size=4)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(V, D)
        self.model.layers = nn.ModuleList(Scale(0.5 + i) for i in range(L))
        self.model.norm = nn.Identity()
        self.lm_head = nn.Linear(D, V, bias=False)

    def forward(self, input_ids, attention_mask=None):
        h = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            h = layer(h)
        return SimpleNamespace(logits=self.lm_head(h))


def test_toy_matches_hand_computation():
    torch.manual_seed(0)
    toy = Toy()
    ids = torch.tensor([[1, 4, 2, 7, 3]])
    labels = torch.tensor([[-100, -100, 2, 7, 3]])
    batch = {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}
    scores = attribute_layers(internals(toy), [batch], aggregate="sum")
    z = toy(ids).logits[0, :-1].detach()
    y = labels[0, 1:]
    m = y != -100
    p = torch.softmax(z[m], -1)
    onehot = torch.nn.functional.one_hot(y[m], z.shape[-1]).float()
    want = float(((p - onehot) * z[m]).sum() / m.sum())
    assert scores.scores == pytest.approx([want] * 3, rel=1e-4, abs=1e-6)
    assert attribute_layers(internals(toy), [batch], aggregate="abs_of_sum").scores == pytest.approx([abs(want)] * 3, rel=1e-4)


def test_matches_captum_per_layer(tiny_tok):
    captum = pytest.importorskip("captum.attr")
    from semalign.testing import tiny_model

    model = tiny_model("qwen2", tokenizer=tiny_tok, hidden=32, layers=3).float()
    ex = {"messages": [{"role": "user", "content": "What is 3 + 4?"}, {"role": "assistant", "content": "The answer is 7."}]}
    (b,) = batches(tiny_tok, [ex], 1)
    arch = internals(model)
    ours = attribute_layers(arch, [b], aggregate="sum", positions="all")
    resp = attribute_layers(arch, [b], aggregate="sum", positions="response")

    def objective(input_ids):
        logits = model(input_ids=input_ids).logits[:, :-1]
        lab = b["labels"][:, 1:]
        m = lab != -100
        return torch.nn.functional.cross_entropy(logits[m], lab[m]).reshape(1)

    ref = captum.LayerGradientXActivation(objective, list(arch.layers), multiply_by_inputs=True)
    attrs = ref.attribute(b["input_ids"], attribute_to_layer_input=False)
    want = [float(a.detach().sum()) for a in attrs]
    assert ours.scores == pytest.approx(want, rel=1e-3, abs=1e-6)
    # positions='response' (spec §8.1) = Captum's attributions summed over the supervised positions only
    pos = torch.zeros_like(b["labels"], dtype=torch.bool)
    pos[:, :-1] = b["labels"][:, 1:] != -100
    want_resp = [float(a.detach()[pos].sum()) for a in attrs]
    assert resp.scores == pytest.approx(want_resp, rel=1e-3, abs=1e-6)
    assert resp.scores != pytest.approx(ours.scores, rel=1e-3, abs=1e-6)  # prompt positions do contribute


EXAMPLES = [{"messages": [{"role": "user", "content": f"What is {a} + {b}?"},
                          {"role": "assistant", "content": f"The answer is {a + b}."}]} for a, b in
            [(3, 4), (10, 22), (7, 1), (5, 5), (13, 8)]]


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_batched_equals_one_by_one(tiny_tok, family):
    from semalign.testing import tiny_model

    model = tiny_model(family, tokenizer=tiny_tok, hidden=32, layers=3).float()
    arch = internals(model)
    one = attribute_layers(arch, batches(tiny_tok, EXAMPLES, 1), aggregate="sum")
    many = attribute_layers(arch, batches(tiny_tok, EXAMPLES, 3), aggregate="sum")
    assert many.n_examples == one.n_examples == len(EXAMPLES)
    assert many.scores == pytest.approx(one.scores, rel=1e-4, abs=1e-7)
    for a, b in zip(many.per_example, one.per_example):
        assert a == pytest.approx(b, rel=1e-4, abs=1e-7)


def test_last_layer_block_output_is_zero_but_residual_is_not(tiny_tok):
    """The final RMSNorm is scale-invariant: sum_d g_L h_L = 0 at every position (Euler), so the signed
    block-output score of the last layer vanishes; the residual contribution's does not."""
    from semalign.testing import tiny_model

    model = tiny_model("qwen2", tokenizer=tiny_tok, hidden=32, layers=3).float()
    arch = internals(model)
    arch.final_norm.variance_epsilon = 1e-12  # tiny random states are small: make the norm's eps negligible
    bs = batches(tiny_tok, EXAMPLES, 2)
    out = attribute_layers(arch, bs, aggregate="abs_of_sum", target="block_output")
    res = attribute_layers(arch, bs, aggregate="abs_of_sum", target="residual")
    assert out.scores[-1] < 1e-4 * max(out.scores[:-1])
    assert res.scores[-1] > 1e-2 * max(res.scores)
    assert res.target == "residual" and out.target == "block_output"


def test_runs_in_fp32_and_restores_the_model_dtype(tiny_tok, tmp_path):
    from semalign.attribution.layers import LayerScores
    from semalign.testing import tiny_model

    model = tiny_model("qwen2", tokenizer=tiny_tok, hidden=32, layers=3).to(torch.bfloat16)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    s = attribute_layers(internals(model), batches(tiny_tok, EXAMPLES, 2))
    assert s.dtype == "float32"
    for n, p in model.named_parameters():
        assert p.dtype == torch.bfloat16 and torch.equal(p, before[n])
    m = s.margin()
    assert m["top"] == s.top(1)[0] and m["next"] == s.top(2)[1]
    assert m["relative_margin"] == pytest.approx((m["top_score"] - m["next_score"]) / m["top_score"])
    s.save(tmp_path / "a.json")
    back = LayerScores.load(tmp_path / "a.json")
    assert back.scores == s.scores and back.dtype == "float32" and back.positions == "response"
    import json

    assert json.loads((tmp_path / "a.json").read_text())["margin"]["top"] == m["top"]


def test_one_backward_pass_for_all_layers(tiny_tok, monkeypatch):
    from semalign.testing import tiny_model

    model = tiny_model("llama", tokenizer=tiny_tok, hidden=32, layers=4)
    ex = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is 4."}]}
    bs = batches(tiny_tok, [ex, ex], 1)
    calls = {"n": 0}
    orig = torch.autograd.grad

    def counting(*a, **k):
        calls["n"] += 1
        return orig(*a, **k)

    monkeypatch.setattr(torch.autograd, "grad", counting)
    s = attribute_layers(internals(model), bs)
    assert calls["n"] == 2 and len(s.scores) == 4  # one backward per example, all layers at once
    assert all(not p.requires_grad or p.grad is None for p in model.parameters())
