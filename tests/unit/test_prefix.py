"""Frozen-prefix execution equals the full forward: logits, block activations and LoRA gradients (fp32)."""

from __future__ import annotations

import pytest
import torch

from semalign.models.arch import internals
from semalign.models.hooks import capture_layers
from semalign.models.prefix import head_logits, lowest_trainable_layer, prefix_states, run_suffix
from semalign.testing import tiny_model

FAMILIES = {
    "llama": {},
    "qwen2": {},
    # sliding and full layers, a window shorter than the sequences, soft-capped logits, scaled embeddings
    "gemma3": {"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
               "sliding_window": 4, "final_logit_softcapping": 30.0},
}


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def model(request, tiny_tok, one_thread):
    return tiny_model(request.param, tokenizer=tiny_tok, hidden=32, layers=4, **FAMILIES[request.param]).eval()


def _batch(vocab: int, side: str, pad: int = 0):
    g = torch.Generator().manual_seed(1)
    lengths = [11, 7, 4]
    T = max(lengths)
    ids = torch.full((len(lengths), T), pad)
    att = torch.zeros((len(lengths), T), dtype=torch.long)
    for i, n in enumerate(lengths):
        sl = slice(0, n) if side == "right" else slice(T - n, T)
        ids[i, sl] = torch.randint(5, vocab, (n,), generator=g)
        att[i, sl] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0) if side == "left" else None
    return ids, att, pos


@pytest.mark.parametrize("side", ["right", "left"])
def test_suffix_equals_full_forward(model, side):
    arch = internals(model)
    L = arch.num_layers
    ids, att, pos = _batch(arch.vocab_size, side)
    valid = att.bool()
    with torch.no_grad(), capture_layers(arch, range(1, L + 1)) as cap:
        full = model(input_ids=ids, attention_mask=att, position_ids=pos).logits
    ref_out = {k: v.clone() for k, v in cap.outputs.items()}
    worst = 0.0
    for k in range(1, L + 2):
        h = prefix_states(arch, ids, att, k, position_ids=pos)
        if k <= L:
            assert torch.equal(h[valid], cap.inputs[k][valid])
        with torch.no_grad(), capture_layers(arch, range(k, L + 1)) as cap2:
            out = run_suffix(arch, h, k, attention_mask=att, position_ids=pos)
        worst = max(worst, float((out.logits - full)[valid].abs().max()))
        for j in range(k, L + 1):
            assert torch.allclose(cap2.outputs[j][valid], ref_out[j][valid], atol=1e-5)
    assert worst < 1e-5, worst


def test_logit_selection(model):
    arch = internals(model)
    ids, att, _ = _batch(arch.vocab_size, "right")
    sel = att.bool() & (torch.rand(att.shape) > 0.5)
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=att).logits
        h = prefix_states(arch, ids, att, 3)
        rows = run_suffix(arch, h, 3, attention_mask=att, logits=sel).logits
        last = run_suffix(arch, h, 3, attention_mask=att, logits=2).logits
        none = run_suffix(arch, h, 3, attention_mask=att, logits=False)
    assert rows.shape == (int(sel.sum()), arch.vocab_size)
    assert torch.allclose(rows, full[sel], atol=1e-5)
    assert torch.allclose(last, full[:, -2:], atol=1e-5)
    assert none.logits is None
    assert torch.allclose(head_logits(arch, none.hidden, sel), full[sel], atol=1e-5)


def test_lora_gradients_match(tiny_tok, one_thread):
    """LoRA on block 3 (PEFT-wrapped): the loss and adapter gradients of the suffix path equal the full path."""
    from peft import LoraConfig, get_peft_model

    for fam, extra in FAMILIES.items():
        base = tiny_model(fam, tokenizer=tiny_tok, hidden=32, layers=4, **extra)
        arch = internals(base)
        targets = [arch.projection_path(3, n) for n in ("v_proj", "o_proj", "up_proj", "down_proj")]
        model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0))
        with torch.no_grad():
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.2)  # a trained adapter, not the zero init
        assert lowest_trainable_layer(model, arch) == 3
        ids, att, _ = _batch(arch.vocab_size, "right")
        sel = att.bool().clone()
        sel[:, :3] = False

        def loss_of(logits_rows, cap):
            return logits_rows.float().logsumexp(-1).mean() + cap.interface(3, "residual")[att.bool()].pow(2).mean()

        params = [p for p in model.parameters() if p.requires_grad]
        with capture_layers(arch, [3]) as cap:
            full = model(input_ids=ids, attention_mask=att).logits
        l_full = loss_of(full[sel], cap)
        g_full = torch.autograd.grad(l_full, params)
        h = prefix_states(arch, ids, att, 3)
        assert not h.requires_grad
        with capture_layers(arch, [3]) as cap:
            out = run_suffix(arch, h, 3, attention_mask=att, logits=sel)
        l_fast = loss_of(out.logits, cap)
        g_fast = torch.autograd.grad(l_fast, params)
        assert abs(float((l_full - l_fast).detach())) < 1e-5, fam
        worst = max(float((a - b).abs().max()) for a, b in zip(g_full, g_fast))
        assert worst < 1e-5, (fam, worst)


def test_lowest_trainable_layer(tiny_tok):
    model = tiny_model("llama", tokenizer=tiny_tok, hidden=32, layers=4)
    arch = internals(model)
    for p in model.parameters():
        p.requires_grad_(False)
    assert lowest_trainable_layer(model, arch) is None
    for p in arch.layer(4).parameters():
        p.requires_grad_(True)
    arch.layer(2).mlp.down_proj.weight.requires_grad_(True)
    assert lowest_trainable_layer(model, arch) == 2
    for p in model.parameters():
        p.requires_grad_(False)
    arch.final_norm.weight.requires_grad_(True)
    assert lowest_trainable_layer(model, arch) == 5
    arch.embed.weight.requires_grad_(True)
    assert lowest_trainable_layer(model, arch) is None
