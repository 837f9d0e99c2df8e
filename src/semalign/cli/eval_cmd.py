"""``semalign eval``: evaluate one model on MMLU / GSM8K / HumanEval / MBPP (lm-eval-like results)."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Optional

import typer

from ..errors import SemalignError

log = logging.getLogger("semalign.eval")

EPILOG = """\b
Examples:
  semalign eval --model qwen2.5-coder-0.5b-instruct --tasks mmlu --limit 285
  semalign eval --model runs/x --tasks gsm8k --data-dir ../shared/data --output runs/x/eval
  semalign eval --model runs/x --tasks mmlu --limit 1000 --baseline runs/base/eval/results.json
  semalign eval --model qwen2.5-coder-1.5b-instruct --tasks humaneval,mbpp --allow-code-execution \\
      --data-dir ../shared/data --n-samples 20 --temperature 0.1
"""


def _read_ids(path: Optional[Path]) -> Optional[set[str]]:
    """Ids from a JSON list, a JSON object with ``ids``/split manifests, or one id per line."""
    if path is None:
        return None
    from ..data.jsonl import read_text_file

    text = read_text_file(path, "--exclude-ids file")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        if text.lstrip()[:1] in ("[", "{"):
            raise SemalignError(f"{path}:{exc.lineno}: invalid JSON in --exclude-ids ({exc.msg}); fix the file or "
                                "give one id per line") from None
        return {ln.strip() for ln in text.split("\n") if ln.strip()}
    if isinstance(data, list):
        return {str(x) for x in data}
    if isinstance(data, dict):
        if "ids" in data:
            return {str(x) for x in data["ids"]}
        if "splits" in data:  # a data.tasks Splits manifest: everything but the eval split
            return {str(i) for name, s in data["splits"].items() if name != "eval" for i in s.get("ids", [])}
    raise SemalignError(f"--exclude-ids {path}: expected a JSON list of ids, {{\"ids\": [...]}}, a splits manifest, "
                        "or one id per line")


def _load(spec: str, dtype: str, device: str):
    from ..models.load import load_model

    return load_model(spec, dtype=dtype, device=device)


def _model_hash(resolved) -> Optional[str]:
    try:
        from ..models.load import model_content_hash

        if getattr(resolved, "kind", None) == "hub":
            return None
        return model_content_hash(resolved)
    except (SemalignError, OSError, ImportError) as e:
        log.info("no model content hash (%s); results will not be cached", e)
        return None


def eval_cmd(
    model: str = typer.Option(..., "--model", "-m", help="asset name, model/run directory, .gguf file or hub id"),
    tasks: str = typer.Option("mmlu", "--tasks", "-t", help="comma separated: mmlu,gsm8k,humaneval,mbpp"),
    limit: Optional[int] = typer.Option(None, "--limit", help="examples per task (MMLU: stratified over subjects; "
                                        "others: the first N)"),
    batch_size: str = typer.Option("auto", "--batch-size", help="'auto' or a number of sequences per batch"),
    allow_code_execution: bool = typer.Option(False, "--allow-code-execution",
                                              help="run model-written code for HumanEval/MBPP (not a sandbox)"),
    num_fewshot: int = typer.Option(0, "--num-fewshot", help="MMLU exemplars per subject (held out, seeded)"),
    data_dir: Optional[Path] = typer.Option(None, "--data-dir", help="folder with gsm8k/, mbpp/ (and optionally "
                                            "mmlu/, humaneval/) data files"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 where the hardware has native bf16, else fp32), "
                              "bf16, fp16 or fp32"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    seed: int = typer.Option(1234, "--seed"),
    output: Optional[Path] = typer.Option(None, "--output", "-o",
                                          help="write results.json and samples_<task>.jsonl here"),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="default 512 (GSM8K and code)"),
    n_samples: int = typer.Option(1, "--n-samples", help="code samples per problem (pass@k for k <= n)"),
    temperature: Optional[float] = typer.Option(None, "--temperature", help="code sampling temperature "
                                                "(default 0 = greedy for n=1, 0.1 for n>1)"),
    mbpp_set: str = typer.Option("test", "--mbpp-set", help="test (task ids 11-510, 257 problems) or full (427)"),
    chat_format: str = typer.Option("auto", "--chat-format", help="auto, tokenizer, tulu or plain"),
    code_answer_prefix: bool = typer.Option(True, "--code-answer-prefix/--no-code-answer-prefix",
                                            help="pre-fill 'Here is the completed function: ```python' (protocol)"),
    gsm8k_answer_prefix: bool = typer.Option(False, "--gsm8k-answer-prefix/--no-gsm8k-answer-prefix",
                                             help="pre-fill 'Answer:' for GSM8K (Open-Instruct chat mode)"),
    exclude_ids: Optional[Path] = typer.Option(None, "--exclude-ids", help="ids used for training (JSON list, "
                                               "splits manifest or one per line); never evaluated"),
    exec_timeout: float = typer.Option(10.0, "--exec-timeout", help="seconds per generated program"),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="results.json (or its folder) of another "
                                            "evaluation of the same questions: print paired statistics against it"),
    teacher_results: Optional[Path] = typer.Option(None, "--teacher-results", help="with --baseline: a teacher's "
                                                   "results.json, for gap closed"),
    log_samples: bool = typer.Option(True, "--log-samples/--no-log-samples"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="reuse results cached for the same model hash and "
                               "settings"),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's choice; 1 is "
                                          "faster when other jobs share the cores)"),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="more logging"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="warnings and errors only"),
) -> None:
    """Evaluate a model on MMLU, GSM8K, HumanEval and MBPP; print a markdown table, write results.json."""
    from ..eval import evaluate, markdown_table
    from ..eval.tasks import parse_tasks
    from ..eval.execution import require_opt_in
    from ..eval.tasks import EVAL_TASKS

    names = parse_tasks(tasks)
    if teacher_results is not None and baseline is None:
        raise SemalignError("--teacher-results needs --baseline (gap closed is measured from the baseline)")
    if baseline is not None:
        if not log_samples:
            raise SemalignError("--baseline compares per question; drop --no-log-samples")
        from ..eval.results import load_samples

        for ref in (baseline, teacher_results):
            for n in names if ref is not None else ():
                load_samples(ref, n)  # refuse before loading a model when a side lacks per-question records
    code = [n for n in names if EVAL_TASKS.get(n).needs_execution]
    if code:
        require_opt_in(allow_code_execution, code)  # refuse before loading a model
    if threads is not None:
        import torch

        if threads < 1:
            raise SemalignError(f"--threads must be >= 1 (got {threads})")
        torch.set_num_threads(threads)
    m, tok, resolved = _load(model, dtype, device)
    tmp = None
    if baseline is not None and output is None:
        import tempfile

        tmp = tempfile.TemporaryDirectory(prefix="semalign-eval-")
        output_dir = Path(tmp.name)
    else:
        output_dir = output
    mhash = _model_hash(resolved)
    res = evaluate(m, tok, names, limit=limit, batch_size=batch_size, allow_code_execution=allow_code_execution,
                   data_dir=data_dir, seed=seed, num_fewshot=num_fewshot, exclude_ids=_read_ids(exclude_ids),
                   output_dir=output_dir, log_samples=log_samples, model_name=getattr(resolved, "display_name", model),
                   progress=progress and not quiet, cache_key=mhash if cache else None, model_hash=mhash,
                   chat_format=chat_format, max_new_tokens=max_new_tokens, n_samples=n_samples,
                   temperature=temperature, mbpp_set=mbpp_set, code_answer_prefix=code_answer_prefix,
                   gsm8k_answer_prefix=gsm8k_answer_prefix, exec_timeout_s=exec_timeout,
                   extra_config={"model_spec": model, "model_kind": getattr(resolved, "kind", None),
                                 "model_path": getattr(resolved, "path", None), "requested_dtype": dtype})
    typer.echo(f"\n**{res['config']['model']}** ({res['config']['dtype']}, {res['config']['chat_format']} chat "
               f"format, seed {seed})\n")
    typer.echo(markdown_table(res))
    if baseline is not None:
        from ..eval.paired import NOTE, compare_evaluations, letter_lines, paired_table
        from ..eval.results import load_results
        from ..paths import atomic_write_json

        paired = compare_evaluations(baseline, output_dir, teacher_results, tasks=names, names=("baseline", "model"))
        res["paired"] = {"baseline": str(baseline), "teacher": str(teacher_results) if teacher_results else None,
                         **paired}
        typer.echo(f"\nPaired against {baseline}:\n")
        typer.echo(paired_table(paired, label="acc baseline → model"))
        for t, d in paired.items():
            for w in d.get("warnings", []):
                typer.echo(f"warning: {t}: {w}")
        lines = letter_lines([("baseline", load_results(baseline)), ("model", res)])
        if lines:
            typer.echo("\nMMLU letters:\n" + "\n".join(lines))
        typer.echo("\n" + NOTE)
        if output is not None:
            atomic_write_json(Path(output) / "results.json", res)
    if tmp is not None:
        tmp.cleanup()
    if output is not None:
        typer.echo(f"\nresults: {Path(output) / 'results.json'}")


def register(app: typer.Typer) -> None:
    """Add the ``eval`` command to ``app``."""
    app.command("eval", epilog=EPILOG, no_args_is_help=True)(eval_cmd)
