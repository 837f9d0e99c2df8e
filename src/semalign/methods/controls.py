"""Controls and the shared PostPKT fine-tuning loop.

* ``lora-sft``: random-init LoRA fine-tuned on the train split (the "7B-LoRA" row of Seeking / NI's PostPKT
  random-init control). No teacher.
* ``logit-kd``: the same LoRA, data and step budget, trained on forward KL(teacher || student) over the supervised
  positions (optionally plus CE). The vocabulary-sized logits are formed ``chunk_tokens`` positions at a time and
  recomputed in backward (activation checkpointing), so memory stays bounded with a 151,936-token vocabulary.

:func:`posttrain` is also Seeking's fine-tuning stage. Step budget: ``--steps`` when given, else
``ceil(epochs * |train| / batch_size)``. Schedule: linear warm-up (``warmup_ratio``) then linear decay (HF default).
Resumable: LoRA tensors, optimiser, scheduler and RNG are checkpointed every :data:`SAVE_EVERY` steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import time
from typing import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from ..artifacts import peak_rss_mb
from ..data.prompts import collate, pad_id_of, render_example
from ..errors import SemalignError
from ..models.arch import Internals
from ..training.loop import (check_finite, check_finite_grads, config_hash, load_checkpoint, make_optimizer,
                             save_checkpoint)
from .base import METHODS, TransferContext, TransferMethod

log = logging.getLogger(__name__)

SAVE_EVERY = 10  # optimizer steps between resumable checkpoints (and always after the last step)
MAX_GRAD_NORM = 1.0  # HF Trainer default, used by the Seeking fine-tuning recipe

LossFn = Callable[[torch.nn.Module, dict], tuple[torch.Tensor, dict[str, float]]]


# ----------------------------------------------------------------------------------------------- helpers
def compute_autocast(ctx: TransferContext):
    """bf16/fp16 autocast for student compute (fp32 master weights), or a no-op for ``--dtype fp32``."""
    dt = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(ctx.config.dtype)
    if dt is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=ctx.device.type, dtype=dt)


def progress_bar(description: str, total: int):
    """A transient rich progress bar; returns (Progress, task id) to use as ``with prog: prog.advance(tid)``."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    prog = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True, disable=not log.isEnabledFor(logging.INFO))
    return prog, prog.add_task(description, total=total)


def parse_targets(spec: str, arch: Internals, flag: str, extra: tuple[str, ...] = ()) -> list[str]:
    """Comma-separated module names -> validated list (projections of ``arch`` plus ``extra`` names)."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    allowed = tuple(arch.projection_names) + extra
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SemalignError(f"{flag}: unknown module(s) {', '.join(bad) or '(none given)'}; "
                            f"choose from {', '.join(allowed)}")
    return list(dict.fromkeys(names))


def make_lora(model: torch.nn.Module, targets: list[str], *, rank: int, alpha: float, dropout: float):
    """Freeze ``model`` and wrap it in a PEFT LoRA (adapter weights fp32) on ``targets``."""
    from peft import LoraConfig, get_peft_model

    for p in model.parameters():
        p.requires_grad_(False)
    cfg = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return get_peft_model(model, cfg, autocast_adapter_dtype=True)


def train_pool(ctx: TransferContext) -> list[dict]:
    """The examples post-training draws from: the train split, or (``--train-pool extract_align``) the extract +
    align pool SemAlign trains on, for a comparison at the same data."""
    if ctx.config.train_pool == "extract_align":
        return list(ctx.splits.extract) + list(ctx.splits.align)
    return ctx.splits.train


def posttrain_steps(ctx: TransferContext, epochs: float, batch_size: int) -> int:
    if ctx.config.steps:
        return int(ctx.config.steps)
    pool = train_pool(ctx)
    if not pool:
        raise SemalignError(f"task {ctx.config.task!r} has an empty train split; pass --data-dir with a train split")
    return max(1, math.ceil(epochs * len(pool) / batch_size))


def step_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """Example indices of optimizer step ``step``: seeded reshuffle every epoch, deterministic per step."""
    out: list[int] = []
    pos = step * batch_size
    while len(out) < batch_size:
        epoch, off = divmod(pos, n)
        perm = list(range(n))
        random.Random(seed * 100_003 + epoch).shuffle(perm)
        take = perm[off: off + batch_size - len(out)]
        out += take
        pos += len(take)
    return out


def linear_warmup_decay(total: int, warmup_ratio: float) -> Callable[[int], float]:
    warm = int(round(warmup_ratio * total))

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / (warm + 1)
        return max(0.0, (total - s) / max(1, total - warm))

    return f


# ---------------------------------------------------------------------------------- chunked vocab losses
def final_hidden(model: torch.nn.Module, batch: dict) -> torch.Tensor:
    """Post-final-norm hidden states [B, T, d] without materialising the full [B, T, V] logits."""
    out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True,
                logits_to_keep=1)
    return out.hidden_states[-1]


def supervised(batch: dict, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(hidden at supervised positions [N, d], next-token targets [N], row index [N])."""
    lab = batch["labels"][:, 1:]
    mask = lab != -100
    rows = torch.arange(lab.shape[0], device=lab.device).unsqueeze(1).expand_as(lab)[mask]
    return h[:, :-1][mask], lab[mask], rows


def _nll_chunk(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(head(h).float(), y, reduction="none")


def token_nll(head: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, chunk: int) -> torch.Tensor:
    """Per-token NLL [N], ``chunk`` positions at a time (recomputed in backward)."""
    parts = []
    for i in range(0, h.shape[0], chunk):
        hi, yi = h[i:i + chunk], y[i:i + chunk]
        parts.append(checkpoint(_nll_chunk, head, hi, yi, use_reentrant=False) if hi.requires_grad
                     else _nll_chunk(head, hi, yi))
    return torch.cat(parts) if parts else h.new_zeros(0)


def _kl_chunk(head: torch.nn.Module, h: torch.Tensor, t_logp: torch.Tensor, tau: float) -> torch.Tensor:
    s_logp = F.log_softmax(head(h).float()[:, : t_logp.shape[-1]] / tau, dim=-1)
    return (t_logp.exp() * (t_logp - s_logp)).sum()


def forward_kl(s_head: torch.nn.Module, h_s: torch.Tensor, t_head: torch.nn.Module, h_t: torch.Tensor, *,
               tau: float, chunk: int) -> torch.Tensor:
    """Sum over positions of KL(p_T || p_S) at temperature ``tau`` (times tau^2), chunked over positions."""
    vocab = min(s_head.weight.shape[0], t_head.weight.shape[0])
    total = h_s.new_zeros((), dtype=torch.float32)
    for i in range(0, h_s.shape[0], chunk):
        with torch.no_grad():
            t_logp = F.log_softmax(t_head(h_t[i:i + chunk]).float()[:, :vocab] / tau, dim=-1)
        total = total + checkpoint(_kl_chunk, s_head, h_s[i:i + chunk], t_logp, tau, use_reentrant=False)
    return total * tau * tau


def ce_loss(chunk: int = 256) -> LossFn:
    def fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        h, y, _ = supervised(batch, final_hidden(model, batch))
        nll = token_nll(model.get_output_embeddings(), h, y, chunk).sum()
        return nll, {"ce": float(nll.detach())}

    return fn


# ------------------------------------------------------------------------------------------ the loop
@contextlib.contextmanager
def activation_checkpointing(model: torch.nn.Module, enabled: bool):
    """Hugging Face gradient checkpointing (non-reentrant) on the (PEFT-wrapped) student while the block runs."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if not enabled:
        yield
        return
    if not getattr(base, "supports_gradient_checkpointing", False):
        raise SemalignError(f"{type(base).__name__} does not support gradient checkpointing; "
                            "drop --gradient-checkpointing")
    kwargs = {"use_reentrant": False}
    if hasattr(base, "activation_checkpointing_enable"):  # transformers >= 5 name
        base.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        off = base.activation_checkpointing_disable
    else:  # pragma: no cover - older transformers
        base.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        off = base.gradient_checkpointing_disable
    try:
        yield
    finally:
        off()


def posttrain(ctx: TransferContext, model: torch.nn.Module, loss_fn: LossFn, *, lr: float, batch_size: int,
              warmup_ratio: float, steps: int, label: str) -> dict:
    """Fine-tune the trainable parameters of ``model`` on the train split; loss is token-weighted per step.

    ``loss_fn(model, micro_batch) -> (summed loss over supervised tokens, parts)``. Returns a summary dict.
    """
    c = ctx.config
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, lr=lr, weight_decay=0.0, betas=(0.9, 0.999))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, linear_warmup_decay(steps, warmup_ratio))
    chash = config_hash({"cfg": c.model_dump(mode="json"), "stage": label})
    ckpt = ctx.run.checkpoint_dir / label
    start = 0
    if ctx.resume and (ckpt / "trainer_state.json").is_file():
        start, _ = load_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, cfg_hash=chash)
        ctx.run.truncate_metrics(start)
        log.info("%s: resumed after step %d", label, start)
    train, pad = train_pool(ctx), pad_id_of(ctx.tokenizer)
    if not train:
        raise SemalignError(f"task {ctx.config.task!r} has an empty train split; pass --data-dir with a train split")
    cache: dict[int, dict] = {}

    def rendered(i: int) -> dict:
        if i not in cache:
            cache[i] = render_example(ctx.tokenizer, train[i], max_length=c.max_length,
                                      train_on_inputs=ctx.task.train_on_inputs)
        return cache[i]

    losses: list[float] = []
    t_fit = time.perf_counter()
    prog, tid = progress_bar(f"{label} fine-tuning", steps)
    with prog, activation_checkpointing(model, c.gradient_checkpointing):
        prog.update(tid, completed=start)
        for step in range(start, steps):
            t0 = time.perf_counter()
            ex = [rendered(i) for i in step_indices(len(train), batch_size, step, c.seed)]
            n_tok = sum(sum(1 for v in e["labels"][1:] if v != -100) for e in ex)
            if n_tok == 0:
                raise SemalignError(f"step {step + 1} has no supervised tokens; raise --max-length")
            model.train()
            parts_sum: dict[str, float] = {}
            loss_sum = 0.0
            for i in range(0, len(ex), c.micro_batch):
                b = {k: v.to(ctx.device) for k, v in collate(ex[i:i + c.micro_batch], pad).items()}
                with compute_autocast(ctx):
                    loss, parts = loss_fn(model, b)
                check_finite(loss, step + 1)
                (loss / n_tok).backward()
                loss_sum += float(loss.detach())
                for k, v in parts.items():
                    parts_sum[k] = parts_sum.get(k, 0.0) + v
            check_finite_grads(params, step + 1)
            gnorm = float(torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM))
            cur_lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            dt = time.perf_counter() - t0
            losses.append(loss_sum / n_tok)
            ctx.run.log_metrics({"stage": label, "step": step + 1, "loss": round(loss_sum / n_tok, 6),
                                 **{k: round(v / n_tok, 6) for k, v in parts_sum.items()}, "lr": cur_lr,
                                 "grad_norm": round(gnorm, 6), "examples": len(ex), "tokens": n_tok,
                                 "step_seconds": round(dt, 3), "peak_rss_mb": round(peak_rss_mb(), 1)})
            log.info("%s step %d/%d loss %.4f (%.1fs)", label, step + 1, steps, loss_sum / n_tok, dt)
            if (step + 1) % SAVE_EVERY == 0 or step + 1 == steps:
                save_checkpoint(ckpt, model=model, optimizer=opt, scheduler=sched, step=step + 1, cfg_hash=chash)
            prog.advance(tid)
    model.eval()
    return {"steps": steps, "resumed_from": start, "batch_size": batch_size, "lr": lr,
            "final_loss": losses[-1] if losses else None, "seconds": round(time.perf_counter() - t_fit, 2),
            "trainable_parameters": sum(p.numel() for p in params)}


# --------------------------------------------------------------------------------------- the methods
@METHODS.register("lora-sft", help="control: random-init LoRA fine-tuned on the train split")
class LoraSft(TransferMethod):
    name = "lora-sft"
    paper = "arXiv 2106.09685 (Hu et al., LoRA: Low-Rank Adaptation of Large Language Models)"
    summary_line = "control: random-init LoRA fine-tuned on the train split (no teacher)"
    needs_teacher_forward = False

    def fit(self, ctx: TransferContext) -> None:
        c = ctx.config.lora_sft
        targets = parse_targets(c.targets, ctx.s_arch, "--lora-sft-targets")
        model = make_lora(ctx.student, targets, rank=c.rank, alpha=c.lora_alpha, dropout=c.lora_dropout)
        ctx.student = model
        steps = posttrain_steps(ctx, c.epochs, c.batch_size)
        info = posttrain(ctx, model, ce_loss(), lr=c.lr, batch_size=c.batch_size, warmup_ratio=c.warmup_ratio,
                         steps=steps, label="lora-sft")
        ctx.summary["lora_sft"] = {"targets": targets, "rank": c.rank, "alpha": c.lora_alpha, **info}


def kd_loss(ctx: TransferContext) -> LossFn:
    c = ctx.config.logit_kd
    t_head = ctx.t_arch.lm_head

    def fn(model: torch.nn.Module, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
        with torch.no_grad():
            h_t, _, _ = supervised(batch, final_hidden(ctx.teacher, batch))
        h_s, y, _ = supervised(batch, final_hidden(model, batch))
        head = model.get_output_embeddings()
        kl = forward_kl(head, h_s, t_head, h_t, tau=c.temperature, chunk=c.chunk_tokens)
        parts = {"kl": float(kl.detach())}
        loss = kl
        if c.ce_weight > 0:
            ce = token_nll(head, h_s, y, c.chunk_tokens).sum()
            loss = loss + c.ce_weight * ce
            parts["ce"] = float(ce.detach())
        return loss, parts

    return fn


@METHODS.register("logit-kd", help="control: forward-KL logit distillation with LoRA")
class LogitKd(TransferMethod):
    name = "logit-kd"
    paper = "arXiv 1503.02531 (Hinton, Vinyals, Dean, Distilling the Knowledge in a Neural Network)"
    summary_line = "control: LoRA trained on forward KL(teacher || student) over the train split"

    def fit(self, ctx: TransferContext) -> None:
        c = ctx.config.logit_kd
        targets = parse_targets(c.targets, ctx.s_arch, "--logit-kd-targets")
        if ctx.teacher_tokenizer is not None and ctx.teacher_tokenizer.get_vocab() != ctx.tokenizer.get_vocab():
            raise SemalignError("logit-kd needs teacher and student to share one tokenizer vocabulary; "
                                "use a teacher from the student's model family")
        model = make_lora(ctx.student, targets, rank=c.rank, alpha=c.lora_alpha, dropout=c.lora_dropout)
        ctx.student = model
        steps = posttrain_steps(ctx, c.epochs, c.batch_size)
        info = posttrain(ctx, model, kd_loss(ctx), lr=c.lr, batch_size=c.batch_size, warmup_ratio=c.warmup_ratio,
                         steps=steps, label="logit-kd")
        ctx.summary["logit_kd"] = {"targets": targets, "rank": c.rank, "temperature": c.temperature,
                                   "ce_weight": c.ce_weight, "chunk_tokens": c.chunk_tokens, **info}
