"""Architecture internals as data.

An :class:`ArchSpec` says where a family keeps its decoder layers, final norm, LM head, embeddings and
attention / MLP projections. Sizes are never tabulated: :class:`Internals` reads them from the HF config
and the live module tree. Adding a family = one ``ARCHITECTURES.register`` call plus a tiny-model test.
Layer numbers in this package are **1-based** (as in the paper: layer 1 is the first decoder block and
``h_0`` the embeddings); :meth:`Internals.layer` converts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import SemalignError
from ..registry import Registry

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ArchSpec:
    """Dotted module paths (relative to the CausalLM) for one model family."""

    family: str
    layers: str = "model.layers"
    final_norm: str = "model.norm"
    lm_head: str = "lm_head"
    embed: str = "model.embed_tokens"
    rotary: str = "model.rotary_emb"  # the model-level rotary embedding (position_embeddings for every layer)
    attn: str = "self_attn"
    mlp: str = "mlp"
    attn_projs: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    mlp_projs: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    # Effective RMSNorm gain is weight + norm_offset (Gemma stores w and multiplies by 1 + w).
    norm_offset: float = 0.0
    model_types: tuple[str, ...] = field(default_factory=tuple)


ARCHITECTURES: Registry[ArchSpec] = Registry("architecture")

ARCHITECTURES.register("llama", ArchSpec("llama", model_types=("llama", "mistral")),
                       help="Llama / Llama-2 / Llama-3 / SmolLM2 / Mistral")
ARCHITECTURES.register("qwen2", ArchSpec("qwen2", model_types=("qwen2", "qwen3")),
                       help="Qwen2 / Qwen2.5 / Qwen3 (dense)")
ARCHITECTURES.register("gemma3", ArchSpec("gemma3", norm_offset=1.0,
                                          model_types=("gemma3_text", "gemma2", "gemma")),
                       help="Gemma / Gemma-2 / Gemma-3 text")


def spec_for_model_type(model_type: str) -> ArchSpec:
    for name in ARCHITECTURES:
        spec = ARCHITECTURES.get(name)
        if model_type in spec.model_types:
            return spec
    supported = sorted(t for n in ARCHITECTURES for t in ARCHITECTURES.get(n).model_types)
    raise SemalignError(
        f"unsupported architecture {model_type!r}: supported model types are {', '.join(supported)}; "
        "add an ArchSpec in semalign/models/arch.py (one entry plus a tiny-model test) to support it"
    )


def _get(root: nn.Module, path: str) -> nn.Module:
    mod = root
    for part in path.split("."):
        if not hasattr(mod, part):
            raise AttributeError(path)
        mod = getattr(mod, part)
    return mod


class Internals:
    """Resolved internals of one live causal LM (module handles + sizes read from its config)."""

    def __init__(self, model: nn.Module, spec: ArchSpec | None = None):
        cfg = model.config
        model_type = getattr(cfg, "model_type", type(model).__name__)
        self.model = model
        self.spec = spec or spec_for_model_type(model_type)
        try:
            self.layers: nn.ModuleList = _get(model, self.spec.layers)  # type: ignore[assignment]
            self.final_norm = _get(model, self.spec.final_norm)
            self.lm_head = _get(model, self.spec.lm_head)
            self.embed = _get(model, self.spec.embed)
        except AttributeError as exc:
            raise SemalignError(
                f"model of type {model_type!r} has no module {exc.args[0]!r} expected by the "
                f"{self.spec.family!r} ArchSpec; fix the paths in semalign/models/arch.py"
            ) from None
        try:
            self.rotary: nn.Module | None = _get(model, self.spec.rotary)
        except AttributeError:
            self.rotary = None  # only the suffix runner (models/prefix.py) needs it, and says so
        text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
        self.config = text_cfg
        self.model_type = model_type
        self.num_layers: int = len(self.layers)
        self.hidden_size: int = int(text_cfg.hidden_size)
        self.intermediate_size: int = int(getattr(text_cfg, "intermediate_size", 0) or 0)
        self.num_heads: int = int(text_cfg.num_attention_heads)
        self.num_kv_heads: int = int(getattr(text_cfg, "num_key_value_heads", None) or self.num_heads)
        self.head_dim: int = int(getattr(text_cfg, "head_dim", None) or self.hidden_size // self.num_heads)
        self.vocab_size: int = int(self.lm_head.weight.shape[0])
        self.tied: bool = self.lm_head.weight is self.embed.weight or (
            self.lm_head.weight.device.type != "meta"
            and self.lm_head.weight.data_ptr() == self.embed.weight.data_ptr())

    # -- modules -------------------------------------------------------------------------------
    def layer(self, k: int) -> nn.Module:
        """Decoder block ``k`` (1-based)."""
        if not 1 <= k <= self.num_layers:
            raise SemalignError(f"layer {k} is out of range: this model has layers 1..{self.num_layers}")
        return self.layers[k - 1]

    def attn(self, k: int) -> nn.Module:
        return _get(self.layer(k), self.spec.attn)

    def mlp(self, k: int) -> nn.Module:
        return _get(self.layer(k), self.spec.mlp)

    def projection(self, k: int, name: str) -> nn.Linear:
        """A named projection (``q_proj`` ... ``down_proj``) of block ``k``."""
        if name in self.spec.attn_projs:
            return _get(self.attn(k), name)  # type: ignore[return-value]
        if name in self.spec.mlp_projs:
            return _get(self.mlp(k), name)  # type: ignore[return-value]
        raise SemalignError(
            f"unknown projection {name!r}; this architecture has "
            f"{', '.join(self.spec.attn_projs + self.spec.mlp_projs)}"
        )

    def projection_path(self, k: int, name: str) -> str:
        sub = self.spec.attn if name in self.spec.attn_projs else self.spec.mlp
        return f"{self.spec.layers}.{k - 1}.{sub}.{name}"

    @property
    def projection_names(self) -> tuple[str, ...]:
        return self.spec.attn_projs + self.spec.mlp_projs

    # -- weights ---------------------------------------------------------------------------------
    def lm_head_weight(self) -> torch.Tensor:
        return self.lm_head.weight

    def final_norm_gain(self) -> torch.Tensor | None:
        w = getattr(self.final_norm, "weight", None)
        if w is None:
            return None
        return w.detach().float() + self.spec.norm_offset

    @property
    def device(self) -> torch.device:
        return self.lm_head.weight.device

    def describe(self) -> dict:
        return {
            "model_type": self.model_type,
            "family": self.spec.family,
            "num_layers": self.num_layers,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_heads": self.num_heads,
            "num_kv_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab_size,
            "tied_embeddings": self.tied,
        }


def internals(model: nn.Module) -> Internals:
    """Resolve the internals of ``model`` (raises a one-line error for unsupported families)."""
    return Internals(model)
