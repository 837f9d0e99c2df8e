"""``semalign analyze``: CKA heat-maps, resolution check, parametric similarity and attribution profiles for a
transfer run directory or a teacher/student pair (see docs/analysis.md)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import typer

from ..errors import SemalignError

log = logging.getLogger("semalign.analysis")

EPILOG = """\b
Examples:
  semalign analyze runs/semalign-mmlu-20250101-120000        # writes RUN/analysis/, regenerates RUN/report.html
  semalign analyze --teacher qwen2.5-coder-1.5b-instruct --student qwen2.5-coder-0.5b-instruct \\
      --task mmlu --n-samples 8 --output runs/analysis-qwen
  semalign analyze RUN --no-parametric --bases output,random  # faster
"""


def analyze_cmd(
    run_dir: Optional[Path] = typer.Argument(None, help="a transfer run directory (reads config.resolved.yaml, "
                                             "student/, attribution/, semantic_map/, layer_map.json)"),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="teacher spec (pair mode): asset, dir, .gguf"),
    student: Optional[str] = typer.Option(None, "--student", help="student spec (pair mode)"),
    task: str = typer.Option("mmlu", "--task", help="mmlu | gsm8k | humaneval | mbpp (pair mode)"),
    data_dir: Optional[str] = typer.Option(None, "--data-dir", help="folder with protocol splits (pair mode)"),
    n_samples: int = typer.Option(8, "--n-samples", help="examples (extract split first), one forward each"),
    max_tokens: int = typer.Option(2048, "--max-tokens", help="pooled token rows for CKA (seeded subsample)"),
    max_length: int = typer.Option(512, "--max-length", help="token cutoff per example"),
    keep_prefix: bool = typer.Option(False, "--keep-prefix", help="keep the chat-template prefix shared by all "
                                     "examples (identical states, attention sink) in the pooled tokens"),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="output folder (default RUN/analysis, or "
                                          "runs/analysis-<task>-<time> in pair mode)"),
    seed: Optional[int] = typer.Option(None, "--seed", help="default: the run's seed, or 42"),
    dtype: str = typer.Option("auto", "--dtype", help="model dtype for forwards: auto (bf16 where the hardware has "
                              "native bf16, else fp32) | bf16 | fp32 | fp16; reductions are fp32/fp64"),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:N"),
    attribution: bool = typer.Option(True, "--attribution/--no-attribution", help="Grad x Act profiles "
                                     "(one backward per example)"),
    resolution: bool = typer.Option(True, "--resolution/--no-resolution", help="resolution-of-semantics check"),
    parametric: bool = typer.Option(True, "--parametric/--no-parametric", help="parametric similarity"),
    extraction: str = typer.Option("auto", "--extraction", help="auto | seeking-run | sensitivity | leading: "
                                   "how teacher blocks of student shape are chosen"),
    bases: str = typer.Option("output,output_folded,input,random,random_uniform", "--bases", help="basis kinds of the "
                              "resolution check"),
    folded: bool = typer.Option(True, "--folded/--no-folded", help="also align with M built from the LM head with "
                                "the final-norm gain folded in (spec §8.6)"),
    rank: int = typer.Option(16, "--rank", help="rank of the LoRA-style factorisation in parametric similarity"),
    cache: bool = typer.Option(True, "--cache/--no-cache", help="reuse cached semantic maps and frame operators"),
    verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="more logging"),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="warnings and errors only"),
) -> None:
    """Analyse how teacher and student representations relate: CKA heat-maps (with and without semantic alignment,
    before/after transfer), the resolution-of-semantics check, parametric similarity (NI) and attribution profiles.
    Writes PNG + JSON and report.md/report.html."""
    from ..analysis.suite import AnalysisOptions, analyze_pair, analyze_run

    opts = AnalysisOptions(n_samples=n_samples, max_tokens=max_tokens, max_length=max_length, keep_prefix=keep_prefix,
                           seed=seed, dtype=dtype, device=device, attribution=attribution, resolution=resolution,
                           parametric=parametric, extraction=extraction, folded=folded,
                           bases=tuple(b.strip() for b in bases.split(",") if b.strip()), rank=rank, cache=cache)
    opts.validate()
    if run_dir is not None:
        if teacher or student:
            raise SemalignError("give either RUN_DIR or --teacher/--student, not both")
        index = analyze_run(run_dir, output=output, opts=opts)
        report = (Path(index["output"]) if output else Path(run_dir)) / "report.html"
    else:
        if not (teacher and student):
            raise SemalignError("pass a RUN_DIR, or both --teacher and --student (see `semalign analyze --help`)")
        index = analyze_pair(teacher, student, task, data_dir=data_dir, output=output, opts=opts)
        report = Path(index["output"]) / "report.html"
    out = index.get("output")
    typer.echo(f"analysis: {out} ({len(index.get('figures', []))} figures, {index.get('wall_seconds')} s)")
    typer.echo(f"report: {report}")


def register(app: typer.Typer) -> None:
    """Add the ``analyze`` command to ``app``."""
    app.command("analyze", epilog=EPILOG, no_args_is_help=True)(analyze_cmd)
