"""SemAlign v1 pieces: aligned teacher targets (incl. interpolation), step sampling, trainable selection."""

import random
from types import SimpleNamespace

import pytest
import torch

from semalign.methods.semalign.bases import SemanticMap
from semalign.methods.semalign.common import teacher_targets
from semalign.methods.semalign.recipe import step_examples
from semalign.models.arch import internals
from semalign.pairing import LayerPair
from semalign.testing import tiny_model


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True)


@pytest.mark.parametrize("interface", ["residual", "block_output"])
def test_targets_are_mapped_teacher_states(tiny_tok, interface):
    teacher = tiny_model("qwen2", tokenizer=tiny_tok, hidden=64, layers=4)
    ctx = SimpleNamespace(t_arch=internals(teacher), teacher=teacher)
    M = torch.randn(32, 64)
    smap = SemanticMap(M, {})
    ids = torch.tensor([[30, 17, 40, 9, 11]])  # no special tokens (the pad embedding is zero)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    with torch.no_grad():
        hs = teacher(input_ids=ids, output_hidden_states=True).hidden_states
    act = {k: (hs[k] - hs[k - 1]) if interface == "residual" else hs[k] for k in (1, 2, 3)}
    plain = LayerPair(student_layer=1, teacher_layer=2)
    interp = LayerPair(student_layer=2, teacher_layer=3, interpolation={"a": 1, "b": 2, "lambda": 0.25})
    out, logits = teacher_targets(ctx, batch, [plain, interp], smap, interface)
    assert logits is None
    assert torch.allclose(out[1], _unit(act[2]) @ M.T, atol=1e-5)
    mix = 0.75 * act[1] + 0.25 * act[2]
    assert torch.allclose(out[2], _unit(mix) @ M.T, atol=1e-5)
    out2, logits2 = teacher_targets(ctx, batch, [plain], smap, interface, logits=True)
    assert logits2.shape == (1, 5, len(tiny_tok)) and torch.allclose(out2[1], out[1])


def test_step_examples_one_extract_plus_align():
    ext = [{"id": f"e{i}"} for i in range(3)]
    align = [{"id": f"a{i}"} for i in range(40)]
    ctx = SimpleNamespace(splits=SimpleNamespace(extract=ext, align=align), config=SimpleNamespace(batch_size=16))
    rng = random.Random(0)
    batches = [step_examples(ctx, s, rng) for s in range(4)]
    assert [b[0]["id"] for b in batches] == ["e0", "e1", "e2", "e0"]  # extract example cycles
    for b in batches:
        assert len(b) == 16 and all(x["id"].startswith("a") for x in b[1:]) and len({x["id"] for x in b}) == 16
    again = [step_examples(ctx, s, random.Random(0)) for s in range(1)]
    assert again[0] == batches[0]  # seeded: a resumed run replays the same data
