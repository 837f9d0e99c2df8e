"""Offline teacher logits: top-k log-probabilities plus one "rest" bucket per position, and the KL they give.

Storing the teacher's full distribution costs ``V`` floats per position (151,936 for Qwen2.5); offline
distillation keeps the ``k`` most likely tokens instead. Per position we store

* ``topk_ids`` [.., k] and ``topk_logprobs`` [.., k]: the teacher's k largest ``log softmax(z_T / tau)``;
* ``rest_lse`` [..]: ``logsumexp`` of the teacher log-probs outside the top k, i.e. the log of the tail mass
  ``p_rest = 1 - sum(top-k p)`` (``-inf`` when k = V).

The KL is then computed over k + 1 outcomes, the tail merged into one bucket on both sides::

    KL_k = sum_{i in top-k} p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest),
    log q_rest = logsumexp_{j not in top-k} log q_j        (the student's mass outside the teacher's top-k)

Merging outcomes can only lose information, so ``KL_k <= KL`` (log-sum inequality), with equality when the
student's tail is proportional to the teacher's, and ``KL_k == KL`` exactly when k = V (tested). The gap is at
most ``p_rest`` times the KL between the two tails; with ``k = 64`` (the default, :data:`DEFAULT_TOPK`) the teacher
tail mass of an instruct model on its own gold answers is typically far below 1%, and the student is still pushed
toward the right total tail mass. Log-probs are stored in float32 (bf16 would round ``log p`` by up to ~0.03).
"""

from __future__ import annotations

import torch

DEFAULT_TOPK = 64


def teacher_topk_logprobs(logits: torch.Tensor, k: int = DEFAULT_TOPK, tau: float = 1.0
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(topk_ids [.., k] int64, topk_logprobs [.., k] f32, rest_lse [..] f32)`` of ``log_softmax(logits/tau)``.

    ``k`` is clipped to the vocabulary size; ``rest_lse`` is ``-inf`` when the top k cover the vocabulary.
    Pass logits restricted to the vocabulary shared with the student.
    """
    lp = torch.log_softmax(logits.detach().float() / tau, dim=-1)
    k = max(1, min(int(k), lp.shape[-1]))
    vals, ids = lp.topk(k, dim=-1)
    if k == lp.shape[-1]:
        rest = torch.full(lp.shape[:-1], float("-inf"), dtype=lp.dtype, device=lp.device)
    else:
        rest = lp.scatter(-1, ids, float("-inf")).logsumexp(-1)
    return ids, vals, rest


def kl_from_topk(student_logits: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor,
                 rest_lse: torch.Tensor, tau: float = 1.0) -> torch.Tensor:
    """Per-position forward KL(teacher || student) from stored top-k teacher log-probs (see module docstring).

    ``student_logits`` [.., V] must span the same vocabulary as the stored teacher ids (the shared prefix);
    the teacher was stored at the same temperature ``tau``. Returns [..] (float32, differentiable in the
    student logits). Equals the exact KL when ``k == V``.
    """
    ls = torch.log_softmax(student_logits.float() / tau, dim=-1)
    ids = topk_ids.long()
    lp_t = topk_logprobs.float()
    kl = (lp_t.exp() * (lp_t - ls.gather(-1, ids))).sum(-1)
    if ids.shape[-1] >= ls.shape[-1]:
        return kl
    lq_rest = ls.scatter(-1, ids, float("-inf")).logsumexp(-1)
    rest = rest_lse.float()
    has = torch.isfinite(rest)
    safe = torch.where(has, rest, torch.zeros_like(rest))
    return kl + torch.where(has, safe.exp() * (safe - lq_rest), torch.zeros_like(rest))


def kl_source_topk_loss(logits: torch.Tensor, labels: torch.Tensor, *, topk_ids: torch.Tensor,
                        topk_logprobs: torch.Tensor, rest_lse: torch.Tensor, tau: float = 1.0,
                        vocab: int | None = None, chunk: int = 256, **_) -> torch.Tensor:
    """``kl_source`` (forward KL on response tokens, times tau^2) from stored teacher top-k instead of live
    teacher logits. The teacher arrays are [B, T, k] / [B, T], aligned with ``logits`` [B, T, V]; ``vocab`` is
    the (shared) vocabulary size the teacher's top-k were taken over (default: the student's)."""
    mask = labels[:, 1:] != -100
    s = logits[:, :-1][mask]
    if vocab is not None:
        s = s[..., :vocab]
    ids, lp, rest = topk_ids[:, :-1][mask], topk_logprobs[:, :-1][mask], rest_lse[:, :-1][mask]
    total = logits.float().sum() * 0.0
    for i in range(0, s.shape[0], chunk):
        total = total + kl_from_topk(s[i:i + chunk], ids[i:i + chunk], lp[i:i + chunk], rest[i:i + chunk], tau).sum()
    return total * (tau ** 2) / max(1, s.shape[0])
