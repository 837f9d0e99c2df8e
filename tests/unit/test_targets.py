"""Teacher-free training pieces: top-k teacher log-probs, the bucketed KL, and cached per-example targets."""

from __future__ import annotations

import random
from types import SimpleNamespace

import pytest
import torch

from semalign.cache import StageCache
from semalign.data.prompts import batches
from semalign.methods.semalign.bases import SemanticMap
from semalign.methods.semalign.common import teacher_targets
from semalign.methods.semalign.losses import kl_divergence, kl_source_loss
from semalign.methods.semalign.targets import cached_teacher_targets, compute_teacher_targets
from semalign.methods.semalign.topk import kl_from_topk, kl_source_topk_loss, teacher_topk_logprobs
from semalign.models.arch import internals
from semalign.pairing import LayerPair
from semalign.testing import tiny_model

from tests.conftest import mmlu_like


# --------------------------------------------------------------------------- top-k KL
@pytest.mark.parametrize("tau", [1.0, 2.0])
def test_topk_kl_equals_exact_kl_when_k_is_the_vocabulary(tau):
    g = torch.Generator().manual_seed(0)
    t, s = torch.randn(3, 5, 50, generator=g) * 3, torch.randn(3, 5, 50, generator=g) * 3
    ids, lp, rest = teacher_topk_logprobs(t, k=50, tau=tau)
    assert torch.isinf(rest).all()
    got = kl_from_topk(s, ids, lp, rest, tau)
    assert torch.allclose(got, kl_divergence(t, s, tau), atol=1e-5)
    ids, lp, rest = teacher_topk_logprobs(t, k=10_000, tau=tau)  # k is clipped to V
    assert ids.shape[-1] == 50 and torch.allclose(kl_from_topk(s, ids, lp, rest, tau), kl_divergence(t, s, tau),
                                                  atol=1e-5)


def test_topk_kl_is_a_lower_bound_exact_for_proportional_tails_and_differentiable():
    g = torch.Generator().manual_seed(1)
    t, s = torch.randn(64, 40, generator=g) * 2, torch.randn(64, 40, generator=g) * 2
    exact = kl_divergence(t, s)
    prev = torch.zeros_like(exact)
    for k in (1, 5, 20, 39):
        ids, lp, rest = teacher_topk_logprobs(t, k)
        assert torch.allclose(rest.exp() + lp.exp().sum(-1), torch.ones(64), atol=1e-5)  # mass is complete
        approx = kl_from_topk(s, ids, lp, rest)
        assert (approx <= exact + 1e-5).all() and (approx >= -1e-6).all()  # merging outcomes loses information
        assert (approx >= prev - 1e-5).all()  # refining the partition never lowers it
        prev = approx
    # a student whose tail is proportional to the teacher's: the bucketed KL is exact
    ids, lp, rest = teacher_topk_logprobs(t, 5)
    s2 = t.clone()
    s2.scatter_(-1, ids, torch.randn(64, 5, generator=g))
    assert torch.allclose(kl_from_topk(s2, ids, lp, rest), kl_divergence(t, s2), atol=1e-5)
    s.requires_grad_(True)
    kl_from_topk(s, ids, lp, rest).sum().backward()
    assert torch.isfinite(s.grad).all() and s.grad.abs().sum() > 0


def test_kl_source_topk_loss_matches_kl_source_at_full_k():
    g = torch.Generator().manual_seed(2)
    s, t = torch.randn(2, 6, 30, generator=g), torch.randn(2, 6, 32, generator=g)  # teacher has 2 extra rows
    labels = torch.tensor([[-100, -100, 3, 4, 5, -100], [-100, 1, 2, 3, 4, 5]])
    ids, lp, rest = teacher_topk_logprobs(t[..., :30], k=30, tau=2.0)
    got = kl_source_topk_loss(s, labels, topk_ids=ids, topk_logprobs=lp, rest_lse=rest, tau=2.0, vocab=30)
    assert torch.allclose(got, kl_source_loss(s, labels, teacher_logits=t, tau=2.0), atol=1e-5)


# --------------------------------------------------------------------------- cached targets
@pytest.fixture(scope="module")
def teacher(tiny_tok):
    return tiny_model("qwen2", tokenizer=tiny_tok, hidden=64, layers=4)


def _examples(n=5):
    rng = random.Random(0)
    return [mmlu_like(i, rng) for i in range(n)]


PAIRS = [LayerPair(student_layer=1, teacher_layer=2),
         LayerPair(student_layer=2, teacher_layer=3, interpolation={"a": 2, "b": 3, "lambda": 0.5})]


def test_per_example_targets_match_the_live_teacher_targets(teacher, tiny_tok):
    smap = SemanticMap(torch.randn(32, 64), {"key": "m1"})
    ex = _examples(4)
    bs = batches(tiny_tok, ex, 4, max_length=64)
    rows = compute_teacher_targets(internals(teacher), smap, bs, PAIRS, "residual", topk=8,
                                   store_dtype=torch.float32)
    ctx = SimpleNamespace(t_arch=internals(teacher), teacher=teacher)
    live, logits = teacher_targets(ctx, bs[0], PAIRS, smap, "residual", logits=True)
    for i, row in enumerate(rows):
        L = int(bs[0]["attention_mask"][i].sum())
        for k in (1, 2):
            assert row[f"L{k}"].shape == (L, 32)
            assert torch.allclose(row[f"L{k}"], live[k][i, :L], atol=1e-5)
        ids, lp, _ = teacher_topk_logprobs(logits[i, :L], 8)
        assert torch.equal(row["topk_ids"].long(), ids) and torch.allclose(row["topk_logprobs"], lp)


def test_cached_targets_hit_miss_and_key(teacher, tiny_tok, tmp_path):
    cache = StageCache(tmp_path / "stages")
    smap = SemanticMap(torch.randn(32, 64), {"key": "m1"})
    ex = _examples(5)
    kw = dict(teacher_hash="t-hash", max_length=64, micro_batch=2, cache=cache)
    first = cached_teacher_targets(internals(teacher), smap, tiny_tok, ex + ex[:2], PAIRS, "residual", **kw)
    assert not first.cache_hit and len(first.rows) == 5  # duplicates computed once
    assert all(t.dtype == torch.bfloat16 for r in first.rows.values() for n, t in r.items() if n.startswith("L"))

    class NoTeacher(torch.nn.Module):  # the teacher is not needed on a hit
        def forward(self, *a, **k):
            raise AssertionError("teacher ran on a cache hit")

    arch = internals(teacher)
    real_model, arch.model = arch.model, NoTeacher()
    arch.model.parameters = real_model.parameters  # dtype lookup only
    second = cached_teacher_targets(arch, smap, tiny_tok, ex, PAIRS, "residual", **kw)
    arch.model = real_model
    assert second.cache_hit
    for i in first.rows:
        for n in first.rows[i]:
            assert torch.equal(first.rows[i][n], second.rows[i][n])
    # every input that decides the targets is in the key
    for change in (dict(teacher_hash="other"), dict(max_length=32)):
        assert not cached_teacher_targets(internals(teacher), smap, tiny_tok, ex, PAIRS, "residual",
                                          **{**kw, **change}).cache_hit
    assert not cached_teacher_targets(internals(teacher), smap, tiny_tok, ex[:4], PAIRS, "residual", **kw).cache_hit
    assert not cached_teacher_targets(internals(teacher), smap, tiny_tok, ex, PAIRS, "block_output", **kw).cache_hit
    assert not cached_teacher_targets(internals(teacher), SemanticMap(smap.M, {"key": "m2"}), tiny_tok, ex, PAIRS,
                                      "residual", **kw).cache_hit
    # no teacher hash: computed, nothing stored
    n = len(cache.ls())
    assert not cached_teacher_targets(internals(teacher), smap, tiny_tok, ex, PAIRS, "residual",
                                      **{**kw, "teacher_hash": None}).cache_hit
    assert len(cache.ls()) == n


def test_batch_pads_targets_and_topk(teacher, tiny_tok, tmp_path):
    smap = SemanticMap(torch.randn(32, 64), {"key": "m1"})
    ex = _examples(3)
    tt = cached_teacher_targets(internals(teacher), smap, tiny_tok, ex, PAIRS[:1], "residual", teacher_hash="h",
                                max_length=64, topk=4, vocab=len(tiny_tok), cache=StageCache(tmp_path))
    ids = [e["id"] for e in ex[::-1]]
    lens = [tt.rows[i]["L1"].shape[0] for i in ids]
    T = max(lens) + 2
    targets, topk = tt.batch(ids, T)
    assert targets[1].shape == (3, T, 32) and targets[1].dtype == torch.float32
    assert topk["topk_ids"].shape == (3, T, 4) and topk["rest_lse"].shape == (3, T)
    for j, L in enumerate(lens):
        assert targets[1][j, L:].abs().sum() == 0 and torch.isinf(topk["topk_logprobs"][j, L:]).all()
    with pytest.raises(KeyError):
        tt.batch(["nope"], T)
