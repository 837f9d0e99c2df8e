"""The transfer driver: validate -> load -> splits -> before -> method.prepare/fit/export -> after -> report.

``run_transfer(cfg)`` is what ``semalign transfer`` calls; every method runs through it, so run directories,
evaluation and reports are uniform. Bad input is rejected before anything is written.
"""

from __future__ import annotations

import logging
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .artifacts import RunDir, check_output_dir, env_info, peak_rss_mb
from .config import RunConfig, dump_config
from .data.prompts import batches
from .data.tasks import build_splits, get_task
from .errors import NonFiniteLossError, SemalignError
from .methods.base import TransferContext, get_method
from .models.arch import internals
from .models.export import merged, roundtrip_check
from .models.precision import resolve_compute_dtype
from .training.loop import gold_nll

log = logging.getLogger(__name__)

VOCAB_METHODS = {"semalign", "semalign-frontier", "logit-kd"}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    try:
        import numpy as np

        np.random.seed(seed)
    except ImportError:  # pragma: no cover
        pass


def default_output(cfg: RunConfig) -> Path:
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.method}-{cfg.task}-{stamp}"


def _student_autocast(cfg: RunConfig, device: torch.device):
    import contextlib

    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.dtype)
    return torch.autocast(device_type=device.type, dtype=dt) if dt else contextlib.nullcontext()


def measure_nll(cfg: RunConfig, model, tok, examples, task, device, *, student: bool) -> dict:
    if not examples:
        return {"nll": None, "tokens": 0}
    # Always the answer tokens only (even for tasks trained on inputs): "gold-answer NLL".
    bs = batches(tok, examples, cfg.micro_batch, max_length=cfg.max_length, train_on_inputs=False)
    ctx = _student_autocast(cfg, device) if student else torch.autocast(device_type=device.type, enabled=False)
    t0 = time.perf_counter()
    with ctx:
        r = gold_nll(model, bs, device)
    log.info("held-out NLL %.4f over %d answer tokens (%.1fs)", r["nll"], r["tokens"], time.perf_counter() - t0)
    return r


def _evaluate(cfg: RunConfig, model, tok, name: str, used_ids: set[str], *, cache_key: str | None = None,
              output_dir: Path | None = None) -> dict:
    tasks = cfg.eval_task_list()
    if not tasks:
        return {}
    from .eval import evaluate

    log.info("evaluating %s on %s", name, ",".join(tasks))
    kw: dict[str, Any] = dict(limit=cfg.eval_limit, allow_code_execution=cfg.allow_code_execution,
                              data_dir=cfg.data_dir, exclude_ids=used_ids, model_name=name)
    if cache_key:
        kw["cache_key"] = cache_key
    if output_dir is not None:
        kw["output_dir"] = output_dir
    return evaluate(model, tok, tasks, **kw)


def validate(cfg: RunConfig, *, resume: bool, overwrite: bool) -> tuple[Path, Any]:
    """Cheap checks before any loading: names, output dir, eval task names. Returns (output, method)."""
    method = get_method(cfg.method)
    get_task(cfg.task)
    for t in cfg.eval_task_list():
        get_task(t)
    out = Path(cfg.output) if cfg.output else default_output(cfg)
    check_output_dir(out)
    if out.exists() and any(out.iterdir()) and not (resume or overwrite):
        raise SemalignError(f"output directory {out} already exists; pass --resume to continue it, "
                            "--overwrite to replace it, or choose another --output")
    if resume and out.exists() and (out / "config.resolved.yaml").is_file():
        import yaml

        old = yaml.safe_load((out / "config.resolved.yaml").read_text())
        new = cfg.model_dump(mode="json")
        old.pop("output", None), new.pop("output", None)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise SemalignError(f"cannot --resume {out}: the configuration differs in {', '.join(diff)}; "
                                "rerun with the original flags or use --overwrite")
    return out, method


def run_transfer(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, argv: list[str] | None = None,
                 preloaded: dict | None = None) -> dict:
    """Run one transfer end to end and return the summary dict (also written to summary.json)."""
    from .models.load import load_model, model_content_hash, resolve_device

    t_start = time.perf_counter()
    device = resolve_device(cfg.device)
    compute = resolve_compute_dtype(cfg.dtype, device)
    if compute != cfg.dtype:
        log.info("--dtype auto -> %s on this %s", compute, device.type)
        cfg = cfg.model_copy(update={"dtype": compute})
    out, method = validate(cfg, resume=resume, overwrite=overwrite)
    seed_everything(cfg.seed)
    task = get_task(cfg.task)
    splits = build_splits(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed)
    preloaded = preloaded or {}
    timings: dict[str, float] = {}

    t0 = time.perf_counter()
    if "teacher" in preloaded:
        teacher, t_tok = preloaded["teacher"], preloaded["teacher_tokenizer"]
    else:
        teacher, t_tok, _ = load_model(cfg.teacher, dtype=compute, device=cfg.device)
    # Trained weights must be fp32 so small updates survive; compute runs under bf16 autocast. Methods that
    # upcast only what they train load the student in its stored dtype, so untouched weights are never rounded.
    s_dtype = "fp32" if method.student_fp32 or compute == "fp32" else "stored"
    student, s_tok, s_res = load_model(cfg.student, dtype=s_dtype, device=cfg.device)
    timings["load_models"] = time.perf_counter() - t0
    for p in teacher.parameters():
        p.requires_grad_(False)
    t_arch, s_arch = internals(teacher), internals(student)
    if cfg.method in VOCAB_METHODS:
        from .methods.semalign.bases import shared_vocab_size

        shared_vocab_size(t_tok, s_tok, t_arch.vocab_size, s_arch.vocab_size)

    run = RunDir.create(out, resume=resume, overwrite=overwrite)
    run.write_text("config.resolved.yaml", dump_config(cfg.model_copy(update={"output": str(out)})))
    run.write_command(argv)
    run.write_json("env.json", env_info())
    run.write_json("data_manifest.json", splits.manifest())
    summary: dict[str, Any] = {"status": "running", "method": cfg.method, "paper": method.paper,
                               "teacher": {"spec": cfg.teacher, **t_arch.describe()},
                               "student": {"spec": cfg.student, **s_arch.describe()}, "task": cfg.task,
                               "data": {"source": splits.source, "notes": splits.notes,
                                        **{k: len(v) for k, v in splits.items()}}}
    run.write_json("summary.json", summary)
    try:
        nll_ex = splits.eval[: cfg.nll_examples]
        t0 = time.perf_counter()
        nll = {"teacher": measure_nll(cfg, teacher, t_tok, nll_ex, task, device, student=False),
               "student_before": measure_nll(cfg, student, s_tok, nll_ex, task, device, student=True)}
        timings["nll_before"] = time.perf_counter() - t0
        used = splits.used_ids()
        t0 = time.perf_counter()
        teacher_key = None
        if cfg.eval_task_list():
            try:
                from .models.load import resolve_model

                teacher_key = model_content_hash(preloaded.get("teacher_path") or resolve_model(cfg.teacher).path)
            except Exception:  # noqa: BLE001 - caching is an optimisation only
                teacher_key = None
        evals = {"teacher": _evaluate(cfg, teacher, t_tok, "teacher", used, cache_key=teacher_key,
                                      output_dir=run.path("eval", "teacher")),
                 "student_before": _evaluate(cfg, student, s_tok, "student (before)", used,
                                             output_dir=run.path("eval", "student_before"))}
        timings["eval_before"] = time.perf_counter() - t0

        ctx = TransferContext(cfg, teacher, student, s_tok, t_arch, s_arch, splits, task, run, device,
                              resume=resume, teacher_tokenizer=t_tok)
        t0 = time.perf_counter()
        method.prepare(ctx)
        timings["prepare"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        method.fit(ctx)
        timings["fit"] = time.perf_counter() - t0
        ctx.student = merged(ctx.student)
        t0 = time.perf_counter()
        path = method.export(ctx)
        probe = batches(s_tok, (splits.eval or splits.extract)[:2], 2, max_length=min(cfg.max_length, 256))[0]
        summary["roundtrip"] = roundtrip_check(ctx.student, path, probe)
        timings["export"] = time.perf_counter() - t0
        if not summary["roundtrip"]["equal"]:
            raise SemalignError(f"exported student at {path} does not reproduce the in-memory logits "
                                f"(max diff {summary['roundtrip']['max_abs_logit_diff']:.3g}); please report this bug")
        t0 = time.perf_counter()
        nll["student_after"] = measure_nll(cfg, ctx.student, s_tok, nll_ex, task, device, student=True)
        timings["nll_after"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        evals["student_after"] = _evaluate(cfg, ctx.student, s_tok, "student (after)", used,
                                           output_dir=run.path("eval", "student_after"))
        timings["eval_after"] = time.perf_counter() - t0
        summary.update(ctx.summary)
        summary.update({"status": "completed", "nll": nll, "nll_examples": len(nll_ex), "export": str(path),
                        "student_content_hash": model_content_hash(path), "timings_seconds":
                        {k: round(v, 2) for k, v in timings.items()},
                        "wall_seconds": round(time.perf_counter() - t_start, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
                        "student_source": s_res.display_name})
        results = {"nll": nll, "eval": evals}
        run.write_json("results.json", results)
        from .report import write_run_report

        write_run_report(run, cfg, summary, results)
        run.write_json("summary.json", summary)
        ctx.state.clear()
        return summary
    except NonFiniteLossError as exc:
        summary.update({"status": "failed", "error": exc.message,
                        "note": "the last good state is in checkpoints/; rerun with --resume after changing nothing, "
                                "or start over with a lower --lr"})
        run.write_summary(summary)
        raise
    except BaseException as exc:
        summary.update({"status": "failed" if not isinstance(exc, KeyboardInterrupt) else "interrupted",
                        "error": f"{type(exc).__name__}: {exc}"[:500]})
        run.write_summary(summary)
        raise
