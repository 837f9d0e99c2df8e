"""The unbiased pass@k estimator against hand-computed values and the closed form."""

import math

import pytest

from semalign.eval.passk import mean_pass_at_k, pass_at_k, valid_ks


@pytest.mark.parametrize("n,c,k,expected", [
    (5, 2, 1, 0.4),
    (5, 2, 2, 0.7),          # 1 - C(3,2)/C(5,2) = 1 - 3/10
    (20, 1, 10, 0.5),        # 1 - C(19,10)/C(20,10) = 1 - 10/20
    (10, 0, 1, 0.0),
    (10, 10, 5, 1.0),
    (1, 1, 1, 1.0),
    (1, 0, 1, 0.0),
    (20, 5, 1, 0.25),
    (3, 1, 3, 1.0),          # n - c < k: every draw of 3 contains the correct one
])
def test_known_values(n, c, k, expected):
    assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)


def test_matches_closed_form_on_a_grid():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                exact = 1.0 - (math.comb(n - c, k) / math.comb(n, k) if n - c >= k else 0.0)
                assert pass_at_k(n, c, k) == pytest.approx(exact, abs=1e-12)


def test_errors_and_helpers():
    with pytest.raises(ValueError):
        pass_at_k(5, 2, 6)
    with pytest.raises(ValueError):
        pass_at_k(5, 6, 1)
    m, se = mean_pass_at_k([(5, 2), (5, 0), (5, 5)], 1)
    assert m == pytest.approx((0.4 + 0 + 1) / 3)
    assert se > 0
    assert valid_ks(20) == [1, 10]
    assert valid_ks(1) == [1]
