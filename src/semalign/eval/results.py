"""Results: the ``results.json`` schema, sample logs, markdown tables, the result cache and transfer comparisons.

``results.json`` follows lm-evaluation-harness's layout (``results``, ``configs``, ``n-samples``, ``versions``,
``config``, ``date``) with flat metric keys (``acc``, ``acc_stderr``, ``acc_ci95``) and adds what this project
needs to compare transfers: ``n_excluded`` per task, per-subject MMLU accuracy (``breakdown``), generation
statistics and ``notes``.
"""

from __future__ import annotations

import json
import logging
import math
import platform
from pathlib import Path
from typing import Any, Sequence

from ..errors import SemalignError
from ..paths import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
EVAL_VERSION = "2"  # bump when a change moves scores or adds metrics (invalidates the cache); 2: MMLU letters
REQUIRED_KEYS = ("schema_version", "results", "configs", "n-samples", "versions", "config", "date")
PROTOCOL_NOTE = ("Decoding and prompt settings were chosen by this project (Open-Instruct conventions, spec "
                 "semalign.md §8 item 13); the papers do not report theirs.")


def package_versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for p in ("semalign", "torch", "transformers", "tokenizers", "numpy"):
        try:
            out[p] = md.version(p)
        except md.PackageNotFoundError:
            out[p] = "not installed"
    return out


def check_schema(res: Any, what: str = "results") -> dict:
    """Raise a one-line error unless ``res`` looks like a dict returned by :func:`semalign.eval.evaluate`."""
    if not isinstance(res, dict) or any(k not in res for k in REQUIRED_KEYS):
        missing = [k for k in REQUIRED_KEYS if not isinstance(res, dict) or k not in res]
        raise SemalignError(f"{what} is not a semalign eval result (missing {', '.join(missing)}); pass the dict "
                            "returned by semalign.eval.evaluate or a loaded results.json")
    return res


def load_results(path: str | Path) -> dict:
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
    try:
        return check_schema(json.loads(p.read_text(encoding="utf-8")), str(p))
    except (OSError, json.JSONDecodeError) as e:
        raise SemalignError(f"cannot read eval results {p} ({type(e).__name__}); run `semalign eval --output DIR` "
                            "first") from None


def load_samples(path: str | Path, task: str) -> list[dict]:
    """The per-question records of ``task`` written next to a results.json (``path``: the file or its folder)."""
    p = Path(path)
    p = p / "results.json" if p.is_dir() else p
    res = load_results(p)
    if task not in res["results"]:
        raise SemalignError(f"{p} has no {task} results (it has {', '.join(res['results']) or 'none'}); evaluate "
                            f"the same tasks on both sides")
    f = p.parent / (res.get("samples_files") or {}).get(task, f"samples_{task}.jsonl")
    if not f.is_file():
        raise SemalignError(f"{p} has no per-question records for {task} ({f.name} is missing); re-run that "
                            "evaluation with --output and --log-samples to compare per question")
    try:
        return [json.loads(line) for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]
    except json.JSONDecodeError:
        raise SemalignError(f"{f} is not JSON lines; re-run that evaluation") from None


def primary(res: dict, task: str) -> tuple[str, float | None]:
    r = res["results"][task]
    m = r.get("primary_metric", "acc")
    return m, r.get(m)


# --------------------------------------------------------------------------- writing
def write_outputs(res: dict, samples: dict[str, list[dict]], output_dir: str | Path, *, log_samples: bool) -> Path:
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if log_samples:
        res["samples_files"] = {task: f"samples_{task}.jsonl" for task in samples}
    atomic_write_json(out / "results.json", res)
    if log_samples:
        for task, rows in samples.items():
            atomic_write_text(out / f"samples_{task}.jsonl",
                              "".join(json.dumps(r, ensure_ascii=False, default=str) + "\n" for r in rows))
    return out / "results.json"


def _fmt(v: Any) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "–"
    return f"{100 * v:.1f}" if isinstance(v, (int, float)) else str(v)


def markdown_table(res: dict) -> str:
    """One row per task: primary metric (percent) ± stderr, 95% interval, n, excluded, wall time."""
    lines = ["| Task | Metric | Value (%) | ± stderr | 95% CI | n | excluded | wall s |",
             "|---|---|---:|---:|---|---:|---:|---:|"]
    for task, r in res["results"].items():
        m = r.get("primary_metric", "acc")
        ci = r.get(f"{m}_ci95") or [None, None]
        ci_s = f"{_fmt(ci[0])}–{_fmt(ci[1])}" if ci[0] is not None else "–"
        lines.append(f"| {task} | {m} | {_fmt(r.get(m))} | {_fmt(r.get(f'{m}_stderr'))} | {ci_s} | {r.get('n')} | "
                     f"{r.get('n_excluded', 0)} | {r.get('wall_time_s', 0):.0f} |")
        for k in ("acc_macro", "acc_prior_corrected", "exact_match_strict"):
            if k in r:
                lines.append(f"| {task} | {k} | {_fmt(r[k])} | {_fmt(r.get(f'{k}_stderr'))} | | {r.get('n')} | | |")
        for k in sorted(r):
            if k.startswith("pass@") and k != m and not k.endswith(("_stderr", "_ci95")):
                lines.append(f"| {task} | {k} | {_fmt(r[k])} | {_fmt(r.get(f'{k}_stderr'))} | | {r.get('n')} | | |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- cache
EVAL_STAGE = "eval"


def eval_cache_inputs(cache_key: str, task: str, settings: dict) -> dict:
    """What decides one task's evaluation of one model (stage ``eval``; see docs/cache.md)."""
    return {"model": cache_key, "task": task, "settings": settings}


def cache_get(inputs: dict) -> dict | None:
    """The cached per-question outputs and result of one task, verified by checksum (None on a miss)."""
    from ..cache import stage_cache

    cache = stage_cache()
    e = cache.get(EVAL_STAGE, cache.key(EVAL_STAGE, EVAL_VERSION, inputs))
    data = e.json if e is not None else None
    return data if isinstance(data, dict) and "result" in data else None


def cache_put(inputs: dict, entry: dict) -> None:
    from ..cache import stage_cache

    cache = stage_cache()
    try:
        cache.put(EVAL_STAGE, cache.key(EVAL_STAGE, EVAL_VERSION, inputs),
                  meta={"version": EVAL_VERSION, "inputs": inputs}, json_obj=entry)
    except OSError as e:  # a read-only cache never fails an evaluation
        log.warning("could not write the eval cache (%s)", e)


# --------------------------------------------------------------------------- transfer comparison
def compare_table(teacher: dict, before: dict, after: dict) -> tuple[str, list[dict]]:
    """Teacher vs student before/after transfer, per task on its primary metric.

    ``gap_closed = (after - before) / (teacher - before)``; ``None`` ("n/a") when teacher == before. A negative
    value means the student got worse; above 1 it passed the teacher. Returns (markdown, rows).
    """
    for name, r in (("teacher", teacher), ("before", before), ("after", after)):
        check_schema(r, name)
    tasks = [t for t in after["results"] if t in teacher["results"] and t in before["results"]]
    rows = []
    for t in tasks:
        m, a = primary(after, t)
        _, tv = primary(teacher, t)
        _, b = primary(before, t)
        gap = None
        if None not in (a, tv, b) and abs(tv - b) > 1e-12:
            gap = (a - b) / (tv - b)
        rows.append({"task": t, "metric": m, "teacher": tv, "before": b, "after": a,
                     "delta": None if None in (a, b) else a - b, "gap_closed": gap,
                     "n": after["results"][t].get("n")})
    lines = ["| Task | Metric | Teacher | Student before | Student after | Δ (pts) | Gap closed |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        d = "–" if r["delta"] is None else f"{100 * r['delta']:+.1f}"
        g = "n/a" if r["gap_closed"] is None else f"{100 * r['gap_closed']:.0f}%"
        lines.append(f"| {r['task']} | {r['metric']} | {_fmt(r['teacher'])} | {_fmt(r['before'])} | "
                     f"{_fmt(r['after'])} | {d} | {g} |")
    return "\n".join(lines), rows


_COMPARABLE = ("num_fewshot", "chat_format", "max_new_tokens", "temperature", "n_samples", "limit", "mbpp_set",
               "answer_prefix", "letter_aggregation", "data_sha256", "source", "seed")


def _mismatches(results: Sequence[tuple[str, dict]], task: str) -> list[str]:
    out = []
    for key in _COMPARABLE:
        vals = {name: r["configs"].get(task, {}).get(key) for name, r in results}
        if len({json.dumps(v, sort_keys=True, default=str) for v in vals.values()}) > 1:
            out.append(f"{task}: `{key}` differs ({', '.join(f'{k}={v}' for k, v in vals.items())})")
    return out


def write_report_section(teacher: dict, before: dict, after: dict, *, title: str = "Evaluation",
                         level: int = 2) -> str:
    """Markdown for report.md: the comparison table, the settings each number depends on, and warnings."""
    table, rows = compare_table(teacher, before, after)
    h = "#" * max(1, level)
    out = [f"{h} {title}", "", table, ""]
    out.append("Values in percent; gap closed = (after − before) / (teacher − before). Uncertainty (stderr, 95% CI) "
               "is in each results.json.")
    out.append("")
    out.append(f"{h}# Settings")
    out.append("")
    for r in rows:
        t = r["task"]
        cfg = after["configs"].get(t, {})
        res = after["results"][t]
        bits = [f"n = {res.get('n')}", f"excluded (training ids) = {res.get('n_excluded', 0)}"]
        for key in ("num_fewshot", "chat_format", "decoding", "temperature", "n_samples", "max_new_tokens",
                    "mbpp_set_description", "limit_strategy"):
            if cfg.get(key) not in (None, ""):
                bits.append(f"{key} = {cfg[key]}")
        bits.append(f"data: {cfg.get('source', '?')}")
        out.append(f"* **{t}**: " + "; ".join(bits))
    cfg = after.get("config", {})
    out.append(f"* dtype = {cfg.get('dtype')}, batch size = {cfg.get('batch_size')}, seed = {cfg.get('seed')}, "
               f"versions: " + ", ".join(f"{k} {v}" for k, v in after.get("versions", {}).items()))
    out.append(f"* {PROTOCOL_NOTE}")
    warn = []
    for r in rows:
        warn += _mismatches([("teacher", teacher), ("before", before), ("after", after)], r["task"])
    if warn:
        out += ["", "**Warning: the three evaluations differ in score-affecting settings:**", ""]
        out += [f"* {w}" for w in warn]
    return "\n".join(out) + "\n"
