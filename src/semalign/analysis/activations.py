"""Per-layer token representations pooled across examples, from ONE forward (+ optional backward) per example.

``collect(arch, batches, selection)`` returns the block outputs ``h_0 .. h_L`` (``h_0`` = the input of block 1,
i.e. the embeddings; ``h_l`` = the output of block ``l`` captured with forward hooks, never
``hidden_states[L]``, which is post-norm; spec §1) for the selected token positions, stacked as
``[L+1, N, D]`` float32. In the same pass it can compute

* the layer Grad x Act attribution of every block (same objective and aggregation as
  :mod:`semalign.attribution.layers`: the gradient of the mean gold-token NLL wrt ``h_l`` times ``h_l``, signed
  sum over tokens and channels per example, then ``abs_of_sum`` etc. across examples), and
* Seeking's parameter sensitivity ``sum_j |theta * dL_j/dtheta|`` for named weights (accumulated by
  post-accumulate-grad hooks so only one parameter gradient is alive at a time).

Token selection (:func:`select_tokens`): examples rendered with a chat template share a prefix (system prompt +
task preamble) whose hidden states are *identical* across examples, and the first token is an attention sink
with ~100x the norm of other tokens in Qwen2.5. Both would dominate linear CKA over pooled tokens, so by
default the longest common token prefix is dropped; ``keep_prefix=True`` keeps every non-pad token. At most
``max_tokens`` positions are kept (uniform seeded subsample), the same positions for every model fed the same
token ids.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..attribution.layers import AGGREGATES, LayerScores
from ..errors import SemalignError
from ..models.arch import Internals
from ..models.hooks import capture_layers

log = logging.getLogger(__name__)


@dataclass
class TokenSelection:
    """Which positions of each batch are pooled (boolean masks [B, T]) and why."""

    masks: list[torch.Tensor]
    prefix_len: int
    n_total: int
    n_kept: int

    def describe(self) -> dict:
        return {"dropped_common_prefix_tokens": self.prefix_len, "candidate_tokens": self.n_total,
                "pooled_tokens": self.n_kept}


@dataclass
class PassResult:
    states: torch.Tensor                                 # [L+1, N, D] float32 (h_0 .. h_L)
    attribution: LayerScores | None = None
    sensitivity: dict[str, torch.Tensor] = field(default_factory=dict)  # parameter path -> sum |theta * g|
    loss: float | None = None                            # mean supervised NLL over examples (when computed)


def common_prefix_len(batches: list[dict[str, torch.Tensor]]) -> int:
    """Longest token prefix shared by every example (rows of all batches, padding ignored)."""
    rows = [b["input_ids"][i, : int(b["attention_mask"][i].sum())] for b in batches for i in range(b["input_ids"].shape[0])]
    if not rows:
        return 0
    if len(rows) == 1:
        return min(1, rows[0].numel() - 1)  # a single example: drop only the attention-sink first token
    n = min(r.numel() for r in rows)
    ref = rows[0][:n]
    same = torch.stack([r[:n] == ref for r in rows[1:]]).all(0)
    p = int(same.long().cumprod(0).sum())
    return max(0, min(p, n - 1))


def select_tokens(batches: list[dict[str, torch.Tensor]], *, keep_prefix: bool = False, max_tokens: int = 2048,
                  seed: int = 0) -> TokenSelection:
    """Masks of pooled positions: non-pad, after the common prefix (unless ``keep_prefix``), subsampled."""
    if max_tokens < 2:
        raise SemalignError("--max-tokens must be at least 2 (CKA needs several tokens)")
    p = 0 if keep_prefix else common_prefix_len(batches)
    masks = []
    for b in batches:
        m = b["attention_mask"].bool().clone()
        # right padding (data.prompts.collate): positions < p are the shared prefix
        m[:, :p] = False
        masks.append(m)
    n_total = int(sum(int(m.sum()) for m in masks))
    if n_total < 2:
        raise SemalignError("fewer than 2 tokens left to pool; use more --n-samples or --keep-prefix")
    if n_total > max_tokens:
        g = torch.Generator().manual_seed(seed)
        keep = torch.zeros(n_total, dtype=torch.bool)
        keep[torch.randperm(n_total, generator=g)[:max_tokens]] = True
        i = 0
        for m in masks:
            k = int(m.sum())
            flat = m.view(-1)
            idx = flat.nonzero().squeeze(-1)
            flat[idx[~keep[i:i + k]]] = False
            i += k
    return TokenSelection(masks, p, n_total, int(sum(int(m.sum()) for m in masks)))


def _supervised_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    lab = labels[:, 1:]
    mask = lab != -100
    if not bool(mask.any()):
        return logits.float().sum() * 0.0
    return torch.nn.functional.cross_entropy(logits[:, :-1].float()[mask], lab[mask])


def _aggregate(signed: torch.Tensor, absval: torch.Tensor, mean: torch.Tensor, aggregate: str) -> torch.Tensor:
    if aggregate == "abs_of_sum":
        return signed.abs().mean(0)
    if aggregate == "sum":
        return signed.mean(0)
    if aggregate == "mean":
        return mean.mean(0)
    return absval.mean(0)


def collect(arch: Internals, batches: list[dict[str, torch.Tensor]], selection: TokenSelection, *,
            attribution: bool = False, aggregate: str = "abs_of_sum", sensitivity: dict[str, torch.nn.Parameter]
            | None = None, sensitivity_dtype: torch.dtype = torch.float32,
            progress: Callable[[], None] | None = None) -> PassResult:
    """One forward per batch (and one backward when ``attribution`` or ``sensitivity`` is requested).

    Batches should hold one example each when attribution is wanted (the objective is a per-example mean NLL).
    """
    if aggregate not in AGGREGATES:
        raise SemalignError(f"unknown aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
    model, L = arch.model, arch.num_layers
    sens = dict(sensitivity or {})
    need_grad = attribution or bool(sens)
    was_training = model.training
    model.eval()
    req = [(p, p.requires_grad) for p in model.parameters()]
    handles = []
    acc = {n: torch.zeros(p.shape, dtype=sensitivity_dtype) for n, p in sens.items()}
    rows: list[list[torch.Tensor]] = [[] for _ in range(L + 1)]
    signed, absval, meanv, losses = [], [], [], []
    try:
        for p, _ in req:
            p.requires_grad_(False)
        if need_grad:
            handles.append(arch.embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True)))
            for name, p in sens.items():
                p.requires_grad_(True)

                def hook(param: torch.Tensor, name: str = name) -> None:
                    acc[name] += (param.detach() * param.grad).abs().to(sensitivity_dtype).cpu()
                    param.grad = None

                handles.append(p.register_post_accumulate_grad_hook(hook))
        dev = arch.device
        for b, keep in zip(batches, selection.masks):
            b = {k: v.to(dev) for k, v in b.items()}
            with torch.set_grad_enabled(need_grad), capture_layers(
                    arch, range(1, L + 1), inputs=True, detach=not need_grad, retain_grad=attribution) as cap:
                out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
            acts = [cap.inputs[1]] + [cap.outputs[k] for k in range(1, L + 1)]
            km = keep.to(dev)
            for l, a in enumerate(acts):
                rows[l].append(a.detach()[km].float().cpu())
            if need_grad:
                loss = _supervised_nll(out.logits, b["labels"])
                losses.append(float(loss.detach()))
                if loss.requires_grad:
                    loss.backward()
                if attribution:
                    mask = b["attention_mask"].unsqueeze(-1).float()
                    ga = [(a.grad.float() * a.detach().float() * mask) if a.grad is not None
                          else torch.zeros_like(mask) for a in acts[1:]]
                    signed.append(torch.stack([x.sum(dim=(1, 2)) for x in ga], 1).cpu())
                    absval.append(torch.stack([x.abs().sum(dim=(1, 2)) for x in ga], 1).cpu())
                    count = mask.sum(dim=(1, 2)) * acts[-1].shape[-1]
                    meanv.append((signed[-1] / count.cpu().unsqueeze(1)))
            del out, acts
            if progress is not None:
                progress()
    finally:
        for h in handles:
            h.remove()
        for p, r in req:
            p.requires_grad_(r)
            p.grad = None
        model.train(was_training)
    states = torch.stack([torch.cat(r) for r in rows])
    res = PassResult(states, sensitivity=acc, loss=sum(losses) / len(losses) if losses else None)
    if attribution:
        s, a, m = torch.cat(signed), torch.cat(absval), torch.cat(meanv)
        res.attribution = LayerScores([float(x) for x in _aggregate(s, a, m, aggregate)], aggregate,
                                      int(s.shape[0]), [[float(x) for x in row] for row in s])
    return res
