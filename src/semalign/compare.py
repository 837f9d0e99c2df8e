"""``semalign compare``: several transfer methods on identical splits and seeds, one table.

The teacher is loaded once and handed to every :func:`semalign.transfer.run_transfer` call through ``preloaded``;
each method gets a freshly loaded student. Teacher, student and every exported student are evaluated with the
built-in harness (:func:`semalign.eval.evaluate`) on the same examples (training ids excluded). Output::

    <output>/runs/<method>/     one standard run directory per method
    <output>/eval/<model>/      harness results per model
    <output>/compare/           results.json, table.md, bars.png

Wall time and peak RSS are measured per method (RSS sampled by a background thread; it includes the resident
teacher, which is shared). ``resume=True`` reuses completed method runs and cached evaluations.
"""

from __future__ import annotations

import gc
import json
import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .artifacts import peak_rss_mb
from .config import RunConfig, dump_config, make_config
from .errors import SemalignError
from .paths import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)

DEFAULT_METHODS = ("semalign", "seeking", "laten", "lora-sft", "logit-kd")


class RssSampler:
    """Peak resident memory of this process while the ``with`` block runs (sampled every ``interval`` s)."""

    def __init__(self, interval: float = 0.2):
        import psutil

        self.proc, self.interval, self.peak = psutil.Process(), interval, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __enter__(self) -> "RssSampler":
        self.peak = self.proc.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)

    @property
    def peak_mb(self) -> float:
        return self.peak / 2**20


def parse_overrides(items: list[str]) -> dict:
    """``["seeking.seed_examples=4", "max_length=256"]`` -> nested dict (values parsed as YAML scalars)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise SemalignError(f"--set {item!r} is not KEY=VALUE; use e.g. --set seeking.seed_examples=4")
        d = out
        parts = key.strip().split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = yaml.safe_load(raw)
    return out


@dataclass
class Row:
    name: str
    kind: str                               # teacher | student | method
    status: str = "completed"
    metrics: dict[str, float | None] = field(default_factory=dict)   # eval task -> primary metric
    stderr: dict[str, float | None] = field(default_factory=dict)
    nll: float | None = None
    wall_seconds: float | None = None       # transfer (teacher/student rows: load + eval)
    eval_seconds: float | None = None
    peak_rss_mb: float | None = None
    run_dir: str | None = None
    error: str | None = None
    gap_closed: dict[str, float | None] = field(default_factory=dict)
    paired: dict[str, dict] = field(default_factory=dict)  # eval task -> paired statistics vs the student
    letters: dict[str, Any] = field(default_factory=dict)  # MMLU: predicted-letter shares, letter mass, prior-corr.


def _primary(res: dict) -> tuple[dict, dict]:
    vals, errs = {}, {}
    for task, r in (res.get("results") or {}).items():
        m = r.get("primary_metric", "acc")
        vals[task], errs[task] = r.get(m), r.get(f"{m}_stderr")
    return vals, errs


def _letters(res: dict) -> dict:
    r = ((res or {}).get("results") or {}).get("mmlu") or {}
    return {k: r[k] for k in ("pred_shares", "letter_mass_mean", "acc", "acc_prior_corrected") if k in r}


def _evaluate(model, tok, name: str, cfg: RunConfig, tasks: list[str], used: set[str], out: Path,
              cache_key: str | None) -> dict:
    from .eval import evaluate
    from .eval.tasks import eval_limits

    if not tasks:
        return {}
    return evaluate(model, tok, tasks, limit=eval_limits(cfg.eval_limit, tasks),
                    allow_code_execution=cfg.allow_code_execution,
                    data_dir=cfg.data_dir, exclude_ids=used, model_name=name, cache_key=cache_key,
                    output_dir=out / "eval" / name, log_samples=True)


def _completed(run_dir: Path) -> dict | None:
    p = run_dir / "summary.json"
    if not p.is_file():
        return None
    summary = json.loads(p.read_text())
    return summary if summary.get("status") == "completed" else None


def _gap(value: float | None, student: float | None, teacher: float | None) -> float | None:
    if value is None or student is None or teacher is None or abs(teacher - student) < 1e-12:
        return None
    return (value - student) / (teacher - student)


def run_compare(cfg: RunConfig, methods: list[str], *, output: str | Path, resume: bool = False,
                overwrite: bool = False, teacher_dtype: str | None = None) -> dict:
    """Run ``methods`` with ``cfg`` (its ``method``/``output`` are replaced per method) and write ``compare/``.

    ``teacher_dtype`` loads the shared teacher in another dtype than ``cfg.dtype`` (e.g. bf16 weights to save
    memory while the student computes in fp32).
    """
    from .data.tasks import build_splits
    from .methods.base import get_method
    from .models.load import load_model, model_content_hash
    from .transfer import run_transfer

    t_all = time.perf_counter()
    if not methods:
        raise SemalignError("--methods is empty; name at least one method (see `semalign ls methods`)")
    for m in methods:
        get_method(m)
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise SemalignError(f"output directory {out} already exists; pass --resume to reuse finished runs, "
                            "--overwrite to replace it, or choose another --output")
    if overwrite and not resume and out.exists():
        import shutil

        shutil.rmtree(out)
    (out / "compare").mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "compare" / "config.yaml", dump_config(cfg))
    tasks = cfg.eval_task_list()
    splits = build_splits(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed)
    used = splits.used_ids()

    t0 = time.perf_counter()
    with RssSampler() as rs:
        teacher, t_tok, t_res = load_model(cfg.teacher, dtype=teacher_dtype or cfg.dtype, device=cfg.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        t_key = model_content_hash(t_res) if tasks and t_res.kind != "hub" else None
        t_eval = _evaluate(teacher, t_tok, "teacher", cfg, tasks, used, out, t_key)
    rows = [Row("teacher", "teacher", metrics=_primary(t_eval)[0], stderr=_primary(t_eval)[1],
                letters=_letters(t_eval), eval_seconds=round(time.perf_counter() - t0, 2),
                peak_rss_mb=round(rs.peak_mb, 1))]
    preloaded = {"teacher": teacher, "teacher_tokenizer": t_tok, "teacher_path": t_res.path}

    t0 = time.perf_counter()
    with RssSampler() as rs:
        student, s_tok, s_res = load_model(cfg.student, dtype="fp32", device=cfg.device)
        s_key = model_content_hash(s_res) if tasks and s_res.kind != "hub" else None
        s_eval = _evaluate(student, s_tok, "student", cfg, tasks, used, out, s_key)
        del student
    rows.append(Row("student", "student", metrics=_primary(s_eval)[0], stderr=_primary(s_eval)[1],
                    letters=_letters(s_eval),
                    eval_seconds=round(time.perf_counter() - t0, 2), peak_rss_mb=round(rs.peak_mb, 1)))
    gc.collect()

    nll_ref: dict[str, float | None] = {}
    for m in methods:
        run_dir = out / "runs" / m
        mcfg = make_config({**cfg.model_dump(mode="json"), "method": m, "output": str(run_dir), "eval_tasks": ""})
        row = Row(m, "method", run_dir=str(run_dir))
        measure = run_dir / "compare_measure.json"
        t0 = time.perf_counter()
        try:
            summary = _completed(run_dir) if resume else None
            if summary is None:
                with RssSampler() as rs:
                    summary = run_transfer(mcfg, resume=resume and run_dir.exists(),
                                           overwrite=overwrite or not resume, preloaded=preloaded)
                row.wall_seconds, row.peak_rss_mb = round(time.perf_counter() - t0, 2), round(rs.peak_mb, 1)
                atomic_write_json(measure, {"wall_seconds": row.wall_seconds, "peak_rss_mb": row.peak_rss_mb})
            else:
                log.info("%s: reusing the completed run in %s", m, run_dir)
                old = json.loads(measure.read_text()) if measure.is_file() else {}
                row.wall_seconds = old.get("wall_seconds", summary.get("wall_seconds"))
                row.peak_rss_mb = old.get("peak_rss_mb", summary.get("peak_rss_mb"))
            nll = summary.get("nll") or {}
            row.nll = (nll.get("student_after") or {}).get("nll")
            for k in ("teacher", "student_before"):
                nll_ref.setdefault(k, (nll.get(k) or {}).get("nll"))
            if tasks:
                t1 = time.perf_counter()
                model, tok, _ = load_model(summary["export"], dtype="fp32", device=cfg.device)
                res = _evaluate(model, tok, m, cfg, tasks, used, out, summary.get("student_content_hash"))
                row.metrics, row.stderr = _primary(res)
                row.letters = _letters(res)
                row.eval_seconds = round(time.perf_counter() - t1, 2)
                del model
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # noqa: BLE001 - one failing method must not lose the others' results
            log.error("%s failed: %s", m, exc)
            row.status, row.error = "failed", f"{type(exc).__name__}: {exc}"[:400]
            row.wall_seconds = round(time.perf_counter() - t0, 2)
        gc.collect()
        rows.append(row)
        _write(out, cfg, methods, rows, nll_ref, splits, t_all, teacher_dtype)  # partial results survive a crash
    del preloaded, teacher
    gc.collect()
    return _write(out, cfg, methods, rows, nll_ref, splits, t_all, teacher_dtype)


def _write(out: Path, cfg: RunConfig, methods: list[str], rows: list[Row], nll_ref: dict, splits, t_all: float,
           teacher_dtype: str | None = None) -> dict:
    rows[0].nll, rows[1].nll = nll_ref.get("teacher"), nll_ref.get("student_before")
    t, s = rows[0], rows[1]
    for r in rows[2:]:
        r.gap_closed = {k: _gap(v, s.metrics.get(k), t.metrics.get(k)) for k, v in r.metrics.items()}
        r.gap_closed["nll"] = _gap(r.nll, s.nll, t.nll)
        r.paired = paired_vs(out / "eval", r.name, "student") if r.status == "completed" else {}
    from .eval.tasks import eval_limits

    res = {"task": cfg.task, "methods": methods, "eval_tasks": cfg.eval_task_list(), "eval_limit": cfg.eval_limit,
           "eval_limits": eval_limits(cfg.eval_limit, cfg.eval_task_list()),
           "steps": cfg.steps, "seed": cfg.seed, "teacher": cfg.teacher, "student": cfg.student,
           "dtype": cfg.dtype, "teacher_dtype": teacher_dtype or cfg.dtype,
           "splits": {k: len(v) for k, v in splits.items()}, "split_source": splits.source,
           "rows": [asdict(r) for r in rows], "wall_seconds": round(time.perf_counter() - t_all, 2),
           "peak_rss_mb": round(peak_rss_mb(), 1)}
    d = out / "compare"
    atomic_write_json(d / "results.json", res)
    atomic_write_text(d / "table.md", markdown(res))
    bar_plot(res, d / "bars.png")
    try:
        from .report import write_compare_report

        write_compare_report(d, res)
    except Exception as e:  # noqa: BLE001 - the report is a view of results.json, never a reason to lose the run
        log.warning("could not write compare/report.md: %s", e)
    return res


def paired_vs(eval_root: Path, name: str, base: str, teacher: str | None = "teacher") -> dict:
    """Paired statistics of ``eval_root/name`` against ``eval_root/base`` (gap closed toward ``teacher``);
    {} when either lacks results, with the reason logged."""
    from .eval.paired import compare_evaluations

    a, b = eval_root / base, eval_root / name
    if not (a / "results.json").is_file() or not (b / "results.json").is_file():
        return {}
    tdir = eval_root / teacher if teacher else None
    try:
        return compare_evaluations(a, b, tdir if tdir is not None and (tdir / "results.json").is_file() else None,
                                   names=(base, name))
    except SemalignError as exc:
        log.warning("no paired statistics for %s vs %s: %s", name, base, exc.message)
        return {}


def paired_markdown(rows: list[dict], tasks: list[str], base: str = "student", key: str = "paired") -> str:
    """One line per (row, task) with paired statistics against ``base``."""
    from .eval.paired import SUMMARY_HEADER, summary_cells

    head = ["Model", "task", "n", f"acc {base} → model"] + SUMMARY_HEADER
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        for t in tasks:
            d = (r.get(key) or {}).get(t)
            if not d:
                continue
            acc = f"{100 * d['acc_a']:.1f} → {100 * d['acc_b']:.1f}"
            lines.append("| " + " | ".join([r["name"], t, str(d["n"]), acc] + summary_cells(d)) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


# ----------------------------------------------------------------------------------------------- report
def _pct(v: float | None, err: float | None = None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" + (f" ± {100 * err:.1f}" if err is not None else "")


def markdown(res: dict) -> str:
    """Table-1 style: teacher, student, each method; metric, gap closed, held-out NLL, wall time, peak RSS."""
    tasks = res["eval_tasks"]
    head = (["Model"] + [f"{t} (%)" for t in tasks] + [f"gap closed {t}" for t in tasks]
            + ["held-out NLL", "gap closed NLL", "transfer s", "eval s", "peak RSS GB", "status"])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in res["rows"]:
        gc_ = r.get("gap_closed") or {}
        cells = ([r["name"]] + [_pct(r["metrics"].get(t), r["stderr"].get(t)) for t in tasks]
                 + [("–" if gc_.get(t) is None else f"{100 * gc_[t]:+.0f}%") for t in tasks]
                 + [("–" if r.get("nll") is None else f"{r['nll']:.4f}"),
                    ("–" if gc_.get("nll") is None else f"{100 * gc_['nll']:+.0f}%"),
                    ("–" if r.get("wall_seconds") is None or r.get("kind") != "method"
                     else f"{r['wall_seconds']:.0f}"),
                    ("–" if r.get("eval_seconds") is None else f"{r['eval_seconds']:.0f}"),
                    ("–" if r.get("peak_rss_mb") is None else f"{r['peak_rss_mb'] / 1024:.1f}"),
                    r["status"] + (f" ({r['error'][:80]})" if r.get("error") else "")])
        lines.append("| " + " | ".join(cells) + " |")
    limits = res.get("eval_limits") or res.get("eval_limit")
    notes = [f"Task `{res['task']}`; teacher `{res['teacher']}`, student `{res['student']}`; seed {res['seed']}; "
             f"steps {res['steps'] or 'method default'}; eval limit {limits}; splits {res['splits']}.",
             "Gap closed = (method - student) / (teacher - student) in every column (NLL included): moving "
             "toward the teacher is positive. Transfer s / peak RSS: the method's `run_transfer` (RSS includes the "
             "shared resident teacher); eval s: the harness on the exported model (teacher/student: load + eval)."]
    out = "\n".join(lines) + "\n\n" + "\n".join(notes) + "\n"
    pm = paired_markdown(res["rows"], tasks)
    if pm:
        from .eval.paired import NOTE

        out += "\n**Paired against the untouched student (same questions)**\n\n" + pm + "\n" + NOTE + "\n"
    return out + letters_markdown(res["rows"])


def letters_markdown(rows: list[dict]) -> str:
    """MMLU knowledge vs format: predicted-letter shares, letter mass, raw and prior-corrected accuracy per row."""
    rows = [r for r in rows if (r.get("letters") or {}).get("pred_shares")]
    if not rows:
        return ""
    lines = ["", "**MMLU: knowledge vs format**", "",
             "| Model | A | B | C | D | letter mass | acc | prior-corrected acc |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        x = r["letters"]
        sh = x["pred_shares"]
        lines.append(f"| {r['name']} | " + " | ".join(f"{100 * sh.get(L, 0):.0f}%" for L in "ABCD")
                     + f" | {x.get('letter_mass_mean', float('nan')):.2f} | {_pct(x.get('acc'))} | "
                     f"{_pct(x.get('acc_prior_corrected'))} |")
    lines.append("")
    lines.append("Predicted-letter shares; prior-corrected = contextual calibration over the evaluated questions.")
    return "\n".join(lines) + "\n"


def bar_plot(res: dict, path: Path) -> None:
    """Grouped bars per eval task (or held-out NLL when no eval task was run); matplotlib Agg backend."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    tasks = res["eval_tasks"] or ["nll"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(max(4.0, 1.0 + 0.9 * len(rows)) * len(tasks), 3.6),
                             squeeze=False)
    colors = ["#444444", "#999999"] + [f"C{i}" for i in range(len(rows) - 2)]
    for ax, t in zip(axes[0], tasks):
        vals = [(r.get("nll") if t == "nll" else r["metrics"].get(t)) for r in rows]
        ys = [float("nan") if v is None else (v if t == "nll" else 100 * v) for v in vals]
        errs = [0.0 if t == "nll" or r["stderr"].get(t) is None else 100 * r["stderr"][t] for r in rows]
        ax.bar(range(len(rows)), ys, color=colors, yerr=errs, capsize=3, error_kw={"elinewidth": 0.8})
        if ys[1] == ys[1]:
            ax.axhline(ys[1], color="#999999", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=30, ha="right")
        ax.set_ylabel("held-out NLL (lower is better)" if t == "nll" else f"{t} (%)")
        ax.set_title(t)
        for i, y in enumerate(ys):
            if y == y:
                ax.annotate(f"{y:.2f}" if t == "nll" else f"{y:.1f}", (i, y), ha="center", va="bottom", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)
