"""``evaluate``: score a live model on evaluation tasks and return (and optionally write) lm-eval-like results."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import logging
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..errors import SemalignError
from ..faults import fault_point
from . import code as _code  # noqa: F401  (registers humaneval, mbpp)
from . import gsm8k as _gsm8k  # noqa: F401  (registers gsm8k)
from . import mmlu as _mmlu  # noqa: F401  (registers mmlu)
from .execution import ExecLimits, require_opt_in, runner as exec_runner
from .prompting import format_info, resolve_chat_format
from .results import (EVAL_VERSION, PROTOCOL_NOTE, SCHEMA_VERSION, cache_get, cache_put, eval_cache_inputs, markdown_table,
                      package_versions, write_outputs)
from .tasks import EVAL_TASKS, EvalOptions, Progress, parse_tasks

log = logging.getLogger(__name__)


def _model_info(model) -> dict:
    try:
        p = next(model.parameters())
        dtype, device = str(p.dtype).replace("torch.", ""), str(p.device)
    except StopIteration:  # pragma: no cover
        dtype, device = "unknown", "unknown"
    cfg = getattr(model, "config", None)
    return {"model_class": type(model).__name__, "model_type": getattr(cfg, "model_type", None),
            "name_or_path": getattr(cfg, "_name_or_path", None), "dtype": dtype, "device": device}


def evaluate(model, tokenizer, tasks: str | Iterable[str] = ("mmlu",), *,
             limit: int | Mapping[str, int | None] | None = None,
             batch_size: int | str = "auto", allow_code_execution: bool = False,
             data_dir: str | Path | None = None, seed: int = 1234, num_fewshot: int = 0,
             exclude_ids: Iterable[str] | None = None, output_dir: str | Path | None = None,
             log_samples: bool = True, model_name: str | None = None, progress: bool = True,
             cache_key: str | None = None, model_hash: str | None = None, chat_format: str = "auto",
             max_new_tokens: int | None = None, n_samples: int = 1, temperature: float | None = None,
             top_p: float = 1.0, mbpp_set: str = "test", code_answer_prefix: bool = True,
             gsm8k_answer_prefix: bool = False,
             letter_aggregation: str = "logsumexp", exec_timeout_s: float = 10.0, exec_memory_mb: int = 1024,
             exec_workers: int | None = None, extra_config: dict | None = None) -> dict:
    """Evaluate ``model`` (already loaded, any device/dtype) on ``tasks`` without saving or reloading it.

    Returns the results dict (the ``results.json`` schema, see docs/evaluation.md); with ``output_dir`` also writes
    ``results.json`` and, with ``log_samples``, ``samples_<task>.jsonl``. ``exclude_ids`` are example ids used for
    training (never evaluated; counted as ``n_excluded``). ``cache_key`` (e.g. the model's content hash) enables the
    result cache (stage ``eval`` of :mod:`semalign.cache`); without it nothing is cached, because a live model may differ
    from any files it was loaded from. Code tasks need ``allow_code_execution=True``. ``limit`` is one number for
    every task or a mapping task -> limit (see :func:`semalign.eval.tasks.eval_limits`).
    """
    names = parse_tasks(tasks)
    code_tasks = [n for n in names if EVAL_TASKS.get(n).needs_execution]
    if code_tasks:
        require_opt_in(allow_code_execution, code_tasks)
    if isinstance(batch_size, str) and batch_size != "auto":
        if not batch_size.isdigit():
            raise SemalignError(f"--batch-size {batch_size!r} must be 'auto' or a positive integer")
        batch_size = int(batch_size)
    if isinstance(batch_size, int) and batch_size < 1:
        raise SemalignError(f"--batch-size must be 'auto' or a positive integer (got {batch_size})")
    if max_new_tokens is not None and max_new_tokens < 1:
        raise SemalignError(f"--max-new-tokens must be >= 1 (got {max_new_tokens})")
    ddir = Path(data_dir).expanduser() if data_dir else None
    if ddir is not None and not ddir.is_dir():
        raise SemalignError(f"--data-dir {ddir} is not a directory")
    fmt = resolve_chat_format(tokenizer, chat_format)
    limits = dict(limit) if isinstance(limit, Mapping) else dict.fromkeys(names, limit)
    opts = EvalOptions(limit=None, batch_size=batch_size, seed=seed, num_fewshot=num_fewshot, data_dir=ddir,
                       exclude_ids=frozenset(str(i) for i in (exclude_ids or ())), chat_format=fmt,
                       format_info=format_info(tokenizer, fmt), max_new_tokens=max_new_tokens, n_samples=n_samples,
                       temperature=temperature, top_p=top_p, mbpp_set=mbpp_set,
                       code_answer_prefix=code_answer_prefix, gsm8k_answer_prefix=gsm8k_answer_prefix,
                       letter_aggregation=letter_aggregation,
                       exec_limits=ExecLimits(timeout_s=exec_timeout_s, memory_mb=exec_memory_mb),
                       exec_workers=exec_workers, allow_code_execution=allow_code_execution)
    minfo = _model_info(model)
    versions = package_versions()
    name = model_name or minfo["name_or_path"] or type(model).__name__
    torch.manual_seed(seed)
    res: dict[str, Any] = {"schema_version": SCHEMA_VERSION, "results": {}, "configs": {}, "n-samples": {},
                           "breakdown": {}, "generation": {}, "versions": versions, "notes": [PROTOCOL_NOTE]}
    samples: dict[str, list[dict]] = {}
    t_all = time.perf_counter()
    with Progress(progress) as prog:
        for tname in names:
            task = EVAL_TASKS.get(tname)
            opts = dataclasses.replace(opts, limit=limits.get(tname))
            fault_point("eval")
            prep = task.prepare(opts)
            settings = {**prep.settings, **opts.format_info, "seed": seed, "dtype": minfo["dtype"],
                        "source": prep.source, "data_sha256": prep.data_digest()[:16], "n": len(prep.docs),
                        "n_excluded": prep.n_excluded}
            if task.needs_execution:
                settings["exec_python"] = exec_runner()[0]
            if not prep.docs:
                raise SemalignError(f"{tname}: nothing left to evaluate after excluding {prep.n_excluded} ids and "
                                    f"--limit {opts.limit}; check --exclude-ids / --limit")
            cached = None
            ckey = None
            if cache_key:
                key_settings = {**settings, "batch_size": str(batch_size),
                                "versions": {k: versions[k] for k in ("torch", "transformers", "tokenizers")}}
                ckey = eval_cache_inputs(cache_key, tname, key_settings)
                cached = cache_get(ckey)
            t0 = time.perf_counter()
            if cached is not None:
                log.info("%s: reusing the cached result (model %s)", tname, cache_key[:12])
                out_result, out_samples = cached["result"], cached.get("samples", [])
                out_cfg, out_break = cached["config"], cached.get("breakdown", {})
                out_gen = cached.get("generation", {})
                out_result["cached"] = True
            else:
                log.info("%s: %d examples (%d excluded) from %s", tname, len(prep.docs), prep.n_excluded, prep.source)
                for note in prep.notes:
                    log.warning("%s", note)
                out = task.execute(model, tokenizer, prep, opts, prog)
                wall = time.perf_counter() - t0
                out_cfg = {**settings, **out.settings}
                out_result = {"alias": tname, "primary_metric": task.primary_metric, **out.metrics,
                              "n": len(prep.docs), "n_excluded": prep.n_excluded, "wall_time_s": round(wall, 2),
                              "cached": False}
                out_samples, out_break, out_gen = out.samples, out.breakdown, out.generation
                if ckey is not None:
                    cache_put(ckey, {"result": out_result, "config": out_cfg, "breakdown": out_break,
                                      "generation": out_gen, "samples": out_samples})
            res["results"][tname] = out_result
            res["configs"][tname] = out_cfg
            res["n-samples"][tname] = {"original": prep.n_total, "excluded": prep.n_excluded,
                                       "effective": len(prep.docs)}
            if out_break:
                res["breakdown"][tname] = out_break
            if out_gen:
                res["generation"][tname] = out_gen
            res["notes"] += [f"{tname}: {n}" for n in prep.notes]
            samples[tname] = out_samples
            m = task.primary_metric
            log.info("%s: %s = %s (n = %d, %.0f s)", tname, m, out_result.get(m), len(prep.docs),
                     out_result.get("wall_time_s", 0))
    res["config"] = {"model": name, "model_hash": model_hash or cache_key, **minfo,
                     "batch_size": batch_size, "seed": seed, "num_fewshot": num_fewshot,
                     "limit": dict(limit) if isinstance(limit, Mapping) else limit,
                     **opts.format_info, "allow_code_execution": allow_code_execution,
                     "n_exclude_ids": len(opts.exclude_ids), "cache_key": cache_key, "eval_version": EVAL_VERSION,
                     "torch_threads": torch.get_num_threads(), **(extra_config or {})}
    res["total_wall_time_s"] = round(time.perf_counter() - t_all, 2)
    res["date"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    if output_dir is not None:
        path = write_outputs(res, samples, output_dir, log_samples=log_samples)
        log.info("wrote %s", path)
    log.debug("\n%s", markdown_table(res))
    return res
