"""LaTen's knowledge translator and the injection of translated teacher vectors (spec baselines.md §2.2-2.4).

One MLP per module type, shared by all layers: ``g(x) = W2 ReLU(W1 x)`` with ``W1: d_T x H``, ``W2: H x d_S``
(H = d_T by default), no biases, fp32, N(0, init_std) initialisation. Sizes come from the live configs.

Knowledge vectors (nn.Linear stores [out, in]):

* ``up_proj`` / ``v_proj``: selected **rows** of the teacher weight (length d_T); the translated rows are added
  to the student's selected rows.
* ``down_proj`` / ``o_proj``: selected **columns** (length d_T); the translated columns are added to the
  student's selected columns.

During training the student stays frozen and the translated vectors enter through forward hooks that add
``x Delta^T`` next to each projection (only the k touched rows/columns are computed); at the end the same Delta is
folded into the weights (``W <- W + Delta``) so the exported checkpoint carries the transfer (bug B1 fixed).
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from ...models.arch import Internals
from .attribution import Location

MODULES = ("up_proj", "down_proj", "v_proj", "o_proj")
ROWS = ("up_proj", "v_proj")     # neurons are output rows
COLS = ("down_proj", "o_proj")   # neurons are input columns


class Translator(nn.Module):
    """Four (or fewer) MLPs d_T -> H -> d_S, one per module type."""

    def __init__(self, modules: list[str], d_teacher: int, d_student: int, *, hidden: int | None = None,
                 init_std: float = 1e-5):
        super().__init__()
        hidden = hidden or d_teacher
        self.nets = nn.ModuleDict({m: nn.Sequential(nn.Linear(d_teacher, hidden, bias=False), nn.ReLU(),
                                                    nn.Linear(hidden, d_student, bias=False)) for m in modules})
        for p in self.parameters():
            nn.init.normal_(p, mean=0.0, std=init_std)
        self.sizes = {"d_teacher": d_teacher, "hidden": hidden, "d_student": d_student}

    @classmethod
    def for_pair(cls, t_arch: Internals, s_arch: Internals, modules: list[str], **kw) -> "Translator":
        return cls(modules, t_arch.hidden_size, s_arch.hidden_size, **kw)

    def forward(self, module: str, x: torch.Tensor) -> torch.Tensor:
        return self.nets[module](x.float())


def gather_teacher(t_arch: Internals, loc: Location, module: str) -> torch.Tensor:
    """Stacked teacher knowledge vectors [N, k, d_T] (fp32) for one module type."""
    t_idx = loc.idx[module][0]
    out = []
    for (lt, _), idx in zip(loc.pairs(module), t_idx):
        w = t_arch.projection(lt, module).weight.detach()
        ix = idx.to(w.device)
        out.append((w[ix] if module in ROWS else w[:, ix].T).float().cpu())
    return torch.stack(out)


def _add_rows(idx: torch.Tensor, G: torch.Tensor):
    def hook(_m, args, out):
        x = args[0]
        extra = (x.to(G.dtype) @ G.T).to(out.dtype)
        return out.index_add(-1, idx, extra)

    return hook


def _add_cols(idx: torch.Tensor, G: torch.Tensor):
    def hook(_m, args, out):
        x = args[0]
        return out + (x.index_select(-1, idx).to(G.dtype) @ G).to(out.dtype)

    return hook


@contextlib.contextmanager
def inject(s_arch: Internals, loc: Location, translated: dict[str, torch.Tensor]) -> Iterator[None]:
    """Add ``x Delta^T`` at every selected student projection while the block is active (hooks always removed)."""
    handles = []
    try:
        for module, G in translated.items():
            s_idx = loc.idx[module][1]
            for (_, ls), idx, g in zip(loc.pairs(module), s_idx, G):
                lin = s_arch.projection(ls, module)
                ix = idx.to(lin.weight.device)
                hook = _add_rows(ix, g) if module in ROWS else _add_cols(ix, g)
                handles.append(lin.register_forward_hook(hook))
        yield
    finally:
        for h in handles:
            h.remove()


@torch.no_grad()
def fold(s_arch: Internals, loc: Location, translated: dict[str, torch.Tensor]) -> dict[str, dict]:
    """``W <- W + Delta`` in place; returns per-module ||Delta||_F / ||W||_F and how many weights changed."""
    stats: dict[str, dict] = {}
    for module, G in translated.items():
        s_idx = loc.idx[module][1]
        d2 = w2 = 0.0
        changed = 0
        for (_, ls), idx, g in zip(loc.pairs(module), s_idx, G):
            w = s_arch.projection(ls, module).weight
            ix = idx.to(w.device)
            before = w.detach().clone()
            delta = g.to(w.device, torch.float32)
            if module in ROWS:
                w[ix] = (w[ix].float() + delta).to(w.dtype)
            else:
                w[:, ix] = (w[:, ix].float() + delta.T).to(w.dtype)
            changed += int((w != before).sum())
            d2 += float((delta.double() ** 2).sum())
            w2 += float((before.double() ** 2).sum())
        stats[module] = {"delta_rel_norm": (d2 / w2) ** 0.5 if w2 > 0 else 0.0, "changed_weights": changed}
    return stats


def penalty(translated: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over modules of mean(g^2): the official "MSE to zero" magnitude penalty."""
    return torch.stack([(g.float() ** 2).mean() for g in translated.values()]).sum()
