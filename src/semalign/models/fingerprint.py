"""Weights compared tensor by tensor: per-tensor digests of a model's module groups, and the lowest changed layer.

A group is the embeddings, one decoder block, the final norm or the LM head; its digest map holds one
``blake2b(dtype, shape, bytes)`` per state-dict entry. Two models' groups are equal when the maps are equal: the same
tensor names (a LoRA-wrapped block has new ones, so it counts as changed), dtypes, shapes and bytes. Used to decide
which blocks a transfer really changed, never trusting what a method says it trained.
"""

from __future__ import annotations

import hashlib

import torch

from .arch import Internals


def tensor_digest(t: torch.Tensor) -> str:
    t = t.detach()
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{t.dtype}|{tuple(t.shape)}|".encode())
    if t.numel():
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def module_digests(module: torch.nn.Module) -> dict[str, str]:
    return {name: tensor_digest(t) for name, t in module.state_dict().items()}


def module_digest(module: torch.nn.Module) -> str:
    d = module_digests(module)
    return hashlib.sha256("".join(f"{k}={v};" for k, v in sorted(d.items())).encode()).hexdigest()


def weight_digests(arch: Internals) -> dict[str, dict[str, str]]:
    """``{"embed": ..., "layer1": ..., ..., "final_norm": ..., "lm_head": ...}``, each a per-tensor digest map."""
    out = {"embed": module_digests(arch.embed)}
    for i in range(1, arch.num_layers + 1):
        out[f"layer{i}"] = module_digests(arch.layer(i))
    out["final_norm"] = module_digests(arch.final_norm)
    out["lm_head"] = module_digests(arch.lm_head)
    return out


def lowest_changed_layer(before: dict[str, dict[str, str]], after: dict[str, dict[str, str]]) -> int:
    """The boundary ``k`` below which ``after`` equals ``before``: 1 when the embeddings (or the depth) changed,
    the lowest changed block, ``L + 1`` when only the final norm / LM head changed, ``L + 2`` when nothing did."""
    L = sum(1 for g in before if g.startswith("layer"))
    if before.get("embed") != after.get("embed") or L != sum(1 for g in after if g.startswith("layer")):
        return 1
    for i in range(1, L + 1):
        if before[f"layer{i}"] != after[f"layer{i}"]:
            return i
    if before["final_norm"] != after["final_norm"] or before["lm_head"] != after["lm_head"]:
        return L + 1
    return L + 2
