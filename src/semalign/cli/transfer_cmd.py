"""``semalign transfer``: flags generated from RunConfig (see ``options.py``)."""

from __future__ import annotations

import sys

import click

from ..config import RunConfig, load_config, make_config
from .options import apply_overrides, config_options

EPILOG = """\b
Examples:
  semalign transfer                                  # SemAlign v1, Qwen2.5-Coder 1.5B -> 0.5B, MMLU
  semalign transfer --task gsm8k --data-dir ../shared/data --steps 4
  semalign transfer --method semalign-frontier --frontier-layer-loss relgeom
  semalign transfer --output runs/x --resume         # continue an interrupted run
  semalign transfer --preset paper-v1                # the paper's v1 recipe exactly
"""


def transfer_command() -> click.Command:
    options = config_options()

    def callback(config_file, preset, resume, overwrite, verbose, quiet, dry_run, **params):
        from rich.console import Console

        from ..config import merge_values, preset_values

        base = preset_values(preset)
        if config_file:  # a config file's own values override the preset's
            base = merge_values(base, load_config(config_file).model_dump(mode="json", exclude_unset=True))
        cfg = make_config(apply_overrides(base, params, options))
        console = Console()
        if dry_run:
            from ..config import dump_config

            console.print(dump_config(cfg))
            return
        from ..transfer import run_transfer

        summary = run_transfer(cfg, resume=resume, overwrite=overwrite, argv=["semalign", "transfer", *sys.argv[2:]]
                               if sys.argv and sys.argv[0].endswith("semalign") else None)
        print_summary(console, summary)

    params = [
        click.Option(["--config", "config_file"], type=click.Path(dir_okay=False), default=None,
                     help="YAML config; CLI flags override it."),
        click.Option(["--preset"], default=None, help="a named bundle of settings applied first (--config and flags "
                     "override it): paper-v1 = the paper's v1 recipe exactly (docs/method.md)"),
        click.Option(["--resume"], is_flag=True, default=False, help="continue the run in --output from its last checkpoint"),
        click.Option(["--overwrite"], is_flag=True, default=False, help="replace an existing --output directory"),
        click.Option(["--dry-run"], is_flag=True, default=False, help="print the resolved config and exit"),
        click.Option(["-v", "--verbose"], count=True, help="more logging (-vv for debug)"),
        click.Option(["-q", "--quiet"], is_flag=True, default=False, help="warnings and errors only"),
    ] + [o for o, _ in options]
    return click.Command("transfer", callback=callback, params=params, epilog=EPILOG,
                         help="Transfer task knowledge from a teacher to a smaller student and write a run directory.\n\n"
                              "Defaults: SemAlign v1 on the offline Qwen2.5-Coder-1.5B-Instruct -> 0.5B-Instruct pair, "
                              "task mmlu, spec Table-4 steps.")


def print_summary(console, summary: dict) -> None:
    from rich.markdown import Markdown

    from ..artifacts import RunDir
    from ..report import eval_section, nll_table

    run = RunDir(summary["export"]).root.parent
    console.rule(f"[bold]{summary['method']}[/] finished in {summary.get('wall_seconds')} s")
    if "layer_map" in summary:
        console.print(f"layer map: {summary['layer_map']}")
    att = summary.get("attribution")
    if att and att.get("margin", {}).get("top"):
        m = att["margin"]
        rel = m.get("relative_margin")
        console.print(f"attribution ({att['target']}, {att['positions']} positions, {att['dtype']}): top T{m['top']}, "
                      f"next T{m['next']}, relative margin {rel:.3f}" if rel is not None else "")
    prec = summary.get("precision")
    if prec:
        console.print(f"precision: student evaluated in {prec.get('student_before')} before and "
                      f"{prec.get('student_after')} after; teacher in {prec.get('teacher')}; training compute "
                      f"{prec.get('compute')}")
    results = RunDir(run).read_json("results.json")
    console.print(Markdown(nll_table(results.get("nll", {}))))
    sec = eval_section(results.get("eval", {}), results.get("paired"))
    if sec:
        console.print(Markdown(sec))
    console.print(f"run directory: {run}  (report.md, student/, metrics.jsonl)")


RunConfig  # re-export for type checkers
