"""Incremental MMLU scoring (issue 10 item 4): identical letter log-probs to a full evaluation."""

from __future__ import annotations

import pytest
import torch

from semalign.eval import incremental
from semalign.eval.mmlu import score_letters
from semalign.eval.prompting import encode
from semalign.models.arch import internals
from semalign.models.fingerprint import lowest_changed_layer, weight_digests
from semalign.testing import tiny_model

GEMMA3 = {"layer_types": ["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
          "sliding_window": 6}
TEXTS = ["What is 2 + 3?\nA. 5\nB. 6\nC. 8\nD. 4\nAnswer: The answer is:",
         "The following are multiple choice questions (with answers) about virology.\n\nWhich?\nA. x\nB. y\nAnswer:",
         "def add(a, b): return a + b\nAnswer: The answer is:", "Q? A. 1 B. 2 Answer:", "0123456789 Answer:"]


def _model(fam, tok):
    return tiny_model(fam, tokenizer=tok, hidden=32, layers=4, **(GEMMA3 if fam == "gemma3" else {}))


def _score(model, tok, prompts, session=None):
    with session or incremental.contextlib.nullcontext():
        return score_letters(model, tok, prompts, batch_size=2, forward=incremental.forward_for(model))


def _perturb(module):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.3)


@pytest.mark.parametrize("fam", ["qwen2", "llama", "gemma3"])
def test_incremental_equals_full_after_upper_layer_change(fam, tiny_tok, one_thread):
    model = _model(fam, tiny_tok)
    prompts = [encode(tiny_tok, t) for t in TEXTS]
    bank = incremental.StateBank(model)
    before = _score(model, tiny_tok, prompts, incremental.recording(model, bank))
    assert before == _score(model, tiny_tok, prompts)  # recording does not change the scores
    _perturb(internals(model).layer(3))
    full = _score(model, tiny_tok, prompts)
    inc = _score(model, tiny_tok, prompts, incremental.reusing(model, bank))
    assert inc == full and inc != before
    assert bank.stats["lowest_changed_block"] == 3 and bank.stats["start_block"] == 3
    assert bank.stats["suffix_batches"] > 0 and bank.stats["full_batches"] == 0


def test_budget_and_fallbacks(tiny_tok, one_thread):
    model = _model("qwen2", tiny_tok)
    prompts = [encode(tiny_tok, t) for t in TEXTS]
    probe = incremental.StateBank(model)
    _score(model, tiny_tok, prompts, incremental.recording(model, probe))
    per_block = probe.nbytes / len(probe.layers)
    bank = incremental.StateBank(model, budget_mb=1.5 * per_block / 2 ** 20)  # room for one block's states
    _score(model, tiny_tok, prompts, incremental.recording(model, bank))
    assert bank.layers == [5] and bank.nbytes <= bank.budget  # the lowest blocks were dropped first
    _perturb(internals(model).layer(4))
    full = _score(model, tiny_tok, prompts)
    assert _score(model, tiny_tok, prompts, incremental.reusing(model, bank)) == full
    assert bank.stats["start_block"] in (None, *[j for j in bank.layers if j <= 4])
    # a changed embedding leaves nothing to reuse: every batch runs the full forward
    _perturb(internals(model).embed)
    bank.stats["full_batches"] = 0
    full = _score(model, tiny_tok, prompts)
    assert _score(model, tiny_tok, prompts, incremental.reusing(model, bank)) == full
    assert bank.stats["lowest_changed_block"] == 1 and bank.stats["suffix_batches"] == 0


def test_lowest_changed_layer_reads_weights(tiny_tok):
    model = _model("llama", tiny_tok)
    arch = internals(model)
    before = weight_digests(arch)
    assert lowest_changed_layer(before, weight_digests(arch)) == 6  # nothing changed: L + 2
    arch.layer(4).float()  # same values, same dtype: unchanged
    assert lowest_changed_layer(before, weight_digests(arch)) == 6
    with torch.no_grad():
        arch.final_norm.weight[0] += 1
    assert lowest_changed_layer(before, weight_digests(arch)) == 5
    arch.layer(2).to(torch.bfloat16)  # a dtype change is a change
    assert lowest_changed_layer(before, weight_digests(arch)) == 2
