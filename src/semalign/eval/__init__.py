"""Evaluation harness: MMLU, GSM8K, HumanEval and MBPP on a live model (see docs/evaluation.md).

>>> from semalign.eval import evaluate
>>> res = evaluate(model, tokenizer, ["mmlu", "gsm8k"], limit=57)          # doctest: +SKIP
>>> res["results"]["mmlu"]["acc"]                                           # doctest: +SKIP
"""

from __future__ import annotations

from .execution import ExecLimits, ExecResult, run_program, run_programs
from .passk import pass_at_k
from .results import compare_table, load_results, markdown_table, write_report_section
from .runner import evaluate
from .tasks import EVAL_TASKS

__all__ = ["evaluate", "compare_table", "write_report_section", "markdown_table", "load_results", "pass_at_k",
           "EVAL_TASKS", "ExecLimits", "ExecResult", "run_program", "run_programs"]
