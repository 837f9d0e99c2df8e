"""``semalign sweep GRID.yaml``: a grid of transfer configurations on the same splits, seed and evaluation set.

GRID.yaml::

    base:                 # RunConfig fields (nested sections or dotted keys), shared by every row
      task: mmlu
      steps: 8
      semalign: {trainable: full}
    grid:                 # field -> list of values; rows = the cartesian product (in this order)
      lr: [3.0e-5, 3.0e-4]
      semalign.interface: [residual, block_output]
    runs:                 # and/or explicit named rows (overrides on top of base)
      - {name: paper, set: {lr: 3.0e-5, steps: 2}}
    reference: paper      # a row every other row is also compared against (optional)
    teacher_dtype: bf16   # optional, as `semalign compare --teacher-dtype`

Every row runs through :func:`semalign.transfer.run_transfer` into ``DIR/runs/<row>/`` with the teacher loaded
once (``preloaded``); the teacher and the untouched student are evaluated once, each exported student on the same
held-out questions (``DIR/eval/<row>/``, with per-question records). Fields that define the shared setting
(:data:`SHARED`) cannot vary. ``resume`` skips rows whose run and evaluation are complete (after checking that
their configuration is unchanged). Output: ``DIR/results.json``, ``table.md``, ``plot.png``, ``report.md``,
``report.html``.
"""

from __future__ import annotations

import difflib
import gc
import itertools
import json
import logging
import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .config import RunConfig, Section, make_config
from .errors import SemalignError
from .paths import atomic_write_json, atomic_write_text

from .sweep_report import markdown, plot, training_diagnostics, training_table, write_report  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

GRID_KEYS = ("base", "grid", "runs", "reference", "teacher_dtype", "description", "eval_from_block", "teacher_eval")
SHARED = ("teacher", "student", "task", "data_dir", "seed", "eval_tasks", "eval_limit", "allow_code_execution",
          "dtype", "device", "output")


@dataclass
class SweepRow:
    name: str
    dir: str
    overrides: dict[str, Any]
    config: RunConfig


@dataclass
class Grid:
    path: str
    base: dict[str, Any]
    rows: list[SweepRow]
    reference: str | None = None
    teacher_dtype: str | None = None
    description: str = ""
    eval_from_block: int | None = None  # incremental MMLU evaluation of the rows from this student block up
    teacher_eval: bool = True  # false: no teacher evaluation (no gap closed) until a --resume with it on

    @property
    def cfg(self) -> RunConfig:
        return self.rows[0].config


def field_paths() -> set[str]:
    """Every settable RunConfig field as a dotted path (``lr``, ``semalign.trainable``, ...)."""
    out = set()
    for name, info in RunConfig.model_fields.items():
        ann = info.annotation
        if isinstance(ann, type) and issubclass(ann, Section):
            out.update(f"{name}.{sub}" for sub in ann.model_fields)
        else:
            out.add(name)
    return out


def _flat(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def _nested(flat: dict[str, Any]) -> dict:
    out: dict = {}
    for k, v in flat.items():
        d = out
        parts = k.split(".")
        for p in parts[:-1]:
            d = d.setdefault(p, {})
        d[parts[-1]] = v
    return out


def _check_field(key: str, where: str, paths: set[str]) -> None:
    if key not in paths:
        close = difflib.get_close_matches(key, sorted(paths), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else "; see `semalign transfer --help` for the fields"
        raise SemalignError(f"{where}: unknown config field {key!r}{hint}")


def _fmt(v: Any) -> str:
    return yaml.safe_dump(v, default_flow_style=True).strip().removesuffix("...").strip() if not isinstance(v, str) \
        else v


def _dirname(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("=", "-").replace(",", "__")).strip("_") or "row"


def load_grid(path: str | Path) -> Grid:
    """Read and validate GRID.yaml; every problem is a one-line :class:`SemalignError`."""
    p = Path(path)
    if not p.is_file():
        raise SemalignError(f"grid file {p} does not exist")
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        raise SemalignError(f"{p}: invalid YAML ({type(exc).__name__}); fix the file") from None
    if not isinstance(raw, dict):
        raise SemalignError(f"{p}: a grid file is a mapping with `base:`, `grid:` and/or `runs:`, `reference:`")
    unknown = [k for k in raw if k not in GRID_KEYS]
    if unknown:
        raise SemalignError(f"{p}: unknown top-level key {unknown[0]!r}; use {', '.join(GRID_KEYS)}")
    paths = field_paths()
    base = raw.get("base") or {}
    if not isinstance(base, dict):
        raise SemalignError(f"{p}: `base:` must map config fields to values")
    base = _flat(base)
    for k in base:
        _check_field(k, f"{p}: base", paths)
    base.setdefault("eval_tasks", base.get("task", "mmlu"))
    grid = raw.get("grid") or {}
    runs = raw.get("runs") or []
    if not isinstance(grid, dict) or not isinstance(runs, list):
        raise SemalignError(f"{p}: `grid:` maps a field to a list of values and `runs:` is a list of "
                            "{name, set} entries")
    if not grid and not runs:
        raise SemalignError(f"{p}: the grid has no rows; give `grid:` (field -> list of values) and/or `runs:`")
    for k, vals in grid.items():
        _check_field(k, f"{p}: grid", paths)
        if not isinstance(vals, list) or not vals:
            raise SemalignError(f"{p}: grid field {k!r} needs a non-empty list of values (got {vals!r})")
    specs: list[tuple[str, dict]] = []
    keys = list(grid)
    if keys:
        for combo in itertools.product(*(grid[k] for k in keys)):
            ov = dict(zip(keys, combo))
            specs.append((",".join(f"{k}={_fmt(v)}" for k, v in ov.items()), ov))
    for i, r in enumerate(runs):
        if not isinstance(r, dict) or not isinstance(r.get("name"), str) or not r["name"].strip() \
                or set(r) - {"name", "set"} or not isinstance(r.get("set") or {}, dict):
            raise SemalignError(f"{p}: runs[{i}] must be {{name: <text>, set: {{field: value, ...}}}}")
        ov = _flat(r.get("set") or {})
        for k in ov:
            _check_field(k, f"{p}: runs[{i}] ({r['name']})", paths)
        specs.append((r["name"].strip(), ov))
    rows, seen, dirs = [], set(), set()
    for name, ov in specs:
        fixed = [k for k in ov if k in SHARED]
        if fixed:
            raise SemalignError(f"{p}: row {name!r} changes {fixed[0]!r}, which every row shares (same pair, splits, "
                                f"seed and evaluation set); set it in `base:`")
        if name in seen:
            raise SemalignError(f"{p}: two rows are named {name!r}; names must be unique")
        d = _dirname(name)
        if d in ("teacher", "student"):
            raise SemalignError(f"{p}: a row cannot be named {name!r} (reserved for the untouched models); rename it")
        if d in dirs:
            raise SemalignError(f"{p}: rows {name!r} and another map to the same folder {d!r}; rename one")
        seen.add(name), dirs.add(d)
        try:
            cfg = make_config(_nested({**base, **ov}))
        except SemalignError as exc:
            raise SemalignError(f"{p}: row {name!r}: {exc.message}") from None
        rows.append(SweepRow(name, d, ov, cfg))
    ref = raw.get("reference")
    if ref is not None and ref not in seen:
        raise SemalignError(f"{p}: reference {ref!r} is not a row; choose one of {', '.join(sorted(seen))}")
    td = raw.get("teacher_dtype")
    if td is not None and td not in ("bf16", "fp32", "fp16", "auto"):
        raise SemalignError(f"{p}: teacher_dtype {td!r} is not one of bf16, fp32, fp16, auto")
    from .methods.base import get_method

    for r in rows:
        get_method(r.config.method)
    efb = raw.get("eval_from_block")
    if efb is not None and (not isinstance(efb, int) or isinstance(efb, bool) or efb < 2):
        raise SemalignError(f"{p}: eval_from_block must be a student block number >= 2 (got {efb!r})")
    te = raw.get("teacher_eval", True)
    if not isinstance(te, bool):
        raise SemalignError(f"{p}: teacher_eval must be true or false (got {te!r})")
    return Grid(str(p), base, rows, ref, td, str(raw.get("description") or ""), efb, te)


# ------------------------------------------------------------------------------------------------ running
@dataclass
class Result:
    name: str
    kind: str                         # teacher | student | row
    dir: str | None = None
    overrides: dict[str, Any] = field(default_factory=dict)
    method: str | None = None
    status: str = "completed"
    metrics: dict[str, float | None] = field(default_factory=dict)
    stderr: dict[str, float | None] = field(default_factory=dict)
    ci95: dict[str, list | None] = field(default_factory=dict)
    letters: dict[str, Any] = field(default_factory=dict)
    nll: float | None = None
    wall_seconds: float | None = None
    eval_seconds: float | None = None
    peak_rss_mb: float | None = None
    run_dir: str | None = None
    error: str | None = None
    reused: bool = False
    incremental: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)  # first/last step losses (diagnosis of each row)
    vs_student: dict[str, dict] = field(default_factory=dict)
    vs_reference: dict[str, dict] = field(default_factory=dict)


def _fill(r: Result, res: dict) -> None:
    from .compare import _letters, _primary

    r.metrics, r.stderr = _primary(res)
    r.ci95 = {t: x.get(f"{x.get('primary_metric', 'acc')}_ci95") for t, x in (res.get("results") or {}).items()}
    r.letters = _letters(res)


def _unchanged(cfg: RunConfig, run_dir: Path) -> None:
    """Raise when a finished row's saved configuration differs from the grid's (resume would mix settings)."""
    from .models.load import resolve_device
    from .models.precision import resolve_compute_dtype
    from .transfer import validate

    compute = resolve_compute_dtype(cfg.dtype, resolve_device(cfg.device))
    try:
        validate(cfg.model_copy(update={"dtype": compute}), resume=True, overwrite=False)
    except SemalignError as exc:
        raise SemalignError(f"{exc.message} (grid row in {run_dir}; use a new --output or --overwrite)") from None


def run_sweep(grid: Grid, *, output: str | Path, resume: bool = False, overwrite: bool = False) -> dict:
    """Run every row of ``grid`` and write the sweep folder; returns the results dict (``results.json``)."""
    from .compare import RssSampler, _completed, _evaluate
    from .data.tasks import build_splits
    from .models.load import load_model, model_content_hash
    from .transfer import run_transfer

    t_all = time.perf_counter()
    out = Path(output)
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise SemalignError(f"output directory {out} already exists; pass --resume to skip finished rows, "
                            "--overwrite to replace it, or choose another --output")
    if overwrite and not resume and out.exists():
        import shutil

        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "grid.yaml", Path(grid.path).read_text(encoding="utf-8"))
    cfg = grid.cfg
    tasks = cfg.eval_task_list()
    splits = build_splits(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed)
    used = splits.used_ids()

    t0 = time.perf_counter()
    with RssSampler() as rs:
        teacher, t_tok, t_res = load_model(cfg.teacher, dtype=grid.teacher_dtype or cfg.dtype, device=cfg.device)
        for p in teacher.parameters():
            p.requires_grad_(False)
        t_key = model_content_hash(t_res) if tasks and t_res.kind != "hub" else None
        t_eval = _evaluate(teacher, t_tok, "teacher", cfg, tasks, used, out, t_key) if grid.teacher_eval else {}
    results = [Result("teacher", "teacher", eval_seconds=round(time.perf_counter() - t0, 2),
                      peak_rss_mb=round(rs.peak_mb, 1), status="completed" if grid.teacher_eval else "skipped")]
    if grid.teacher_eval:
        _fill(results[0], t_eval)
    else:
        log.info("teacher evaluation skipped (teacher_eval: false): no gap closed until a --resume with it on")
    t0 = time.perf_counter()
    student, s_tok, s_res = load_model(cfg.student, dtype="fp32", device=cfg.device)
    s_key = model_content_hash(s_res) if tasks and s_res.kind != "hub" else None
    bank = None
    if grid.eval_from_block and "mmlu" in tasks:
        # Record the untouched student's input to block `eval_from_block` for every evaluated question (so not
        # from the evaluation cache); each row's MMLU evaluation then runs only the blocks from there up, when
        # nothing below changed (checked tensor by tensor; otherwise that row is evaluated in full).
        from .eval.incremental import StateBank, recording

        bank = StateBank(student, blocks=[grid.eval_from_block], budget_mb=1 << 16)
        with recording(student, bank):
            s_eval = _evaluate(student, s_tok, "student", cfg, tasks, used, out, None)
        log.info("stored block-%d inputs of %d sequences for incremental row evaluation", grid.eval_from_block,
                 bank.stats["recorded_sequences"])
    else:
        s_eval = _evaluate(student, s_tok, "student", cfg, tasks, used, out, s_key)
    del student
    results.append(Result("student", "student", eval_seconds=round(time.perf_counter() - t0, 2)))
    _fill(results[1], s_eval)
    gc.collect()
    preloaded = {"teacher": teacher, "teacher_tokenizer": t_tok, "teacher_path": t_res.path}
    nll_ref: dict[str, float | None] = {}

    for row in grid.rows:
        run_dir = out / "runs" / row.dir
        mcfg = row.config.model_copy(update={"output": str(run_dir), "eval_tasks": ""})
        r = Result(row.name, "row", row.dir, row.overrides, mcfg.method, run_dir=str(run_dir))
        t0 = time.perf_counter()
        try:
            summary = _completed(run_dir) if resume else None
            if summary is not None:
                _unchanged(mcfg, run_dir)
                log.info("%s: reusing the completed run in %s", row.name, run_dir)
                old = json.loads((run_dir / "sweep_measure.json").read_text()) \
                    if (run_dir / "sweep_measure.json").is_file() else {}
                r.wall_seconds = old.get("wall_seconds", summary.get("wall_seconds"))
                r.peak_rss_mb = old.get("peak_rss_mb", summary.get("peak_rss_mb"))
                r.reused = True
            else:
                log.info("%s: running %s", row.name, mcfg.method)
                with RssSampler() as rs:
                    summary = run_transfer(mcfg, resume=resume and run_dir.exists(),
                                           overwrite=overwrite or not resume, preloaded=preloaded)
                r.wall_seconds, r.peak_rss_mb = round(time.perf_counter() - t0, 2), round(rs.peak_mb, 1)
                atomic_write_json(run_dir / "sweep_measure.json",
                                  {"wall_seconds": r.wall_seconds, "peak_rss_mb": r.peak_rss_mb})
            r.training = training_diagnostics(run_dir)
            nll = summary.get("nll") or {}
            r.nll = (nll.get("student_after") or {}).get("nll")
            for k in ("teacher", "student_before"):
                nll_ref.setdefault(k, (nll.get(k) or {}).get("nll"))
            if tasks:
                done = out / "eval" / row.dir / "results.json"
                t1 = time.perf_counter()
                if r.reused and done.is_file():
                    res = json.loads(done.read_text())
                else:
                    model, tok, _ = load_model(summary["export"], dtype="fp32", device=cfg.device)
                    if bank is not None:
                        from .eval.incremental import reusing

                        bank.stats.update(suffix_batches=0, full_batches=0)
                        with reusing(model, bank):
                            res = _evaluate(model, tok, row.dir, cfg, tasks, used, out, None)
                        r.incremental = dict(bank.stats)
                    else:
                        res = _evaluate(model, tok, row.dir, cfg, tasks, used, out,
                                        summary.get("student_content_hash"))
                    del model
                    r.eval_seconds = round(time.perf_counter() - t1, 2)
                _fill(r, res)
        except KeyboardInterrupt:
            raise
        except SemalignError as exc:
            if r.reused:  # a changed configuration is the user's to resolve, not a failed row
                raise
            log.error("%s failed: %s", row.name, exc.message)
            r.status, r.error = "failed", exc.message[:400]
        except Exception as exc:  # noqa: BLE001 - one failing row must not lose the others
            log.error("%s failed: %s", row.name, exc)
            r.status, r.error = "failed", f"{type(exc).__name__}: {exc}"[:400]
        gc.collect()
        results.append(r)
        _write(out, grid, results, nll_ref, splits, t_all)  # partial results survive a crash
    del preloaded, teacher
    gc.collect()
    return _write(out, grid, results, nll_ref, splits, t_all)


def _write(out: Path, grid: Grid, results: list[Result], nll_ref: dict, splits, t_all: float) -> dict:
    from .compare import paired_vs
    from .eval.tasks import eval_limits

    results[0].nll, results[1].nll = nll_ref.get("teacher"), nll_ref.get("student_before")
    ref = next((r for r in results if r.name == grid.reference and r.status == "completed"), None)
    for r in results[2:]:
        if r.status != "completed":
            continue
        r.vs_student = paired_vs(out / "eval", r.dir, "student")
        r.vs_reference = paired_vs(out / "eval", r.dir, ref.dir, teacher=None) if ref and ref is not r else {}
    cfg = grid.cfg
    res = {"grid": grid.path, "description": grid.description, "reference": grid.reference,
           "task": cfg.task, "teacher": cfg.teacher, "student": cfg.student, "seed": cfg.seed, "dtype": cfg.dtype,
           "teacher_dtype": grid.teacher_dtype or cfg.dtype, "eval_tasks": cfg.eval_task_list(),
           "eval_limits": eval_limits(cfg.eval_limit, cfg.eval_task_list()), "base": grid.base,
           "splits": {k: len(v) for k, v in splits.items()}, "split_source": splits.source,
           "rows": [asdict(r) for r in results], "wall_seconds": round(time.perf_counter() - t_all, 2)}
    atomic_write_json(out / "results.json", res)
    atomic_write_text(out / "table.md", markdown(res))
    try:
        plot(res, out / "plot.png")
    except Exception as exc:  # noqa: BLE001 - a figure is never a reason to lose the results
        log.warning("could not draw %s: %s", out / "plot.png", exc)
    try:
        write_report(out, res)
    except Exception as exc:  # noqa: BLE001
        log.warning("could not write %s: %s", out / "report.md", exc)
    return res


# ------------------------------------------------------------------------------------------------ views
def describe(grid: Grid) -> str:
    """The rows a grid expands to (for ``--dry-run``)."""
    lines = [f"{len(grid.rows)} rows, reference: {grid.reference or 'none'}"]
    for r in grid.rows:
        ov = ", ".join(f"{k}={_fmt(v)}" for k, v in r.overrides.items()) or "base"
        lines.append(f"- {r.name} [{r.config.method}] -> runs/{r.dir}: {ov}")
    return "\n".join(lines) + "\n\nbase:\n" + yaml.safe_dump(_nested(grid.base), sort_keys=False)
