"""Rendering chat examples to token ids with answer-span label masking.

The tokenizer's own chat template is used when it has one; otherwise the documented Tulu fallback
(``<|user|>\\n{user}\\n<|assistant|>\\n{answer}{eos}``, the format LaTen trains with). Labels are -100 on
prompt tokens unless ``train_on_inputs`` (MMLU, where the answer is one letter).
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)

IGNORE = -100


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def tulu_format(messages: list[dict], add_generation_prompt: bool) -> str:
    out = []
    for m in messages:
        out.append(f"<|{m['role']}|>\n{m['content'].strip()}\n")
    text = "".join(out)
    if add_generation_prompt:
        text += "<|assistant|>\n"
    return text


def _ids(enc) -> list[int]:
    if hasattr(enc, "keys"):
        enc = enc["input_ids"]
    return list(enc)


def prompt_ids(tokenizer, messages: list[dict], *, use_chat_template: bool | None = None) -> list[int]:
    """Token ids of the prompt (all messages but the last assistant turn) ready for generation."""
    use = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if use:
        return _ids(tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True))
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    return bos + tokenizer(tulu_format(messages, True), add_special_tokens=False)["input_ids"]


def render_example(tokenizer, example: dict, *, max_length: int = 768, train_on_inputs: bool = False,
                   use_chat_template: bool | None = None) -> dict:
    """``{"input_ids", "labels"}`` for one protocol example (truncated from the right to ``max_length``)."""
    messages = example["messages"]
    prompt, answer = messages[:-1], messages[-1]["content"]
    p_ids = prompt_ids(tokenizer, prompt, use_chat_template=use_chat_template)
    use = has_chat_template(tokenizer) if use_chat_template is None else use_chat_template
    if use:
        full = _ids(tokenizer.apply_chat_template(messages, tokenize=True))
        if full[: len(p_ids)] != p_ids:
            # Templates that rewrite earlier turns: fall back to prompt ids + answer ids.
            eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
            full = p_ids + tokenizer(answer, add_special_tokens=False)["input_ids"] + eos
        else:
            # Drop a trailing newline after the end-of-turn token, which is not part of the answer.
            while len(full) > len(p_ids) + 1 and tokenizer.decode(full[-1:]).strip() == "":
                full = full[:-1]
    else:
        eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        full = p_ids + tokenizer(answer.strip(), add_special_tokens=False)["input_ids"] + eos
    labels = list(full) if train_on_inputs else [IGNORE] * len(p_ids) + full[len(p_ids):]
    full, labels = full[:max_length], labels[:max_length]
    return {"input_ids": full, "labels": labels}


def collate(batch: list[dict], pad_id: int, *, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pad a list of rendered examples to a batch (labels padded with -100, attention mask 0)."""
    n = max(len(b["input_ids"]) for b in batch)
    ids = torch.full((len(batch), n), pad_id, dtype=torch.long)
    lab = torch.full((len(batch), n), IGNORE, dtype=torch.long)
    att = torch.zeros((len(batch), n), dtype=torch.long)
    for i, b in enumerate(batch):
        L = len(b["input_ids"])
        sl = slice(0, L) if padding_side == "right" else slice(n - L, n)
        ids[i, sl] = torch.tensor(b["input_ids"])
        lab[i, sl] = torch.tensor(b["labels"])
        att[i, sl] = 1
    return {"input_ids": ids, "labels": lab, "attention_mask": att}


def pad_id_of(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    return 0


def batches(tokenizer, examples: list[dict], batch_size: int, *, max_length: int = 768,
            train_on_inputs: bool = False) -> list[dict[str, torch.Tensor]]:
    """Render and collate ``examples`` in order into batches of ``batch_size``."""
    rendered = [render_example(tokenizer, e, max_length=max_length, train_on_inputs=train_on_inputs) for e in examples]
    pad = pad_id_of(tokenizer)
    return [collate(rendered[i:i + batch_size], pad) for i in range(0, len(rendered), batch_size)]


def budget_batches(tokenizer, examples: list[dict], *, max_examples: int, max_tokens: int, max_length: int = 768,
                   train_on_inputs: bool = False) -> tuple[list[dict[str, torch.Tensor]], list[int]]:
    """Length-sorted batches of at most ``max_examples`` examples and ``max_tokens`` padded tokens (a lone longer
    example gets its own batch). Returns ``(batches, order)``: ``order[j]`` is the input index of the j-th example
    across the batches, so per-example results can be put back in input order."""
    rendered = [render_example(tokenizer, e, max_length=max_length, train_on_inputs=train_on_inputs) for e in examples]
    order = sorted(range(len(rendered)), key=lambda i: (-len(rendered[i]["input_ids"]), i))
    pad = pad_id_of(tokenizer)
    out, cur, placed = [], [], []
    for i in order:
        width = len(rendered[cur[0]]["input_ids"]) if cur else len(rendered[i]["input_ids"])
        if cur and (len(cur) >= max_examples or (len(cur) + 1) * width > max_tokens):
            out.append(collate([rendered[j] for j in cur], pad))
            placed += cur
            cur = []
        cur.append(i)
    if cur:
        out.append(collate([rendered[j] for j in cur], pad))
        placed += cur
    return out, placed
