"""Paired statistics: exact McNemar, paired bootstrap, gap closed, prior correction, record joining."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from semalign.errors import SemalignError
from semalign.eval import paired


# Reference p-values: scipy.stats.binomtest(min(b, c), b + c, 0.5).pvalue, identical to
# statsmodels.stats.contingency_tables.mcnemar([[0, b], [c, 0]], exact=True).pvalue (scipy 1.x, statsmodels 0.14).
@pytest.mark.parametrize("b,c,p", [(50, 37, 0.1979791406725175), (0, 5, 0.0625), (3, 3, 1.0), (10, 0, 0.001953125),
                                   (1, 2, 1.0), (120, 80, 0.005685155996750306), (7, 19, 0.028959274291992188)])
def test_mcnemar_known_values(b, c, p):
    assert paired.mcnemar_exact(b, c) == pytest.approx(p, rel=1e-9)
    assert paired.mcnemar_exact(c, b) == pytest.approx(p, rel=1e-9)


def test_mcnemar_edge_cases():
    assert paired.mcnemar_exact(0, 0) == 1.0
    assert 0 < paired.mcnemar_exact(0, 2000) < 1e-300 or paired.mcnemar_exact(0, 2000) == 0.0
    with pytest.raises(SemalignError):
        paired.mcnemar_exact(-1, 2)


def _table(fixed, broken, both_right, both_wrong):
    a = [0] * fixed + [1] * broken + [1] * both_right + [0] * both_wrong
    b = [1] * fixed + [0] * broken + [1] * both_right + [0] * both_wrong
    return a, b


def test_paired_bootstrap_matches_scipy():
    a, b = _table(30, 20, 60, 90)
    r = paired.paired_bootstrap(a, b, n_boot=20_000, seed=1)
    assert r["diff"] == pytest.approx(0.05)
    # scipy.stats.bootstrap((a, b), mean(y) - mean(x), paired=True, method="percentile", n_resamples=100000)
    # -> CI (-0.0200, 0.1200), standard error 0.03531
    assert r["ci95"][0] == pytest.approx(-0.02, abs=0.006) and r["ci95"][1] == pytest.approx(0.12, abs=0.006)
    assert r["se"] == pytest.approx(0.03531, rel=0.03)
    # analytic paired standard error sqrt((f + b)/n - d^2) / sqrt(n)
    assert r["se"] == pytest.approx(math.sqrt(50 / 200 - 0.05 ** 2) / math.sqrt(200), rel=0.03)
    assert paired.paired_bootstrap(a, b, n_boot=500, seed=3) == paired.paired_bootstrap(a, b, n_boot=500, seed=3)


def test_gap_closed_matches_scipy():
    a, b = _table(30, 20, 60, 90)
    t = [1] * 30 + [1] * 20 + [1] * 60 + [0] * 40 + [1] * 50
    g = paired.gap_closed(a, b, t, n_boot=20_000, seed=1)
    assert g["value"] == pytest.approx(0.125)
    # scipy.stats.bootstrap((a, b, t), (mean b - mean a) / (mean t - mean a), paired=True, method="percentile",
    # n_resamples=100000) -> CI (-0.0526, 0.2771)
    assert g["ci95"][0] == pytest.approx(-0.0526, abs=0.015) and g["ci95"][1] == pytest.approx(0.2771, abs=0.015)
    assert paired.gap_closed([0, 1], [1, 1], [0, 1])["value"] is None


def test_fixed_broken_and_detectable():
    assert paired.fixed_broken([1, 0, 1, 0], [1, 1, 0, 0]) == {"fixed": 1, "broken": 1, "both_correct": 1,
                                                               "both_wrong": 1}
    # 1,000 questions with 30% discordant: ~4.8 points at 80% power, alpha 0.05
    assert paired.detectable_difference(1000, 0.3) == pytest.approx(0.0485, abs=5e-4)
    assert paired.detectable_difference(4000, 0.3) == pytest.approx(0.0485 / 2, abs=5e-4)


binary = st.lists(st.booleans(), min_size=1, max_size=60)


@settings(max_examples=40, deadline=None)
@given(binary)
def test_identical_sides_give_zero(xs):
    r = paired.paired_comparison(_recs(xs), _recs(xs), n_boot=200)
    assert r["diff"] == 0 and r["ci95"] == [0.0, 0.0] and r["mcnemar_p"] == 1.0
    assert r["fixed"] == r["broken"] == 0


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(st.booleans(), st.booleans()), min_size=1, max_size=60))
def test_swapping_sides_negates(pairs):
    a, b = [p[0] for p in pairs], [p[1] for p in pairs]
    ab = paired.paired_comparison(_recs(a), _recs(b), n_boot=300, seed=5)
    ba = paired.paired_comparison(_recs(b), _recs(a), n_boot=300, seed=5)
    assert ab["diff"] == pytest.approx(-ba["diff"])
    assert ab["mcnemar_p"] == pytest.approx(ba["mcnemar_p"])
    assert (ab["fixed"], ab["broken"]) == (ba["broken"], ba["fixed"])
    assert ab["ci95"][0] <= ab["diff"] + 1e-12 and ab["diff"] <= ab["ci95"][1] + 1e-12 or len(pairs) < 3


def _recs(xs, prefix="q", letters=None):
    out = []
    for i, x in enumerate(xs):
        r = {"id": f"{prefix}{i}", "correct": bool(x)}
        if letters:
            r.update(letters[i])
        out.append(r)
    return out


def test_comparison_joins_by_id_and_warns():
    a = _recs([1, 0, 0, 1])
    b = list(reversed(_recs([1, 1, 0, 1, 1])))  # order does not matter; q4 only in b
    r = paired.paired_comparison(a, b, n_boot=200)
    assert r["n"] == 4 and r["n_only_b"] == 1 and r["fixed"] == 1 and r["broken"] == 0
    assert r["diff"] == pytest.approx(0.25) and "only the 4 questions" in r["warnings"][0]
    with pytest.raises(SemalignError, match="share no question ids"):
        paired.paired_comparison(_recs([1]), _recs([1], prefix="z"))
    t = _recs([1, 1, 1, 1])
    r = paired.paired_comparison(a, b, t, n_boot=200)
    assert r["gap_closed"] == pytest.approx(0.5)  # (0.75 - 0.5) / (1 - 0.5)
    # fractional scores (code pass@1 with n samples): bootstrap only
    frac = [{"id": "x", "n": 4, "n_correct": 1, "correct": None}, {"id": "y", "n": 4, "n_correct": 4, "correct": None}]
    r = paired.paired_comparison(frac, frac, n_boot=50)
    assert r["mcnemar_p"] is None and r["diff"] == 0


def _lp(a, b, c, d):
    return {"logprobs": {"A": a, "B": b, "C": c, "D": d}}


def test_prior_correction_removes_a_letter_bias():
    # the model always prefers C by a constant margin; underneath, the gold letter is 0.5 nats above the others
    golds = "ABCDABCD"
    lps = []
    for g in golds:
        s = {L: -3.0 for L in "ABCD"}
        s["C"] += 2.0
        s[g] += 0.5
        lps.append(s)
    raw = [max("ABCD", key=lambda L: s[L]) for s in lps]
    assert raw.count("C") == 8
    pc = paired.prior_corrected(lps, list(golds))
    assert pc["acc"] == 1.0 and pc["preds"] == list(golds)
    assert max(pc["prior"], key=pc["prior"].get) == "C"
    # invariant to a per-question constant (unnormalised letter scores / letter mass)
    shifted = [{L: v - i for L, v in s.items()} for i, s in enumerate(lps)]
    assert paired.prior_corrected(shifted, list(golds))["preds"] == pc["preds"]


def test_letter_diagnostics():
    samples = [{"pred": "C", "target": g, "letter_mass": 0.9, **_lp(-3, -3, -1 + (g == "C"), -3)} for g in "ABCC"]
    d = paired.letter_diagnostics(samples)
    assert d["pred_counts"] == {"A": 0, "B": 0, "C": 4, "D": 0} and d["pred_shares"]["C"] == 1.0
    assert d["target_counts"]["C"] == 2 and d["letter_mass_mean"] == pytest.approx(0.9)
    assert 0 <= d["acc_prior_corrected"] <= 1 and set(d["letter_prior"]) == set("ABCD")
    assert paired.letter_diagnostics([]) == {}


def test_comparison_reports_prior_corrected():
    golds = "ABCDABCD"
    before = [{"id": f"q{i}", "target": g, "correct": g == "C", "pred": "C",
               **_lp(*[-3 + 2 * (L == "C") + 0.5 * (L == g) for L in "ABCD"])} for i, g in enumerate(golds)]
    after = [{**r, "correct": True, "pred": r["target"]} for r in before]  # same letter scores: same knowledge
    r = paired.paired_comparison(before, after, n_boot=200)
    assert r["diff"] == pytest.approx(0.75)
    assert r["prior_corrected"]["diff"] == 0 and r["prior_corrected"]["acc_a"] == 1.0


def test_formatting():
    d = {"diff": 0.031, "ci95": [0.004, 0.058], "mcnemar_p": 0.0123, "fixed": 40, "broken": 9,
         "gap_closed": 0.25, "gap_closed_ci95": [0.1, 0.4]}
    cells = paired.summary_cells(d)
    assert cells[:4] == ["+3.1 [+0.4, +5.8]", "0.01", "40/9", "+25% [+10, +40]%"]
    assert paired.fmt_p(0.0001) == "<0.001" and paired.fmt_p(0.2) == "0.20" and paired.summary_cells(None)[0] == "–"
