"""The transfer driver: ``run_transfer(cfg)`` runs these named stages, each timed once (``Stages``) and the
expensive ones read through the stage cache (docs/cache.md):

load_models -> nll_before [nll] -> eval_before [eval; the untouched student's block inputs recorded] ->
prepare [attribution, semantic map] -> fit [frozen prefix, teacher_targets] -> export (+ stock reload check) ->
nll_after -> eval_after (incremental from the lowest changed block) -> results, report.

It is what ``semalign transfer`` calls; every method runs through it, so run directories, evaluation and reports
are uniform. Bad input is rejected before anything is written.
"""

from __future__ import annotations

import contextlib
import logging
import random
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import torch

from .artifacts import RunDir, check_output_dir, env_info, peak_rss_mb
from .cache import stage_cache
from .config import RunConfig, dump_config
from .data.prompts import batches
from .data.tasks import build_splits, get_task
from .eval.incremental import StateBank, recording, reusing
from .errors import NonFiniteLossError, SemalignError
from .methods.base import TransferContext, get_method
from .models.arch import internals
from .models.export import merged, roundtrip_check
from .models.precision import resolve_compute_dtype
from .stages import Stages
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


def measure_nll(cfg: RunConfig, model, tok, examples, task, device, *, student: bool) -> dict:
    """Gold-answer NLL in the model's own dtype, never under autocast: the student before and after is fp32, so
    a small update is not rounded away (and both sides are measured in the same precision)."""
    if not examples:
        return {"nll": None, "tokens": 0}
    # Always the answer tokens only (even for tasks trained on inputs): "gold-answer NLL".
    bs = batches(tok, examples, cfg.micro_batch, max_length=cfg.max_length, train_on_inputs=False)
    t0 = time.perf_counter()
    with torch.autocast(device_type=device.type, enabled=False):
        r = gold_nll(model, bs, device)
    r["dtype"] = str(next(model.parameters()).dtype).removeprefix("torch.")
    log.info("held-out NLL %.4f over %d answer tokens (%s, %.1fs)", r["nll"], r["tokens"], r["dtype"],
             time.perf_counter() - t0)
    return r


def model_dtype(model) -> str:
    dts = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    return dts[0] if len(dts) == 1 else "mixed(" + ",".join(dts) + ")"


NLL_VERSION = "2"  # bump when a change moves the held-out NLL (2: model dtype, never autocast)


def cached_nll(cfg: RunConfig, model_hash: str | None, model, tok, examples, task, device, *, student: bool) -> dict:
    """:func:`measure_nll` through the stage cache (stage ``nll``; key in docs/cache.md). ``model_hash`` is the
    model's content hash; ``None`` (a hub model) or ``--no-cache`` computes without caching."""
    from .cache import stage_cache
    from .fingerprints import examples_hash, tokenizer_hash

    cache = stage_cache(cfg.cache)
    if model_hash is None or not cache.enabled or not examples:
        return measure_nll(cfg, model, tok, examples, task, device, student=student)
    inputs = {"model": model_hash, "weights_dtype": str(next(model.parameters()).dtype),
              "tokenizer": tokenizer_hash(tok),
              "examples": examples_hash(examples), "max_length": cfg.max_length, "micro_batch": cfg.micro_batch,
              "device": device.type}
    entry = cache.get_or_compute("nll", NLL_VERSION, inputs,
                                 lambda: (None, measure_nll(cfg, model, tok, examples, task, device, student=student)))
    return entry.json


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
        for k in ("output", "cache"):  # neither changes results
            old.pop(k, None), new.pop(k, None)
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            raise SemalignError(f"cannot --resume {out}: the configuration differs in {', '.join(diff)}; "
                                "rerun with the original flags or use --overwrite")
    return out, method


def run_transfer(cfg: RunConfig, *, resume: bool = False, overwrite: bool = False, argv: list[str] | None = None,
                 preloaded: dict | None = None) -> dict:
    """Run one transfer end to end and return the summary dict (also written to summary.json)."""
    from .fingerprints import model_key
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
    if cfg.train_on_inputs is not None:  # the post-training loss with/without prompt tokens (protocol default: task's)
        import dataclasses

        task = dataclasses.replace(task, train_on_inputs=cfg.train_on_inputs)
    splits = build_splits(cfg.task, data_dir=cfg.data_dir, seed=cfg.seed)
    preloaded = preloaded or {}
    stages = Stages(stage_cache(cfg.cache))  # each stage below is timed once, here, into summary.timings_seconds

    with stages("load_models"):
        if "teacher" in preloaded:
            teacher, t_tok = preloaded["teacher"], preloaded["teacher_tokenizer"]
        else:
            teacher, t_tok, _ = load_model(cfg.teacher, dtype=compute, device=cfg.device)
        # The student is held in fp32 (master weights; training computes under --dtype autocast) and evaluated in
        # fp32 before and after: an update of ~1e-6 on weights of ~0.02 does not survive bf16 rounding, and
        # evaluating "before" in bf16 but "after" in fp32 would measure the precision switch, not the transfer.
        student, s_tok, s_res = load_model(cfg.student, dtype="fp32", device=cfg.device)
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
        t_hash = model_key(cfg.teacher, path=preloaded.get("teacher_path")) if cfg.cache else None
        s_hash = model_key(s_res) if cfg.cache else None
        with stages("nll_before"):  # stage cache `nll`
            nll = {"teacher": cached_nll(cfg, t_hash, teacher, t_tok, nll_ex, task, device, student=False),
                   "student_before": cached_nll(cfg, s_hash, student, s_tok, nll_ex, task, device, student=True)}
        used = splits.used_ids()
        summary["precision"] = {"compute": compute, "teacher": model_dtype(teacher),
                                "student_before": model_dtype(student)}
        # incremental evaluation: the after-evaluation reuses these states below the lowest changed block (the
        # states must be recorded, so the untouched student's cached evaluation is not used then)
        bank = StateBank(student) if cfg.fast_path and "mmlu" in cfg.eval_task_list() else None
        with stages("eval_before"):  # stage cache `eval` (teacher; the student too when nothing is recorded)
            evals = {"teacher": _evaluate(cfg, teacher, t_tok, "teacher", used, cache_key=t_hash,
                                          output_dir=run.path("eval", "teacher"))}
            with recording(student, bank) if bank else contextlib.nullcontext():
                evals["student_before"] = _evaluate(cfg, student, s_tok, "student (before)", used,
                                                    cache_key=None if bank else s_hash,
                                                    output_dir=run.path("eval", "student_before"))

        ctx = TransferContext(cfg, teacher, student, s_tok, t_arch, s_arch, splits, task, run, device,
                              resume=resume, teacher_tokenizer=t_tok)
        if t_hash is not None:
            ctx.state["teacher_hash"] = t_hash
        with stages("prepare"):  # attribution (stage cache `attribution`), layer map, semantic map
            method.prepare(ctx)
        with stages("fit"):  # frozen prefix + teacher-free targets (stage cache `teacher_targets`)
            method.fit(ctx)
        with stages("export"):
            ctx.student = merged(ctx.student)
            path = method.export(ctx)
            probe = batches(s_tok, (splits.eval or splits.extract)[:2], 2, max_length=min(cfg.max_length, 256))[0]
            summary["roundtrip"] = roundtrip_check(ctx.student, path, probe)
        if not summary["roundtrip"]["equal"]:
            raise SemalignError(f"exported student at {path} does not reproduce the in-memory logits "
                                f"(max diff {summary['roundtrip']['max_abs_logit_diff']:.3g}); please report this bug")
        summary["precision"]["student_after"] = model_dtype(ctx.student)
        if summary["precision"]["student_after"] != summary["precision"]["student_before"]:
            raise SemalignError(f"the student was evaluated in {summary['precision']['student_before']} before and "
                                f"would be in {summary['precision']['student_after']} after; please report this bug")
        with stages("nll_after"):
            nll["student_after"] = measure_nll(cfg, ctx.student, s_tok, nll_ex, task, device, student=True)
        with stages("eval_after"), reusing(ctx.student, bank) if bank else contextlib.nullcontext():
            evals["student_after"] = _evaluate(cfg, ctx.student, s_tok, "student (after)", used,
                                               output_dir=run.path("eval", "student_after"))
        if bank:
            summary["incremental_eval"] = bank.stats
            del bank
        summary.update(ctx.summary)
        summary.update({"status": "completed", "nll": nll, "nll_examples": len(nll_ex), "export": str(path),
                        "student_content_hash": model_content_hash(path),
                        "timings_seconds": stages.timings_rounded(),
                        "wall_seconds": round(time.perf_counter() - t_start, 2), "peak_rss_mb": round(peak_rss_mb(), 1),
                        "student_source": s_res.display_name})
        from .eval.paired import transfer_paired

        results = {"nll": nll, "eval": evals, "precision": summary["precision"],
                   "paired": transfer_paired(run.path("eval"))}
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
