"""Shared training utilities: optimiser, LR schedule, data cursor, non-finite guard, resumable checkpoints.

Checkpoints hold only what is needed to continue bit-for-bit: the trainable tensors, optimiser and scheduler
state, the step, RNG states and a config hash. They are written atomically under ``checkpoints/last/``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import random
from pathlib import Path
from typing import Iterable

import torch

from ..errors import NonFiniteLossError, SemalignError
from ..faults import fault_point
from ..paths import atomic_dir

log = logging.getLogger(__name__)


def trainable_parameters(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def make_optimizer(params: Iterable[torch.nn.Parameter], *, lr: float, weight_decay: float = 0.05,
                   betas: tuple[float, float] = (0.9, 0.95)) -> torch.optim.Optimizer:
    params = list(params)
    if not params:
        raise SemalignError("no trainable parameters were selected; check the layer map / LoRA target modules")
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, betas=betas)


def warmup_steps(total_steps: int) -> int:
    """Warm-up length of ``warmup_constant``: 10% of the steps, but none for runs shorter than 10 steps."""
    return total_steps // 10 if total_steps >= 10 else 0


def make_scheduler(opt: torch.optim.Optimizer, kind: str, total_steps: int, lr: float):
    """``warmup_constant`` (default), ``onecycle`` (LaTen's), ``cosine`` (10% warm-up) or ``constant``.

    ``warmup_constant``: linear warm-up over :func:`warmup_steps` steps (step s gets (s+1)/(w+1) of the peak), then
    the peak LR to the end. Short runs (the paper's 2-8 steps) get the peak LR on every step. OneCycle anneals to
    ~lr/1e4 on its last step: with 2 steps the second step is wasted (lr 2.4e-5 then 1.2e-10 at peak 3e-5).
    """
    total_steps = max(1, int(total_steps))
    if kind == "warmup_constant":
        warm = warmup_steps(total_steps)
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / (warm + 1) if s < warm else 1.0)
    if kind == "onecycle":
        if total_steps < 2:
            return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        return torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total_steps)
    if kind == "cosine":
        warm = max(1, total_steps // 10)

        def f(s: int) -> float:
            if s < warm:
                return (s + 1) / warm
            return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, total_steps - warm))))

        return torch.optim.lr_scheduler.LambdaLR(opt, f)
    if kind == "constant":
        return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    raise SemalignError(f"unknown scheduler {kind!r}; choose warmup_constant, onecycle, cosine or constant")


def check_finite(value: torch.Tensor | float, step: int, what: str = "loss") -> None:
    v = float(value.detach()) if isinstance(value, torch.Tensor) else float(value)
    if not math.isfinite(v):
        raise NonFiniteLossError(
            f"non-finite {what} ({v}) at step {step}; training stopped and the last good state was kept — "
            "lower --lr, use --dtype fp32, or check the data"
        )


def check_finite_grads(params: Iterable[torch.nn.Parameter], step: int) -> None:
    for p in params:
        if p.grad is not None and not torch.isfinite(p.grad).all():
            raise NonFiniteLossError(
                f"non-finite gradient at step {step}; training stopped and the last good state was kept — "
                "lower --lr or use --dtype fp32"
            )


def config_hash(obj: dict) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


def save_checkpoint(directory: Path, *, model: torch.nn.Module, optimizer, scheduler, step: int,
                    cfg_hash: str, extra: dict | None = None) -> None:
    """Atomically write ``directory`` (replacing it) with the trainable state needed to resume."""
    fault_point("step")
    trainables = {n: p.detach().cpu().clone() for n, p in trainable_parameters(model)}
    with atomic_dir(Path(directory)) as tmp:
        torch.save({
            "trainables": trainables,
            "optimizer": optimizer.state_dict() if optimizer is not None else None,
            "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "rng": rng_state(),
            "extra": extra or {},
        }, tmp / "state.pt")
        fault_point("checkpoint")
        (tmp / "trainer_state.json").write_text(json.dumps({"step": step, "config_hash": cfg_hash}, indent=2))


def load_checkpoint(directory: Path, *, model: torch.nn.Module, optimizer, scheduler, cfg_hash: str) -> tuple[int, dict]:
    """Restore state written by :func:`save_checkpoint`; returns (step, extra)."""
    directory = Path(directory)
    meta = json.loads((directory / "trainer_state.json").read_text())
    if meta["config_hash"] != cfg_hash:
        raise SemalignError(
            f"cannot resume from {directory}: it was written with a different configuration; "
            "rerun with the original flags or use --overwrite"
        )
    state = torch.load(directory / "state.pt", weights_only=False)
    params = dict(trainable_parameters(model))
    missing = set(state["trainables"]) ^ set(params)
    if missing:
        raise SemalignError(f"cannot resume from {directory}: trainable parameters differ ({sorted(missing)[:3]} ...)")
    with torch.no_grad():
        for n, t in state["trainables"].items():
            params[n].copy_(t.to(params[n].device, params[n].dtype))
    if optimizer is not None and state["optimizer"] is not None:
        optimizer.load_state_dict(state["optimizer"])
    if scheduler is not None and state["scheduler"] is not None:
        scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"])
    return int(meta["step"]), state.get("extra", {})


def gold_nll(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], device: torch.device) -> dict:
    """Mean per-token NLL of the gold answer tokens (labels != -100) over ``batches``; the LM head runs only at the
    answer positions (no [B, T, V] logits)."""
    from ..models.arch import internals
    from ..models.hooks import supervised_logits

    arch = internals(model)
    total, count = 0.0, 0
    model.eval()
    with torch.no_grad():
        for b in batches:
            b = {k: v.to(device) for k, v in b.items()}
            logits, y, _ = supervised_logits(arch, b)
            total += float(torch.nn.functional.cross_entropy(logits.float(), y, reduction="sum"))
            count += int(y.numel())
    return {"nll": total / max(1, count), "tokens": count}
