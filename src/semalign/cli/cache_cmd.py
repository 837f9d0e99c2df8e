"""``semalign cache ls | du | clear``: inspect and prune the stage cache (see docs/cache.md)."""

from __future__ import annotations

import datetime as _dt
import json
from typing import Optional

import typer

EPILOG = """\b
Examples:
  semalign cache ls                      # every entry: stage, full key, size, last use
  semalign cache ls --stage nll --json   # machine-readable, with each entry's inputs and path
  semalign cache du                      # size per stage and the bound (SEMALIGN_CACHE_MAX_GB)
  semalign cache clear --older-than 7d   # drop entries unused for a week
  semalign cache clear --stage eval      # drop every cached evaluation
"""

cache_app = typer.Typer(no_args_is_help=True, epilog=EPILOG,
                        help="Inspect and prune the stage cache (attribution, targets, NLL, evaluations).")


def _when(ts: float | None) -> str:
    if ts is None:
        return "?"
    return _dt.datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M")


def _table(*columns: str):
    """A rich table whose cells wrap instead of being cut (keys and paths must be copyable whole)."""
    from rich.table import Table

    t = Table(show_lines=False)
    for c in columns:
        t.add_column(c, overflow="fold", no_wrap=False)
    return t


@cache_app.command("ls")
def cache_ls(stage: Optional[str] = typer.Option(None, "--stage", help="only this stage"),
             as_json: bool = typer.Option(False, "--json", help="print JSON (with inputs and paths)")) -> None:
    """List cache entries, least recently used last (plain columns: keys print whole, never cut)."""
    from ..cache import human_bytes, stage_cache

    c = stage_cache()
    rows = sorted((r for r in c.ls() if not stage or r["stage"] == stage), key=lambda r: -r["accessed_unix"])
    if as_json:
        typer.echo(json.dumps(rows, indent=2, default=str))
        return
    cells = [("STAGE", "SIZE", "LAST USED", "KEY")] + [
        (r["stage"], human_bytes(r["size"]), _when(r["accessed_unix"]), r["key"]) for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(3)]
    for row in cells:
        typer.echo("  ".join(v.ljust(w) for v, w in zip(row[:3], widths)) + "  " + row[3])
    typer.echo(f"{len(rows)} entries under {c.root}")


@cache_app.command("du")
def cache_du() -> None:
    """Disk use per stage, the total and the bound."""
    from rich.console import Console

    from ..cache import human_bytes, stage_cache

    c = stage_cache()
    t = _table("stage", "entries", "size")
    usage = c.du()
    total = usage.pop("total")
    for s, v in sorted(usage.items()):
        t.add_row(s, str(v["entries"]), human_bytes(v["bytes"]))
    t.add_row("total", str(total["entries"]), human_bytes(total["bytes"]))
    Console().print(t)
    typer.echo(f"bound {human_bytes(c.max_bytes)} (SEMALIGN_CACHE_MAX_GB; least recently used evicted first)")
    typer.echo(f"root {c.root}")


@cache_app.command("clear")
def cache_clear(older_than: Optional[str] = typer.Option(None, "--older-than",
                                                         help="only entries unused for this long (7d, 12h, 30m)"),
                stage: Optional[str] = typer.Option(None, "--stage", help="only this stage")) -> None:
    """Delete cache entries (all, or those unused for --older-than / of --stage)."""
    from ..cache import human_bytes, parse_age, stage_cache

    age = parse_age(older_than) if older_than else None
    n, b = stage_cache().clear(older_than=age, stage=stage)
    typer.echo(f"deleted {n} entries ({human_bytes(b)})")


def register(app: typer.Typer) -> None:
    """Add the ``cache`` command group to ``app``."""
    app.add_typer(cache_app, name="cache")
