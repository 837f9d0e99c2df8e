import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semalign.methods.semalign.losses import (cos_label_loss, cosine_loss, fisher_quadratic, kl_divergence,
                                              kl_source_loss, relgeom_loss)
from semalign.similarity import linear_cka

seeds = st.integers(0, 10_000)


def rand(seed, *shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


@settings(max_examples=25, deadline=None)
@given(seeds, st.floats(0.1, 10.0))
def test_cosine_loss_properties(seed, scale):
    h = rand(seed, 2, 5, 8)
    mask = torch.ones(2, 5, dtype=torch.bool)
    assert cosine_loss(h, h, mask).item() == pytest.approx(0.0, abs=1e-6)
    assert cosine_loss(h, -h, mask).item() == pytest.approx(2.0, abs=1e-6)
    t = rand(seed + 1, 2, 5, 8)
    assert cosine_loss(h * scale, t, mask).item() == pytest.approx(cosine_loss(h, t, mask).item(), abs=1e-5)
    assert 0.0 <= cosine_loss(h, t, mask).item() <= 2.0


def test_cosine_loss_mask_ignores_positions():
    h, t = rand(0, 1, 4, 6), rand(1, 1, 4, 6)
    mask = torch.tensor([[True, True, False, False]])
    t2 = t.clone()
    t2[:, 2:] = rand(5, 1, 2, 6)
    assert cosine_loss(h, t, mask) == pytest.approx(cosine_loss(h, t2, mask).item())


def test_cos_label_is_gold_logit_over_norm():
    logits = rand(0, 2, 4, 10)
    labels = torch.tensor([[-100, 3, 7, -100], [-100, -100, 1, 2]])
    z = logits[:, :-1]
    lab = labels[:, 1:]
    m = lab != -100
    want = 1 - (z[m].gather(-1, lab[m].unsqueeze(-1)).squeeze(-1) / z[m].norm(dim=-1)).mean()
    assert cos_label_loss(logits, labels).item() == pytest.approx(want.item(), abs=1e-6)
    # scale invariant, and minimal for a one-hot logit vector
    assert cos_label_loss(logits * 7, labels).item() == pytest.approx(want.item(), abs=1e-5)
    oh = torch.zeros(1, 2, 10)
    oh[0, 0, 4] = 5.0
    assert cos_label_loss(oh, torch.tensor([[-100, 4]])).item() == pytest.approx(0.0, abs=1e-6)


def test_cos_label_smoothing_matches_explicit():
    logits = rand(2, 1, 3, 6)
    labels = torch.tensor([[-100, 2, 5]])
    eps = 0.1
    z = logits[0, :-1]
    y = torch.full((2, 6), eps / 6)
    y[0, 2] += 1 - eps
    y[1, 5] += 1 - eps
    want = 1 - torch.nn.functional.cosine_similarity(z, y, dim=-1).mean()
    assert cos_label_loss(logits, labels, smoothing=eps).item() == pytest.approx(want.item(), abs=1e-5)


@settings(max_examples=25, deadline=None)
@given(seeds, st.floats(0.1, 20.0))
def test_relgeom_is_two_one_minus_cka_and_scale_invariant(seed, scale):
    x, y = rand(seed, 1, 7, 5), rand(seed + 1, 1, 7, 9)
    mask = torch.ones(1, 7, dtype=torch.bool)
    r = relgeom_loss(x, y, mask).item()
    cka = linear_cka(x[0], y[0]).item()
    assert r == pytest.approx(2 * (1 - cka), abs=1e-4)
    assert relgeom_loss(x, y * scale, mask).item() == pytest.approx(r, abs=1e-4)
    assert relgeom_loss(x, x, mask).item() == pytest.approx(0.0, abs=1e-5)


@settings(max_examples=25, deadline=None)
@given(seeds, st.floats(-5, 5))
def test_fisher_second_order_kl_and_shift_invariance(seed, shift):
    z_ref = rand(seed, 3, 11)
    d = rand(seed + 1, 3, 11) * 1e-2
    kl = kl_divergence(z_ref, z_ref + d)
    fq = fisher_quadratic(z_ref + d, z_ref)
    assert torch.allclose(fq, kl, rtol=0.05, atol=1e-7)
    assert torch.allclose(fisher_quadratic(z_ref + d + shift, z_ref), fq, atol=1e-5)
    assert torch.all(fisher_quadratic(z_ref + d, z_ref, variant="diagonal") >= fq - 1e-7)


@settings(max_examples=15, deadline=None)
@given(seeds)
def test_kl_zero_for_identical_and_nonnegative(seed):
    z = rand(seed, 2, 5, 13)
    labels = torch.tensor([[-100, 1, 2, 3, 4], [-100, -100, 5, 6, 7]])
    assert kl_source_loss(z, labels, teacher_logits=z).item() == pytest.approx(0.0, abs=1e-6)
    assert kl_source_loss(z, labels, teacher_logits=rand(seed + 3, 2, 5, 13)).item() >= 0
    assert math.isfinite(kl_source_loss(z * 50, labels, teacher_logits=z).item())
