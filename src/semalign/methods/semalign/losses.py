"""SemAlign losses as pure functions (spec §2.5 v1; §3.3 d-1, d-2, e reconstruction).

Layer losses take the student activation ``h`` [B, T, D], the aligned target ``target`` [B, T, D] (already in
student space, constant) and a position mask [B, T]; output losses take student logits and labels (and teacher
logits for KL). All reductions run in float32.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ...registry import Registry
from ...similarity import centered_gram

LAYER_LOSSES: Registry[Callable[..., torch.Tensor]] = Registry("layer loss")
OUTPUT_LOSSES: Registry[Callable[..., torch.Tensor]] = Registry("output loss")


def _masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    m = mask.to(x.dtype)
    return (x * m).sum() / m.sum().clamp_min(1.0)


@LAYER_LOSSES.register("cosine", help="v1: 1 - mean cos(h, target) over positions")
def cosine_loss(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, **_) -> torch.Tensor:
    cos = F.cosine_similarity(h.float(), target.float(), dim=-1, eps=1e-8)
    return 1.0 - _masked_mean(cos, mask)


@LAYER_LOSSES.register("relgeom", help="v2 reading: |G(h) - G(target)|_F^2 of centred token Grams = 2(1 - CKA)")
def relgeom_loss(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, **_) -> torch.Tensor:
    """Per sequence over valid tokens; averaged over sequences with >= 2 valid tokens."""
    losses = []
    for b in range(h.shape[0]):
        idx = mask[b].nonzero().squeeze(-1)
        if idx.numel() < 2:
            continue
        g1 = centered_gram(h[b, idx].float())
        g2 = centered_gram(target[b, idx].float())
        losses.append(((g1 - g2) ** 2).sum())
    if not losses:
        return h.float().sum() * 0.0
    return torch.stack(losses).mean()


def fisher_quadratic(z: torch.Tensor, z_ref: torch.Tensor, tau: float = 1.0, variant: str = "exact") -> torch.Tensor:
    """½ δᵀ F δ per row with F = diag(p̃) − p̃p̃ᵀ, p̃ = softmax(z_ref/τ) (stop-gradient), δ = z − z_ref.

    ``exact`` = ½ Var_p̃[δ]; ``diagonal`` = ½ Σ p̃ δ². Returns one value per row ([...]).
    """
    p = torch.softmax(z_ref.detach().float() / tau, dim=-1)
    d = z.float() - z_ref.detach().float()
    m1 = (p * d).sum(-1)
    m2 = (p * d * d).sum(-1)
    return 0.5 * (m2 - m1 * m1) if variant == "exact" else 0.5 * m2


@LAYER_LOSSES.register("fisher_logits", help="ACL reading: Fisher-weighted quadratic on target-space logit-lens logits")
def fisher_logits_loss(h: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, *, lens: Callable,
                       tau: float = 1.0, variant: str = "exact", chunk: int = 256, **_) -> torch.Tensor:
    """``lens`` maps hidden states to target logits (final norm + LM head); chunked over tokens."""
    hv, tv = h.reshape(-1, h.shape[-1]), target.reshape(-1, target.shape[-1])
    idx = mask.reshape(-1).nonzero().squeeze(-1)
    total = h.float().sum() * 0.0
    for i in range(0, idx.numel(), chunk):
        sel = idx[i:i + chunk]
        z = lens(hv[sel])
        with torch.no_grad():
            z_ref = lens(tv[sel].to(hv.dtype))
        total = total + fisher_quadratic(z, z_ref, tau, variant).sum()
    return total / max(1, idx.numel())


def shift_labels(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(labels for positions 0..T-2, mask) — logits at t predict token t+1."""
    lab = labels[:, 1:]
    return lab, lab != -100


def output_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: the positions whose logits the output terms read (those followed by a supervised token)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != -100
    return mask


def response_rows(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits [N, V], gold next tokens [N]) at :func:`output_positions`, in row-major order. ``logits`` is either
    [B, T, V] or already those N rows (a suffix run that applied the head only there, ``models/prefix.py``)."""
    lab, mask = shift_labels(labels)
    return (logits[:, :-1][mask] if logits.dim() == 3 else logits), lab[mask]


@OUTPUT_LOSSES.register("cos_label", help="v1: 1 - mean cos(z, one-hot(y)) over response tokens")
def cos_label_loss(logits: torch.Tensor, labels: torch.Tensor, *, smoothing: float = 0.0, **_) -> torch.Tensor:
    """cos(z, e_y) = z_y / |z|; with label smoothing ε, y = (1-ε) e_y + ε/V."""
    z, y = response_rows(logits, labels)
    z = z.float()
    zy = z.gather(-1, y.unsqueeze(-1)).squeeze(-1)
    zn = z.norm(dim=-1).clamp_min(1e-12)
    if smoothing > 0:
        V = z.shape[-1]
        num = (1 - smoothing) * zy + smoothing / V * z.sum(-1)
        yn = ((1 - smoothing + smoothing / V) ** 2 + (V - 1) * (smoothing / V) ** 2) ** 0.5
        cos = num / (zn * yn)
    else:
        cos = zy / zn
    if cos.numel() == 0:
        return logits.float().sum() * 0.0
    return 1.0 - cos.mean()


@OUTPUT_LOSSES.register("ce", help="cross-entropy of the gold response tokens (beyond the paper's cosine)")
def ce_label_loss(logits: torch.Tensor, labels: torch.Tensor, **_) -> torch.Tensor:
    z, y = response_rows(logits, labels)
    if z.numel() == 0:
        return logits.float().sum() * 0.0
    return F.cross_entropy(z.float(), y)


def kl_divergence(p_logits: torch.Tensor, q_logits: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """KL(softmax(p/τ) || softmax(q/τ)) per row (float32)."""
    lp = torch.log_softmax(p_logits.float() / tau, dim=-1)
    lq = torch.log_softmax(q_logits.float() / tau, dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1)


@OUTPUT_LOSSES.register("kl_source", help="v2/ACL: forward KL(teacher || student) on final logits, response tokens")
def kl_source_loss(logits: torch.Tensor, labels: torch.Tensor, *, teacher_logits: torch.Tensor,
                   tau: float = 1.0, chunk: int = 256, shared_vocab: int | None = None, **_) -> torch.Tensor:
    """Over the shared token ids only (``shared_vocab``: the ids both tokenizers produce with the same string;
    padded LM-head rows and placeholder tokens are excluded, spec §8.7, §8.18)."""
    s, _ = response_rows(logits, labels)
    t, _ = response_rows(teacher_logits, labels)
    n = min(s.shape[-1], t.shape[-1])  # shared vocabulary prefix
    if shared_vocab:
        n = min(n, int(shared_vocab))
    total = logits.float().sum() * 0.0
    for i in range(0, s.shape[0], chunk):
        total = total + kl_divergence(t[i:i + chunk, :n].detach(), s[i:i + chunk, :n], tau).sum()
    return total * (tau ** 2) / max(1, s.shape[0])
