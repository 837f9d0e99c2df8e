"""``semalign sweep GRID.yaml``: a grid of transfer configurations on identical splits, one table and report."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Optional

import typer

EPILOG = """\b
Examples:
  semalign sweep examples/sweep_lr.yaml --output runs/sweep-lr
  semalign sweep examples/sweep_v1_study.yaml --output runs/v1-study --resume   # skip finished rows
  semalign sweep examples/sweep_lr.yaml --dry-run                               # list the rows and exit
"""


def register(app: typer.Typer) -> None:
    @app.command("sweep", epilog=EPILOG, no_args_is_help=True)
    def sweep(
        grid: Path = typer.Argument(..., help="GRID.yaml: base config, grid of field -> values and/or named runs, "
                                    "reference row"),
        output: Optional[str] = typer.Option(None, help="output folder (default runs/sweep-<grid>-<time>)"),
        resume: bool = typer.Option(False, "--resume", help="skip rows whose run and evaluation are complete"),
        overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --output"),
        dry_run: bool = typer.Option(False, "--dry-run", help="print the rows the grid expands to and exit"),
        verbose: int = typer.Option(0, "-v", "--verbose", count=True, help="more logging"),
        quiet: bool = typer.Option(False, "-q", "--quiet", help="warnings and errors only"),
    ) -> None:
        """Run a grid of transfer configurations (any config field, method too) on the same splits and seed."""
        from rich.console import Console
        from rich.markdown import Markdown

        from ..sweep import describe, load_grid, markdown, run_sweep

        g = load_grid(grid)
        console = Console()
        if dry_run:
            console.print(describe(g), markup=False, highlight=False)
            return
        out = output or f"runs/sweep-{grid.stem}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"
        res = run_sweep(g, output=out, resume=resume, overwrite=overwrite)
        console.print(Markdown(markdown(res)))
        console.print(f"sweep written to {out}/ (results.json, table.md, plot.png, report.md, report.html)")
