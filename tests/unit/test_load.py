"""Model spec resolution, loading, saving (incl. GGUF-loaded models) and content hashing, on tiny random models."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast, Qwen2Config

from semalign.errors import SemalignError
from semalign.models import assets, load
from semalign.models.load import (
    ResolvedModel,
    load_model,
    load_tokenizer,
    model_content_hash,
    resolve_device,
    resolve_dtype,
    resolve_model,
    save_model_dir,
)

VOCAB = 128


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def tiny_model(kind: str = "llama") -> torch.nn.Module:
    torch.manual_seed(0)
    common = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                  "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}
    cfg = LlamaConfig(**common) if kind == "llama" else Qwen2Config(**common)
    return AutoModelForCausalLM.from_config(cfg).eval()


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor([[1, 5, 9, 17, 33]])).logits.float()


def write_tiny_gguf(path: Path) -> Path:
    """A tiny random qwen2 GGUF (F32) with a byte-level vocabulary, loadable by transformers."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    path.parent.mkdir(parents=True, exist_ok=True)
    vocab, hidden, ffn, kv_dim = 300, 32, 64, 16
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2")
    for fn, v in [(w.add_context_length, 64), (w.add_embedding_length, hidden), (w.add_block_count, 1),
                  (w.add_feed_forward_length, ffn), (w.add_head_count, 4), (w.add_head_count_kv, 2),
                  (w.add_rope_freq_base, 10000.0), (w.add_layer_norm_rms_eps, 1e-6), (w.add_file_type, 0)]:
        fn(v)
    b2u = bytes_to_unicode()
    toks = [b2u[i] for i in range(256)] + ["Ġt"] + [f"t{i}" for i in range(257, vocab - 2)]
    toks += ["<|endoftext|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(toks)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges(["Ġ t"])
    w.add_eos_token_id(vocab - 1)
    shapes = {"token_embd.weight": (vocab, hidden), "output.weight": (vocab, hidden), "output_norm.weight": (hidden,),
              "blk.0.attn_norm.weight": (hidden,), "blk.0.ffn_norm.weight": (hidden,),
              "blk.0.attn_q.weight": (hidden, hidden), "blk.0.attn_q.bias": (hidden,),
              "blk.0.attn_k.weight": (kv_dim, hidden), "blk.0.attn_k.bias": (kv_dim,),
              "blk.0.attn_v.weight": (kv_dim, hidden), "blk.0.attn_v.bias": (kv_dim,),
              "blk.0.attn_output.weight": (hidden, hidden), "blk.0.ffn_gate.weight": (ffn, hidden),
              "blk.0.ffn_up.weight": (ffn, hidden), "blk.0.ffn_down.weight": (hidden, ffn)}
    for name, shape in shapes.items():
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def local_dir(tmp_path) -> Path:
    return save_model_dir(tiny_model("llama"), tiny_tokenizer(), tmp_path / "tiny-llama")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMALIGN_CACHE", str(tmp_path / "cache"))


# ------------------------------------------------------------------------------------------------ resolve


def test_resolve_local_and_run_dir(local_dir, tmp_path):
    rm = resolve_model(str(local_dir))
    assert rm.kind == "local" and rm.path == str(local_dir) and rm.gguf_file is None
    run = tmp_path / "runs" / "r1"
    save_model_dir(tiny_model("qwen2"), tiny_tokenizer(), run / "student")
    rm = resolve_model(run)
    assert rm.kind == "run" and rm.path == str(run / "student") and rm.display_name == "r1/student"


def test_resolve_gguf_file_and_dir(tmp_path):
    g = write_tiny_gguf(tmp_path / "g" / "tiny.gguf")
    assert resolve_model(g) == ResolvedModel("gguf", str(g.parent), "tiny.gguf", "tiny", str(g))
    assert resolve_model(g.parent).gguf_file == "tiny.gguf"


def test_resolve_errors(tmp_path):
    expected = (r"unknown model 'nonsense': not an asset name \(see `semalign assets list`\), not a directory with "
                r"config.json, not a .gguf file, not a hub id")
    with pytest.raises(SemalignError, match=expected):
        resolve_model("nonsense")
    with pytest.raises(SemalignError, match="Did you mean 'qwen2.5-coder-0.5b-instruct'"):
        resolve_model("qwen2.5-coder-0.5b-instruc")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SemalignError, match="has no config.json"):
        resolve_model(tmp_path / "empty")
    (tmp_path / "x.bin").write_bytes(b"")
    with pytest.raises(SemalignError, match="not a .gguf"):
        resolve_model(tmp_path / "x.bin")


def test_resolve_asset_fetches_when_missing(tmp_path, monkeypatch):
    calls = []
    target = tmp_path / "fetched"
    monkeypatch.setattr(assets, "asset_dir", lambda name, verify=False: None)
    monkeypatch.setattr(assets, "fetch_asset", lambda name, **kw: calls.append(name) or target)
    rm = resolve_model("smollm2-135m-instruct")
    assert rm == ResolvedModel("asset", str(target), None, "smollm2-135m-instruct", "smollm2-135m-instruct")
    assert calls == ["smollm2-135m-instruct"]
    with pytest.raises(SemalignError, match="not fetched yet"):
        resolve_model("smollm2-135m-instruct", fetch=False)


def test_hub_id_offline_error_lists_assets(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    rm = resolve_model("someone/tiny-model-that-does-not-exist")
    assert rm.kind == "hub" and rm.path == "someone/tiny-model-that-does-not-exist"
    with pytest.raises(SemalignError) as e:
        load_model(rm, dtype="fp32", device="cpu")
    msg = str(e.value)
    assert "hub" in msg and "unreachable" in msg and "semalign assets list" in msg
    assert all(name in msg for name in assets.ASSETS.names()) and "\n" not in msg
    with pytest.raises(SemalignError, match="unreachable"):
        load_tokenizer("someone/tiny-model-that-does-not-exist")


# ------------------------------------------------------------------------------------------------ dtype / device


def test_dtype_and_device():
    assert resolve_dtype("bf16") is torch.bfloat16 and resolve_dtype("fp32") is torch.float32
    assert resolve_dtype("fp16") is torch.float16 and resolve_dtype("stored") == "auto"
    from semalign.models.precision import native_compute_dtype

    want = torch.bfloat16 if native_compute_dtype("cpu") == "bf16" else torch.float32
    assert resolve_dtype("auto", "cpu") is want
    with pytest.raises(SemalignError, match="unknown dtype 'int3'"):
        resolve_dtype("int3")
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(SemalignError, match="unknown device"):
        resolve_device("toaster")
    if not torch.cuda.is_available():
        with pytest.raises(SemalignError, match="CUDA is not available"):
            resolve_device("cuda:0")


# ------------------------------------------------------------------------------------------------ load / save


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_save_load_round_trip_equal_logits(kind, tmp_path):
    model, tok = tiny_model(kind), tiny_tokenizer()
    out = save_model_dir(model, tok, tmp_path / kind)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp dirs left
    m2, t2, rm = load_model(out, dtype="fp32", device="cpu")
    assert rm.kind == "local" and not m2.training and m2.dtype == torch.float32
    assert torch.equal(logits(model), logits(m2))
    if kind == "llama":  # transformers 5 re-reads a generic tokenizer saved beside a qwen2 config as Qwen2Tokenizer
        assert t2("w5 w9").input_ids == tok("w5 w9").input_ids
    m3, _, _ = load_model(out, dtype="bf16", device="cpu", with_tokenizer=False)
    assert m3.dtype == torch.bfloat16


def test_gguf_load_and_save(tmp_path):
    g = write_tiny_gguf(tmp_path / "tiny.gguf")
    model, tok, rm = load_model(g, dtype="fp32", device="cpu")
    assert rm.kind == "gguf" and type(model).__name__ == "Qwen2ForCausalLM" and len(tok) == 300
    out = save_model_dir(model, tok, tmp_path / "saved")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "float32"
    m2, t2, _ = load_model(out, dtype="fp32", device="cpu")
    assert torch.equal(logits(model), logits(m2))
    assert t2("hello world").input_ids == tok("hello world").input_ids


def test_save_workaround_for_plain_gguf_load(tmp_path):
    """A model loaded with a bare ``gguf_file=`` keeps its GGUF quantization_config and refuses save_pretrained."""
    g = write_tiny_gguf(tmp_path / "tiny.gguf")
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file=g.name, dtype=torch.float32).eval()
    assert load._is_gguf_loaded(model)
    out = save_model_dir(model, load_tokenizer(g), tmp_path / "saved")
    assert hasattr(model.config, "quantization_config")  # the caller's model is left as it was
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    m2, _, _ = load_model(out, dtype="fp32", device="cpu")
    assert torch.equal(logits(model), logits(m2))


def test_save_model_dir_replaces_atomically(local_dir):
    (local_dir / "stale.txt").write_text("old")
    save_model_dir(tiny_model("qwen2"), None, local_dir)
    assert not (local_dir / "stale.txt").exists()
    assert json.loads((local_dir / "config.json").read_text())["model_type"] == "qwen2"


# ------------------------------------------------------------------------------------------------ content hash


def test_model_content_hash_is_cached_and_tracks_changes(local_dir, monkeypatch):
    h1 = model_content_hash(local_dir)
    assert len(h1) == 64 and (local_dir / load.HASH_SIDECAR).is_file()

    class NoRead:
        def __init__(self, *a, **k):
            raise AssertionError("the sidecar should have answered")

    with monkeypatch.context() as mp:
        mp.setattr(load.hashlib, "sha256", NoRead)
        assert model_content_hash(str(local_dir)) == h1
        assert model_content_hash(resolve_model(local_dir)) == h1
    st = local_dir / "model.safetensors"
    st.write_bytes(st.read_bytes() + b"\0")
    assert model_content_hash(local_dir) != h1
    m = tiny_model("llama")
    assert model_content_hash(m) == model_content_hash(tiny_model("llama")) != model_content_hash(tiny_model("qwen2"))
    with pytest.raises(SemalignError, match="does not exist"):
        model_content_hash(local_dir / "missing")
