"""Frozen-prefix execution: run the frozen bottom of a decoder once, then only the blocks that change.

``prefix_states(arch, ids, mask, k)`` is ``h_{k-1}``, the hidden state entering block ``k`` (1-based; ``k = L + 1``
is the final norm's input), computed without autograd by the model's own forward stopped at block ``k``.
``run_suffix(arch, h, k, ...)`` continues from it: blocks ``k..L``, the final norm and the LM head, called as the
model's forward calls them (its rotary module for ``position_embeddings``, masks from ``transformers.masking_utils``
per layer type as read from the config), with the head applied only at the positions asked for. Hooks on the
blocks (``capture_layers``) fire as in a full forward, and PEFT adapters inside the blocks run as usual.
``run_suffix(arch, prefix_states(arch, x, m, k), k, attention_mask=m)`` equals ``model(x, m)`` (tests/unit/test_prefix.py).

``lowest_trainable_layer`` reads the boundary from ``requires_grad`` (never from a method's description).
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from ..errors import SemalignError
from .arch import Internals
from .hooks import _first_tensor, run_to_input


def lowest_trainable_layer(model: torch.nn.Module, arch: Internals) -> int | None:
    """1-based index of the lowest block with a trainable parameter (``L + 1``: only the final norm / LM head
    train); ``None`` when nothing trains or something below block 1 or outside the known modules trains
    (embeddings, a tied LM head), i.e. when there is no frozen prefix to reuse."""
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    if not trainable or trainable & {id(p) for p in arch.embed.parameters()}:
        return None
    L = arch.num_layers
    k = next((i for i in range(1, L + 1) if any(id(p) in trainable for p in arch.layer(i).parameters())), L + 1)
    known = {id(p) for i in range(k, L + 1) for p in arch.layer(i).parameters()}
    known |= {id(p) for p in arch.final_norm.parameters()} | {id(p) for p in arch.lm_head.parameters()}
    return k if trainable <= known else None


def frozen_below(model: torch.nn.Module, arch: Internals, k: int) -> bool:
    """True when no parameter of the embeddings or of blocks ``1..k-1`` trains (their output can be reused)."""
    mods = [arch.embed] + [arch.layer(i) for i in range(1, k)]
    return not any(p.requires_grad for m in mods for p in m.parameters())


@torch.no_grad()
def prefix_states(arch: Internals, input_ids: torch.Tensor, attention_mask: torch.Tensor | None, k: int,
                  *, position_ids: torch.Tensor | None = None) -> torch.Tensor:
    """``h_{k-1}`` [B, T, D] for the batch (no autograd); ``k = 1`` gives the (scaled) embeddings."""
    _check_k(arch, k)
    kw = {"input_ids": input_ids, "attention_mask": attention_mask}
    if position_ids is not None:
        kw["position_ids"] = position_ids
    return run_to_input(arch, k, **kw)


def layer_types(arch: Internals) -> list[str]:
    """Attention type per block (``full_attention``, ``sliding_attention``, ...) as the model's forward picks them."""
    types = getattr(arch.config, "layer_types", None)
    if types:
        return list(types)[: arch.num_layers]
    sliding = getattr(arch.config, "sliding_window", None)  # Mistral-style: one window for every layer
    return ["sliding_attention" if sliding else "full_attention"] * arch.num_layers


def suffix_inputs(arch: Internals, h: torch.Tensor, k: int, attention_mask: torch.Tensor | None,
                  position_ids: torch.Tensor | None) -> tuple[dict, dict, torch.Tensor]:
    """(mask per layer type, position embeddings per layer type, position ids) for blocks ``k..L``."""
    from transformers.masking_utils import LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING

    cfg = arch.config
    if getattr(cfg, "use_bidirectional_attention", False):
        raise SemalignError("frozen-prefix execution supports causal attention only; rerun with --no-fast-path")
    if arch.rotary is None:
        raise SemalignError(f"no rotary module at {arch.spec.rotary!r} in this {arch.model_type} model; "
                            "rerun with --no-fast-path or fix the ArchSpec in semalign/models/arch.py")
    if position_ids is None:  # as the model's forward does without a cache
        position_ids = torch.arange(h.shape[1], device=h.device).unsqueeze(0)
    types = sorted(set(layer_types(arch)[k - 1:]))
    masks, pos_emb = {}, {}
    per_type = "layer_type" in inspect.signature(arch.rotary.forward).parameters
    for t in types:
        fn = LAYER_PATTERN_TO_MASK_FUNCTION_MAPPING.get(t)
        if fn is None or isinstance(fn, dict):
            raise SemalignError(f"layer type {t!r} is not supported by frozen-prefix execution; rerun with --no-fast-path")
        masks[t] = fn(config=cfg, inputs_embeds=h, attention_mask=attention_mask, past_key_values=None,
                      position_ids=position_ids)
        pos_emb[t] = arch.rotary(h, position_ids, t) if per_type else None
    if not per_type:
        shared = arch.rotary(h, position_ids)
        pos_emb = dict.fromkeys(types, shared)
    return masks, pos_emb, position_ids


@dataclass
class SuffixOutput:
    hidden: torch.Tensor        # output of block L (before the final norm), [B, T, D]
    logits: torch.Tensor | None  # per ``logits``: [B, T, V], [B, n, V] or [N, V]


def run_suffix(arch: Internals, h: torch.Tensor, k: int, *, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, logits: bool | int | torch.Tensor = True) -> SuffixOutput:
    """Blocks ``k..L`` on ``h = h_{k-1}``, then the final norm and LM head at the positions ``logits`` selects:
    ``True`` all, ``False`` none, an int ``n`` the last ``n`` ([B, n, V]), a bool [B, T] mask the ``True`` positions
    in row-major order ([N, V]). Autograd and autocast follow the caller's context."""
    _check_k(arch, k)
    masks, pos_emb, position_ids = suffix_inputs(arch, h, k, attention_mask, position_ids)
    types = layer_types(arch)
    for i in range(k, arch.num_layers + 1):
        t = types[i - 1]
        h = _first_tensor(arch.layer(i)(h, attention_mask=masks[t], position_embeddings=pos_emb[t],
                                        position_ids=position_ids, past_key_values=None))
    return SuffixOutput(h, head_logits(arch, h, logits))


def head_logits(arch: Internals, h: torch.Tensor, select: bool | int | torch.Tensor = True) -> torch.Tensor | None:
    """Final norm + LM head (+ the config's final logit soft-capping) at the selected positions of ``h``."""
    if select is False or select is None:
        return None
    if isinstance(select, torch.Tensor):
        if select.dtype != torch.bool or select.shape != h.shape[:2]:
            raise SemalignError(f"logits positions must be a bool mask of shape {tuple(h.shape[:2])}")
        h = h[select]
    elif select is not True:
        h = h[:, -int(select):]
    z = arch.lm_head(arch.final_norm(h))
    cap = getattr(arch.config, "final_logit_softcapping", None)
    if cap:
        z = torch.tanh(z / cap) * cap
    return z


def _check_k(arch: Internals, k: int) -> None:
    if not 1 <= k <= arch.num_layers + 1:
        raise SemalignError(f"prefix boundary {k} is out of range: this model has blocks 1..{arch.num_layers}")
