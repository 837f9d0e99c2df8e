"""Pieces shared by the v1 recipe and the frontier schedule: attribution, trainables, teacher targets."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import asdict
from pathlib import Path

import torch

from ...attribution.layers import LayerScores, attribute_layers
from ...data.prompts import batches, budget_batches
from ...errors import SemalignError
from ...models.arch import Internals
from ...models.hooks import capture_layers, run_to_input, run_until
from ...models.prefix import head_logits
from ...paths import cache_dir
from ...pairing import LayerPair
from ..base import TransferContext
from .bases import SemanticMap, build_semantic_map

log = logging.getLogger(__name__)


def autocast(ctx: TransferContext):
    """bf16/fp16 autocast for student compute (fp32 master weights), or a no-op for fp32."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ctx.config.dtype)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=dt)


def teacher_hash(ctx: TransferContext) -> str | None:
    """The teacher's content hash (stage-cache key); ``None`` (do not cache) for a hub teacher. Memoised in
    ``ctx.state`` (the driver may set it up front)."""
    if "teacher_hash" not in ctx.state:
        from ...fingerprints import model_key

        ctx.state["teacher_hash"] = model_key(ctx.config.teacher)
    return ctx.state["teacher_hash"]


ATTRIBUTION_VERSION = "2"  # bump when a change moves the scores (2: response positions, fp32, batched)


def teacher_attribution(ctx: TransferContext) -> LayerScores:
    """Grad x Act of all teacher layers on the extract split: from the run dir (--resume), else the stage cache
    (stage ``attribution``, key in docs/cache.md), else computed.

    The objective is the gold response NLL (prompt tokens masked, whatever the task's train_on_inputs: spec §8.1),
    summed over ``attribution_positions``, in ``attribution_dtype`` (fp32 by default)."""
    path = ctx.run.path("attribution", "teacher.json")
    if path.is_file():
        return LayerScores.load(path)
    c = ctx.config.semalign
    ex = ctx.splits.extract[: ctx.config.attribution_examples or len(ctx.splits.extract)]
    tok = ctx.teacher_tokenizer or ctx.tokenizer

    def compute() -> tuple[None, dict]:
        # Batches bounded in padded tokens: backward through a 1.5B teacher in fp32 keeps ~6 MB of activations
        # per token, so 4 long MMLU examples (768 tokens each) would need ~18 GB.
        bs, order = budget_batches(tok, ex, max_examples=c.attribution_batch, max_tokens=c.attribution_batch_tokens,
                                   max_length=ctx.config.max_length)
        from rich.progress import Progress

        dtype = torch.float32 if c.attribution_dtype == "fp32" else None
        with Progress(transient=True) as prog:
            t = prog.add_task(f"attribution ({len(ex)} examples)", total=len(bs))
            s = attribute_layers(ctx.t_arch, bs, aggregate=c.aggregate, positions=c.attribution_positions,
                                 target=c.attribution_target, dtype=dtype, progress=lambda: prog.advance(t))
        back = sorted(range(len(order)), key=lambda j: order[j])  # per-example rows in extract-split order
        s.per_example = [s.per_example[j] for j in back]
        return None, asdict(s)

    from ...cache import stage_cache
    from ...fingerprints import examples_hash, tokenizer_hash

    cache = stage_cache(getattr(ctx.config, "cache", True))
    th = teacher_hash(ctx) if cache.enabled else None
    if th is None:
        d = compute()[1]
    else:
        inputs = {"teacher": th, "teacher_dtype": str(next(ctx.teacher.parameters()).dtype),
                  "tokenizer": tokenizer_hash(tok), "examples": examples_hash(ex),
                  "max_length": ctx.config.max_length, "aggregate": c.aggregate,
                  "positions": c.attribution_positions, "target": c.attribution_target,
                  "dtype": c.attribution_dtype}
        d = cache.get_or_compute("attribution", ATTRIBUTION_VERSION, inputs, compute).json
    scores = LayerScores(d["scores"], d["aggregate"], d["n_examples"], d.get("per_example", []),
                         positions=d.get("positions", "all"), target=d.get("target", "block_output"),
                         dtype=d.get("dtype", ""))
    scores.model = ctx.config.teacher
    scores.save(path)
    m = scores.margin()
    log.info("attribution (%s, %s, %s): top T%s %.4g, next T%s %.4g, relative margin %.3f", scores.target,
             scores.positions, scores.dtype, m["top"], m.get("top_score", float("nan")), m["next"],
             m.get("next_score", float("nan")), m["relative_margin"] or float("nan"))
    return scores


def semantic_map(ctx: TransferContext, t_tok) -> SemanticMap:
    d = ctx.run.path("semantic_map")
    if (d / "M.safetensors").is_file():
        return SemanticMap.load(d)
    c = ctx.config.semalign
    sm = build_semantic_map(ctx.t_arch, ctx.s_arch, t_tok, ctx.tokenizer, rcond=c.rcond,
                            fold_final_norm=c.fold_final_norm, cache_root=cache_dir() / "semantic_maps")
    sm.save(d)
    return sm


def lora_targets(ctx: TransferContext) -> list[str]:
    names = [n.strip() for n in ctx.config.semalign.lora_targets.split(",") if n.strip()]
    bad = [n for n in names if n not in ctx.s_arch.projection_names]
    if bad or not names:
        raise SemalignError(f"--semalign-lora-targets: unknown projection(s) {bad or names}; "
                            f"choose from {', '.join(ctx.s_arch.projection_names)}")
    return names


def make_trainable(ctx: TransferContext, layers: list[int]) -> torch.nn.Module:
    """Freeze the student except the given layers: LoRA (default) or the full layers. Returns the model to train."""
    model = ctx.student
    for p in model.parameters():
        p.requires_grad_(False)
    c = ctx.config.semalign
    if c.trainable.endswith("_above"):  # every layer from the lowest paired one up
        layers = list(range(min(layers), ctx.s_arch.num_layers + 1))
    for k in layers:  # fp32 master weights for the layers that change (the rest stays in --dtype)
        ctx.s_arch.layer(k).float()
    if c.trainable.startswith("full"):
        for k in layers:
            for p in ctx.s_arch.layer(k).parameters():
                p.requires_grad_(True)
        return model
    from peft import LoraConfig, get_peft_model

    targets = [ctx.s_arch.projection_path(k, n) for k in layers for n in lora_targets(ctx)]
    cfg = LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout, target_modules=targets,
                     bias="none")
    peft_model = get_peft_model(model, cfg)
    for n, p in peft_model.named_parameters():
        if p.requires_grad:
            p.data = p.data.float()  # fp32 master copies of the adapters
    return peft_model


def teacher_targets(ctx: TransferContext, batch: dict, pairs: list[LayerPair], smap: SemanticMap,
                    interface: str, *, logits: bool = False, logit_positions: torch.Tensor | None = None
                    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
    """Aligned targets M h_T/|h_T| (student space, float32) per pair's student layer, and optionally the
    teacher's final logits (one full forward; only at ``logit_positions`` [B, T] bool, as [N, V] rows, when
    given); without logits the teacher stops after the deepest needed layer."""
    needed = sorted({l for p in pairs for l in p.teacher_layers_needed()})
    t_logits = None
    with torch.no_grad(), capture_layers(ctx.t_arch, needed, mlp=interface == "mlp_output", detach=True) as cap:
        kw = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        if logits and logit_positions is not None:
            h = run_to_input(ctx.t_arch, ctx.t_arch.num_layers + 1, **kw)
            t_logits = head_logits(ctx.t_arch, h, logit_positions)
        elif logits:
            t_logits = ctx.teacher(**kw).logits
        else:
            run_until(ctx.t_arch, max(needed), **kw)
        out = {}
        for p in pairs:
            if p.interpolation:
                lam = p.interpolation["lambda"]
                h = ((1 - lam) * cap.interface(p.interpolation["a"], interface).float()
                     + lam * cap.interface(p.interpolation["b"], interface).float())
            else:
                h = cap.interface(p.teacher_layer, interface)
            out[p.student_layer] = smap.apply(h)
    return out, t_logits


def save_layer_map_plot(path: Path, lm) -> None:
    """Small diagram of teacher/student depths and the supervised pairs."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 2.4))
    L_T, L_S = lm.teacher_layers, lm.student_layers
    ax.scatter(range(1, L_T + 1), [1] * L_T, s=18, c="tab:blue", label="teacher layers")
    ax.scatter([k * L_T / L_S for k in range(1, L_S + 1)], [0] * L_S, s=18, c="tab:orange", label="student layers")
    from ...pairing import depth_map

    for k in range(1, L_S + 1):
        ax.plot([depth_map(k, L_T, L_S), k * L_T / L_S], [1, 0], c="0.85", lw=0.8, zorder=0)
    for p in lm.pairs:
        ax.plot([p.teacher_layer, p.student_layer * L_T / L_S], [1, 0], c="tab:red", lw=2)
    ax.set_yticks([0, 1], ["student", "teacher"])
    ax.set_xlabel("teacher depth (student layers placed at k*L_T/L_S)")
    ax.set_title(f"layer map ({lm.strategy}); red = supervised pairs")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
