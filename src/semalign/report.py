"""Reports: ``report.md`` plus a self-contained ``report.html`` (images embedded) per run, per comparison and per
pair analysis.

* :func:`write_run_report` — every transfer run: setup, layer map, held-out NLL, loss curves, benchmarks,
  export check, and the analysis section when ``RUN_DIR/analysis/analysis.json`` exists.
* :func:`regenerate_run_report` — the same from the files of a finished run (``semalign analyze RUN_DIR``).
* :func:`write_analysis_report` — ``semalign analyze --teacher ... --student ...`` output directories.
* :func:`write_compare_report` — ``compare/`` directories (per-method rows; tolerant of missing keys).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from .artifacts import RunDir
from .config import RunConfig

log = logging.getLogger(__name__)


def plot_losses(run: RunDir) -> Path | None:
    rows = [m for m in run.metrics() if "loss" in m]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [m.get("step", i + 1) for i, m in enumerate(rows)]
    fig, ax = plt.subplots(figsize=(6, 3.2))
    for key in ("loss", "layer_loss", "output_loss"):
        if all(key in m for m in rows):
            ax.plot(steps, [m[key] for m in rows], marker="o", label=key)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    out = run.path("plots", "loss.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def nll_table(nll: dict) -> str:
    def f(x):
        return "n/a" if not x or x.get("nll") is None else f"{x['nll']:.4f}"

    t, b, a = nll.get("teacher"), nll.get("student_before"), nll.get("student_after")
    gap = "n/a"
    if all(v and v.get("nll") is not None for v in (t, b, a)) and abs(t["nll"] - b["nll"]) > 1e-12:
        gap = f"{(a['nll'] - b['nll']) / (t['nll'] - b['nll']):+.3f}"
    return ("| model | held-out gold-answer NLL (lower is better) |\n|---|---|\n"
            f"| teacher | {f(t)} |\n| student before | {f(b)} |\n| student after | {f(a)} |\n\n"
            f"Gap closed (after - before) / (teacher - before): {gap}\n")


def eval_section(evals: dict, paired: dict | None = None) -> str:
    """Benchmarks: the teacher/before/after table, then (when per-question records were compared) the paired
    statistics of after vs before and the MMLU letter diagnostics."""
    if not evals or not any(evals.values()):
        return ""
    try:
        from .eval import compare_table
        from .eval.paired import NOTE, letter_lines, paired_table

        md, _ = compare_table(evals.get("teacher", {}), evals.get("student_before", {}), evals.get("student_after", {}))
        out = "## Benchmarks\n\n" + md + "\n"
        if paired:
            out += "\n### Paired: student after vs before (same questions)\n\n" + paired_table(paired) + "\n\n"
            out += NOTE + "\n"
            out += "".join(f"\n> {t}: {w}\n" for t, d in paired.items() for w in d.get("warnings", []))
        letters = letter_lines([("teacher", evals.get("teacher")), ("student before", evals.get("student_before")),
                                ("student after", evals.get("student_after"))])
        if letters:
            out += "\n### MMLU: knowledge vs format\n\n" + "\n".join(letters) + "\n"
        return out
    except Exception as exc:  # noqa: BLE001 - a report must still be written
        log.warning("could not render the evaluation table: %s", exc)
        return ""


def _fmt(x: Any, nd: int = 3) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, bool):
        return str(x).lower()
    if isinstance(x, float):
        return f"{x:.{nd}f}" if abs(x) >= 10 ** -nd or x == 0 else f"{x:.2e}"
    return str(x)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out) + "\n"


def analysis_section(index: dict, prefix: str = "", heading: str = "##") -> str:
    """Markdown for an analysis index (``analysis.json``); image paths are ``prefix + file``."""
    s = index.get("summary", {})
    tok = index.get("tokens", {})
    opts = index.get("options", {})
    lines = [f"{heading} Analysis", "",
             f"`semalign analyze` on {len(index.get('examples', []))} `{index.get('task')}` examples "
             f"({tok.get('pooled_tokens', 'n/a')} pooled tokens; shared prefix of {tok.get('dropped_common_prefix_tokens', 0)} "
             f"tokens dropped), dtype {opts.get('dtype')}, seed {opts.get('seed')}; wall {index.get('wall_seconds', 'n/a')} s, "
             f"peak RSS {index.get('peak_rss_mb', 'n/a')} MB.", ""]
    cka = s.get("cka", {})
    if cka:
        rows = [[n.replace("_", " "), v.get("mean_along_depth_map", v.get("mean_diagonal")),
                 "along depth map" if "mean_along_depth_map" in v else "mean off-embedding diagonal"]
                for n, v in cka.items()]
        lines += [f"{heading}# Linear CKA summary", "", _table(["map", "mean CKA", "where"], rows)]
    al = s.get("alignment", {})
    if al:
        rows = [[w, d.get("block_output"), d.get("residual")] for w, d in al.items()]
        lines += [f"{heading}# Paired-layer alignment cosine (mean over depth-map pairs)", "",
                  _table(["student", "block output h", "residual Δ"], rows)]
    res = s.get("resolution", {})
    if res:
        kinds = sorted({k for v in res.values() for k in v})
        lines += [f"{heading}# Resolution of semantics (mean cos(h, S Sᵀ h) over layers)", "",
                  _table(["model"] + kinds, [[m] + [v.get(k) for k in kinds] for m, v in res.items()])]
    par = s.get("parametric", {})
    if par:
        keys = ["cos", "cka", "cka_null", "cos_lowrank", "cos_remaining", "pissa_cos"]
        lines += [f"{heading}# Parametric similarity (mean over student layers)", "",
                  _table(["projection"] + keys, [[n] + [v.get(k) for k in keys] for n, v in par.items()])]
    top = s.get("attribution_top_layer")
    if top:
        lines += ["Top Grad x Act layer: " + ", ".join(f"{k} L{v}" for k, v in top.items()), ""]
    lines += [f"{heading}# Figures", ""]
    figs = index.get("figures", [])
    heat = [f for f in figs if str(f.get("file", "")).startswith("cka_")]
    for f in [f for f in figs if f not in heat]:
        lines += [f"{heading}## {f.get('title', f.get('file'))}", "", f"![{f.get('title', '')}]({prefix}{f['file']})",
                  "", f.get("caption", ""), ""]
    if heat:
        lines += [f"{heading}## Linear CKA heat-maps", "",
                  "Rows and columns start at 0 = embeddings (h_0); dashed line = v1 depth map; red squares = the "
                  "run's supervised pairs.", ""]
        lines += [f"![{f.get('title', '')}]({prefix}{f['file']})" for f in heat] + [""]
    return "\n".join(lines)


def _write_both(root: Path, md: str, title: str) -> Path:
    from .render.html import write_html
    from .paths import atomic_write_text

    p = Path(root) / "report.md"
    atomic_write_text(p, md)
    write_html(Path(root) / "report.html", md, base_dir=Path(root), title=title)
    return p


def _run_analysis(run: RunDir) -> str:
    p = run.path("analysis", "analysis.json")
    if not p.is_file():
        return ""
    try:
        return analysis_section(json.loads(p.read_text()), prefix="analysis/")
    except (ValueError, OSError) as exc:
        log.warning("analysis index %s unreadable (%s); report written without it", p, exc)
        return ""


def _model_line(role: str, spec: str, d: dict) -> str:
    shape = f" ({d['num_layers']} layers x {d['hidden_size']})" if "num_layers" in d and "hidden_size" in d else ""
    return f"- {role}: `{spec}`{shape}"


def write_run_report(run: RunDir, cfg: RunConfig, summary: dict, results: dict) -> Path:
    """``report.md`` and ``report.html`` of a run (tolerates partial summaries/results)."""
    plot_losses(run)
    summary, results = summary or {}, results or {}
    lines = [f"# Transfer report: {run.root.name}", "",
             f"- method: **{cfg.method}** ({summary.get('paper', '')})",
             _model_line("teacher", cfg.teacher, summary.get("teacher", {})),
             _model_line("student", cfg.student, summary.get("student", {})),
             f"- task: `{cfg.task}`; data: {summary.get('data', {}).get('source', 'n/a')}",
             f"- steps: {cfg.steps or 'task default'}; batch {cfg.batch_size}; lr {cfg.lr}; seed {cfg.seed}; dtype {cfg.dtype}",
             f"- status: {summary.get('status', 'n/a')}; wall time: {summary.get('wall_seconds', 'n/a')} s; "
             f"peak RSS {summary.get('peak_rss_mb', 'n/a')} MB", ""]
    if cfg.method == "semalign-frontier":
        lines += ["> **Reconstruction.** `semalign-frontier` follows the v2/ACL abstracts only; no published numbers "
                  "exist to compare against.", ""]
    if "layer_map" in summary or run.path("plots", "layer_map.png").is_file():
        lines += ["## Layer map", ""]
        if "layer_map" in summary:
            lines += [f"`{summary['layer_map']}`", ""]
        if run.path("plots", "layer_map.png").is_file():
            lines += ["![layer map](plots/layer_map.png)", ""]
    lines += ["## Held-out NLL", "", nll_table(results.get("nll", {}))]
    if run.path("plots", "loss.png").is_file():
        lines += ["## Training", "", "![loss](plots/loss.png)", ""]
    lines.append(eval_section(results.get("eval", {}), results.get("paired")))
    rt = summary.get("roundtrip", {})
    lines += ["## Export", "", f"Merged student: `student/` (reloads with `AutoModelForCausalLM.from_pretrained`; "
              f"max |logit diff| vs in-memory = {rt.get('max_abs_logit_diff', 'n/a')})", "",
              "Evaluation settings (decoding, prompts) were chosen by this project; see docs/evaluation.md.", ""]
    sec = _run_analysis(run)
    if sec:
        lines += [sec, ""]
    lines += ["## Configuration", "", "```yaml", _config_text(run, cfg).rstrip(), "```", ""]
    return _write_both(run.root, "\n".join(lines), f"semalign run {run.root.name}")


def _config_text(run: RunDir, cfg: RunConfig) -> str:
    p = run.path("config.resolved.yaml")
    if p.is_file():
        return p.read_text()
    from .config import dump_config

    return dump_config(cfg)


def _read_json(p: Path) -> dict:
    try:
        return json.loads(p.read_text()) if p.is_file() else {}
    except ValueError:
        log.warning("%s is not valid JSON; ignored", p)
        return {}


def regenerate_run_report(run_dir: str | Path) -> Path:
    """Rewrite ``report.md``/``report.html`` of an existing run from its files (adds the analysis section)."""
    import yaml

    from .config import make_config

    run = RunDir(Path(run_dir))
    cfg = make_config(yaml.safe_load(run.path("config.resolved.yaml").read_text()) or {})
    return write_run_report(run, cfg, _read_json(run.path("summary.json")), _read_json(run.path("results.json")))


def write_analysis_report(out_dir: str | Path, index: dict) -> Path:
    """Report of a pair analysis (``semalign analyze --teacher ... --student ...``)."""
    out = Path(out_dir)
    lines = [f"# Analysis report: {out.name}", "", f"- teacher: `{index.get('teacher')}`",
             f"- student: `{index.get('student')}`", f"- task: `{index.get('task')}`; data dir: "
             f"{index.get('data_dir') or 'shipped data'}", f"- created: {index.get('created', 'n/a')}", "",
             analysis_section(index, prefix=""), "## Options", "", "```json",
             json.dumps(index.get("options", {}), indent=2), "```", ""]
    return _write_both(out, "\n".join(lines), f"semalign analysis {out.name}")


# -- comparison reports -------------------------------------------------------------------------------------


def _flatten(d: Any, prefix: str = "", depth: int = 3) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(d, dict) and depth > 0:
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}.", depth - 1) if isinstance(v, dict) else
                       {f"{prefix}{k}": v} if isinstance(v, (int, float, str, bool)) or v is None else {})
    return out


def _compare_rows(results: Any) -> list[dict]:
    if isinstance(results, list):
        rows = results
    elif isinstance(results, dict):
        rows = results.get("rows") or results.get("results") or results.get("methods") or []
        if isinstance(rows, dict):
            rows = [{"method": k, **(v if isinstance(v, dict) else {"value": v})} for k, v in rows.items()]
    else:
        rows = []
    return [r for r in rows if isinstance(r, dict)]


def _rel_link(target: str, root: Path) -> str:
    """A link to ``target`` relative to ``root`` when it exists on disk (else the string as given)."""
    import os

    p = Path(target)
    for cand in (p, root / p, root.parent / p, root.parent.parent / p):
        if cand.exists():
            return Path(os.path.relpath(cand.resolve(), root.resolve())).as_posix()
    return p.as_posix()


def _merge_stderr(rows: list[dict]) -> list[dict]:
    """``metrics.X`` and ``stderr.X`` -> one ``X`` cell "v ± e" (in percent for fractions), in place of the metric."""
    out = []
    for r in rows:
        new: dict[str, Any] = {}
        for k, v in r.items():
            if k.startswith("stderr."):
                continue
            if k.startswith("metrics."):
                t = k.split(".", 1)[1]
                e = r.get("stderr." + t)
                if isinstance(v, (int, float)) and not isinstance(v, bool) and abs(v) <= 1:
                    v = f"{100 * v:.1f}" + (f" ± {100 * e:.1f}" if isinstance(e, (int, float)) else "")
                new[t] = v
            else:
                new[k] = v
        out.append(new)
    return out


def write_compare_report(compare_dir: str | Path, results: Any = None) -> Path:
    """``compare/report.md`` + ``report.html`` for ``semalign compare`` (schema of ``semalign/compare.py``:
    ``{"task", "teacher", "student", "rows": [{"name", "kind", "status", "metrics", "stderr", "nll",
    "gap_closed", "wall_seconds", "peak_rss_mb", "run_dir", "error"}], ...}``), tolerant of missing keys and of
    other layouts (a list of rows, or ``{"methods": {name: {...}}}``). ``results=None`` reads
    ``compare_dir/results.json``. Uses the comparison's own ``table.md`` when present; links each row's run
    report; embeds every PNG of the folder and of ``plots/``."""
    root = Path(compare_dir)
    if results is None:
        results = _read_json(root / "results.json")
    rows = _merge_stderr([_flatten(r) for r in _compare_rows(results)])
    meta = results if isinstance(results, dict) else {}
    title = root.parent.name if root.name == "compare" else root.name
    lines = [f"# Comparison report: {title}", ""]
    for key in ("teacher", "student", "task", "eval_tasks", "eval_limit", "steps", "seed", "dtype", "teacher_dtype",
                "split_source", "wall_seconds", "peak_rss_mb", "created"):
        v = meta.get(key)
        if isinstance(v, list):
            v = ", ".join(map(str, v)) or None
        if v is not None and not isinstance(v, dict):
            lines.append(f"- {key.replace('_', ' ')}: `{v}`")
    lines.append("")
    table = root / "table.md"
    if table.is_file():
        lines += ["## Results", "", table.read_text().rstrip(), ""]
    elif rows:
        cols: list[str] = []
        for r in rows:
            cols += [k for k in r if k not in cols and not k.endswith(("run_dir", "path"))]
        first = [c for c in ("name", "method", "label", "kind", "status") if c in cols]
        cols = first + [c for c in cols if c not in first and any(r.get(c) is not None for r in rows)]
        lines += ["## Results", "", _table(cols, [[r.get(c) for c in cols] for r in rows])]
    else:
        lines += ["No per-method rows in results.json yet.", ""]
    runs = [(r.get("name") or r.get("method") or f"row {i + 1}", r.get("run_dir")) for i, r in enumerate(rows)]
    runs = [(m, _rel_link(d, root)) for m, d in runs if isinstance(d, str) and d]
    if runs:
        lines += ["Run reports: " + ", ".join(f"[{m}]({d}/report.html)" for m, d in runs), ""]
    errors = [(r.get("name") or r.get("method"), r.get("error")) for r in rows if r.get("error")]
    if errors:
        lines += ["## Errors", ""] + [f"- **{m}**: {e}" for m, e in errors] + [""]
    if isinstance(meta.get("notes"), list):
        lines += ["## Notes", ""] + [f"- {n}" for n in meta["notes"]] + [""]
    pngs = sorted(root.glob("*.png")) + sorted(root.glob("plots/*.png"))
    if pngs:
        lines += ["## Figures", ""]
        for p in pngs:
            lines += [f"![{p.stem}]({p.relative_to(root).as_posix()})", ""]
    idx = root / "analysis" / "analysis.json"
    if idx.is_file():
        lines += [analysis_section(_read_json(idx), prefix="analysis/")]
    return _write_both(root, "\n".join(lines), f"semalign comparison {root.name}")
