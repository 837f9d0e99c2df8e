"""MMLU: prompt rendering, tokenisation-aware letter scoring, batching, stratified subsets, few-shot."""

from collections import Counter

import pytest
import torch

from semalign.eval import mmlu
from semalign.eval.prompting import encode, render, resolve_chat_format
from semalign.eval.tasks import EvalOptions
from semalign.testing import tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _docs(n_subjects=3, per=6):
    out = []
    for s in range(n_subjects):
        for q in range(per):
            out.append({"id": f"mmlu-test-{len(out):05d}", "subject": f"subject_{s}", "question": f"Question {q}?",
                        "choices": ["w", "x", "y", "z"], "answer": (q + s) % 4})
    return out


def _prefer(model, token_ids, strength=20.0):
    """Make ``model`` put (almost) all next-token mass on ``token_ids`` regardless of the input."""
    head = model.lm_head
    new = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        new.weight.zero_()
        new.bias.zero_()
        for t in token_ids:
            new.bias[t] = strength
    model.lm_head = new
    return model


def test_prompt_ends_with_the_answer_prefix(tok):
    doc = _docs(1, 1)[0]
    text = render(tok, mmlu.user_prompt(doc), mmlu.ANSWER_PREFIX, resolve_chat_format(tok, "auto"))
    assert text.startswith("<|im_start|>user\nThe following are multiple choice questions (with answers) about "
                           "subject 0.\n\nQuestion 0?\nA. w\nB. x\nC. y\nD. z\nAnswer:<|im_end|>")
    assert text.endswith("<|im_start|>assistant\nThe answer is:")
    tok2 = tiny_tokenizer()
    tok2.chat_template = None
    assert resolve_chat_format(tok2, "auto") == "tulu"
    tulu = render(tok2, mmlu.user_prompt(doc), mmlu.ANSWER_PREFIX, "tulu")
    assert tulu.startswith("<|user|>\n") and tulu.endswith("\n<|assistant|>\nThe answer is:")
    plain = render(tok, mmlu.user_prompt(doc), mmlu.ANSWER_PREFIX, "plain", plain_prefix="")
    assert plain.endswith("D. z\nAnswer:")


def test_letter_variants_are_tokenisation_aware(tok):
    v = mmlu.letter_variants(tok)
    ids = lambda s: tuple(tok.encode(s, add_special_tokens=False))  # noqa: E731
    assert v["A"] == [ids("A"), ids(" A")] and len(ids(" A")) == 1  # ' A' is one token in the tiny vocab
    assert v["B"] == [ids("B"), ids(" B")] and len(ids(" B")) == 2  # ' B' is two ('Ġ', 'B')


@pytest.mark.parametrize("letter,spaced", [("C", False), ("A", True), ("D", False)])
def test_crafted_model_predicts_its_letter(tok, letter, spaced):
    target = encode(tok, (" " if spaced else "") + letter)
    assert len(target) == 1
    model = _prefer(tiny_model(tokenizer=tok), target)
    docs = _docs()
    prompts = [encode(tok, render(tok, mmlu.user_prompt(d), mmlu.ANSWER_PREFIX, "tokenizer")) for d in docs]
    res = mmlu.score_letters(model, tok, prompts, batch_size=4)
    assert {r["pred"] for r in res} == {letter}
    assert all(r["mass"] > 0.99 for r in res)
    # logsumexp vs max: the preferred variant dominates either way
    res_max = mmlu.score_letters(model, tok, prompts, batch_size=4, aggregation="max")
    assert {r["pred"] for r in res_max} == {letter}


def test_two_token_variant_is_scored_through_its_prefix(tok):
    """' B' = ['Ġ', 'B']: mass on 'Ġ' then 'B' must make B the prediction."""
    g, b = encode(tok, " B")
    model = _prefer(tiny_model(tokenizer=tok), [g])
    prompts = [encode(tok, "x")]
    # a head preferring 'Ġ' alone gives B no advantage; add 'B' at a lower level than 'Ġ'
    with torch.no_grad():
        model.lm_head.bias[b] = 15.0
    res = mmlu.score_letters(model, tok, prompts, batch_size=1)
    assert res[0]["pred"] == "B"


def test_batched_scores_equal_unbatched(tok):
    model = tiny_model(tokenizer=tok)
    docs = _docs(2, 2)
    prompts = [encode(tok, render(tok, mmlu.user_prompt(d, docs[:i % 3]), mmlu.ANSWER_PREFIX, "tokenizer"))
               for i, d in enumerate(docs)]
    assert len({len(p) for p in prompts}) > 1  # really different lengths -> left padding is exercised
    one = mmlu.score_letters(model, tok, prompts, batch_size=1)
    many = mmlu.score_letters(model, tok, prompts, batch_size=4)
    auto = mmlu.score_letters(model, tok, prompts, batch_size="auto")
    for a, b, c in zip(one, many, auto):
        for L in "ABCD":
            assert a["logprobs"][L] == pytest.approx(b["logprobs"][L], abs=1e-4)
            assert a["logprobs"][L] == pytest.approx(c["logprobs"][L], abs=1e-4)


def test_stratified_subset_is_even_and_seeded():
    docs = _docs(4, 10)
    sub = mmlu.stratified_subset(docs, 8, seed=1)
    assert Counter(d["subject"] for d in sub) == {f"subject_{i}": 2 for i in range(4)}
    assert sub == mmlu.stratified_subset(docs, 8, seed=1)
    assert sub != mmlu.stratified_subset(docs, 8, seed=2)
    odd = mmlu.stratified_subset(docs, 10, seed=1)
    assert len(odd) == 10 and sorted(Counter(d["subject"] for d in odd).values()) == [2, 2, 3, 3]
    uneven = docs[:2] + docs[10:]  # subject_0 has only 2 questions
    assert len(mmlu.stratified_subset(uneven, 20, seed=0)) == 20
    assert len(mmlu.stratified_subset(docs, 1000, seed=0)) == len(docs)


def test_fewshot_exemplars_are_same_subject_and_held_out(monkeypatch):
    docs = _docs(3, 6)
    monkeypatch.setattr(mmlu, "load_records", lambda data_dir: (docs, "fixture"))
    prep = mmlu.prepare(EvalOptions(num_fewshot=2, seed=3))
    shots = prep.extra["shots"]
    evaluated = {d["id"] for d in prep.docs}
    assert len(prep.docs) == len(docs) - 3 * 2
    for subj, ex in shots.items():
        assert len(ex) == 2 and all(e["subject"] == subj and e["id"] not in evaluated for e in ex)
    text = mmlu.user_prompt(prep.docs[0], shots[prep.docs[0]["subject"]])
    assert text.count("Answer:") == 3 and text.endswith("Answer:")
    assert f"Answer: {'ABCD'[shots[prep.docs[0]['subject']][0]['answer']]}\n\n" in text


def test_exclusion_and_limit(monkeypatch):
    docs = _docs(3, 6)
    monkeypatch.setattr(mmlu, "load_records", lambda data_dir: (docs, "fixture"))
    prep = mmlu.prepare(EvalOptions(exclude_ids=frozenset({"mmlu-test-00000", "mmlu-test-00007", "other"}), limit=6))
    assert prep.n_excluded == 2 and prep.n_total == 18 and len(prep.docs) == 6
    assert not {"mmlu-test-00000", "mmlu-test-00007"} & {d["id"] for d in prep.docs}
    assert Counter(d["subject"] for d in prep.docs) == {"subject_0": 2, "subject_1": 2, "subject_2": 2}


def test_local_file_formats(tmp_path):
    import json

    (tmp_path / "mmlu").mkdir()
    rows = [{"question": "q", "answer_a": "1", "answer_b": "2", "answer_c": "3", "answer_d": "4",
             "correct_answer": "C", "topic": "astronomy"},
            {"question": "question", "answer_a": "a", "answer_b": "b", "answer_c": "c", "answer_d": "d",
             "correct_answer": "answer", "topic": "topic"}]
    (tmp_path / "mmlu" / "mmlu.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    recs, src = mmlu.load_records(tmp_path)
    assert len(recs) == 1 and recs[0]["answer"] == 2 and recs[0]["id"] == "mmlu-test-00000"


def test_stratified_subset_above_57k_excludes_training_ids(monkeypatch):
    """1,000 of 57 uneven subjects: exact size, no duplicates, even spread, training ids never drawn."""
    import random

    rng = random.Random(0)
    docs = []
    for s in range(57):
        for q in range(rng.randint(10, 60) if s % 7 else 12):
            docs.append({"id": f"mmlu-test-{len(docs):05d}", "subject": f"s{s:02d}", "question": f"Q{q}?",
                         "choices": ["w", "x", "y", "z"], "answer": q % 4})
    train = frozenset(d["id"] for d in docs[::5])
    monkeypatch.setattr(mmlu, "load_records", lambda data_dir: (docs, "fixture"))
    for limit in (1000, 57 * 18 + 5):
        prep = mmlu.prepare(EvalOptions(exclude_ids=train, limit=limit, seed=7))
        ids = [d["id"] for d in prep.docs]
        assert len(ids) == limit == len(set(ids)) and not set(ids) & train
        per = Counter(d["subject"] for d in prep.docs)
        avail = Counter(d["subject"] for d in docs if d["id"] not in train)
        # each subject gets its even share, or all it has when it has fewer
        floor = min(limit // 57, min(avail.values()))
        assert all(per[s] >= min(floor, avail[s]) for s in avail)
        assert all(per[s] == avail[s] or per[s] >= floor for s in avail)


def test_execute_reports_letter_diagnostics(tok):
    target = encode(tok, "C")
    model = _prefer(tiny_model(tokenizer=tok), target, strength=5.0)
    docs = _docs(2, 4)
    prep = mmlu.Prepared(docs, "fixture", len(docs), 0, {})
    out = mmlu.execute(model, tok, prep, EvalOptions(chat_format="tokenizer"), _NoProgress())
    m = out.metrics
    assert m["pred_shares"]["C"] == 1.0 and 0 <= m["acc_prior_corrected"] <= 1
    assert "acc_prior_corrected_stderr" in m
    letters = out.breakdown["letters"]
    assert letters["pred_counts"]["C"] == len(docs) and set(letters["letter_prior"]) == set("ABCD")
    for s in out.samples:
        assert set(s["logprobs"]) == set("ABCD") and s["pred_prior_corrected"] in "ABCD"
        assert s["correct_prior_corrected"] == (s["pred_prior_corrected"] == s["target"])


class _NoProgress:
    import contextlib

    @contextlib.contextmanager
    def bar(self, name, total):
        yield lambda k=1: None
