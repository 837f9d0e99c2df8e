import pytest
import torch

from semalign.errors import SemalignError
from semalign.models.arch import internals
from semalign.models.hooks import capture_layers, run_until
from semalign.testing import tiny_model


@pytest.mark.parametrize("family,tie", [("llama", True), ("qwen2", False), ("gemma3", True)])
def test_internals_from_config_and_tree(family, tie, tiny_tok):
    m = tiny_model(family, tokenizer=tiny_tok, hidden=32, layers=3, heads=4, kv_heads=2, ffn=48, tie=tie)
    a = internals(m)
    assert a.num_layers == 3 and a.hidden_size == 32 and a.intermediate_size == 48
    assert a.num_heads == 4 and a.num_kv_heads == 2 and a.head_dim == 8
    assert a.vocab_size == len(tiny_tok) and a.tied == tie
    assert a.projection(2, "down_proj").weight.shape == (32, 48)
    assert a.projection(1, "k_proj").weight.shape == (2 * 8, 32)
    assert a.projection_path(3, "v_proj") == "model.layers.2.self_attn.v_proj"
    g = a.final_norm_gain()
    assert g is not None and g.shape == (32,)
    if family == "gemma3":
        assert torch.allclose(g, m.model.norm.weight.float() + 1)  # Gemma stores w, multiplies by 1 + w


def test_unsupported_architecture_lists_supported():
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(SemalignError, match="unsupported architecture 'gpt2'.*llama.*qwen2"):
        internals(m)


def test_layer_out_of_range(tiny_tok):
    a = internals(tiny_model("qwen2", tokenizer=tiny_tok, hidden=32, layers=2))
    with pytest.raises(SemalignError, match="out of range"):
        a.layer(3)


def ours_removed(a) -> bool:
    mods = list(a.layers) + [a.mlp(k) for k in range(1, a.num_layers + 1)]
    return all(h.__name__ not in ("out_hook", "mlp_hook", "hook") for m in mods for h in m._forward_hooks.values())


def test_hooks_capture_residual_and_always_removed(tiny_tok):
    m = tiny_model("qwen2", tokenizer=tiny_tok, hidden=32, layers=3)
    a = internals(m)
    ids = torch.tensor([[1, 5, 9, 12]])
    before = [dict(layer._forward_hooks) for layer in a.layers]
    with torch.no_grad(), capture_layers(a, [1, 2, 3], mlp=True) as cap:
        out = m(input_ids=ids, output_hidden_states=True)
    hs = out.hidden_states
    assert torch.allclose(cap.inputs[1], hs[0]) and torch.allclose(cap.outputs[1], hs[1])
    assert torch.allclose(cap.interface(2, "residual"), hs[2] - hs[1])
    # the last hidden_states entry is post-final-norm, NOT the block output (spec §1 pitfall)
    assert not torch.allclose(cap.outputs[3], hs[3])
    assert cap.mlp_outputs[2].shape == hs[2].shape
    assert ours_removed(a)
    with pytest.raises(RuntimeError):
        with capture_layers(a, [1]):
            raise RuntimeError("boom")
    assert ours_removed(a)


def test_run_until_stops_early(tiny_tok):
    m = tiny_model("llama", tokenizer=tiny_tok, hidden=32, layers=4)
    a = internals(m)
    before = [dict(layer._forward_hooks) for layer in a.layers]
    seen = []
    hs = [a.layer(k).register_forward_hook(lambda *_, k=k: seen.append(k)) for k in range(1, 5)]
    try:
        with torch.no_grad(), capture_layers(a, [2]) as cap:
            run_until(a, 2, input_ids=torch.tensor([[1, 2, 3]]))
    finally:
        for h in hs:
            h.remove()
    assert seen == [1, 2] and 2 in cap.outputs
    assert ours_removed(a)
