"""Batched generation: equality with batch-1 and HF generate, stopping, seeded sampling, GSM8K end to end."""

import pytest
import torch

from semalign.eval.generate import GenStats, cut_at_stop, eos_token_ids, generate
from semalign.testing import tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def _prompts(tok):
    texts = ["def add(a, b):", "The answer is", "Answer the following question. Question: Natalia sold clips", "x"]
    return [tok(t, add_special_tokens=False)["input_ids"] for t in texts]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_batched_greedy_equals_batch_one_and_hf(tok, family):
    model = tiny_model(family, tokenizer=tok, layers=2)
    prompts = _prompts(tok)
    one = generate(model, tok, prompts, max_new_tokens=12, batch_size=1)
    many = generate(model, tok, prompts, max_new_tokens=12, batch_size=4)
    assert [o.token_ids for o in one] == [o.token_ids for o in many]
    eos = sorted(eos_token_ids(model, tok))
    for p, o in zip(prompts, one):
        ref = model.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)[0, len(p):].tolist()
        ref = [t for t in ref if t not in eos and t != tok.pad_token_id]
        assert o.token_ids == ref


def test_early_finishers_leave_the_batch(tok):
    """Rows that stop at different steps are dropped from the KV cache; the others continue unchanged."""
    model = tiny_model(tokenizer=tok, layers=2)
    prompts = _prompts(tok)
    free = generate(model, tok, prompts, max_new_tokens=16, batch_size=1)
    stop_fn = lambda text: len(text) >= 6  # noqa: E731  (rows reach 6 characters at different steps)
    st = GenStats()
    batched = generate(model, tok, prompts, max_new_tokens=16, batch_size=4, stop_fn=stop_fn, stats=st)
    single = generate(model, tok, prompts, max_new_tokens=16, batch_size=1, stop_fn=stop_fn)
    assert [o.token_ids for o in batched] == [o.token_ids for o in single]
    assert len({len(o.token_ids) for o in batched}) > 1  # they really finished at different steps
    for f, b in zip(free, batched):
        assert f.token_ids[:len(b.token_ids)] == b.token_ids
    assert st.new_tokens == sum(len(o.token_ids) for o in batched) and st.batches == 1 and st.requests == 4
    assert tok.convert_tokens_to_ids("<|im_end|>") in eos_token_ids(model, tok)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_refilled_batches_equal_batch_one(tok, family):
    """More prompts than rows: finished rows are replaced by waiting prompts mid-batch (qwen2), or batches run one
    after another (gemma3's sliding-window cache); either way the tokens equal batch-1 decoding."""
    model = tiny_model(family, tokenizer=tok, layers=2)
    texts = ["def add(a, b):", "The answer is", "Answer the following question. Question: Natalia sold clips",
             "x", "Complete the following python function.", "0123", "Here is the completed function:"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    stop_fn = lambda text: len(text) >= 4 + len(text.split()[0]) if text.split() else False  # noqa: E731
    single = generate(model, tok, prompts, max_new_tokens=14, batch_size=1, stop_fn=stop_fn)
    st = GenStats()
    many = generate(model, tok, prompts, max_new_tokens=14, batch_size=3, stop_fn=stop_fn, stats=st)
    assert [o.token_ids for o in many] == [o.token_ids for o in single]
    assert [o.finish for o in many] == [o.finish for o in single]
    sampled = dict(max_new_tokens=10, temperature=1.0, seeds=list(range(7)), stop_fn=stop_fn)
    assert [o.token_ids for o in generate(model, tok, prompts, batch_size=1, **sampled)] == \
        [o.token_ids for o in generate(model, tok, prompts, batch_size=3, **sampled)]


def test_stop_strings_cut_the_text(tok):
    model = tiny_model(tokenizer=tok, layers=2)
    prompts = _prompts(tok)
    free = generate(model, tok, prompts, max_new_tokens=16, batch_size=2)
    text = free[0].text
    assert len(text) > 3
    stop = text[2:4]
    outs = generate(model, tok, prompts[:1], max_new_tokens=16, batch_size=1, stop=[stop])
    assert outs[0].finish == "stop" and outs[0].text == cut_at_stop(text, [stop]) and stop not in outs[0].text
    fn = generate(model, tok, prompts[:1], max_new_tokens=16, stop_fn=lambda t: len(t) >= 3)
    assert fn[0].finish == "stop" and len(fn[0].token_ids) < 16
    assert cut_at_stop("abc```def", ["```", "d"]) == "abc"


def test_seeded_sampling_does_not_depend_on_batching(tok):
    model = tiny_model(tokenizer=tok, layers=2)
    prompts = _prompts(tok)
    kw = dict(max_new_tokens=8, temperature=1.0, seeds=[11, 12, 13, 14])
    a = generate(model, tok, prompts, batch_size=1, **kw)
    b = generate(model, tok, prompts, batch_size=4, **kw)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]
    c = generate(model, tok, prompts, batch_size=4, max_new_tokens=8, temperature=1.0, seeds=[1, 2, 3, 4])
    assert [o.token_ids for o in a] != [o.token_ids for o in c]


def test_gsm8k_task_scores_a_scripted_model(tok, monkeypatch):
    """GSM8K end to end with generation replaced by canned answers (extraction + exact match + stats)."""
    from semalign.eval import evaluate, gsm8k
    from semalign.eval.generate import GenOutput

    rows = [{"id": f"gsm8k-test-{i:04d}", "question": f"q{i}", "rationale": "", "answer": a}
            for i, a in enumerate(["7", "36", "2400", "5"])]
    monkeypatch.setattr(gsm8k.sources, "gsm8k_records", lambda split, data_dir: (rows, "fixture"))
    replies = ["3 + 4 = 7. So the answer is 7.", "The answer is 35", "It is $2,400.00 in total.", "no idea"]

    def fake_generate(model, tokenizer, prompts, **kw):
        kw["stats"].batch_size = 4
        return [GenOutput(r, [1] * 3, "eos", len(p)) for r, p in zip(replies, prompts)]

    monkeypatch.setattr(gsm8k, "generate", fake_generate)
    res = evaluate(tiny_model(tokenizer=tok, layers=1), tok, ["gsm8k"], progress=False,
                   exclude_ids={"gsm8k-test-0003"})
    r = res["results"]["gsm8k"]
    assert r["n"] == 3 and r["n_excluded"] == 1
    assert r["exact_match"] == pytest.approx(2 / 3, abs=1e-6)
    assert r["exact_match_strict"] == pytest.approx(1 / 3, abs=1e-6)
