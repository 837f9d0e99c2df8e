"""``semalign`` command line: transfer, eval, compare, sweep, analyze, assets, ls, env.

Errors a user can fix print one line (``error: ...``) and exit 2; no tracebacks (``-v`` shows them).
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Optional

import click
import typer

from ..errors import SemalignError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Cross-scale knowledge transfer between language models (SemAlign and baselines).")
assets_app = typer.Typer(no_args_is_help=True, help="Offline model and data assets shipped in PyPI packages.")
ls_app = typer.Typer(no_args_is_help=True, help="List registered methods, tasks, architectures, losses, assets.")
app.add_typer(assets_app, name="assets")
app.add_typer(ls_app, name="ls")

log = logging.getLogger("semalign")


def setup_logging(verbosity: int = 0, quiet: bool = False) -> None:
    from rich.logging import RichHandler

    level = logging.WARNING if quiet else (logging.DEBUG if verbosity > 1 else logging.INFO)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_semalign", False):
            root.removeHandler(h)
    h = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    h._semalign = True  # type: ignore[attr-defined]
    root.addHandler(h)
    root.setLevel(logging.WARNING)
    logging.getLogger("semalign").setLevel(level)
    for noisy in ("transformers", "huggingface_hub", "peft", "accelerate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    except Exception:  # noqa: BLE001
        pass


@app.command("env")
def env_cmd() -> None:
    """Print versions, devices, paths and what decides speed (CPU flags, the dtype `auto` picks, threads)."""
    from ..artifacts import env_info
    from ..paths import cache_dir

    from ..cache import stage_cache

    info = env_info()
    info["cache_dir"] = str(cache_dir())
    sc = stage_cache()
    info["stage_cache"] = {"root": str(sc.root), "enabled": sc.enabled, "max_gb": sc.max_bytes / 1e9}
    typer.echo(json.dumps(info, indent=2))


@assets_app.command("list")
def assets_list() -> None:
    """List offline assets, whether they are fetched, and where."""
    from rich.console import Console

    from ..models.assets import list_assets
    from .tables import table

    assets = list_assets()
    rows = [(str(a.get("name")), str(a.get("architecture", "")), "yes" if a.get("fetched") else "no",
             str(a.get("disk_size") or ""), str(a.get("licence", ""))) for a in assets]
    Console().print(table(("name", "architecture", "fetched", "size", "licence"), rows))
    for a in assets:  # paths on plain lines: printed whole, never cut to the terminal width
        if a.get("path"):
            typer.echo(f"{a['name']}: {a['path']}")


@assets_app.command("fetch")
def assets_fetch(name: str = typer.Argument(..., help="asset name (see `semalign assets list`)"),
                 force: bool = typer.Option(False, "--force", help="re-download and re-convert")) -> None:
    """Download, verify (SHA-256) and convert an asset to the bf16 safetensors cache."""
    from ..models.assets import fetch_asset

    path = fetch_asset(name, force=force)
    typer.echo(str(path))


def _ls(kind: str) -> None:
    from rich.console import Console

    from .tables import table

    cols: tuple[str, ...] = ("name", "description")
    rows: list[tuple[str, ...]] = []
    if kind == "methods":
        from ..methods.base import METHODS, _load_builtin_methods

        _load_builtin_methods()
        cols += ("paper",)
        for n in METHODS:
            cls = METHODS.get(n)
            rows.append((n, cls.summary_line or METHODS.help(n), cls.paper))
    elif kind == "tasks":
        from ..data.tasks import TASKS

        for n in TASKS:
            s = TASKS.get(n)
            rows.append((n, f"{s.description}; protocol sizes {s.sizes}; Table-4 steps {s.table4_steps}"))
    elif kind == "architectures":
        from ..models.arch import ARCHITECTURES

        for n in ARCHITECTURES:
            rows.append((n, f"{ARCHITECTURES.help(n)} (model_type: {', '.join(ARCHITECTURES.get(n).model_types)})"))
    elif kind == "losses":
        from ..methods.semalign.losses import LAYER_LOSSES, OUTPUT_LOSSES

        rows += [(f"layer:{n}", LAYER_LOSSES.help(n)) for n in LAYER_LOSSES]
        rows += [(f"output:{n}", OUTPUT_LOSSES.help(n)) for n in OUTPUT_LOSSES]
    Console().print(table(cols, rows))


for _kind in ("methods", "tasks", "architectures", "losses"):
    ls_app.command(_kind, help=f"List registered {_kind}.")(lambda _k=_kind: _ls(_k))


def _register_optional() -> None:
    """Commands contributed by other modules (each exposes ``register(app)``)."""
    import importlib

    for mod in ("semalign.cli.eval_cmd", "semalign.cli.compare_cmd", "semalign.cli.sweep_cmd",
                "semalign.cli.analyze_cmd", "semalign.cli.cache_cmd"):
        try:
            importlib.import_module(mod).register(app)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


def build_cli() -> click.Group:
    from .transfer_cmd import transfer_command

    _register_optional()
    group = typer.main.get_command(app)
    group.add_command(transfer_command(), "transfer")  # type: ignore[attr-defined]
    return group  # type: ignore[return-value]


def main(argv: Optional[list[str]] = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    verbose = sum(a in ("-v", "--verbose") for a in args) + 2 * sum(a == "-vv" for a in args)
    setup_logging(verbose, quiet=any(a in ("-q", "--quiet") for a in args))
    try:
        group = build_cli()
        rv = group.main(args=args, prog_name="semalign", standalone_mode=False)
        if isinstance(rv, int) and rv == 130:  # typer turns KeyboardInterrupt into an exit code
            typer.echo("interrupted; continue with --resume", err=True)
        return rv if isinstance(rv, int) else 0
    except click.exceptions.Exit as e:
        return int(e.exit_code or 0)
    except click.ClickException as e:
        e.show()
        return e.exit_code
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        return 130
    except SemalignError as e:
        if verbose:
            logging.getLogger("semalign").exception("details")
        typer.echo(f"error: {e.message}", err=True)
        return e.exit_code
    except KeyboardInterrupt:
        typer.echo("interrupted; continue with --resume", err=True)
        return 130
    except OSError as e:  # disk full, read-only or vanished paths: one line, no traceback
        if verbose:
            logging.getLogger("semalign").exception("details")
        typer.echo(f"error: {os_error_message(e)}", err=True)
        return 2
    except Exception as e:  # a library error that is really an OS error (safetensors' "os error 28")
        from ..paths import os_error_from

        oserr = os_error_from(e)
        if oserr is None:
            raise
        typer.echo(f"error: {os_error_message(oserr)}", err=True)
        return 2


def os_error_message(e: OSError) -> str:
    import errno

    where = f" ({e.filename})" if getattr(e, "filename", None) else ""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on device{where}; free some space (or choose another --output), then continue "
                "with --resume")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"cannot write{where}: {e.strerror}; choose a writable --output or fix the permissions"
    return f"{e.strerror or type(e).__name__}{where}; check the path and free space, then rerun (with --resume)"


def entry() -> None:
    sys.exit(main())
