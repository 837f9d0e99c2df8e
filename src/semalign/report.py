"""Run reports: ``report.md`` (and plots) in every run directory.

The analysis suite can add sections/figures later; this module renders what every run has: the setup, the
layer map, the loss curves, the held-out NLL table and (when evaluated) the teacher / before / after table.
"""

from __future__ import annotations

import logging
from pathlib import Path

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

    steps = [m["step"] for m in rows]
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
        return "n/a" if x is None or x.get("nll") is None else f"{x['nll']:.4f}"

    t, b, a = nll.get("teacher"), nll.get("student_before"), nll.get("student_after")
    gap = "n/a"
    if all(v and v.get("nll") is not None for v in (t, b, a)) and abs(t["nll"] - b["nll"]) > 1e-12:
        gap = f"{(a['nll'] - b['nll']) / (t['nll'] - b['nll']):+.3f}"
    return ("| model | held-out gold-answer NLL (lower is better) |\n|---|---|\n"
            f"| teacher | {f(t)} |\n| student before | {f(b)} |\n| student after | {f(a)} |\n\n"
            f"Gap closed (after - before) / (teacher - before): {gap}\n")


def eval_section(evals: dict) -> str:
    if not any(evals.values()):
        return ""
    try:
        from .eval import compare_table

        md, _ = compare_table(evals.get("teacher", {}), evals.get("student_before", {}), evals.get("student_after", {}))
        return "## Benchmarks\n\n" + md + "\n"
    except Exception as exc:  # noqa: BLE001 - a report must still be written
        log.warning("could not render the evaluation table: %s", exc)
        return ""


def write_run_report(run: RunDir, cfg: RunConfig, summary: dict, results: dict) -> Path:
    plot_losses(run)
    lines = [f"# Transfer report: {run.root.name}", "",
             f"- method: **{cfg.method}** ({summary.get('paper', '')})",
             f"- teacher: `{cfg.teacher}` ({summary['teacher']['num_layers']} layers x {summary['teacher']['hidden_size']})",
             f"- student: `{cfg.student}` ({summary['student']['num_layers']} layers x {summary['student']['hidden_size']})",
             f"- task: `{cfg.task}`; data: {summary['data']['source']}",
             f"- steps: {cfg.steps or 'task default'}; batch {cfg.batch_size}; lr {cfg.lr}; seed {cfg.seed}; dtype {cfg.dtype}",
             f"- wall time: {summary.get('wall_seconds', 'n/a')} s; peak RSS {summary.get('peak_rss_mb', 'n/a')} MB", ""]
    if cfg.method == "semalign-frontier":
        lines += ["> **Reconstruction.** `semalign-frontier` follows the v2/ACL abstracts only; no published numbers "
                  "exist to compare against.", ""]
    if "layer_map" in summary:
        lines += ["## Layer map", "", f"`{summary['layer_map']}`", "", "![layer map](plots/layer_map.png)", ""]
    lines += ["## Held-out NLL", "", nll_table(results.get("nll", {}))]
    if run.path("plots", "loss.png").is_file():
        lines += ["## Training", "", "![loss](plots/loss.png)", ""]
    lines.append(eval_section(results.get("eval", {})))
    rt = summary.get("roundtrip", {})
    lines += ["## Export", "", f"Merged student: `student/` (reloads with `AutoModelForCausalLM.from_pretrained`; "
              f"max |logit diff| vs in-memory = {rt.get('max_abs_logit_diff', 'n/a')})", "",
              "Evaluation settings (decoding, prompts) were chosen by this project; see docs/evaluation.md.", ""]
    return run.write_text("report.md", "\n".join(lines))
