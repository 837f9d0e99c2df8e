"""Offline tiny random model pairs for tests, demos and docs.

``tiny_tokenizer()`` trains a small byte-level BPE tokenizer in-process (deterministic, no downloads) with a
ChatML chat template. ``tiny_pair()`` builds a random teacher and a smaller student of the same family that
share that tokenizer, e.g. 4 layers x 64 wide -> 2 layers x 32 wide. ``save_tiny_pair()`` writes both as
stock Hugging Face directories so CLI tests can name them by path.
"""

from __future__ import annotations

from pathlib import Path

import torch

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

_QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>"]

_CORPUS = [
    "The following are multiple choice questions (with answers) about abstract algebra.",
    "Answer the following question. Question: Natalia sold clips to 48 of her friends in April.",
    "Complete the following python function. def add(a, b): return a + b",
    "The answer is: A B C D. So the answer is 42. Here is the completed function:",
    "def is_prime(n):\n    if n < 2:\n        return False\n    for i in range(2, n):\n        return True",
    "0123456789 + - * / = ( ) [ ] { } : , . ? ! ' \" # system user assistant",
]


def tiny_tokenizer(vocab_size: int = 384, corpus: list[str] | None = None):
    """A deterministic byte-level BPE ``PreTrainedTokenizerFast`` with ChatML specials and template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    # Qwen2's pre-tokenisation, so a saved copy reloads identically through the Qwen2Tokenizer class that
    # transformers picks for a qwen2 config.
    from tokenizers import Regex

    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator((corpus or _CORPUS) * 4, trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        bos_token=None,
        unk_token=None,
    )
    fast.chat_template = CHATML_TEMPLATE
    return fast


def _config(family: str, *, vocab_size: int, hidden: int, layers: int, heads: int, kv_heads: int,
            ffn: int, tie: bool, pad_id: int, eos_id: int):
    common = dict(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=ffn, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=1024,
        tie_word_embeddings=tie, pad_token_id=pad_id, eos_token_id=eos_id, bos_token_id=None,
    )
    if family == "qwen2":
        from transformers import Qwen2Config
        return Qwen2Config(**common)
    if family == "llama":
        from transformers import LlamaConfig
        return LlamaConfig(**common)
    if family == "gemma3":
        from transformers import Gemma3TextConfig
        return Gemma3TextConfig(**common, head_dim=hidden // heads, sliding_window=64)
    raise ValueError(f"unknown tiny family {family!r}; choose qwen2, llama or gemma3")


def tiny_model(family: str = "qwen2", *, tokenizer=None, hidden: int = 64, layers: int = 4, heads: int = 4,
               kv_heads: int = 2, ffn: int | None = None, tie: bool = False, seed: int = 0,
               vocab_size: int | None = None, **config_overrides):
    """One random causal LM whose vocabulary matches ``tokenizer`` (``config_overrides`` set config fields,
    e.g. ``layer_types`` / ``sliding_window`` for Gemma3)."""
    from transformers import AutoModelForCausalLM

    tokenizer = tokenizer or tiny_tokenizer()
    cfg = _config(
        family, vocab_size=vocab_size or len(tokenizer), hidden=hidden, layers=layers, heads=heads,
        kv_heads=kv_heads, ffn=ffn or hidden * 2, tie=tie, pad_id=tokenizer.pad_token_id,
        eos_id=tokenizer.eos_token_id,
    )
    for key, value in config_overrides.items():
        setattr(cfg, key, value)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model.eval()


def tiny_pair(family: str = "qwen2", *, teacher_layers: int = 4, student_layers: int = 2,
              teacher_hidden: int = 64, student_hidden: int = 32, seed: int = 0, tokenizer=None):
    """(teacher, student, tokenizer): same family and vocabulary, different depth and width."""
    tokenizer = tokenizer or tiny_tokenizer()
    teacher = tiny_model(family, tokenizer=tokenizer, hidden=teacher_hidden, layers=teacher_layers,
                         heads=4, kv_heads=2, seed=seed)
    student = tiny_model(family, tokenizer=tokenizer, hidden=student_hidden, layers=student_layers,
                         heads=4, kv_heads=2, seed=seed + 1)
    return teacher, student, tokenizer


def save_tiny_pair(root: Path, family: str = "qwen2", **kwargs) -> tuple[Path, Path]:
    """Write a tiny teacher and student as HF directories under ``root``; returns their paths."""
    teacher, student, tok = tiny_pair(family, **kwargs)
    root = Path(root)
    paths = []
    for name, model in (("teacher", teacher), ("student", student)):
        out = root / name
        model.save_pretrained(out)
        tok.save_pretrained(out)
        paths.append(out)
    return paths[0], paths[1]

