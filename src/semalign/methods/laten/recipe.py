"""LaTen (PrePKT, arXiv 2505.14436), re-implemented from the spec (baselines.md §2, §6, §7, §8).

prepare: capture both models at position T on every example the run will locate on (the step-t extract examples
and ``locate_examples`` seeded train examples), score layers and neurons once (attribution is independent of the
translator), and fix a :class:`Location` per step plus the inference location. Cached in ``laten/`` for --resume.

fit: ``steps`` AdamW steps on the translator only (student frozen, B6): each step uses P = samples_per_step
examples (the step's extract example + P-1 align examples drawn with ``random.Random(seed + t)``), and sums over
them ``CE_b(student with W + Delta) + norm_penalty * sum_m mean(g_m^2)``. OneCycleLR(max_lr=lr, pct_start 0.1,
cos, final_div_factor 1, total = max(steps, |extract|)) as in the official code. Then the inference location's
Delta is folded into the student's weights once; the export is that plain checkpoint.
"""

from __future__ import annotations

import logging
import random
import time

import torch

from ...artifacts import peak_rss_mb
from ...data.prompts import collate, pad_id_of, render_example
from ...errors import SemalignError
from ...training.loop import check_finite, check_finite_grads, config_hash, load_checkpoint, save_checkpoint
from ..base import METHODS, TransferContext, TransferMethod
from ..controls import compute_autocast, final_hidden, progress_bar, supervised, token_nll
from .attribution import Location, Locator, attribution_input, capture, check_supported
from .translator import MODULES, Translator, fold, gather_teacher, inject, penalty

log = logging.getLogger(__name__)

SUBDIR = "laten"


def laten_modules(ctx: TransferContext) -> list[str]:
    names = [n.strip() for n in ctx.config.laten.modules.split(",") if n.strip()]
    bad = [n for n in names if n not in MODULES]
    if bad or not names:
        raise SemalignError(f"--laten-modules: unknown module(s) {', '.join(bad) or '(none given)'}; choose from "
                            f"{', '.join(MODULES)}")
    return list(dict.fromkeys(names))


def locate_groups(ctx: TransferContext) -> tuple[list[dict], list[list[int]], list[int]]:
    """(examples to capture, per-step example groups, inference group)."""
    ext = ctx.splits.extract
    if not ext:
        raise SemalignError("LaTen needs at least one extract example; check --data-dir")
    steps = ctx.steps
    examples = [ext[t % len(ext)] for t in range(min(steps, len(ext)))]
    groups = [[t % len(ext)] for t in range(steps)]
    pool = ctx.splits.train or ext
    k = min(ctx.config.laten.locate_examples, len(pool))
    inf = random.Random(ctx.config.seed).sample(pool, k)
    infer = list(range(len(examples), len(examples) + k))
    return examples + inf, groups, infer


def _loc_to_state(loc: Location) -> dict:
    return {"attn_pairs": loc.attn_pairs, "ffn_pairs": loc.ffn_pairs,
            "idx": {m: (t.clone(), s.clone()) for m, (t, s) in loc.idx.items()}}


def _loc_from_state(d: dict) -> Location:
    return Location([tuple(p) for p in d["attn_pairs"]], [tuple(p) for p in d["ffn_pairs"]], dict(d["idx"]))


def step_examples(ctx: TransferContext, step: int) -> list[dict]:
    c = ctx.config.laten
    ext, align = ctx.splits.extract, ctx.splits.align or ctx.splits.extract
    k = min(c.samples_per_step - 1, len(align))
    return [ext[step % len(ext)]] + random.Random(ctx.config.seed + step).sample(align, k)


@METHODS.register("laten", help="LaTen (PrePKT): neuron attribution + translator hypernetwork, one injection")
class LaTen(TransferMethod):
    name = "laten"
    paper = ("arXiv 2505.14436 (Tan et al., Neural Incompatibility: The Unbridgeable Gap of Cross-Scale Parametric "
             "Knowledge Transfer in Large Language Models, ACL 2025)")
    summary_line = "PrePKT: logit-lens neuron attribution -> MLP translator of teacher rows/cols -> one injection"

    def prepare(self, ctx: TransferContext) -> None:
        c = ctx.config.laten
        modules = laten_modules(ctx)
        for a in (ctx.t_arch, ctx.s_arch):
            check_supported(a)
        cache = ctx.run.path(SUBDIR, "locations.pt")
        if ctx.resume and cache.is_file():
            st = torch.load(cache, weights_only=False)
            steps_loc = [_loc_from_state(d) for d in st["steps"]]
            infer_loc = _loc_from_state(st["inference"])
            meta = st["meta"]
            log.info("laten: reusing attribution from %s", cache)
        else:
            t0 = time.perf_counter()
            examples, groups, infer = locate_groups(ctx)
            t_tok = ctx.teacher_tokenizer or ctx.tokenizer
            t_caps, s_caps = [], []
            prog, tid = progress_bar("laten capture", 2 * len(examples))
            with prog:
                for ex in examples:
                    for arch, tok, caps in ((ctx.t_arch, t_tok, t_caps), (ctx.s_arch, ctx.tokenizer, s_caps)):
                        ids, y = attribution_input(tok, ex)
                        ids = ids[-ctx.config.max_length:]
                        caps.append(capture(arch, ids, y, original_scaling=c.original_scaling))
                        prog.advance(tid)
            locator = Locator(ctx.t_arch, ctx.s_arch, t_caps, s_caps, c.transfer_rate, modules, c.lens_vocab)
            t1 = time.perf_counter()
            locator.prefetch(groups + [infer])
            steps_loc = [locator.locate(g) for g in groups]
            infer_loc = locator.locate(infer)
            meta = {"examples": [e.get("id") for e in examples], "k": locator.k, "modules": modules,
                    "n_layers": locator.n_layers, "original_scaling": c.original_scaling,
                    "lens_vocab": c.lens_vocab or "full",
                    "lens_check_max_abs": max(abs(self._lens_check(locator, i)) for i in range(len(examples))),
                    "capture_seconds": round(t1 - t0, 2), "score_seconds": round(time.perf_counter() - t1, 2)}
            cache.parent.mkdir(parents=True, exist_ok=True)
            torch.save({"steps": [_loc_to_state(x) for x in steps_loc], "inference": _loc_to_state(infer_loc),
                        "meta": meta}, cache)
            ctx.run.write_json(f"{SUBDIR}/location.json", {**meta, "inference": infer_loc.describe(),
                                                           "steps": [x.describe() for x in steps_loc]})
        ctx.state["laten"] = {"steps": steps_loc, "inference": infer_loc, "modules": modules}
        ctx.summary["laten"] = {**meta, "inference_location": infer_loc.describe()}

    @staticmethod
    def _lens_check(locator: Locator, i: int) -> float:
        """Lens at the last layer minus the model's own log p(y*) (0 up to rounding with the RMSNorm scale)."""
        cap = locator.s_caps[i]
        lp = locator.s_lens.logprob(cap.h_out[-1:], torch.tensor([cap.scale]), torch.tensor([cap.target]))
        return float(lp[0]) - cap.logprob

    def fit(self, ctx: TransferContext) -> None:
        c, cfg = ctx.config.laten, ctx.config
        st = ctx.state["laten"]
        modules: list[str] = st["modules"]
        student = ctx.student
        for p in student.parameters():
            p.requires_grad_(False)  # B6: only the translator trains
        translator = Translator.for_pair(ctx.t_arch, ctx.s_arch, modules, hidden=c.translator_hidden,
                                         init_std=c.init_std).to(ctx.device)
        opt = torch.optim.AdamW(translator.parameters(), lr=c.lr, weight_decay=c.weight_decay, betas=(0.9, 0.95))
        steps = ctx.steps
        total = max(steps, len(ctx.splits.extract), 2)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=c.lr, total_steps=total, pct_start=0.1,
                                                    anneal_strategy="cos", final_div_factor=1.0)
        chash = config_hash({"cfg": cfg.model_dump(mode="json"), "stage": "laten"})
        ckpt = ctx.run.checkpoint_dir / "laten"
        start = 0
        if ctx.resume and (ckpt / "trainer_state.json").is_file():
            start, _ = load_checkpoint(ckpt, model=translator, optimizer=opt, scheduler=sched, cfg_hash=chash)
            ctx.run.truncate_metrics(start)
        pad = pad_id_of(ctx.tokenizer)
        prog, tid = progress_bar("laten alignment", steps)
        with prog:
            prog.update(tid, completed=start)
            for step in range(start, steps):
                t0 = time.perf_counter()
                loc: Location = st["steps"][step]
                X = {m: gather_teacher(ctx.t_arch, loc, m).to(ctx.device) for m in modules}
                rendered = [render_example(ctx.tokenizer, e, max_length=cfg.max_length,
                                           train_on_inputs=ctx.task.train_on_inputs) for e in step_examples(ctx, step)]
                ce_sum = pen_val = 0.0
                translator.train()
                for i in range(0, len(rendered), cfg.micro_batch):
                    b = {k: v.to(ctx.device) for k, v in collate(rendered[i:i + cfg.micro_batch], pad).items()}
                    G = {m: translator(m, X[m]) for m in modules}
                    pen = penalty(G)
                    with compute_autocast(ctx), inject(ctx.s_arch, loc, G):
                        h, y, rows = supervised(b, final_hidden(student, b))
                        nll = token_nll(student.get_output_embeddings(), h, y, 256)
                    n_b = b["input_ids"].shape[0]
                    per_ex = torch.zeros(n_b, device=nll.device).index_add(0, rows, nll)
                    cnt = torch.zeros(n_b, device=nll.device).index_add(0, rows, torch.ones_like(nll))
                    ce = (per_ex / cnt.clamp_min(1)).sum()
                    loss = ce + n_b * c.norm_penalty * pen
                    check_finite(loss, step + 1)
                    loss.backward()
                    ce_sum += float(ce.detach())
                    pen_val = float(pen.detach())
                check_finite_grads(translator.parameters(), step + 1)
                lr = sched.get_last_lr()[0]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                with torch.no_grad():
                    rel = self._rel_norms(ctx, loc, {m: translator(m, X[m]) for m in modules})
                rec = {"stage": "laten", "step": step + 1, "loss": round(ce_sum + len(rendered) * c.norm_penalty
                                                                         * pen_val, 6),
                       "ce_mean": round(ce_sum / len(rendered), 6), "penalty": pen_val, "lr": lr,
                       "delta_rel_norm": rel, "examples": len(rendered),
                       "step_seconds": round(time.perf_counter() - t0, 3), "peak_rss_mb": round(peak_rss_mb(), 1)}
                ctx.run.log_metrics(rec)
                log.info("laten step %d/%d ce %.4f penalty %.3g |delta|/|W| %s", step + 1, steps,
                         rec["ce_mean"], pen_val, {k: f"{v:.2g}" for k, v in rel.items()})
                save_checkpoint(ckpt, model=translator, optimizer=opt, scheduler=sched, step=step + 1,
                                cfg_hash=chash)
                prog.advance(tid)
        infer: Location = st["inference"]
        with torch.no_grad():
            G = {m: translator(m, gather_teacher(ctx.t_arch, infer, m).to(ctx.device)) for m in modules}
        stats = fold(ctx.s_arch, infer, G)
        if all(s["changed_weights"] == 0 for s in stats.values()):
            log.warning("laten: the folded Delta changed no student weight (too small for the weight dtype); the "
                        "export equals the student")
        ctx.summary["laten"].update({"steps": steps, "translator_parameters":
                                     sum(p.numel() for p in translator.parameters()), "translator": translator.sizes,
                                     "fold": stats})
        ctx.student = student

    @staticmethod
    def _rel_norms(ctx: TransferContext, loc: Location, G: dict[str, torch.Tensor]) -> dict[str, float]:
        out = {}
        for m, g in G.items():
            w2 = sum(float(ctx.s_arch.projection(ls, m).weight.double().pow(2).sum()) for _, ls in loc.pairs(m))
            out[m] = float(g.double().pow(2).sum()) ** 0.5 / max(w2, 1e-300) ** 0.5
        return out
