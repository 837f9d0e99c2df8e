"""Incremental evaluation of a transferred student (issue 10 item 4).

While the original student is evaluated (``recording``), a :class:`StateBank` keeps, per scored sequence (its
token ids), the hidden state entering each block (``h_1 .. h_L``; ``h_L`` feeds the final norm), dropping the
lowest blocks first when a memory budget is reached. When the transferred student is evaluated (``reusing``), the
bank compares its weights with the original's tensor by tensor (``models/fingerprint.py``; never a method's claim
about what it trained), takes the lowest changed block ``k`` and, for every batch whose sequences it holds, rebuilds
the left-padded ``h_{j-1}`` for the highest recorded ``j <= k`` and runs only blocks ``j..L``, the final norm and
the LM head at the last positions (``models/prefix.py``). Batches it cannot serve run the full forward.

Only MMLU letter scoring uses it (``mmlu.score_letters`` asks :func:`forward_for`); the sessions are context
managers that always detach.
"""

from __future__ import annotations

import contextlib
import logging
import weakref
from typing import Callable, Iterator

import torch

from ..models.arch import internals
from ..models.fingerprint import lowest_changed_layer, weight_digests
from ..models.hooks import capture_layers
from ..models.prefix import run_suffix
from .generate import forward_last

log = logging.getLogger(__name__)

DEFAULT_BUDGET_MB = 512
Forward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]
_SESSIONS: "weakref.WeakKeyDictionary[torch.nn.Module, Forward]" = weakref.WeakKeyDictionary()


def _keys(ids: torch.Tensor, att: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(row[m.bool()].tolist()) for row, m in zip(ids.cpu(), att.cpu())]


class StateBank:
    """Block-input states of one model per scored sequence, plus its weight digests (taken at construction)."""

    def __init__(self, model: torch.nn.Module, *, budget_mb: float = DEFAULT_BUDGET_MB,
                 blocks: list[int] | None = None):
        """``blocks``: record only the inputs of these blocks (e.g. the lowest block a sweep will change: a stored
        ``h_{j-1}`` serves every model whose lowest changed block is ``>= j``); default: every block, the lowest
        dropped first when ``budget_mb`` is exceeded."""
        self.arch = internals(model)
        self.digests = weight_digests(self.arch)
        L = self.arch.num_layers
        # block j's input h_{j-1}; j = L + 1 is the final norm's input
        self.layers = sorted({int(j) for j in blocks if 2 <= int(j) <= L + 1}) if blocks else list(range(2, L + 2))
        self.states: dict[int, dict[tuple[int, ...], torch.Tensor]] = {j: {} for j in self.layers}
        self.budget = int(budget_mb * 2 ** 20)
        self.nbytes = 0
        self.stats = {"recorded_sequences": 0, "lowest_changed_block": None, "start_block": None,
                      "suffix_batches": 0, "full_batches": 0}

    def _drop_lowest(self) -> None:
        j = self.layers.pop(0)
        self.nbytes -= sum(t.numel() * t.element_size() for t in self.states.pop(j).values())

    def recorder(self, model: torch.nn.Module) -> Forward:
        arch, L = internals(model), self.arch.num_layers

        def forward(ids, att, pos, n_keep):
            blocks = [j for j in self.layers if j <= L] + ([L] if L + 1 in self.layers else [])
            with capture_layers(arch, blocks, detach=True) as cap:
                logits = forward_last(model, ids, att, pos, n_keep).logits
            valid = att.bool()
            for i, key in enumerate(_keys(ids, att)):
                for j in self.layers:
                    h = cap.inputs[j] if j <= L else cap.outputs[L]
                    row = h[i][valid[i]].clone()
                    old = self.states[j].get(key)
                    self.nbytes += row.numel() * row.element_size() - (old.numel() * old.element_size() if old is not None else 0)
                    self.states[j][key] = row
                self.stats["recorded_sequences"] += 1
            while self.nbytes > self.budget and self.layers:
                self._drop_lowest()
            return logits

        return forward

    def reuser(self, model: torch.nn.Module) -> Forward:
        arch = internals(model)
        L = self.arch.num_layers
        k = lowest_changed_layer(self.digests, weight_digests(arch)) if arch.num_layers == L else 1
        usable = [j for j in self.layers if j <= min(k, L + 1)]
        start = max(usable) if usable else None
        self.stats.update(lowest_changed_block=k, start_block=start)
        log.info("incremental evaluation: lowest changed block %s, reusing stored states from block %s", k, start)

        def forward(ids, att, pos, n_keep):
            keys = _keys(ids, att)
            if start is None or any(key not in self.states[start] for key in keys):
                self.stats["full_batches"] += 1
                return forward_last(model, ids, att, pos, n_keep).logits
            first = self.states[start][keys[0]]
            h = torch.zeros((*ids.shape, first.shape[-1]), dtype=first.dtype, device=ids.device)
            for i, key in enumerate(keys):
                s = self.states[start][key]
                h[i, ids.shape[1] - s.shape[0]:] = s.to(ids.device)  # left padded, as score_letters pads
            self.stats["suffix_batches"] += 1
            return run_suffix(arch, h, start, attention_mask=att, position_ids=pos, logits=n_keep).logits

        return forward


@contextlib.contextmanager
def _session(model: torch.nn.Module, fn: Forward) -> Iterator[None]:
    _SESSIONS[model] = fn
    try:
        yield
    finally:
        _SESSIONS.pop(model, None)


def recording(model: torch.nn.Module, bank: StateBank):
    """While active, MMLU scoring of ``model`` stores its block inputs in ``bank``."""
    return _session(model, bank.recorder(model))


def reusing(model: torch.nn.Module, bank: StateBank):
    """While active, MMLU scoring of ``model`` starts from ``bank``'s states below the lowest changed block."""
    return _session(model, bank.reuser(model))


def forward_for(model: torch.nn.Module) -> Forward | None:
    """The active session's ``forward(ids, att, pos, n_keep) -> logits [B, n_keep, V]`` for ``model``, if any."""
    return _SESSIONS.get(model)
