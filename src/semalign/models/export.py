"""Export a transferred student as a stock Hugging Face checkpoint, and verify the round trip."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """Fold PEFT adapters into the base weights (no-op for plain models)."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover
        return model
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    return model


def export_student(model: torch.nn.Module, tokenizer, out_dir: Path, *, card: str | None = None,
                   dtype: torch.dtype | None = None) -> Path:
    """Merge adapters and write ``out_dir`` atomically (safetensors, config, tokenizer, README model card).

    Trainable layers are kept in float32 during transfer; the export keeps every tensor's dtype unless
    ``dtype`` is given, so small updates are not rounded away.
    """
    from .save import save_model_dir

    base = merged(model)
    if dtype is not None:
        base = base.to(dtype)
    for p in base.parameters():
        p.requires_grad_(False)
    # A uniform dtype keeps `from_pretrained(dtype="auto")` faithful to what was trained.
    dtypes = {p.dtype for p in base.parameters()}
    if len(dtypes) > 1:
        base = base.to(torch.float32)
    base.config.dtype = next(iter({p.dtype for p in base.parameters()}))
    out = save_model_dir(base, tokenizer, out_dir)
    if card:
        (Path(out) / "README.md").write_text(card)
    return Path(out)


@torch.no_grad()
def roundtrip_check(model: torch.nn.Module, path: Path, batch: dict[str, torch.Tensor]) -> dict:
    """Reload ``path`` with stock ``AutoModelForCausalLM`` and compare logits with the in-memory model (fp32)."""
    from transformers import AutoModelForCausalLM

    base = merged(model)
    dev = next(base.parameters()).device
    reloaded = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto").to(dev).eval()
    was = base.training
    base.eval()
    kw = {"input_ids": batch["input_ids"].to(dev), "attention_mask": batch["attention_mask"].to(dev)}
    a = base(**kw).logits.float()
    b = reloaded(**kw).logits.float()
    base.train(was)
    diff = float((a - b).abs().max())
    del reloaded
    return {"max_abs_logit_diff": diff, "equal": bool(diff <= 1e-4 * max(1.0, float(a.abs().max()))),
            "reloaded_class": "AutoModelForCausalLM"}
