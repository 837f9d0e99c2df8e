import pytest
import torch

from semalign.errors import SemalignError
from semalign.methods.semalign.bases import compute_map, semantic_bases, shared_vocab_size


def explicit(w_t, w_s, h):
    s_t = torch.linalg.pinv(w_t.double())
    s_t = s_t / s_t.norm(dim=0, keepdim=True)
    s_s = torch.linalg.pinv(w_s.double())
    s_s = s_s / s_s.norm(dim=0, keepdim=True)
    a = (h.double() / h.double().norm(dim=-1, keepdim=True)) @ s_t  # decompose: cosines to teacher bases
    return a @ s_s.T  # recompose with the same coefficients on the student bases


@pytest.mark.parametrize("V,Dt,Ds", [(300, 24, 16), (200, 8, 12), (97, 16, 16)])
def test_closed_form_equals_decompose_recompose(V, Dt, Ds):
    g = torch.Generator().manual_seed(V)
    w_t, w_s = torch.randn(V, Dt, generator=g), torch.randn(V, Ds, generator=g)
    m, stats = compute_map(w_t, w_s, V)
    h = torch.randn(5, 3, Dt, generator=g)
    got = (h / h.norm(dim=-1, keepdim=True)) @ m.T
    assert torch.allclose(got.double(), explicit(w_t, w_s, h), atol=1e-5)
    assert stats.rank_teacher == Dt and stats.rank_student == Ds and stats.dropped_teacher == 0


def test_shared_prefix_only_and_zero_rows_dropped():
    g = torch.Generator().manual_seed(1)
    w_t, w_s = torch.randn(120, 10, generator=g), torch.randn(130, 6, generator=g)
    w_t[100:] = 0.0  # padded tail rows
    m_full, _ = compute_map(w_t, w_s, 100)
    m_pref, _ = compute_map(w_t[:100], w_s[:100], 100)
    assert torch.allclose(m_full, m_pref)
    w_t2 = w_t.clone()
    w_t2[3] = 0.0  # a zero row inside the shared range gives a zero pinv column: dropped, not NaN
    m2, st = compute_map(w_t2, w_s, 100)
    assert torch.isfinite(m2).all() and st.dropped_teacher == 1


def test_semantic_bases_unit_columns():
    w = torch.randn(50, 8)
    s = semantic_bases(w)
    assert s.shape == (8, 50)
    assert torch.allclose(s.norm(dim=0), torch.ones(50), atol=1e-5)


def test_vocab_check(tiny_tok):
    assert shared_vocab_size(tiny_tok, tiny_tok, len(tiny_tok) + 10, len(tiny_tok)) == len(tiny_tok)
    from semalign.testing import tiny_tokenizer

    other = tiny_tokenizer(vocab_size=300)
    # a smaller tokenizer trained on the same corpus shares its prefix: allowed, restricted to the prefix
    assert shared_vocab_size(tiny_tok, other, 400, 400) == len(other)


def test_vocab_mismatch_refused(tiny_tok):
    class Fake:
        def __init__(self, vocab):
            self.v = vocab

        def get_vocab(self):
            return self.v

    a = Fake({f"t{i}": i for i in range(100)})
    b = Fake({f"u{i}": i for i in range(100)})
    with pytest.raises(SemalignError, match="vocabularies differ"):
        shared_vocab_size(a, b, 100, 100)


def test_placeholder_tail_excluded():
    class Fake:
        def __init__(self, vocab):
            self.v = vocab

        def get_vocab(self):
            return self.v

    vocab = {f"t{i}": i for i in range(90)} | {f"[PAD{i}]": i for i in range(90, 100)}
    assert shared_vocab_size(Fake(vocab), Fake(dict(vocab)), 100, 100) == 90
