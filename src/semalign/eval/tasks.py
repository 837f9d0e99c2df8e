"""The registry of evaluation tasks and what every task shares: options, prepared data, outputs, progress.

A task is two functions. ``prepare(opts)`` loads the records, drops excluded ids, applies ``limit`` and returns
:class:`Prepared` (the documents plus every score-affecting setting, which also keys the result cache).
``execute(model, tokenizer, prepared, opts, progress)`` scores them and returns :class:`TaskOutput`.
Adding a task = one module that calls ``EVAL_TASKS.register(...)`` + a test.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

from ..errors import SemalignError
from ..registry import Registry
from .execution import ExecLimits

log = logging.getLogger(__name__)


@dataclass
class EvalOptions:
    """Everything that shapes a run (resolved from :func:`semalign.eval.evaluate`'s arguments)."""

    limit: int | None = None
    batch_size: int | str = "auto"
    seed: int = 1234
    num_fewshot: int = 0
    data_dir: Path | None = None
    exclude_ids: frozenset[str] = frozenset()
    chat_format: str = "tokenizer"  # resolved: tokenizer | tulu | plain
    format_info: dict = field(default_factory=dict)
    max_new_tokens: int | None = None  # None = the task's protocol default
    n_samples: int = 1
    temperature: float | None = None  # None = 0 (greedy) for n_samples == 1, else 0.1
    top_p: float = 1.0
    mbpp_set: str = "test"
    code_answer_prefix: bool = True
    gsm8k_answer_prefix: bool = False
    letter_aggregation: str = "logsumexp"
    exec_limits: ExecLimits = field(default_factory=ExecLimits)
    exec_workers: int | None = None
    allow_code_execution: bool = False


@dataclass
class Prepared:
    docs: list[dict]
    source: str
    n_total: int  # records available before exclusion and limit
    n_excluded: int
    settings: dict  # score-affecting, task-specific settings
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)  # anything execute() needs (few-shot exemplars, ...)

    def data_digest(self) -> str:
        h = hashlib.sha256()
        for d in self.docs:
            h.update(json.dumps(d, sort_keys=True, ensure_ascii=False, default=str).encode())
        return h.hexdigest()


@dataclass
class TaskOutput:
    metrics: dict[str, Any]  # flat: "acc", "acc_stderr", "acc_ci95", ...
    samples: list[dict]
    breakdown: dict = field(default_factory=dict)  # e.g. MMLU per-subject accuracy
    generation: dict = field(default_factory=dict)  # generation statistics (tokens/s, ...)
    settings: dict = field(default_factory=dict)  # settings only known after running (e.g. batch size used)


@dataclass(frozen=True)
class EvalTask:
    name: str
    description: str
    primary_metric: str
    needs_execution: bool
    prepare: Callable[[EvalOptions], Prepared]
    execute: Callable[..., TaskOutput]


EVAL_TASKS: Registry[EvalTask] = Registry("eval task")


def parse_tasks(tasks: str | Iterable[str]) -> list[str]:
    """``"mmlu,gsm8k"`` or a list -> validated, de-duplicated task names (unknown names: did-you-mean error)."""
    names = [t.strip().lower() for t in (tasks.split(",") if isinstance(tasks, str) else tasks)]
    names = [n for n in names if n]
    if not names:
        raise SemalignError(f"no tasks given; choose from {', '.join(EVAL_TASKS.names())} (comma separated)")
    out: list[str] = []
    for n in names:
        EVAL_TASKS.get(n)
        if n not in out:
            out.append(n)
    return out


# Comparison and sweep defaults: large enough that a paired test can see a few points (docs/evaluation.md).
COMPARISON_LIMITS = {"mmlu": 1000, "gsm8k": 200}


def eval_limits(limit: int | None, tasks: Iterable[str]) -> dict[str, int | None]:
    """Per-task example limits: ``limit`` for every task when given, else :data:`COMPARISON_LIMITS` (MMLU 1,000
    stratified questions, GSM8K 200; other tasks all of them)."""
    return {t: limit if limit is not None else COMPARISON_LIMITS.get(t) for t in tasks}


def exclude(docs: list[dict], ids: frozenset[str], key: str = "id") -> tuple[list[dict], int]:
    """Drop documents whose ``key`` is in ``ids``; returns (kept, number dropped)."""
    if not ids:
        return docs, 0
    kept = [d for d in docs if str(d[key]) not in ids]
    return kept, len(docs) - len(kept)


def first_n(docs: list[dict], limit: int | None) -> list[dict]:
    if limit is None:
        return docs
    if limit < 1:
        raise SemalignError(f"--limit must be a positive number of examples (got {limit})")
    return docs[:limit]


def stable_seed(*parts: Any) -> int:
    """A 63-bit seed from arbitrary parts (stable across processes, unlike ``hash``)."""
    h = hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "big") & ((1 << 63) - 1)


# --------------------------------------------------------------------------- progress
class Progress:
    """Thin wrapper over rich progress bars (a no-op when disabled)."""

    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self._p = None

    def __enter__(self) -> "Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import (BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn,
                                       TimeElapsedColumn, TimeRemainingColumn)

            self._p = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                                   TimeElapsedColumn(), TimeRemainingColumn(), console=Console(stderr=True),
                                   transient=False)
            self._p.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        if self._p is not None:
            self._p.__exit__(*exc)
            self._p = None

    @contextlib.contextmanager
    def bar(self, description: str, total: int) -> Iterator[Callable[[int], None]]:
        if self._p is None:
            yield lambda n=1: None
            return
        tid = self._p.add_task(description, total=total)
        try:
            yield lambda n=1: self._p.advance(tid, n)
        finally:
            self._p.update(tid, completed=total)
