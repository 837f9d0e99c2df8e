"""Linear CKA and friends: invariances, identities, the Gram (batched) form, relgeom = 2(1 - CKA)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from semalign.methods.semalign.losses import relgeom_loss
from semalign.similarity import (centered_gram, cka_from_grams, cka_matrix, cka_matrix_fast, cosine_flat,
                                 gram_features, linear_cka)


def _data(seed: int, n: int, p: int, q: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, p, generator=g, dtype=torch.float64)
    y = x @ torch.randn(p, q, generator=g, dtype=torch.float64) + 0.5 * torch.randn(n, q, generator=g,
                                                                                     dtype=torch.float64)
    return x, y


def _orth(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


shapes = st.tuples(st.integers(0, 10_000), st.integers(4, 24), st.integers(1, 12), st.integers(1, 12))


@settings(max_examples=40, deadline=None)
@given(shapes, st.floats(0.01, 100.0))
def test_cka_invariances(args, scale):
    seed, n, p, q = args
    x, y = _data(seed, n, p, q)
    base = float(linear_cka(x, y))
    assert 0.0 <= base <= 1.0 + 1e-6
    assert float(linear_cka(scale * x, y)) == pytest.approx(base, abs=1e-5)               # isotropic scaling
    assert float(linear_cka(x @ _orth(p, seed + 1), y)) == pytest.approx(base, abs=1e-5)  # orthogonal transform
    shift = torch.randn(1, p, dtype=torch.float64) * 10
    assert float(linear_cka(x + shift, y)) == pytest.approx(base, abs=1e-5)              # mean shift
    assert float(linear_cka(y, x)) == pytest.approx(base, abs=1e-6)                      # symmetry


@settings(max_examples=25, deadline=None)
@given(shapes)
def test_cka_self_is_one_and_relgeom_identity(args):
    seed, n, p, q = args
    x, y = _data(seed, n, p, q)
    assert float(linear_cka(x, x)) == pytest.approx(1.0, abs=1e-6)
    mask = torch.ones(1, n, dtype=torch.bool)
    rel = float(relgeom_loss(x[None].float(), y[None].float(), mask))
    assert rel == pytest.approx(2.0 * (1.0 - float(linear_cka(x, y))), abs=2e-4)


def test_cka_not_invariant_to_anisotropic_scaling():
    x, y = _data(3, 50, 6, 6)
    d = torch.diag(torch.tensor([100.0, 1, 1, 1, 1, 0.01], dtype=torch.float64))
    assert abs(float(linear_cka(x @ d, y)) - float(linear_cka(x, y))) > 1e-3


def test_centered_gram_is_normalised_and_centred():
    x, _ = _data(0, 12, 5, 3)
    g = centered_gram(x)
    assert float(g.norm()) == pytest.approx(1.0, abs=1e-5)
    assert torch.allclose(g.sum(0), torch.zeros(12), atol=1e-5)


def test_fast_cka_matrix_matches_reference():
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(40, d, generator=g) for d in (8, 16, 5)]
    ys = [torch.randn(40, 7, generator=g), xs[1] @ torch.randn(16, 9, generator=g)]
    ref = cka_matrix(xs, ys)
    fast = cka_matrix_fast(xs, ys)
    assert fast.shape == (3, 2)
    assert torch.allclose(fast, ref, atol=1e-5)
    stacked = torch.stack([torch.randn(40, 6, generator=g) for _ in range(3)])
    gf = gram_features(stacked)
    assert gf.shape == (3, 1600)
    assert torch.allclose(cka_from_grams(gf, gf).diagonal(), torch.ones(3), atol=1e-5)


def test_cosine_flat():
    a = torch.randn(4, 5)
    assert cosine_flat(a, 3 * a) == pytest.approx(1.0)
    assert cosine_flat(a, -a) == pytest.approx(-1.0)
    b = torch.zeros(4, 5)
    b[0, 0] = 1.0
    c = torch.zeros(4, 5)
    c[1, 1] = 1.0
    assert cosine_flat(b, c) == 0.0
