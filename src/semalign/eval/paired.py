"""Paired statistics: two evaluations of the same questions (before/after, method/method), compared per question.

Every function here is pure (numbers or per-question records in, plain dicts out) and deterministic for a seed.

* :func:`mcnemar_exact` — two-sided exact McNemar test on the discordant counts (binomial, p = 1/2).
* :func:`paired_bootstrap` — difference of means with a percentile 95% bootstrap interval; questions are resampled
  jointly across all sides, so the interval accounts for the pairing.
* :func:`gap_closed` — ``(after - before) / (teacher - before)`` with the same joint bootstrap over
  (teacher, before, after).
* :func:`prior_corrected` — contextual calibration of MMLU letter scores (each letter's mean normalised log-prob
  over the evaluated questions is subtracted before the argmax), and :func:`letter_diagnostics`.
* :func:`paired_comparison` — all of the above from two lists of per-question records (``samples_<task>.jsonl``),
  joined by question id.
* :func:`detectable_difference` — the smallest accuracy change a paired comparison of n questions can detect.

Bootstrap: resampling n questions with replacement is a multinomial draw over the distinct per-question score
tuples, which is what is sampled here (exact, and fast for binary scores: at most 8 distinct tuples).
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from ..errors import SemalignError
from .stats import Z95

log = logging.getLogger(__name__)

LETTERS = "ABCD"
N_BOOT = 10_000
SEED = 0


# --------------------------------------------------------------------------- tests and intervals
def mcnemar_exact(b: int, c: int) -> float:
    """Two-sided exact McNemar p-value for ``b`` and ``c`` discordant pairs: ``min(1, 2 P(X <= min(b, c)))`` with
    X ~ Binomial(b + c, 1/2) (statsmodels' ``mcnemar(table, exact=True)``); 1.0 when there are none."""
    b, c = int(b), int(c)
    if b < 0 or c < 0:
        raise SemalignError(f"McNemar counts must be >= 0 (got {b}, {c})")
    n = b + c
    if n == 0:
        return 1.0
    k = min(b, c)
    # log-space sum of the lower tail, stable for large n
    logs = [math.lgamma(n + 1) - math.lgamma(i + 1) - math.lgamma(n - i + 1) - n * math.log(2) for i in range(k + 1)]
    m = max(logs)
    tail = math.exp(m) * sum(math.exp(x - m) for x in logs)
    return min(1.0, 2.0 * tail)


def fixed_broken(before: Sequence[Any], after: Sequence[Any]) -> dict:
    """Counts over paired binary outcomes: fixed (wrong -> right), broken (right -> wrong), both right, both wrong."""
    if len(before) != len(after):
        raise SemalignError(f"paired outcomes differ in length ({len(before)} vs {len(after)})")
    c = Counter((bool(a), bool(b)) for a, b in zip(before, after))
    return {"fixed": c[(False, True)], "broken": c[(True, False)], "both_correct": c[(True, True)],
            "both_wrong": c[(False, False)]}


def _resampled_means(columns: Sequence[Sequence[float]], n_boot: int, seed: int) -> np.ndarray:
    """``(n_boot, k)`` means of k per-question score columns under joint resampling of the questions."""
    mat = np.asarray(columns, dtype=float).T  # (n, k)
    if mat.ndim != 2 or mat.shape[0] == 0:
        raise SemalignError("a bootstrap needs at least one question")
    uniq, counts = np.unique(mat, axis=0, return_counts=True)
    n = mat.shape[0]
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, counts / n, size=n_boot)  # (n_boot, u)
    return draws @ uniq / n


def _ci(values: np.ndarray) -> list[float | None]:
    v = values[np.isfinite(values)]
    if v.size == 0:
        return [None, None]
    lo, hi = np.percentile(v, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """``mean(b) - mean(a)`` over paired per-question scores, its bootstrap standard error and percentile 95% CI."""
    if len(a) != len(b):
        raise SemalignError(f"paired scores differ in length ({len(a)} vs {len(b)})")
    means = _resampled_means([a, b], n_boot, seed)
    d = means[:, 1] - means[:, 0]
    diff = float(np.mean(b) - np.mean(a))
    return {"diff": diff, "ci95": _ci(d), "se": float(np.std(d, ddof=1)) if n_boot > 1 else None,
            "n": len(a), "n_boot": n_boot, "seed": seed}


def gap_closed(before: Sequence[float], after: Sequence[float], teacher: Sequence[float], *, n_boot: int = N_BOOT,
               seed: int = SEED) -> dict:
    """``(after - before) / (teacher - before)`` on per-question scores with a joint percentile bootstrap 95% CI.

    ``value`` is None when teacher and before score the same; resamples where they tie are dropped from the
    interval and counted in ``undefined_frac`` (an interval from few defined resamples is unreliable)."""
    if not len(before) == len(after) == len(teacher):
        raise SemalignError(f"gap closed needs the same questions on all three sides (got {len(teacher)} teacher, "
                            f"{len(before)} before, {len(after)} after)")
    tb, bb, ab = float(np.mean(teacher)), float(np.mean(before)), float(np.mean(after))
    value = None if abs(tb - bb) < 1e-12 else (ab - bb) / (tb - bb)
    means = _resampled_means([teacher, before, after], n_boot, seed)
    den = means[:, 0] - means[:, 1]
    with np.errstate(divide="ignore", invalid="ignore"):
        g = np.where(np.abs(den) > 1e-12, (means[:, 2] - means[:, 1]) / den, np.nan)
    return {"value": value, "ci95": _ci(g), "undefined_frac": float(np.mean(~np.isfinite(g))), "n": len(before)}


def detectable_difference(n: int, discordant_rate: float, *, alpha: float = 0.05, power: float = 0.8) -> float:
    """Smallest |accuracy difference| a paired test on ``n`` questions detects with probability ``power`` at level
    ``alpha`` (two-sided, normal approximation): ``(z_{1-alpha/2} + z_power) * sqrt(discordant_rate / n)``."""
    if n < 1 or not 0 < discordant_rate <= 1:
        raise SemalignError(f"need n >= 1 and a discordant rate in (0, 1] (got n={n}, rate={discordant_rate})")
    from statistics import NormalDist

    z = NormalDist().inv_cdf(1 - alpha / 2) + NormalDist().inv_cdf(power)
    return z * math.sqrt(discordant_rate / n)


# --------------------------------------------------------------------------- MMLU letters
def _normalised(logprobs: Mapping[str, float]) -> dict[str, float]:
    """Letter log-probs renormalised over the four letters (log-softmax of the letter scores)."""
    vals = [float(logprobs[L]) for L in LETTERS]
    m = max(vals)
    lse = m + math.log(sum(math.exp(v - m) for v in vals))
    return {L: v - lse for L, v in zip(LETTERS, vals)}


def _argmax(scores: Mapping[str, float]) -> str:
    return max(LETTERS, key=lambda L: (scores[L], -LETTERS.index(L)))  # ties -> the earlier letter, as scoring does


def prior_corrected(logprobs: Sequence[Mapping[str, float]], targets: Sequence[str] | None = None) -> dict:
    """Contextual calibration over the evaluated set.

    Each question's letter scores are renormalised over A-D (log p(L | q) / sum over letters), the mean of each
    letter's normalised log-prob over all questions (the model's letter prior) is subtracted, and the argmax is
    the calibrated prediction. Returns ``{"prior": {L: mean normalised log-prob}, "preds": [...], "correct":
    [...] (with targets), "acc": ... (with targets)}``."""
    if not logprobs:
        raise SemalignError("prior correction needs at least one question with letter log-probs")
    norm = [_normalised(lp) for lp in logprobs]
    prior = {L: sum(q[L] for q in norm) / len(norm) for L in LETTERS}
    preds = [_argmax({L: q[L] - prior[L] for L in LETTERS}) for q in norm]
    out: dict[str, Any] = {"prior": prior, "preds": preds}
    if targets is not None:
        out["correct"] = [p == t for p, t in zip(preds, targets)]
        out["acc"] = sum(out["correct"]) / len(preds)
    return out


def letter_diagnostics(samples: Sequence[Mapping]) -> dict:
    """Knowledge vs format for MMLU records (``pred``, ``target``, ``logprobs``, ``letter_mass``): predicted and
    gold letter distributions, mean letter mass, the letter prior and the prior-corrected accuracy."""
    n = len(samples)
    if n == 0:
        return {}
    preds = Counter(s["pred"] for s in samples)
    gold = Counter(s["target"] for s in samples)
    out: dict[str, Any] = {
        "pred_counts": {L: preds.get(L, 0) for L in LETTERS},
        "pred_shares": {L: round(preds.get(L, 0) / n, 6) for L in LETTERS},
        "target_counts": {L: gold.get(L, 0) for L in LETTERS},
    }
    masses = [s["letter_mass"] for s in samples if s.get("letter_mass") is not None]
    out["letter_mass_mean"] = round(sum(masses) / len(masses), 6) if masses else None
    if all(isinstance(s.get("logprobs"), Mapping) and all(L in s["logprobs"] for L in LETTERS) for s in samples):
        pc = prior_corrected([s["logprobs"] for s in samples], [s["target"] for s in samples])
        out["letter_prior"] = {L: round(v, 6) for L, v in pc["prior"].items()}
        out["acc_prior_corrected"] = round(pc["acc"], 6)
        c = Counter(pc["preds"])
        out["pred_counts_prior_corrected"] = {L: c.get(L, 0) for L in LETTERS}
    return out


# --------------------------------------------------------------------------- per-question records
def score_of(sample: Mapping) -> float | None:
    """A record's per-question score: ``correct`` (0/1), else ``n_correct / n`` (code with n samples)."""
    c = sample.get("correct")
    if c is not None:
        return float(bool(c))
    if sample.get("n"):
        return sample.get("n_correct", 0) / sample["n"]
    return None


def _index(samples: Iterable[Mapping], what: str) -> dict[str, Mapping]:
    out: dict[str, Mapping] = {}
    for s in samples:
        if "id" not in s:
            raise SemalignError(f"{what}: a per-question record has no `id`; re-run the evaluation with this version")
        out[str(s["id"])] = s
    return out


def _has_letters(rows: Sequence[Mapping]) -> bool:
    return bool(rows) and all(isinstance(r.get("logprobs"), Mapping) and all(L in r["logprobs"] for L in LETTERS)
                              and r.get("target") in LETTERS for r in rows)


def paired_comparison(samples_a: Sequence[Mapping], samples_b: Sequence[Mapping],
                      teacher: Sequence[Mapping] | None = None, *, n_boot: int = N_BOOT, seed: int = SEED,
                      names: tuple[str, str] = ("a", "b")) -> dict:
    """Compare B against A (e.g. after vs before) on the questions both evaluated, joined by ``id``.

    Returns ``n`` (compared questions), ``n_only_a``/``n_only_b`` (ids on one side only, left out), ``acc_a``,
    ``acc_b``, ``diff`` (b - a) with ``ci95``/``se``, ``mcnemar_p``, ``fixed``/``broken`` (a wrong -> b right and
    the reverse), ``gap_closed`` with ``gap_closed_ci95`` when ``teacher`` records are given (on the questions
    all three share), and for MMLU records the prior-corrected accuracies and their paired difference (each side
    calibrated on the compared questions). ``warnings`` says when the id sets differ."""
    ia, ib = _index(samples_a, names[0]), _index(samples_b, names[1])
    common = [i for i in ia if i in ib]
    it = _index(teacher, "teacher") if teacher is not None else None
    if it is not None:
        common = [i for i in common if i in it]
    if not common:
        raise SemalignError(f"{names[0]} and {names[1]} share no question ids"
                            + (" with the teacher" if it is not None else "")
                            + "; evaluate both on the same task, limit, seed and exclusions")
    warnings = []
    only_a, only_b = len(ia) - len(common), len(ib) - len(common)
    if only_a or only_b:
        warnings.append(f"only the {len(common)} questions both sides evaluated are compared ({only_a} only in "
                        f"{names[0]}, {only_b} only in {names[1]}"
                        + (f", teacher: {len(it)}" if it is not None else "") + ")")
    ra, rb = [ia[i] for i in common], [ib[i] for i in common]
    sa, sb = [score_of(r) for r in ra], [score_of(r) for r in rb]
    if any(s is None for s in sa + sb):
        raise SemalignError(f"{names[0]}/{names[1]}: some per-question records have no correctness; they cannot be "
                            "compared")
    boot = paired_bootstrap(sa, sb, n_boot=n_boot, seed=seed)
    out: dict[str, Any] = {"n": len(common), "n_only_a": only_a, "n_only_b": only_b, "acc_a": float(np.mean(sa)),
                           "acc_b": float(np.mean(sb)), "diff": boot["diff"], "ci95": boot["ci95"], "se": boot["se"],
                           "n_boot": n_boot, "seed": seed}
    binary = all(s in (0.0, 1.0) for s in sa + sb)
    if binary:
        fb = fixed_broken(sa, sb)
        out.update(fb)
        out["mcnemar_p"] = mcnemar_exact(fb["fixed"], fb["broken"])
    else:
        out.update({"fixed": None, "broken": None, "mcnemar_p": None})
        warnings.append("per-question scores are fractional (pass@1 over several samples): no McNemar test")
    if it is not None:
        st = [score_of(it[i]) for i in common]
        if any(s is None for s in st):
            raise SemalignError("teacher: some per-question records have no correctness; gap closed cannot be computed")
        g = gap_closed(sa, sb, st, n_boot=n_boot, seed=seed)
        out.update({"acc_teacher": float(np.mean(st)), "gap_closed": g["value"], "gap_closed_ci95": g["ci95"],
                    "gap_closed_undefined_frac": g["undefined_frac"]})
    if _has_letters(ra) and _has_letters(rb):
        ca = prior_corrected([r["logprobs"] for r in ra], [r["target"] for r in ra])
        cb = prior_corrected([r["logprobs"] for r in rb], [r["target"] for r in rb])
        xa, xb = [float(c) for c in ca["correct"]], [float(c) for c in cb["correct"]]
        pb = paired_bootstrap(xa, xb, n_boot=n_boot, seed=seed)
        fb = fixed_broken(xa, xb)
        out["prior_corrected"] = {"acc_a": ca["acc"], "acc_b": cb["acc"], "diff": pb["diff"], "ci95": pb["ci95"],
                                  "mcnemar_p": mcnemar_exact(fb["fixed"], fb["broken"]), **fb}
        if it is not None and _has_letters([it[i] for i in common]):
            ct = prior_corrected([it[i]["logprobs"] for i in common], [it[i]["target"] for i in common])
            g = gap_closed(xa, xb, [float(c) for c in ct["correct"]], n_boot=n_boot, seed=seed)
            out["prior_corrected"].update({"acc_teacher": ct["acc"], "gap_closed": g["value"],
                                           "gap_closed_ci95": g["ci95"]})
    out["warnings"] = warnings
    for w in warnings:
        log.warning("%s vs %s: %s", names[1], names[0], w)
    return out


# --------------------------------------------------------------------------- formatting
def fmt_p(p: float | None) -> str:
    if p is None:
        return "–"
    return "<0.001" if p < 0.001 else f"{p:.3f}" if p < 0.01 else f"{p:.2f}"


def fmt_diff(d: Mapping | None, key: str = "diff", ci: str = "ci95") -> str:
    """``+3.1 [+0.4, +5.8]`` in accuracy points."""
    if not d or d.get(key) is None:
        return "–"
    lo, hi = (d.get(ci) or [None, None])[:2]
    s = f"{100 * d[key]:+.1f}"
    return s + (f" [{100 * lo:+.1f}, {100 * hi:+.1f}]" if lo is not None and hi is not None else "")


def fmt_gap(d: Mapping | None) -> str:
    if not d or d.get("gap_closed") is None:
        return "n/a"
    lo, hi = (d.get("gap_closed_ci95") or [None, None])[:2]
    s = f"{100 * d['gap_closed']:+.0f}%"
    return s + (f" [{100 * lo:+.0f}, {100 * hi:+.0f}]%" if lo is not None and hi is not None else "")


def summary_cells(d: Mapping | None) -> list[str]:
    """Cells: Δ [95% CI], McNemar p, fixed/broken, gap closed [CI], prior-corrected a -> b (Δ)."""
    if not d:
        return ["–"] * 5
    fb = "–" if d.get("fixed") is None else f"{d['fixed']}/{d['broken']}"
    pc = d.get("prior_corrected")
    pcs = "–" if not pc else (f"{100 * pc['acc_a']:.1f} → {100 * pc['acc_b']:.1f} "
                              f"({fmt_diff(pc)}, p {fmt_p(pc['mcnemar_p'])})")
    return [fmt_diff(d), fmt_p(d.get("mcnemar_p")), fb, fmt_gap(d), pcs]


SUMMARY_HEADER = ["Δ pts [95% CI]", "McNemar p", "fixed/broken", "gap closed [95% CI]", "prior-corrected (Δ, p)"]

NOTE = ("Paired on the same questions (joined by id): Δ = difference in accuracy with a percentile bootstrap 95% CI "
        "(questions resampled jointly, 10,000 draws), McNemar = two-sided exact test on the discordant questions, "
        "fixed/broken = wrong→right / right→wrong, gap closed = (after − before) / (teacher − before) with a joint "
        "bootstrap CI. Prior-corrected = MMLU accuracy after subtracting each letter's mean normalised log-prob "
        "over the compared questions (contextual calibration); see docs/evaluation.md.")


def se_from_ci(ci: Sequence[float | None]) -> float | None:
    """Normal-equivalent standard error of a 95% interval (half-width / 1.96)."""
    if not ci or ci[0] is None or ci[1] is None:
        return None
    return (ci[1] - ci[0]) / (2 * Z95)


# --------------------------------------------------------------------------- evaluation folders
def compare_evaluations(before: str | Path, after: str | Path, teacher: str | Path | None = None, *,
                        tasks: Sequence[str] | None = None, names: tuple[str, str] = ("before", "after"),
                        n_boot: int = N_BOOT, seed: int = SEED) -> dict:
    """:func:`paired_comparison` per task from two (or three) evaluation outputs: a ``results.json`` or the folder
    holding it, with its ``samples_<task>.jsonl``. ``tasks`` defaults to the tasks both evaluated."""
    from .results import load_results, load_samples

    ra, rb = load_results(before), load_results(after)
    rt = load_results(teacher) if teacher is not None else None
    names_t = [t for t in rb["results"] if t in ra["results"] and (rt is None or t in rt["results"])]
    out: dict[str, Any] = {}
    for t in tasks if tasks is not None else names_t:
        out[t] = paired_comparison(load_samples(before, t), load_samples(after, t),
                                   load_samples(teacher, t) if teacher is not None else None, n_boot=n_boot,
                                   seed=seed, names=names)
        out[t]["metric"] = rb["results"][t].get("primary_metric", "acc")
    return out


def paired_table(paired: Mapping[str, Mapping], *, label: str = "acc before → after") -> str:
    """Markdown: one row per task with :data:`SUMMARY_HEADER` cells."""
    head = ["Task", "n", label] + SUMMARY_HEADER
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t, d in paired.items():
        acc = f"{100 * d['acc_a']:.1f} → {100 * d['acc_b']:.1f}"
        lines.append("| " + " | ".join([t, str(d["n"]), acc] + summary_cells(d)) + " |")
    return "\n".join(lines)


def transfer_paired(eval_root: str | Path) -> dict:
    """Paired statistics of a run's ``eval/student_after`` against ``eval/student_before`` (teacher for gap
    closed); {} when the run evaluated nothing. A failure is logged, never raised: it must not lose a run."""
    root = Path(eval_root)
    b, a, t = root / "student_before", root / "student_after", root / "teacher"
    if not (b / "results.json").is_file() or not (a / "results.json").is_file():
        return {}
    try:
        return compare_evaluations(b, a, t if (t / "results.json").is_file() else None)
    except SemalignError as exc:
        log.warning("no paired statistics for %s: %s", root, exc.message)
        return {}


def letter_lines(named: Sequence[tuple[str, Mapping]]) -> list[str]:
    """``- name: A 5% B 10% C 72% D 13%; letter mass 0.96; prior-corrected acc 33.0`` for MMLU results dicts."""
    out = []
    for name, res in named:
        r = ((res or {}).get("results") or {}).get("mmlu") or {}
        shares = r.get("pred_shares")
        if not shares:
            continue
        pcs = r.get("acc_prior_corrected")
        out.append(f"- {name}: predicted " + " ".join(f"{L} {100 * shares.get(L, 0):.0f}%" for L in LETTERS)
                   + f"; letter mass {r.get('letter_mass_mean', float('nan')):.2f}; raw acc {100 * r['acc']:.1f}"
                   + ("" if pcs is None else f", prior-corrected {100 * pcs:.1f}"))
    return out
