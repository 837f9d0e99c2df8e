"""Saving models as stock Hugging Face safetensors directories (GGUF-loaded ones too) and the GGUF loading kwargs.

This module sits below both :mod:`.load` (resolving and loading specs) and :mod:`.assets` (fetching and converting
the offline models), so neither imports the other's internals: ``load -> assets -> save``.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path
from typing import Any

from ..errors import SemalignError
from ..faults import fault_point
from ..paths import atomic_dir, os_error_from


def gguf_dense_kwargs() -> dict[str, Any]:
    """``from_pretrained`` kwargs that unpack GGUF weights into plain dense tensors.

    Newer transformers can keep GGUF blocks packed (when the ``kernels`` package is present); SemAlign needs
    ordinary trainable, savable weights. Older versions (5.17) always dequantize and lack ``GgufConfig``.
    """
    try:
        from transformers import GgufConfig  # type: ignore[attr-defined]
    except ImportError:
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def is_gguf_loaded(model: Any) -> bool:
    qc = getattr(model.config, "quantization_config", None)
    method = qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)
    return str(getattr(method, "value", method)) == "gguf"


def relax_permissions(root: Path) -> None:
    """Give temp-created dirs/files (0700/0600) the modes the umask would have given normal ones."""
    mask = os.umask(0)
    os.umask(mask)
    for p in [root, *root.rglob("*")]:
        with contextlib.suppress(OSError):
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)


def _save_into(model: Any, tokenizer: Any, out: Path) -> None:
    if is_gguf_loaded(model):
        import torch

        if any(not (p.dtype.is_floating_point or p.dtype == torch.bool) for p in model.parameters()):
            raise SemalignError("this model keeps packed (quantized) GGUF weights and cannot be saved densely; "
                                "load it through semalign.models.load.load_model, which unpacks them")
        # save_pretrained refuses GGUF-loaded models: save the tensors directly (assets.md §2.4)
        from safetensors.torch import save_model

        cfg = copy.deepcopy(model.config)
        if hasattr(cfg, "quantization_config"):
            del cfg.quantization_config
        first = next(model.parameters(), None)
        if first is not None:
            cfg.dtype = first.dtype
        save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
        cfg.save_pretrained(out)
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(out)
    else:
        model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    relax_permissions(out)


def save_model_dir(model: Any, tokenizer: Any, out_dir: str | os.PathLike[str], *, atomic: bool = True) -> Path:
    """Save ``model`` (+ ``tokenizer``) as a safetensors HF directory; works for GGUF-loaded models too.

    With ``atomic`` the directory appears complete or not at all (an existing one is replaced).
    """
    out = Path(out_dir)
    if not atomic:
        out.mkdir(parents=True, exist_ok=True)
        _save_into(model, tokenizer, out)
        return out
    with atomic_dir(out) as tmp:
        try:
            _save_into(model, tokenizer, tmp)
        except Exception as exc:  # a full disk inside safetensors arrives as SafetensorError
            oserr = os_error_from(exc, out)
            if oserr is None or oserr is exc:
                raise
            raise oserr from exc
        fault_point("export")
    return out


def safetensors_problem(path: Path) -> str | None:
    """``None`` when ``path`` is a structurally complete safetensors file, else what is wrong (cheap: header only)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return f"{path.name} is truncated ({size} bytes)"
            n = int.from_bytes(head, "little")
            if n <= 0 or 8 + n > size:
                return f"{path.name} is truncated or not a safetensors file (header of {n} bytes, file {size} bytes)"
            header = json.loads(f.read(n))
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
    except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
        return f"{path.name} is not a readable safetensors file ({type(exc).__name__})"
    if 8 + n + end > size:
        return f"{path.name} is truncated ({size} of {8 + n + end} bytes)"
    return None
