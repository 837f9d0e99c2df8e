"""Rendering of a sweep's results: the markdown table, training diagnostics, the plot and report.md/html."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def _pct(v: float | None, err: float | None = None) -> str:
    if v is None:
        return "–"
    return f"{100 * v:.1f}" + (f" ± {100 * err:.1f}" if err is not None else "")


def training_diagnostics(run_dir: Path) -> dict:
    """First and last step of ``metrics.jsonl``: layer loss (1 - cos between the student's activation and its
    target, before and after training), output loss, and steps; {} when the run logged none."""
    f = Path(run_dir) / "metrics.jsonl"
    if not f.is_file():
        return {}
    rows = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
    if not rows:
        return {}
    out: dict[str, Any] = {"steps": len(rows)}
    for key in ("layer_loss", "output_loss", "loss"):
        if key in rows[0]:
            out[f"{key}_first"], out[f"{key}_last"] = rows[0][key], rows[-1][key]
    return out


def training_table(res: dict) -> str:
    """Per row: first -> last layer loss and output loss, and the untouched/row predicted-letter shares."""
    lines = ["| Row | steps | layer loss first → last | output loss first → last | top letter share |",
             "|---|---|---|---|---|"]
    for r in res["rows"]:
        tr = r.get("training") or {}
        lt = (r.get("letters") or {}).get("pred_shares") or {}
        top = max(lt.items(), key=lambda kv: kv[1]) if lt else None
        f = (lambda a, b: "–" if tr.get(a) is None else f"{tr[a]:.4f} → {tr[b]:.4f}")
        lines.append(f"| {r['name']} | {tr.get('steps', '–')} | {f('layer_loss_first', 'layer_loss_last')} | "
                     f"{f('output_loss_first', 'output_loss_last')} | "
                     f"{'–' if not top else f'{top[0]} {100 * top[1]:.1f}%'} |")
    return "\n".join(lines)


def markdown(res: dict) -> str:
    """One table per eval task: accuracy, paired statistics vs the student and vs the reference row."""
    from .eval.paired import fmt_diff, fmt_gap, fmt_p

    tasks = res["eval_tasks"] or []
    ref = res.get("reference")
    parts = []
    for t in tasks:
        head = ["Row", "method", f"{t} (%)", "Δ vs student [95% CI]", "p", "fixed/broken", "gap closed [95% CI]"]
        head += ([f"Δ vs {ref} [95% CI]", "p (ref)"] if ref else []) + ["prior-corrected (Δ vs student)",
                                                                         "held-out NLL", "transfer s", "status"]
        lines = [f"### {t}", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for r in res["rows"]:
            d = (r.get("vs_student") or {}).get(t)
            e = (r.get("vs_reference") or {}).get(t)
            lt = r.get("letters") or {}
            pc = (d or {}).get("prior_corrected")
            pcs = _pct(lt.get("acc_prior_corrected")) + (f" ({fmt_diff(pc)})" if pc else "")
            cells = [r["name"], r.get("method") or "–", _pct(r["metrics"].get(t), r["stderr"].get(t)),
                     fmt_diff(d), fmt_p((d or {}).get("mcnemar_p")),
                     "–" if not d or d.get("fixed") is None else f"{d['fixed']}/{d['broken']}",
                     fmt_gap(d) if d else "–"]
            if ref:
                cells += ([fmt_diff(e), fmt_p((e or {}).get("mcnemar_p"))] if r["name"] != ref
                          else ["(reference)", "–"])
            cells += [pcs if lt else "–", "–" if r.get("nll") is None else f"{r['nll']:.4f}",
                      "–" if r.get("wall_seconds") is None or r["kind"] != "row" else f"{r['wall_seconds']:.0f}",
                      r["status"] + (" (reused)" if r.get("reused") else "")
                      + (f" ({r['error'][:80]})" if r.get("error") else "")]
            lines.append("| " + " | ".join(cells) + " |")
        parts.append("\n".join(lines))
    if not tasks:
        lines = ["| Row | method | held-out NLL | status |", "|---|---|---|---|"]
        for r in res["rows"]:
            nll = "–" if r.get("nll") is None else format(r["nll"], ".4f")
            lines.append(f"| {r['name']} | {r.get('method') or '–'} | {nll} | {r['status']} |")
        parts.append("\n".join(lines))
    n = {t: next((r["vs_student"][t]["n"] for r in res["rows"] if t in (r.get("vs_student") or {})), None)
         for t in tasks}
    notes = [f"Task `{res['task']}`; teacher `{res['teacher']}`, student `{res['student']}`; seed {res['seed']}; "
             f"eval limits {res['eval_limits']} (paired n: {n}); splits {res['splits']}.",
             "Δ: paired accuracy difference (points) with a percentile bootstrap 95% CI over the same questions; "
             "p: exact McNemar; fixed/broken: wrong→right / right→wrong vs the untouched student; gap closed = "
             "(row − student) / (teacher − student). Prior-corrected: MMLU accuracy after removing each model's "
             "letter prior (contextual calibration, docs/evaluation.md)."]
    parts.append("### training diagnostics\n\n" + training_table(res))
    return "\n\n".join(parts) + "\n\n" + "\n".join(notes) + "\n"


def plot(res: dict, path: Path) -> None:
    """Accuracy with its 95% interval per row (one panel per eval task; NLL when nothing was evaluated)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rows"]
    tasks = res["eval_tasks"] or ["nll"]
    fig, axes = plt.subplots(1, len(tasks), figsize=(6.0 * len(tasks), 0.9 + 0.38 * len(rows)), squeeze=False)
    ys = list(range(len(rows)))[::-1]
    for ax, t in zip(axes[0], tasks):
        for y, r in zip(ys, rows):
            v = r.get("nll") if t == "nll" else r["metrics"].get(t)
            if v is None:
                continue
            color = {"teacher": "#444444", "student": "#999999"}.get(r["kind"], "C0")
            if r["name"] == res.get("reference"):
                color = "C3"
            ci = None if t == "nll" else (r.get("ci95") or {}).get(t)
            x = v if t == "nll" else 100 * v
            xerr = None if not ci or None in ci else [[x - 100 * ci[0]], [100 * ci[1] - x]]
            ax.errorbar([x], [y], xerr=xerr, fmt="o", color=color, capsize=3)
            if r["kind"] == "student":
                ax.axvline(x, color="#999999", linestyle="--", linewidth=0.8)
        ax.set_yticks(ys, [r["name"] for r in rows], fontsize=8)
        ax.set_xlabel("held-out NLL" if t == "nll" else f"{t} (%), 95% CI")
        ax.grid(axis="x", alpha=0.3)
        ax.set_title(t)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    tmp.replace(path)


def write_report(out: Path, res: dict) -> Path:
    """``report.md`` + self-contained ``report.html``: the table, the plot, each row's overrides and run link."""
    from .report import _write_both

    lines = [f"# Sweep report: {out.name}", ""]
    if res.get("description"):
        lines += [res["description"], ""]
    lines += [f"- grid: `{res['grid']}`; reference row: `{res.get('reference') or 'none'}`",
              f"- teacher `{res['teacher']}` ({res['teacher_dtype']}), student `{res['student']}`, dtype "
              f"{res['dtype']}, seed {res['seed']}", f"- wall time {res['wall_seconds']} s", "",
              "## Results", "", markdown(res), "", "![accuracy per row](plot.png)", "", "## Rows", ""]
    for r in res["rows"]:
        if r["kind"] != "row":
            continue
        ov = ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) or "base only"
        link = f" — [run report](runs/{r['dir']}/report.html)" if r.get("run_dir") else ""
        lines.append(f"- **{r['name']}** ({r.get('method')}): {ov}{link}")
    errors = [(r["name"], r["error"]) for r in res["rows"] if r.get("error")]
    if errors:
        lines += ["", "## Errors", ""] + [f"- **{n}**: {e}" for n, e in errors]
    warns = sorted({w for r in res["rows"] for k in ("vs_student", "vs_reference")
                    for d in (r.get(k) or {}).values() for w in d.get("warnings", [])})
    if warns:
        lines += ["", "## Warnings", ""] + [f"- {w}" for w in warns]
    base = yaml.safe_dump(res.get("base") or {}, sort_keys=False).rstrip()
    lines += ["", "## Base configuration", "", "```yaml", base, "```", ""]
    return _write_both(out, "\n".join(lines), f"semalign sweep {out.name}")
