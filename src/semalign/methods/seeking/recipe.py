"""Seeking (PostPKT, arXiv 2310.11451), re-implemented from the spec (baselines.md §3, §6, §7, §8).

prepare: seed examples from the train split (seeded; gold answers, or teacher greedy answers) -> sensitivity on
the teacher -> layer map -> max-sensitivity windows -> rank-r SVD factors (B0, A0). Cached in the run dir
(``seeking/extraction.json`` + ``extraction.safetensors``) so ``--resume`` skips it.

fit: the student's base weights become ``W - s B0 A0`` (s = alpha / r) and a PEFT LoRA is initialised to
``(B0, A0)``, so the starting function equals the student's (the max logit difference is recorded); then the LoRA
is fine-tuned on the train split with :func:`semalign.methods.controls.posttrain`.

Outputs: ``student/`` (merged, stock HF) and ``adapter/``: a standard PEFT adapter **for the original student**.
It has rank 2r and encodes ``s (B A - B0 A0)`` as ``B' = [B | -B0]``, ``A' = [A ; A0]`` with alpha' = 2 alpha, so
``PeftModel.from_pretrained(<original student>, run/adapter)`` computes exactly the fine-tuned model and no
modified base checkpoint needs to be shipped.
"""

from __future__ import annotations

import copy
import json
import logging
import random
import time

import torch

from ...data.prompts import batches, collate, pad_id_of, prompt_ids, render_example
from ...errors import SemalignError
from ..base import METHODS, TransferContext, TransferMethod
from ..controls import ce_loss, compute_autocast, make_lora, posttrain, posttrain_steps, progress_bar
from .extract import (EMBED, HEAD, MatrixExtract, accumulate_sensitivity, extract_matrices, resolve_targets,
                      select_layers)

log = logging.getLogger(__name__)

SUBDIR = "seeking"


def seed_examples(ctx: TransferContext) -> list[dict]:
    """``seed_examples`` train examples (seeded sample; spec S5: reproducible, unlike the original shuffle)."""
    c = ctx.config.seeking
    pool = ctx.splits.train or ctx.splits.extract
    k = min(c.seed_examples, len(pool))
    chosen = random.Random(ctx.config.seed).sample(pool, k)
    if c.seed_source == "gold":
        return chosen
    tok = ctx.teacher_tokenizer or ctx.tokenizer
    out = []
    prog, tid = progress_bar("teacher seed answers", len(chosen))
    with prog, torch.no_grad():
        for ex in chosen:
            ids = torch.tensor([prompt_ids(tok, ex["messages"][:-1])], device=ctx.device)
            gen = ctx.teacher.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                       max_new_tokens=c.seed_max_new_tokens, pad_token_id=pad_id_of(tok))
            text = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip()
            msgs = [dict(m) for m in ex["messages"][:-1]] + [{"role": "assistant", "content": text}]
            out.append({**ex, "messages": msgs})
            prog.advance(tid)
    return out


def _save(ctx: TransferContext, extracts: list[MatrixExtract], meta: dict) -> None:
    from safetensors.torch import save_file

    d = ctx.run.path(SUBDIR)
    d.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for e in extracts:
        tensors[f"{e.key}.B"] = e.B.contiguous()
        tensors[f"{e.key}.A"] = e.A.contiguous()
    save_file(tensors, str(d / "extraction.safetensors"))
    ctx.run.write_json(f"{SUBDIR}/extraction.json", {**meta, "matrices": [e.record() for e in extracts]})


def _load(ctx: TransferContext) -> tuple[list[MatrixExtract], dict] | None:
    from safetensors.torch import load_file

    j, t = ctx.run.path(SUBDIR, "extraction.json"), ctx.run.path(SUBDIR, "extraction.safetensors")
    if not (ctx.resume and j.is_file() and t.is_file()):
        return None
    meta = json.loads(j.read_text())
    tensors = load_file(str(t))
    out = []
    for r in meta.pop("matrices"):
        key = f"{r['student_layer']}.{r['name']}"
        r["shape"], r["teacher_shape"] = tuple(r["shape"]), tuple(r["teacher_shape"])
        out.append(MatrixExtract(**r, B=tensors[f"{key}.B"], A=tensors[f"{key}.A"]))
    return out, meta


def module_for(ctx: TransferContext, e: MatrixExtract) -> torch.nn.Module:
    if e.name == HEAD:
        return ctx.s_arch.lm_head
    if e.name == EMBED:
        return ctx.s_arch.embed
    return ctx.s_arch.projection(e.student_layer, e.name)


def module_path(ctx: TransferContext, e: MatrixExtract) -> str:
    if e.name == HEAD:
        return ctx.s_arch.spec.lm_head
    if e.name == EMBED:
        return ctx.s_arch.spec.embed
    return ctx.s_arch.projection_path(e.student_layer, e.name)


@torch.no_grad()
def subtract_init(ctx: TransferContext, extracts: list[MatrixExtract], scale: float) -> None:
    """``W <- W - scale * B0 A0`` on the plain student (the embedding stores the transpose)."""
    for e in extracts:
        w = module_for(ctx, e).weight
        delta = (e.B.double() @ e.A.double()) * scale
        if e.name == EMBED:
            delta = delta.t()
        w.copy_((w.double() - delta.to(w.device)).to(w.dtype))


@torch.no_grad()
def load_factors(peft_model, ctx: TransferContext, extracts: list[MatrixExtract]) -> None:
    mods = dict(peft_model.base_model.model.named_modules())
    for e in extracts:
        m = mods[module_path(ctx, e)]
        if e.name == EMBED:
            m.lora_embedding_A["default"].copy_(e.A)
            m.lora_embedding_B["default"].copy_(e.B)
        else:
            m.lora_A["default"].weight.copy_(e.A)
            m.lora_B["default"].weight.copy_(e.B)


def write_adapter(peft_model, ctx: TransferContext, extracts: list[MatrixExtract], out_dir) -> dict:
    """Rank-2r adapter for the ORIGINAL student: s (B A - B0 A0) = (2alpha / 2r) [B | -B0] [A ; A0]."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    from ...models.load import resolve_model

    state = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    by_path = {module_path(ctx, e): e for e in extracts}
    new: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        path, _, leaf = key.removeprefix("base_model.model.").partition(".lora_")
        e = by_path[path]
        leaf = "lora_" + leaf
        t = t.detach().float().cpu()
        if leaf.startswith("lora_A") or leaf.startswith("lora_embedding_A"):
            new[key] = torch.cat([t, e.A.float()], 0).contiguous()
        else:
            new[key] = torch.cat([t, -e.B.float()], 1).contiguous()
    cfg = copy.deepcopy(peft_model.peft_config["default"])
    cfg.r, cfg.lora_alpha = 2 * cfg.r, 2 * cfg.lora_alpha
    try:
        cfg.base_model_name_or_path = resolve_model(ctx.config.student, fetch=False).path
    except SemalignError:
        cfg.base_model_name_or_path = ctx.config.student
    cfg.inference_mode = True
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg.save_pretrained(str(out_dir))
    save_file(new, str(out_dir / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out_dir / "README.md").write_text(
        "# Seeking adapter\n\nPEFT LoRA for the **original** student "
        f"(`{ctx.config.student}`): rank {cfg.r} = 2 x {cfg.r // 2}, holding `s (B A - B0 A0)` "
        "as `[B | -B0] [A ; A0]`.\n\n```python\nbase = AutoModelForCausalLM.from_pretrained(student)\n"
        "model = PeftModel.from_pretrained(base, 'adapter')\n```\n")
    return {"dir": str(out_dir), "rank": cfg.r, "lora_alpha": cfg.lora_alpha, "applies_to": "original student"}


def _probe(ctx: TransferContext) -> dict:
    rows = (ctx.splits.eval or ctx.splits.train)[:2]
    ex = [render_example(ctx.tokenizer, e, max_length=min(ctx.config.max_length, 128)) for e in rows]
    return {k: v.to(ctx.device) for k, v in collate(ex, pad_id_of(ctx.tokenizer)).items()}


@torch.no_grad()
def _logits(model, probe: dict, ctx: TransferContext) -> torch.Tensor:
    with compute_autocast(ctx):
        return model(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"]).logits.float()


@METHODS.register("seeking", help="Seeking (PostPKT): sensitivity windows -> SVD LoRA init -> LoRA fine-tuning")
class Seeking(TransferMethod):
    name = "seeking"
    paper = ("arXiv 2310.11451 (Zhong et al., Seeking Neural Nuggets: Knowledge Transfer in Large Language Models "
             "from a Parametric Perspective, ICLR 2024)")
    summary_line = "PostPKT: teacher sub-matrices by sensitivity -> SVD LoRA init (function unchanged) -> LoRA SFT"

    def prepare(self, ctx: TransferContext) -> None:
        c = ctx.config.seeking
        targets = resolve_targets(c.targets, ctx.t_arch, ctx.s_arch, rank=c.rank, window=c.window)
        cached = _load(ctx)
        if cached is not None:
            extracts, meta = cached
            log.info("seeking: reusing the extraction in %s", ctx.run.path(SUBDIR))
        else:
            t0 = time.perf_counter()
            seeds = seed_examples(ctx)
            tok = ctx.teacher_tokenizer or ctx.tokenizer
            bs = batches(tok, seeds, 1, max_length=ctx.config.max_length, train_on_inputs=ctx.task.train_on_inputs)
            bs = [{k: v.to(ctx.device) for k, v in b.items()} for b in bs]
            prog, tid = progress_bar("seeking sensitivity", len(bs))
            with prog:
                sens = accumulate_sensitivity(ctx.t_arch, bs, targets, include_norms=c.layer_norms,
                                              progress=lambda: prog.advance(tid))
            t_sens = time.perf_counter() - t0
            layer_map = select_layers(sens.layer_scores, ctx.s_arch.num_layers)
            n_jobs = len(layer_map) * sum(n not in (EMBED, HEAD) for n in targets) + sum(
                n in (EMBED, HEAD) for n in targets)
            prog, tid = progress_bar("seeking windows + SVD", n_jobs)
            with prog:
                extracts = extract_matrices(ctx.t_arch, ctx.s_arch, sens, layer_map, targets, rank=c.rank,
                                            window=c.window, progress=lambda: prog.advance(tid))
            meta = {"targets": targets, "window": c.window, "rank": c.rank, "seed_source": c.seed_source,
                    "seed_examples": len(seeds), "seed_ids": [s.get("id") for s in seeds],
                    "layer_scores": sens.layer_scores,
                    "layer_map": {str(k): t for k, t in enumerate(layer_map, start=1)},
                    "include_norms": c.layer_norms, "sensitivity_seconds": round(t_sens, 2),
                    "extract_seconds": round(time.perf_counter() - t0 - t_sens, 2)}
            del sens
            _save(ctx, extracts, meta)
        ctx.state["seeking"] = extracts
        ev = [e.explained_variance for e in extracts]
        ctx.summary["seeking"] = {k: meta[k] for k in ("targets", "window", "rank", "seed_source", "seed_examples",
                                                       "layer_map")}
        by_name: dict[str, list[float]] = {}
        for e in extracts:
            by_name.setdefault(e.name, []).append(e.explained_variance)
        ctx.summary["seeking"].update({"matrices": len(extracts), "explained_variance_mean": sum(ev) / len(ev),
                                       "explained_variance_min": min(ev),
                                       "explained_variance_by_matrix": {k: round(sum(v) / len(v), 4)
                                                                        for k, v in by_name.items()}})
        log.info("seeking: %d matrices, mean explained variance at r=%d: %.3f", len(extracts), c.rank,
                 sum(ev) / len(ev))

    def fit(self, ctx: TransferContext) -> None:
        c = ctx.config.seeking
        extracts: list[MatrixExtract] = ctx.state["seeking"]
        scale = c.lora_alpha / c.rank
        probe = _probe(ctx)
        before = _logits(ctx.student, probe, ctx)
        subtract_init(ctx, extracts, scale)
        targets = sorted({module_path(ctx, e) for e in extracts})
        model = make_lora(ctx.student, targets, rank=c.rank, alpha=c.lora_alpha, dropout=c.lora_dropout)
        load_factors(model, ctx, extracts)
        model.eval()
        start_diff = float((_logits(model, probe, ctx) - before).abs().max())
        log.info("seeking: start-function max |logit difference| = %.3g", start_diff)
        ctx.student = model
        steps = posttrain_steps(ctx, c.epochs, c.batch_size)
        info = posttrain(ctx, model, ce_loss(), lr=c.lr, batch_size=c.batch_size, warmup_ratio=c.warmup_ratio,
                         steps=steps, label="seeking")
        adapter = write_adapter(model, ctx, extracts, ctx.run.path("adapter"))
        ctx.summary["seeking"].update({"start_max_abs_logit_diff": start_diff, "adapter": adapter, **info})

    def model_card(self, ctx: TransferContext) -> str:
        return super().model_card(ctx) + (
            "\nSeeking variant: targets `" + ctx.config.seeking.targets + "`, rank " + str(ctx.config.seeking.rank)
            + ", windows `" + ctx.config.seeking.window + "`. The PEFT adapter in `../adapter/` applies to the "
            "original student.\n")
