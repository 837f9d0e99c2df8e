"""SemAlign frontier schedule — a labelled RECONSTRUCTION of arXiv 2510.24208v2 / ACL 2026 Findings (spec §3.3).

Only the abstracts of those versions are public; no published numbers exist to compare against.
What this does: one source layer per target layer (attribution argmax within each depth window, depth map as
fallback); target layers trained shallow to deep, only the frontier layer trainable at each stage
(``steps_per_stage`` steps); layer objective ``cosine | relgeom | fisher_logits`` on the aligned supervision
(M applied per token to the source residual contribution / hidden state); output objective
``kl_source`` (forward KL to the source) or ``cos_label``.
"""

from __future__ import annotations

import logging

import torch

from ...pairing import LayerMap, windowed_argmax_pairs
from ..base import METHODS, TransferContext, TransferMethod
from .common import lora_targets, save_layer_map_plot, semantic_map, teacher_attribution
from .recipe import run_alignment_steps

log = logging.getLogger(__name__)


def resolve_interface(ctx: TransferContext) -> str:
    f = ctx.config.frontier
    if f.interface != "auto":
        return f.interface
    return "block_output" if f.layer_loss == "fisher_logits" else "residual"


def _all_layers_lora(ctx: TransferContext) -> torch.nn.Module:
    from peft import LoraConfig, get_peft_model

    c = ctx.config.semalign
    for p in ctx.student.parameters():
        p.requires_grad_(False)
    targets = [ctx.s_arch.projection_path(k, n) for k in range(1, ctx.s_arch.num_layers + 1) for n in lora_targets(ctx)]
    model = get_peft_model(ctx.student, LoraConfig(r=c.lora_r, lora_alpha=c.lora_alpha, lora_dropout=c.lora_dropout,
                                                   target_modules=targets, bias="none"))
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    return model


def _set_frontier(ctx: TransferContext, model: torch.nn.Module, k: int, mode: str) -> int:
    """Make only layer k trainable; returns the number of trainable parameters."""
    for p in model.parameters():
        p.requires_grad_(False)
    layer = ctx.s_arch.layer(k)
    layer.float()  # fp32 master weights for the frontier layer (base and adapters)
    n = 0
    for name, p in layer.named_parameters():
        if (mode == "lora" and "lora_" in name) or (mode == "full" and "lora_" not in name):
            if mode == "full" and p.dtype != torch.float32:
                p.data = p.data.float()
            p.requires_grad_(True)
            n += p.numel()
    return n


@METHODS.register("semalign-frontier", help="RECONSTRUCTION of SemAlign v2/ACL: shallow-to-deep frontier schedule")
class SemAlignFrontier(TransferMethod):
    student_fp32 = False
    name = "semalign-frontier"
    paper = "arXiv 2510.24208v2 / ACL 2026 Findings — RECONSTRUCTION from the abstracts (no published numbers)"
    summary_line = "[reconstruction] every target layer, shallow to deep, only the frontier layer trainable"

    def prepare(self, ctx: TransferContext) -> None:
        scores = teacher_attribution(ctx)
        if ctx.run.path("layer_map.json").is_file():
            lm = LayerMap.from_json(ctx.run.read_json("layer_map.json"))
        else:
            lm = windowed_argmax_pairs(scores.scores, ctx.s_arch.num_layers, interface=resolve_interface(ctx))
            lm.notes.append("RECONSTRUCTION (v2/ACL abstracts): one source layer per target layer")
            ctx.run.write_json("layer_map.json", lm.to_json())
        save_layer_map_plot(ctx.run.path("plots", "layer_map.png"), lm)
        smap = semantic_map(ctx, ctx.teacher_tokenizer or ctx.tokenizer)
        ctx.state.update(layer_map=lm, smap=smap)
        ctx.summary["layer_map"] = lm.describe()
        ctx.summary["reconstruction"] = True
        ctx.summary["semantic_map"] = smap.meta

    def fit(self, ctx: TransferContext) -> None:
        f = ctx.config.frontier
        lm: LayerMap = ctx.state["layer_map"]
        interface = resolve_interface(ctx)
        model = _all_layers_lora(ctx) if f.trainable == "lora" else ctx.student
        extra = {}
        if f.layer_loss == "fisher_logits":
            arch = ctx.s_arch

            def lens(h: torch.Tensor) -> torch.Tensor:
                return arch.lm_head(arch.final_norm(h))

            extra = {"lens": lens, "tau": f.tau, "variant": f.fisher_variant}
        trainable = {}
        n_stages = len(lm.pairs)
        for i, pair in enumerate(lm.pairs):
            k = pair.student_layer
            trainable[k] = _set_frontier(ctx, model, k, f.trainable)
            use_out = f.kl_every_stage or i == n_stages - 1
            run_alignment_steps(ctx, model, [pair], ctx.state["smap"], layer_loss=f.layer_loss,
                                output_loss=f.output_loss, steps=f.steps_per_stage, label=f"stage{k:02d}",
                                step_offset=i * f.steps_per_stage, interface=interface, extra_loss_kwargs=extra,
                                output_weight=f.beta if use_out else 0.0, tau=f.tau)
        for p in model.parameters():
            p.requires_grad_(False)
        ctx.summary["trainable_parameters_per_stage"] = trainable
        ctx.summary["frontier"] = {"stages": n_stages, "steps_per_stage": f.steps_per_stage,
                                   "layer_loss": f.layer_loss, "output_loss": f.output_loss, "interface": interface}
        ctx.student = model
