"""GSM8K: zero-shot chat prompt, greedy generation, answer extraction, exact match.

Prompt (protocol): user ``"Answer the following question.\\n\\nQuestion: {q}"`` and an empty assistant turn, so an
instruct model reasons step by step before its answer. ``gsm8k_answer_prefix=True`` pre-fills the assistant turn with
``"Answer:"`` instead (Open-Instruct's chat mode and the protocol's training target ``"Answer: {rationale} So the
answer is {n}."``); untuned instruct models then tend to answer in one short sentence without reasoning, which
is why it is not the default. Greedy, up to 512 new tokens, stopping at the end-of-turn token or when the model
starts a new ``"Question:"``.

Extraction (``flexible``, the headline ``exact_match``): the number after the last "answer is" / "answer:";
otherwise the last ``\\boxed{..}`` or ``#### N``; otherwise the last number in the response. ``strict``
(``exact_match_strict``) accepts only the "answer is N" form. Numbers are normalised: thousands commas, ``$`` and
a trailing ``.`` are removed and integral decimals lose their zeros (``18.00`` -> ``18``).
"""

from __future__ import annotations

import logging
import re

from ..data import sources
from . import stats
from .generate import GenStats, generate
from .prompting import encode, render
from .tasks import EVAL_TASKS, EvalOptions, EvalTask, Prepared, TaskOutput, exclude, first_n

log = logging.getLogger(__name__)

PROMPT = "Answer the following question.\n\nQuestion: {question}"
ANSWER_PREFIX = "Answer:"
STOP = ("\nQuestion:", "\n\nQuestion")
MAX_NEW_TOKENS = 512

_NUM = r"(?:(?<![\w)\]])-)?\$?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?"
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)\s*:?\s*(?:\*\*)?\s*(?:\\\(|\$\$?)?\s*(?:\\boxed\{)?\s*(" + _NUM + ")",
                        re.IGNORECASE)
_BOXED = re.compile(r"\\boxed\{\s*(" + _NUM + r")\s*\}")
_HASHES = re.compile(r"####\s*(" + _NUM + ")")
_ANY = re.compile(_NUM)


def normalize_number(s: str | None) -> str | None:
    """``"$1,234.00"`` -> ``"1234"``; ``"18.50"`` -> ``"18.5"``; None when ``s`` is not a number."""
    if s is None:
        return None
    t = s.strip().replace(",", "").replace("$", "").replace(" ", "").rstrip(".")
    if not re.fullmatch(r"-?\d+(?:\.\d+)?", t):
        return None
    if "." in t:
        t = t.rstrip("0").rstrip(".")
    if t in ("-0", ""):
        t = "0"
    return t


def extract_answer(text: str) -> dict:
    """``{"flexible": str|None, "strict": str|None}`` normalised answers from a model response."""
    strict = None
    m = _ANSWER_IS.findall(text)
    if m:
        strict = normalize_number(m[-1])
    flexible = strict
    if flexible is None:
        for rx in (_BOXED, _HASHES, _ANY):
            found = rx.findall(text)
            if found:
                flexible = normalize_number(found[-1])
                if flexible is not None:
                    break
    return {"flexible": flexible, "strict": strict}


def prepare(opts: EvalOptions) -> Prepared:
    rows, source = sources.gsm8k_records("test", opts.data_dir)
    notes = []
    if "subset" in source:
        notes.append("GSM8K: packaged 100-problem subset of the test split; pass --data-dir with gsm8k/test.jsonl "
                     "for all 1,319")
    n_total = len(rows)
    docs, n_excl = exclude(rows, opts.exclude_ids)
    docs = first_n(docs, opts.limit)
    settings = {"num_fewshot": 0, "prompt": PROMPT,
                "answer_prefix": ANSWER_PREFIX if opts.gsm8k_answer_prefix else None, "stop": list(STOP),
                "max_new_tokens": opts.max_new_tokens or MAX_NEW_TOKENS, "decoding": "greedy", "temperature": 0.0,
                "extraction": "answer-is, then boxed/####, then last number; numbers normalised",
                "limit": opts.limit, "limit_strategy": "first N" if opts.limit else None}
    if opts.num_fewshot:
        notes.append(f"GSM8K runs zero-shot; --num-fewshot {opts.num_fewshot} applies to MMLU only")
        log.warning(notes[-1])
    return Prepared(docs, source, n_total, n_excl, settings, notes)


def execute(model, tokenizer, prep: Prepared, opts: EvalOptions, progress) -> TaskOutput:
    prefix = ANSWER_PREFIX if opts.gsm8k_answer_prefix else ""
    texts = [render(tokenizer, PROMPT.format(question=d["question"]), prefix, opts.chat_format,
                    plain_prefix="\n" + ANSWER_PREFIX) for d in prep.docs]
    gstats = GenStats()
    with progress.bar("gsm8k", len(texts)) as advance:
        outs = generate(model, tokenizer, [encode(tokenizer, t) for t in texts],
                        max_new_tokens=prep.settings["max_new_tokens"], batch_size=opts.batch_size, stop=STOP,
                        on_finish=advance, stats=gstats)
    samples = []
    for d, text, o in zip(prep.docs, texts, outs):
        ext = extract_answer(o.text)
        gold = normalize_number(str(d["answer"]))
        samples.append({"id": d["id"], "prompt": text, "target": gold, "response": o.text,
                        "extracted": ext["flexible"], "extracted_strict": ext["strict"],
                        "correct": ext["flexible"] is not None and ext["flexible"] == gold,
                        "correct_strict": ext["strict"] is not None and ext["strict"] == gold,
                        "finish": o.finish, "new_tokens": len(o.token_ids)})
    n = len(samples)
    metrics: dict = {}
    stats.put(metrics, "exact_match", stats.binomial(sum(s["correct"] for s in samples), n))
    stats.put(metrics, "exact_match_strict", stats.binomial(sum(s["correct_strict"] for s in samples), n))
    metrics["truncated"] = sum(s["finish"] == "length" for s in samples)
    return TaskOutput(metrics, samples, generation=gstats.to_dict(), settings={"batch_size": gstats.batch_size})


EVAL_TASKS.register("gsm8k", EvalTask("gsm8k", "GSM8K grade-school math, greedy, exact match", "exact_match", False,
                                      prepare, execute))
