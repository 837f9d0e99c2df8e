"""``semalign compare``: run several methods on identical splits/seeds and write a comparison table + plot."""

from __future__ import annotations

from datetime import datetime
from typing import List, Optional

import typer

from ..config import DEFAULT_STUDENT, DEFAULT_TEACHER

EPILOG = """\b
Examples:
  semalign compare --methods semalign,seeking,laten,lora-sft,logit-kd --eval-limit 100
  semalign compare --task gsm8k --data-dir ../shared/data --steps 4 --eval-tasks gsm8k --eval-limit 50
  semalign compare --methods seeking,lora-sft --set seeking.seed_examples=8 --set max_length=256
  semalign compare --output runs/cmp --resume        # reuse finished method runs and cached evaluations
"""


def register(app: typer.Typer) -> None:
    @app.command("compare", epilog=EPILOG)
    def compare(
        teacher: str = typer.Option(DEFAULT_TEACHER, help="asset name, local dir, .gguf file or hub id"),
        student: str = typer.Option(DEFAULT_STUDENT, help="asset name, local dir, .gguf file or hub id"),
        task: str = typer.Option("mmlu", help="transfer task: mmlu | gsm8k | humaneval | mbpp"),
        methods: str = typer.Option("semalign,seeking,laten,lora-sft,logit-kd", help="comma-separated methods"),
        eval_tasks: Optional[str] = typer.Option(None, help="comma-separated benchmarks (default: --task; "
                                                 "'none' for held-out NLL only)"),
        eval_limit: Optional[int] = typer.Option(None, min=1, help="examples per benchmark (default: 1000 stratified "
                                                 "MMLU questions, 200 GSM8K problems, all HumanEval/MBPP)"),
        steps: Optional[int] = typer.Option(None, min=1, help="optimizer steps for every method "
                                            "(default: each method's own budget)"),
        data_dir: Optional[str] = typer.Option(None, help="folder with protocol splits (pkt-splits layout)"),
        output: Optional[str] = typer.Option(None, help="output folder (default runs/compare-<task>-<time>)"),
        seed: int = typer.Option(42, help="seed shared by every method"),
        dtype: str = typer.Option("auto", help="teacher dtype and student compute dtype: auto | bf16 | fp32 | fp16 "
                                            "(auto: bf16 where the hardware has native bf16, else fp32)"),
        teacher_dtype: Optional[str] = typer.Option(None, help="load the shared teacher in this dtype instead "
                                                    "(e.g. bf16 weights with --dtype fp32 to save memory)"),
        device: str = typer.Option("auto", help="auto | cpu | cuda | cuda:N"),
        set_: List[str] = typer.Option([], "--set", help="config override KEY=VALUE, repeatable "
                                       "(e.g. seeking.seed_examples=8, laten.samples_per_step=8, max_length=256, batch_size=2)"),
        allow_code_execution: bool = typer.Option(False, help="needed to evaluate humaneval / mbpp"),
        resume: bool = typer.Option(False, "--resume", help="reuse completed runs and cached evaluations"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --output"),
        verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="more logging"),
        quiet: bool = typer.Option(False, "-q", "--quiet", help="warnings and errors only"),
    ) -> None:
        """Compare transfer methods on identical splits and seeds (teacher loaded once)."""
        from rich.console import Console
        from rich.markdown import Markdown

        from ..compare import markdown, parse_overrides, run_compare
        from ..config import make_config

        names = [m.strip() for m in methods.split(",") if m.strip()]
        ev = task if eval_tasks is None else ("" if eval_tasks.strip().lower() == "none" else eval_tasks)
        values = {"teacher": teacher, "student": student, "task": task, "eval_tasks": ev, "eval_limit": eval_limit,
                  "steps": steps, "data_dir": data_dir, "seed": seed, "dtype": dtype, "device": device,
                  "allow_code_execution": allow_code_execution}
        for key, val in parse_overrides(set_).items():
            if isinstance(val, dict):
                values.setdefault(key, {}).update(val)
            else:
                values[key] = val
        cfg = make_config(values)
        out = output or f"runs/compare-{task}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        if teacher_dtype is not None and teacher_dtype not in ("bf16", "fp32", "fp16", "auto"):
            from ..errors import SemalignError

            raise SemalignError(f"--teacher-dtype {teacher_dtype!r} is not one of bf16, fp32, fp16, auto")
        res = run_compare(cfg, names, output=out, resume=resume, overwrite=overwrite, teacher_dtype=teacher_dtype)
        console = Console()
        console.print(Markdown(markdown(res)))
        console.print(f"comparison written to {out}/compare/ (results.json, table.md, bars.png)")
