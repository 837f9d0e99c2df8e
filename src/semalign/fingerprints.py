"""Content hashes that key the stage cache: examples, tokenizers, tensors and model specs.

Each returns a hex SHA-256 (or ``None`` where no stable hash exists, e.g. a hub model that is not on disk, in
which case callers skip the cache).
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Any, Iterable

log = logging.getLogger(__name__)


def examples_hash(examples: Iterable[dict]) -> str:
    """Order-sensitive hash of the ids and messages of protocol examples."""
    h = hashlib.sha256()
    for e in examples:
        h.update(json.dumps({"id": e.get("id"), "messages": e.get("messages")}, sort_keys=True,
                            ensure_ascii=False, default=str).encode("utf-8"))
        h.update(b"\x00")
    return h.hexdigest()


def example_hash(example: dict) -> str:
    return examples_hash([example])


def tokenizer_hash(tok: Any) -> str:
    """Hash of what decides how a tokenizer renders text: its class, vocabulary/merges, specials, chat template."""
    h = hashlib.sha256()
    h.update(type(tok).__name__.encode())
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None and hasattr(backend, "to_str"):
        h.update(backend.to_str().encode("utf-8"))
    else:
        vocab = tok.get_vocab() if hasattr(tok, "get_vocab") else {}
        h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode("utf-8"))
    extra = {"chat_template": getattr(tok, "chat_template", None), "bos": getattr(tok, "bos_token_id", None),
             "eos": getattr(tok, "eos_token_id", None), "pad": getattr(tok, "pad_token_id", None)}
    h.update(json.dumps(extra, sort_keys=True, default=str).encode("utf-8"))
    return h.hexdigest()


def tensor_hash(t) -> str:
    """Hash of a tensor's dtype, shape and bytes."""
    import torch

    h = hashlib.sha256()
    t = t.detach().cpu().contiguous()
    h.update(f"{t.dtype}:{tuple(t.shape)}".encode())
    if t.numel():
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def model_key(spec: Any = None, *, path: str | None = None, model: Any = None) -> str | None:
    """The content hash of a model for cache keys: of its files (``path``, or ``spec``: a model spec or a
    ``ResolvedModel``; cached in a
    sidecar, so instant after the first call), else of a live ``model``'s state dict; ``None`` when neither works
    (a hub model), which means "do not cache"."""
    from .models.load import ResolvedModel, model_content_hash, resolve_model

    try:
        if path is not None:
            return model_content_hash(path)
        if spec is not None:
            rm = spec if isinstance(spec, ResolvedModel) else resolve_model(spec, fetch=False)
            if rm.kind != "hub":
                return model_content_hash(rm)
    except Exception as e:  # noqa: BLE001 - caching is an optimisation only
        log.debug("no file content hash for %s (%s)", spec or path, e)
    if model is not None:
        return model_content_hash(model)
    return None
