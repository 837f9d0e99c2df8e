"""LM head only at the answer positions: same NLL as full logits; token-budget batches keep every example once."""

import pytest
import torch

from semalign.data.prompts import batches, budget_batches
from semalign.models.arch import internals
from semalign.training.loop import gold_nll

EX = [{"messages": [{"role": "user", "content": "q " * n}, {"role": "assistant", "content": f"a{n} " * (n % 3 + 1)}]}
      for n in (1, 9, 4, 17, 2, 6)]


@pytest.mark.parametrize("family", ["qwen2", "llama", "gemma3"])
def test_gold_nll_equals_full_logits(tiny_tok, family):
    from semalign.testing import tiny_model

    model = tiny_model(family, tokenizer=tiny_tok, hidden=32, layers=2).float().eval()
    bs = batches(tiny_tok, EX, 3)
    got = gold_nll(model, bs, torch.device("cpu"))
    tot, cnt = 0.0, 0
    with torch.no_grad():
        for b in bs:
            lg = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
            lab = b["labels"][:, 1:]
            m = lab != -100
            tot += float(torch.nn.functional.cross_entropy(lg[m], lab[m], reduction="sum"))
            cnt += int(m.sum())
    assert got["tokens"] == cnt
    assert got["nll"] == pytest.approx(tot / cnt, rel=1e-5)
    assert internals(model)  # the model is left usable (hooks removed)
    assert model(input_ids=bs[0]["input_ids"]).logits.shape[-1] == internals(model).vocab_size


def test_budget_batches_cover_each_example_once(tiny_tok):
    bs, order = budget_batches(tiny_tok, EX, max_examples=4, max_tokens=40)
    assert sorted(order) == list(range(len(EX)))
    assert sum(b["input_ids"].shape[0] for b in bs) == len(EX)
    for b in bs:
        assert b["input_ids"].shape[0] == 1 or b["input_ids"].numel() <= 40
        assert b["input_ids"].shape[0] <= 4
