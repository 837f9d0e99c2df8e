"""Frozen-prefix reuse for training loops (issue 10 item 3).

When every trainable parameter sits in block ``k`` or above (read from ``requires_grad``, never from a method's
description), the blocks below ``k`` are a fixed function of the tokens. :class:`FrozenPrefix` computes their
output ``h_{k-1}`` once per example without autograd, keeps it (keyed by the example's token ids, so identical
examples share an entry), and assembles right-padded micro-batches of it for :func:`~semalign.models.prefix.run_suffix`.

Examples missing from the store are computed together, collated exactly like the step's micro-batch (right
padding, no position ids), so a step whose examples are all new sees the same prefix numbers as the full forward.
Right padding and causal attention make an example's states independent of the batch it was computed in.

Reuse is refused (``active`` is False, with ``reason``) when a module below ``k`` would be random in training mode
(dropout with p > 0, attention dropout), since a stored state would then differ from a fresh one.

Hook point for a persistent store (``semalign.cache.StageCache``, another branch): ``FrozenPrefix(store=...)`` takes
any object with ``get(key) -> Tensor | None`` and ``put(key, tensor)``; keys are :meth:`store_key` strings,
a hash of the frozen weights below ``k`` (tensor by tensor), ``k`` and the token ids.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Protocol, Sequence

import torch

from ..data.prompts import collate
from ..models.arch import Internals
from ..models.prefix import lowest_trainable_layer, prefix_states

log = logging.getLogger(__name__)


class PrefixStore(Protocol):
    def get(self, key: str) -> torch.Tensor | None: ...

    def put(self, key: str, value: torch.Tensor) -> None: ...


def _random_below(model: torch.nn.Module, arch: Internals, k: int) -> str | None:
    """Why blocks ``1..k-1`` are not deterministic in the model's current mode, or None."""
    if not model.training or k <= 1:
        return None
    if float(getattr(arch.config, "attention_dropout", 0.0) or 0.0) > 0:
        return f"attention dropout {arch.config.attention_dropout} is active below block {k}"
    for i in range(1, k):
        for name, m in arch.layer(i).named_modules():
            if isinstance(m, torch.nn.Dropout) and m.training and m.p > 0:
                return f"dropout p={m.p} at block {i} ({name}) is active"
    return None


class FrozenPrefix:
    """Per-example ``h_{k-1}`` of a model's frozen bottom, computed once and batched for the suffix."""

    def __init__(self, model: torch.nn.Module, arch: Internals, *, pad_id: int, enabled: bool = True,
                 store: PrefixStore | None = None):
        self.arch, self.pad_id, self.store = arch, pad_id, store
        self.k = lowest_trainable_layer(model, arch) if enabled else None
        self.reason = None if enabled else "disabled (--no-fast-path)"
        if enabled and self.k is None:
            self.reason = "no frozen prefix (nothing trains, or embeddings / unknown modules train)"
        elif enabled:
            self.reason = _random_below(model, arch, self.k)
        self.active = self.reason is None
        self.states: dict[tuple[int, ...], torch.Tensor] = {}
        self.hits = self.computed = 0
        self.seconds = 0.0
        self._weights_digest: str | None = None

    def describe(self) -> dict:
        return {"active": self.active, "k": self.k, "reason": self.reason, "examples": len(self.states),
                "hits": self.hits, "computed": self.computed, "prefix_seconds": round(self.seconds, 3)}

    # -- the hook point for a persistent store -------------------------------------------------------
    def store_key(self, tokens: Sequence[int]) -> str:
        if self._weights_digest is None:
            from ..models.fingerprint import module_digest

            mods = [self.arch.embed] + [self.arch.layer(i) for i in range(1, self.k)]
            self._weights_digest = hashlib.sha256("".join(module_digest(m) for m in mods).encode()).hexdigest()
        toks = hashlib.sha256(torch.tensor(list(tokens), dtype=torch.int64).numpy().tobytes()).hexdigest()
        return f"prefix-{self._weights_digest[:16]}-k{self.k}-{toks[:24]}"

    # -- batches --------------------------------------------------------------------------------------
    def batch(self, rendered: Sequence[dict], attention_mask: torch.Tensor) -> torch.Tensor:
        """``h_{k-1}`` [B, T, D] for the rendered examples of one right-padded micro-batch (pad rows are zero)."""
        keys = [tuple(r["input_ids"]) for r in rendered]
        missing = [i for i, key in enumerate(keys) if key not in self.states]
        if self.store is not None:
            for i in list(missing):
                got = self.store.get(self.store_key(keys[i]))
                if got is not None:
                    self.states[keys[i]] = got.to(attention_mask.device)
                    missing.remove(i)
        self.hits += len(keys) - len(missing)
        if missing:
            self._compute([rendered[i] for i in missing], attention_mask.device)
        B, T = attention_mask.shape
        first = self.states[keys[0]]
        h = torch.zeros((B, T, first.shape[-1]), dtype=first.dtype, device=attention_mask.device)
        for i, key in enumerate(keys):
            s = self.states[key]
            h[i, : s.shape[0]] = s
        return h

    def _compute(self, rendered: Sequence[dict], device: torch.device) -> None:
        t0 = time.perf_counter()
        b = collate(list(rendered), self.pad_id)
        att = b["attention_mask"].to(device)
        h = prefix_states(self.arch, b["input_ids"].to(device), att, self.k)
        for i, r in enumerate(rendered):
            key = tuple(r["input_ids"])
            self.states[key] = h[i, : len(key)].detach().clone()
            if self.store is not None:
                self.store.put(self.store_key(key), self.states[key].cpu())
        self.computed += len(rendered)
        self.seconds += time.perf_counter() - t0
