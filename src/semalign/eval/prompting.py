"""Rendering evaluation prompts: the tokenizer's chat template, the Tulu fallback, or plain text.

Every task builds a user message (the protocol prompt) and an *assistant prefix* (text the answer is forced to
start with, e.g. ``"The answer is:"`` for MMLU). The prompt is rendered as text and tokenised once with
``add_special_tokens=False`` (the rendered text already holds any BOS/turn markers), so the token boundary between
the prefix and the model's continuation is the same as in the training data.

Modes (recorded in every result as ``chat_format``):

* ``tokenizer``: ``apply_chat_template([user], add_generation_prompt=True)`` + prefix (Qwen's template adds its
  default system message);
* ``tulu``: ``<|user|>\\n{user}\\n<|assistant|>\\n`` + prefix (the format LaTen trains with), BOS first if any;
* ``plain``: the user text followed by the task's plain-text prefix (non-chat, for base models);
* ``auto``: ``tokenizer`` when the tokenizer has a chat template, otherwise ``tulu``.
"""

from __future__ import annotations

import hashlib

from ..data.prompts import has_chat_template, tulu_format
from ..errors import SemalignError

CHAT_FORMATS = ("auto", "tokenizer", "tulu", "plain")


def resolve_chat_format(tokenizer, chat_format: str | None = "auto") -> str:
    fmt = (chat_format or "auto").strip().lower()
    if fmt not in CHAT_FORMATS:
        raise SemalignError(f"unknown chat format {chat_format!r}; use one of {', '.join(CHAT_FORMATS)}")
    if fmt == "auto":
        return "tokenizer" if has_chat_template(tokenizer) else "tulu"
    if fmt == "tokenizer" and not has_chat_template(tokenizer):
        raise SemalignError("--chat-format tokenizer was requested but the tokenizer has no chat template; "
                            "use --chat-format tulu or plain")
    return fmt


def render(tokenizer, user: str, assistant_prefix: str, chat_format: str, *, plain_prefix: str | None = None) -> str:
    """The full prompt text for one example (``chat_format`` must already be resolved)."""
    messages = [{"role": "user", "content": user}]
    if chat_format == "tokenizer":
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return str(text) + assistant_prefix
    if chat_format == "tulu":
        bos = tokenizer.bos_token or ""
        return bos + tulu_format(messages, True) + assistant_prefix
    if chat_format == "plain":
        bos = tokenizer.bos_token or ""
        return bos + user + (plain_prefix if plain_prefix is not None else "")
    raise SemalignError(f"chat format {chat_format!r} is not resolved; call resolve_chat_format first")


def encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def format_info(tokenizer, chat_format: str) -> dict:
    """What was used to render prompts (score-affecting, recorded in results)."""
    info: dict = {"chat_format": chat_format}
    if chat_format == "tokenizer":
        tpl = tokenizer.chat_template
        tpl = tpl if isinstance(tpl, str) else repr(tpl)
        info["chat_template_sha256"] = hashlib.sha256(tpl.encode()).hexdigest()[:16]
    return info
