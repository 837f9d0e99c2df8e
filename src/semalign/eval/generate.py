"""Batched generation with a KV cache, left padding, length bucketing and per-sequence stopping.

A small decoding loop instead of ``model.generate``: prompts are sorted by length (so a batch holds prompts of
similar length and little padding), left padded, prefilled, then decoded one token per step with the model's
``DynamicCache``. A sequence that hits an end-of-sequence token, a stop string or its token budget leaves the batch
at once (its rows are dropped from the cache), and waiting prompts are prefilled and merged into the running batch
(their key/value states left-padded to the batch width), so the batch stays full and one long answer does not
leave the machine decoding a single row. Cache columns no remaining row attends to are dropped.

Greedy decoding by default. With ``temperature > 0`` each request samples from its own seeded generator, so a
request's sample does not depend on which other requests share its batch (up to floating-point effects of
batching, see docs/evaluation.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Sequence

import torch

from ..data.prompts import pad_id_of

log = logging.getLogger(__name__)

EXTRA_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>", "<|eot_id|>", "<end_of_turn>", "</s>", "<|end|>")


@dataclass
class GenOutput:
    text: str
    token_ids: list[int]
    finish: str  # eos | stop | length
    n_prompt: int


@dataclass
class GenStats:
    requests: int = 0
    batches: int = 0
    new_tokens: int = 0
    prompt_tokens: int = 0
    wall_s: float = 0.0
    batch_size: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        return self.new_tokens / self.wall_s if self.wall_s > 0 else 0.0

    def to_dict(self) -> dict:
        return {"requests": self.requests, "batches": self.batches, "batch_size": self.batch_size,
                "new_tokens": self.new_tokens, "prompt_tokens": self.prompt_tokens, "wall_s": round(self.wall_s, 3),
                "tokens_per_s": round(self.tokens_per_s, 2), **self.extra}


def model_device(model) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:  # pragma: no cover
        return torch.device("cpu")


def eos_token_ids(model, tokenizer) -> set[int]:
    """End-of-sequence ids: the tokenizer's, the generation config's, and known end-of-turn tokens in the vocab."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gc = getattr(model, "generation_config", None)
    e = getattr(gc, "eos_token_id", None) if gc is not None else None
    if isinstance(e, int):
        ids.add(e)
    elif isinstance(e, (list, tuple)):
        ids.update(int(x) for x in e)
    vocab = tokenizer.get_vocab()
    for t in EXTRA_EOS_TOKENS:
        if t in vocab:
            ids.add(int(vocab[t]))
    return ids


def auto_batch_size(model, max_total_len: int, n: int) -> int:
    """Batch size for ``batch_size='auto'``: 16 on CPU (decode becomes compute-bound), 64 on GPU, less for long
    sequences (a token budget keeps the KV cache and the prefill activations bounded)."""
    dev = model_device(model)
    cap, budget = (64, 262144) if dev.type == "cuda" else (16, 32768)
    return max(1, min(cap, n, budget // max(1, max_total_len)))


def forward_last(model, input_ids, attention_mask, position_ids, n_keep: int = 1, **kw):
    """Forward computing logits only for the last ``n_keep`` positions (when the model supports it)."""
    try:
        return model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                     logits_to_keep=n_keep, **kw)
    except TypeError:  # custom models without logits_to_keep
        out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, **kw)
        out.logits = out.logits[:, -n_keep:]
        return out


def left_pad(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask, position_ids) for left-padded ``seqs``."""
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, n - len(s):] = torch.tensor(list(s), dtype=torch.long)
            att[i, n - len(s):] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), att.to(device), pos.to(device)


def _pick(logits: torch.Tensor, temperature: float, top_p: float, gens: list[torch.Generator] | None) -> torch.Tensor:
    if temperature <= 0 or gens is None:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, -1)
    if top_p < 1.0:
        sp, si = probs.sort(-1, descending=True)
        drop = sp.cumsum(-1) - sp > top_p
        sp = sp.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, si, sp)
    out = torch.empty(probs.shape[0], dtype=torch.long)
    cpu = probs.cpu()
    for r in range(cpu.shape[0]):
        out[r] = torch.multinomial(cpu[r], 1, generator=gens[r])[0]
    return out.to(logits.device)


def _stop_hit(tokenizer, toks: list[int], stop: Sequence[str], window: int) -> bool:
    tail = tokenizer.decode(toks[-window:], skip_special_tokens=False)
    return any(s in tail for s in stop)


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
    """``text`` up to (not including) the earliest stop string."""
    cut = len(text)
    for s in stop:
        i = text.find(s)
        if i != -1:
            cut = min(cut, i)
    return text[:cut]


def _plain_layers(cache) -> bool:
    """True when every cache layer is a plain growing ``DynamicLayer`` (rows can be merged and columns trimmed)."""
    try:
        from transformers.cache_utils import DynamicLayer
    except ImportError:  # pragma: no cover
        return False
    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer and getattr(layer, "keys", None) is not None
                                and layer.keys.dim() == 4 for layer in layers)


def _merge_rows(cache, new_cache, width: int) -> None:
    """Append ``new_cache``'s rows to ``cache``, left-padding their (shorter) key/value states with zeros."""
    for old, new in zip(cache.layers, new_cache.layers):
        pad = width - new.keys.shape[-2]
        k, v = new.keys, new.values
        if pad > 0:
            k = torch.nn.functional.pad(k, (0, 0, pad, 0))
            v = torch.nn.functional.pad(v, (0, 0, pad, 0))
        old.keys = torch.cat([old.keys, k], dim=0)
        old.values = torch.cat([old.values, v], dim=0)


def _trim_left(cache, attn: torch.Tensor) -> torch.Tensor:
    """Drop leading cache columns that no remaining row attends to (padding of rows that have left)."""
    used = attn.sum(0) > 0
    first = int(used.nonzero()[0]) if bool(used.any()) else 0
    if first == 0:
        return attn
    for layer in cache.layers:
        layer.keys = layer.keys[:, :, first:]
        layer.values = layer.values[:, :, first:]
    return attn[:, first:]


@torch.inference_mode()
def _run_stream(model, tokenizer, prompts: list[list[int]], seeds: list[int], *, batch_size: int, pad_id: int,
                eos: set[int], stop: Sequence[str], max_new_tokens: int, temperature: float, top_p: float,
                on_finish: Callable[[], None] | None, stop_fn: Callable[[str], bool] | None,
                stats: GenStats | None, refill: bool = True) -> list[GenOutput]:
    """Decode ``prompts`` (sorted longest first) with at most ``batch_size`` rows in flight.

    When rows finish, waiting prompts are prefilled and merged into the running batch (their key/value states
    left-padded to the batch width), so the batch stays full; leading cache columns nobody attends to are dropped.
    Falls back to plain static batches for caches with sliding-window or other special layers.
    """
    dev = model_device(model)
    n = len(prompts)
    pending = list(range(n))
    gens: list[list[int]] = [[] for _ in prompts]
    finish = ["length"] * n
    window = 2 * max((len(s) for s in stop), default=0) + 4
    rngs = [torch.Generator().manual_seed(int(s)) for s in seeds] if temperature > 0 else None
    refill_at = max(1, batch_size // 4)

    def admit(k: int):
        new = pending[:k]
        del pending[:k]
        ids, att, pos = left_pad([prompts[i] for i in new], pad_id, dev)
        out = forward_last(model, ids, att, pos, 1, use_cache=True)
        if stats is not None:
            stats.batches += 1
        return new, out.past_key_values, att, att.sum(-1), out.logits[:, -1, :]

    rows, cache, attn, next_pos, logits = admit(batch_size)
    mergeable = refill and _plain_layers(cache)
    while True:
        free = batch_size - len(rows)
        if mergeable and pending and free >= refill_at and len(prompts[pending[0]]) <= attn.shape[1]:
            new, ncache, natt, npos, nlogits = admit(free)  # same model, so the same plain cache layout
            width = attn.shape[1]
            _merge_rows(cache, ncache, width)
            attn = torch.cat([attn, torch.nn.functional.pad(natt, (width - natt.shape[1], 0))], dim=0)
            next_pos = torch.cat([next_pos, npos])
            logits = torch.cat([logits, nlogits])
            rows = rows + new
        tok = _pick(logits, temperature, top_p, [rngs[i] for i in rows] if rngs else None)
        tok_list = tok.tolist()
        keep = []
        for j, i in enumerate(rows):
            t = tok_list[j]
            if t in eos:
                finish[i] = "eos"
            else:
                gens[i].append(t)
                if stop and _stop_hit(tokenizer, gens[i], stop, window):
                    finish[i] = "stop"
                elif stop_fn is not None and stop_fn(tokenizer.decode(gens[i], skip_special_tokens=True)):
                    finish[i] = "stop"
                elif len(gens[i]) < max_new_tokens:
                    keep.append(j)
                    continue
            if on_finish:
                on_finish()
        if not keep:
            if not pending:
                break
            rows, cache, attn, next_pos, logits = admit(batch_size)
            mergeable = refill and _plain_layers(cache)
            continue
        if len(keep) < len(rows):
            idx = torch.tensor(keep, device=dev)
            cache.batch_select_indices(idx)
            attn, next_pos, tok = attn[idx], next_pos[idx], tok[idx]
            rows = [rows[j] for j in keep]
            if mergeable:
                attn = _trim_left(cache, attn)
        attn = torch.cat([attn, attn.new_ones((len(rows), 1))], dim=1)
        out = model(input_ids=tok[:, None], attention_mask=attn, position_ids=next_pos[:, None],
                    past_key_values=cache, use_cache=True)
        cache = out.past_key_values
        next_pos = next_pos + 1
        logits = out.logits[:, -1, :]
    results = []
    for i, p in enumerate(prompts):
        text = tokenizer.decode(gens[i], skip_special_tokens=True)
        if finish[i] == "stop" and stop:
            text = cut_at_stop(text, stop)
        results.append(GenOutput(text, gens[i], finish[i], len(p)))
    return results


def generate(model, tokenizer, prompts: Sequence[Sequence[int]], *, max_new_tokens: int = 512,
             batch_size: int | str = "auto", stop: Sequence[str] = (), temperature: float = 0.0, top_p: float = 1.0,
             seeds: Sequence[int] | None = None, on_finish: Callable[[], None] | None = None,
             stats: GenStats | None = None, stop_fn: Callable[[str], bool] | None = None,
             ignore_eos: bool = False, refill: bool = True) -> list[GenOutput]:
    """Generate a continuation for each prompt (token ids). Returns outputs in the order of ``prompts``.

    ``stop`` strings end a sequence (they are cut from the returned text); end-of-sequence tokens always do.
    ``stop_fn(text_so_far)`` returning True also ends a sequence (the text is kept whole).
    ``seeds`` (one per prompt) seed sampling when ``temperature > 0``. ``ignore_eos`` (benchmarks only) generates
    exactly ``max_new_tokens`` per prompt. ``refill=False`` runs static batches (for benchmarking the refill).
    """
    n = len(prompts)
    if n == 0:
        return []
    if max_new_tokens < 1:
        raise ValueError("max_new_tokens must be >= 1")
    pad_id = pad_id_of(tokenizer)
    eos = set() if ignore_eos else eos_token_ids(model, tokenizer)
    seeds = list(seeds) if seeds is not None else list(range(n))
    order = sorted(range(n), key=lambda i: (-len(prompts[i]), i))  # length buckets, longest first
    max_len = max(len(p) for p in prompts) + max_new_tokens
    bs = auto_batch_size(model, max_len, n) if batch_size in ("auto", None, 0) else max(1, int(batch_size))
    t0 = time.perf_counter()
    was_training = model.training
    model.eval()
    try:
        res = _run_stream(model, tokenizer, [list(prompts[i]) for i in order], [seeds[i] for i in order],
                          batch_size=bs, pad_id=pad_id, eos=eos, stop=stop, max_new_tokens=max_new_tokens,
                          temperature=temperature, top_p=top_p, on_finish=on_finish, stop_fn=stop_fn, stats=stats,
                          refill=refill)
    finally:
        model.train(was_training)
    outputs: list[GenOutput | None] = [None] * n
    for i, r in zip(order, res):
        outputs[i] = r
    if stats is not None:
        stats.requests += n
        stats.batch_size = bs
        stats.new_tokens += sum(len(o.token_ids) for o in outputs if o)
        stats.prompt_tokens += sum(len(p) for p in prompts)
        stats.wall_s += time.perf_counter() - t0
    return [o for o in outputs if o is not None]
