"""SemAlign v1 (arXiv 2510.24208v1), exactly as specified (spec semalign.md §2, defaults §8).

prepare: Grad x Act attribution of all teacher layers on the extract split (one backward per example) ->
top-k critical layers -> k-dagger pairing (optional interpolation) -> closed-form semantic map M (cached).
fit: Table-4 schedule — ``steps`` optimiser steps, each on P = 16 examples (1 extract + 15 align),
AdamW (wd 0.05, betas 0.9/0.95) with OneCycle at lr 3e-5, loss = (1 - cos) at the paired layers'
interface + (1 - cos(z, one-hot y)); only the paired student layer(s) train (LoRA r=16 on up/down/v/o by
default). export: LoRA merged into a stock HF checkpoint.
"""

from __future__ import annotations

import logging
import random
import time

import torch

from ...artifacts import peak_rss_mb
from ...data.prompts import collate, pad_id_of, render_example
from ...models.hooks import capture_layers
from ...models.prefix import run_suffix
from ...pairing import LayerMap, critical_pairs
from ...training.frozen import FrozenPrefix
from ...training.loop import (check_finite, check_finite_grads, config_hash, load_checkpoint, make_optimizer,
                              make_scheduler, save_checkpoint)
from ..base import METHODS, TransferContext, TransferMethod
from .common import (autocast, make_trainable, save_layer_map_plot, semantic_map, teacher_attribution,
                     teacher_targets)
from .losses import LAYER_LOSSES, OUTPUT_LOSSES, output_positions
from .targets import example_id

log = logging.getLogger(__name__)


def step_examples(ctx: TransferContext, step: int, rng: random.Random) -> list[dict]:
    """LaTen/SemAlign sampling: extract example ``step mod n`` + (P-1) align examples drawn without replacement."""
    ext, align = ctx.splits.extract, ctx.splits.align
    p = ctx.config.batch_size
    first = [ext[step % len(ext)]]
    pool = align if align else ext
    k = min(p - 1, len(pool))
    return first + rng.sample(pool, k)


def run_alignment_steps(ctx: TransferContext, model: torch.nn.Module, pairs, smap, *,
                        layer_loss: str, output_loss: str, steps: int, label: str, step_offset: int = 0,
                        interface: str | None = None, extra_loss_kwargs: dict | None = None,
                        output_weight: float | None = None, tau: float = 1.0) -> None:
    """Shared optimisation loop (v1 and every frontier stage): resumable, logged, non-finite guarded."""
    c = ctx.config
    sc = c.semalign
    interface = interface or sc.interface
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=c.lr, weight_decay=c.weight_decay)
    sched = make_scheduler(opt, c.scheduler, steps, c.lr)
    # fast_path changes how, not what, is computed: a run may resume across it
    chash = config_hash({"cfg": c.model_dump(mode="json", exclude={"fast_path"}), "stage": label})
    ckpt = ctx.run.checkpoint_dir / label
    start = 0
    if ctx.resume and (ckpt / "trainer_state.json").is_file():
        start, _ = load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, cfg_hash=chash)
        if start < steps:
            ctx.run.truncate_metrics(step_offset + start)
        log.info("%s: resumed after step %d", label, start)
    rng = random.Random(c.seed + step_offset)
    for s in range(start):  # replay the data cursor so resumed runs see the same batches
        step_examples(ctx, s, rng)
    lfn, ofn = LAYER_LOSSES.get(layer_loss), OUTPUT_LOSSES.get(output_loss)
    ow = sc.output_weight if output_weight is None else output_weight
    pad = pad_id_of(ctx.tokenizer)
    student_layers = [p.student_layer for p in pairs]
    model.train()
    freeze_inactive_dropout(model)  # the modes the steps run in decide whether the prefix is deterministic
    fast = FrozenPrefix(model, ctx.s_arch, pad_id=pad, enabled=c.fast_path)
    if fast.active and min(student_layers) < fast.k:
        fast.active, fast.reason = False, "a supervised layer lies below the lowest trainable block"
    log.info("%s: %s", label, f"frozen prefix: blocks 1..{fast.k - 1} run once per example" if fast.active
             else f"full forward every step ({fast.reason})")
    out_kwargs = {"tau": tau, "shared_vocab": smap.meta.get("shared_vocab_bound", smap.meta.get("shared_ids"))}
    need_logits = output_loss == "kl_source" and ow > 0
    offline = offline_targets(ctx, pairs, smap, interface, steps=steps, step_offset=step_offset) \
        if c.fast_path and not need_logits else None
    for step in range(start, steps):
        t0 = time.perf_counter()
        examples = step_examples(ctx, step, rng)
        # SemAlign's output term (and attribution) are defined over response tokens (spec §8.1, §8.10), whatever
        # the task's train_on_inputs (that protocol setting is LaTen's); the layer term has its own positions.
        rendered = [render_example(ctx.tokenizer, e, max_length=c.max_length, train_on_inputs=False)
                    for e in examples]
        micro = [collate(rendered[i:i + c.micro_batch], pad) for i in range(0, len(rendered), c.micro_batch)]
        # The step's loss is a mean over the batch's supervised positions, not a mean of micro-batch means:
        # each micro-batch's term is weighted by its share of the positions (sequences for relgeom).
        masks = [layer_mask(b, sc.layer_positions) for b in micro]
        if layer_loss == "relgeom":
            n_layer = [int((m.sum(1) >= 2).sum()) for m in masks]
        else:
            n_layer = [int(m.sum()) for m in masks]
        n_out = [int((b["labels"][:, 1:] != -100).sum()) for b in micro]
        tot_layer, tot_out = max(1, sum(n_layer)), max(1, sum(n_out))
        totals = {"loss": 0.0, "layer_loss": 0.0, "output_loss": 0.0}
        per_layer: dict[int, float] = {}
        tokens, t_teacher, t_prefix = 0, 0.0, fast.seconds
        model.train()
        freeze_inactive_dropout(model)
        for j, b in enumerate(micro):
            b = {k: v.to(ctx.device) for k, v in b.items()}
            mask = masks[j].to(ctx.device)
            w_l, w_o = n_layer[j] / tot_layer, n_out[j] / tot_out
            tokens += int(b["attention_mask"].sum())
            rows = output_positions(b["labels"]) if fast.active and ow > 0 else None  # head only where read
            t_teacher -= time.perf_counter()
            if offline is not None:  # teacher-free: the mapped targets were computed once (stage cache)
                ids = [example_id(e) for e in examples[j * c.micro_batch:(j + 1) * c.micro_batch]]
                targets, t_logits = offline.batch(ids, b["input_ids"].shape[1], ctx.device)[0], None
            else:
                targets, t_logits = teacher_targets(ctx, b, pairs, smap, interface, logits=need_logits,
                                                    logit_positions=rows)
            t_teacher += time.perf_counter()
            with autocast(ctx):
                h0 = fast.batch(rendered[j * c.micro_batch:(j + 1) * c.micro_batch], b["attention_mask"]) \
                    if fast.active else None
                with capture_layers(ctx.s_arch, student_layers, mlp=interface == "mlp_output") as cap:
                    if fast.active:
                        logits = run_suffix(ctx.s_arch, h0, fast.k, attention_mask=b["attention_mask"],
                                            logits=rows if rows is not None else False).logits
                    else:
                        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
            layer_terms = []
            for p in pairs:
                h = cap.interface(p.student_layer, interface)
                term = lfn(h, targets[p.student_layer], mask, **(extra_loss_kwargs or {}))
                layer_terms.append(term)
                per_layer[p.student_layer] = per_layer.get(p.student_layer, 0.0) + float(term.detach()) * w_l
            l_layer = torch.stack(layer_terms).mean()
            l_out = (ofn(logits, b["labels"], teacher_logits=t_logits, **out_kwargs) if ow > 0
                     else torch.zeros((), device=ctx.device))
            loss = sc.layer_weight * l_layer * w_l + ow * l_out * w_o
            check_finite(loss, step + 1)
            loss.backward()
            totals["loss"] += float(loss.detach())
            totals["layer_loss"] += float(l_layer.detach()) * w_l
            totals["output_loss"] += float(l_out.detach()) * w_o
        check_finite_grads(params, step + 1)
        gnorm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        lr = sched.get_last_lr()[0]
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        dt = time.perf_counter() - t0
        rec = {"stage": label, "step": step_offset + step + 1, **{k: round(v, 6) for k, v in totals.items()},
               "layer_loss_per_pair": {str(k): round(v, 6) for k, v in per_layer.items()}, "lr": lr,
               "grad_norm": gnorm, "examples": len(examples), "tokens": tokens, "step_seconds": round(dt, 3),
               "tokens_per_second": round(tokens / dt, 1), "peak_rss_mb": round(peak_rss_mb(), 1),
               "teacher_seconds": round(t_teacher, 3), "prefix_seconds": round(fast.seconds - t_prefix, 3),
               "fast_path": fast.describe()}
        ctx.run.log_metrics(rec)
        log.info("%s step %d/%d loss %.4f (layer %.4f, out %.4f) %.1fs", label, step + 1, steps, totals["loss"],
                 totals["layer_loss"], totals["output_loss"], dt)
        save_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, step=step + 1, cfg_hash=chash)


def offline_targets(ctx: TransferContext, pairs, smap, interface: str, *, steps: int, step_offset: int):
    """Teacher-free training: the mapped targets of every example these steps will draw (the data cursor is
    replayed), computed once and kept in the stage cache (stage ``teacher_targets``, stored in float32); ``fit``
    then never runs the teacher. Layer losses only: a live ``kl_source`` term still needs the teacher."""
    from .common import teacher_hash
    from .targets import cached_teacher_targets

    c = ctx.config
    rng = random.Random(c.seed + step_offset)
    pool: dict[str, dict] = {}
    for s in range(steps):
        for e in step_examples(ctx, s, rng):
            pool.setdefault(example_id(e), e)
    th = teacher_hash(ctx) if c.cache else None
    return cached_teacher_targets(ctx.t_arch, smap, ctx.tokenizer, list(pool.values()), pairs, interface,
                                  teacher_hash=th, max_length=c.max_length, micro_batch=c.micro_batch,
                                  store_dtype=torch.float32)


def layer_mask(batch: dict, positions: str) -> torch.Tensor:
    """[B, T] bool: positions the layer term averages over (``response``: supervised next-token positions)."""
    if positions == "response":
        lab = batch["labels"]
        mask = torch.zeros_like(lab, dtype=torch.bool)
        mask[:, :-1] = lab[:, 1:] != -100
        return mask
    return batch["attention_mask"].bool()


def freeze_inactive_dropout(model: torch.nn.Module) -> None:
    """Adapters that do not train in this stage (earlier frontier stages) run their dropout in eval mode."""
    for m in model.modules():
        if hasattr(m, "lora_dropout") and hasattr(m, "lora_A"):
            active = any(p.requires_grad for p in m.lora_A.parameters())
            m.lora_dropout.train(active)


@METHODS.register("semalign", help="SemAlign v1: attribution-paired layer alignment via semantic bases")
class SemAlignV1(TransferMethod):
    student_fp32 = False
    name = "semalign"
    paper = "arXiv 2510.24208v1 (Gu et al., Beyond Neural Incompatibility: latent semantic alignment)"
    summary_line = "activations: critical teacher layer -> paired student layer via pinv(LM head) bases"

    def prepare(self, ctx: TransferContext) -> None:
        c = ctx.config.semalign
        t0 = time.perf_counter()
        scores = teacher_attribution(ctx)
        t_attr = time.perf_counter() - t0
        lm_path = ctx.run.path("layer_map.json")
        if lm_path.is_file():
            lm = LayerMap.from_json(ctx.run.read_json("layer_map.json"))
        else:
            lm = critical_pairs(scores.scores, ctx.s_arch.num_layers, top_k=c.top_k_layers,
                                depth_exact=c.depth_exact, interface=c.interface)
            ctx.run.write_json("layer_map.json", lm.to_json())
        save_layer_map_plot(ctx.run.path("plots", "layer_map.png"), lm)
        t0 = time.perf_counter()
        smap = semantic_map(ctx, ctx.teacher_tokenizer or ctx.tokenizer)
        t_map = time.perf_counter() - t0
        ctx.summary["semantic_map"] = smap.meta
        ctx.summary["prepare_timings"] = {"attribution_seconds": round(t_attr, 2), "semantic_map_seconds": round(t_map, 2),
                                          "attribution_examples": scores.n_examples}
        ctx.summary["attribution"] = {"aggregate": scores.aggregate, "positions": scores.positions,
                                      "target": scores.target, "dtype": scores.dtype, "margin": scores.margin()}
        if c.map != "closed_form":
            from .maps import choose_map

            smap = choose_map(ctx, smap, lm.pairs, c.interface)
            ctx.summary["map"] = smap.meta
        ctx.state.update(layer_map=lm, smap=smap, scores=scores)
        ctx.summary["layer_map"] = lm.describe()
        log.info("layer map: %s", lm.describe())

    def fit(self, ctx: TransferContext) -> None:
        lm: LayerMap = ctx.state["layer_map"]
        model = make_trainable(ctx, [p.student_layer for p in lm.pairs])
        ctx.state["train_model"] = model
        n_train = sum(p.numel() for p in model.parameters() if p.requires_grad)
        ctx.summary["trainable_parameters"] = n_train
        run_alignment_steps(ctx, model, lm.pairs, ctx.state["smap"], layer_loss="cosine",
                            output_loss=ctx.config.semalign.output_loss, steps=ctx.steps, label="v1")
        ctx.student = model
