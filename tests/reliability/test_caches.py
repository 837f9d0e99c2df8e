"""Caches: truncated or bit-flipped entries are detected by checksum and recomputed with a warning; two
processes filling one entry at once both succeed and leave one valid entry."""

from __future__ import annotations

import logging
import multiprocessing as mp
import shutil

import pytest
import torch

from semalign.methods.semalign.bases import SemanticMap, build_semantic_map, load_cached_map, save_cached_map
from semalign.paths import MANIFEST, verify_manifest


def _damage(f, how: str) -> None:
    data = bytearray(f.read_bytes())
    if how == "truncated":
        f.write_bytes(bytes(data[: len(data) // 2]))
    else:
        data[-3] ^= 0x10
        f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def pair():
    from semalign.models.arch import internals
    from semalign.testing import tiny_pair

    t, s, tok = tiny_pair()
    return internals(t), internals(s), tok


# ------------------------------------------------------------------ semantic-map cache
@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_semantic_map_cache_entry_damaged_is_recomputed(how, pair, tmp_path, caplog):
    ta, sa, tok = pair
    root = tmp_path / "semantic_maps"
    first = build_semantic_map(ta, sa, tok, tok, cache_root=root)
    (entry,) = [p for p in root.iterdir() if not p.name.startswith(".")]
    assert verify_manifest(entry) is None
    _damage(entry / "M.safetensors", how)
    with caplog.at_level(logging.WARNING):
        again = build_semantic_map(ta, sa, tok, tok, cache_root=root)
    assert torch.equal(again.M, first.M)
    assert any("invalid" in r.getMessage() and "recomputing" in r.getMessage() for r in caplog.records)
    assert verify_manifest(entry) is None  # a valid entry was written again
    assert torch.equal(load_cached_map(entry).M, first.M)


def test_semantic_map_entry_without_manifest_is_recomputed(pair, tmp_path, caplog):
    ta, sa, tok = pair
    root = tmp_path / "semantic_maps"
    first = build_semantic_map(ta, sa, tok, tok, cache_root=root)
    (entry,) = list(root.iterdir())
    (entry / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING):
        assert torch.equal(build_semantic_map(ta, sa, tok, tok, cache_root=root).M, first.M)
    assert verify_manifest(entry) is None


def _fill(entry: str, barrier, q) -> None:
    sm = SemanticMap(torch.arange(12.0).reshape(3, 4), {"key": "k"})
    barrier.wait()
    try:
        for _ in range(20):
            save_cached_map(sm, __import__("pathlib").Path(entry))
            got = load_cached_map(__import__("pathlib").Path(entry))
            assert got is not None and torch.equal(got.M, sm.M)
        q.put("ok")
    except BaseException as exc:  # noqa: BLE001
        q.put(repr(exc))


def test_two_processes_fill_one_semantic_map_entry(tmp_path):
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    entry = tmp_path / "semantic_maps" / "k"
    procs = [ctx.Process(target=_fill, args=(str(entry), barrier, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [q.get(timeout=5) for _ in procs] == ["ok", "ok"]
    assert verify_manifest(entry) is None
    assert [p.name for p in entry.parent.iterdir()] == ["k"]  # no temp dirs left


# ------------------------------------------------------------------ model (asset) cache
@pytest.fixture
def cached_asset(tiny_dirs, tmp_path, monkeypatch):
    """The tiny student installed as the converted cache entry of an offline asset (as convert_gguf writes it)."""
    from semalign.models import assets
    from semalign.paths import write_manifest

    name = "smollm2-135m-instruct"
    d = assets.models_dir() / name
    shutil.copytree(tiny_dirs[1], d)
    (d / assets.ASSET_RECORD).write_text('{"gguf": {"sha256": "%s"}}' % assets.ASSETS.get(name).sha256)
    write_manifest(d)
    calls = []

    def refetch(n, force=False, **kw):  # stands in for download + convert (no network in tests)
        calls.append(n)
        shutil.copytree(tiny_dirs[1], d)
        (d / assets.ASSET_RECORD).write_text("{}")
        write_manifest(d)
        return d

    monkeypatch.setattr(assets, "fetch_asset", refetch)
    return name, d, calls


@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_model_cache_entry_damaged_is_reconverted(how, cached_asset, caplog):
    from semalign.models.load import load_model

    name, d, calls = cached_asset
    _damage(d / "model.safetensors", how)
    with caplog.at_level(logging.WARNING):
        model, tok, rm = load_model(name, dtype="fp32", device="cpu")
    assert calls == [name] and rm.path == str(d)
    assert any("cached model" in r.getMessage() and "invalid" in r.getMessage() for r in caplog.records)
    assert verify_manifest(d) is None


def test_model_cache_legacy_entry_gets_a_manifest(cached_asset):
    from semalign.models import assets

    name, d, calls = cached_asset
    (d / MANIFEST).unlink()
    assert assets.asset_dir(name, verify=True) == d and calls == []
    assert verify_manifest(d) is None


# ------------------------------------------------------------------ stage cache (src/semalign/cache.py, branch `cache`)
# Minimal cases against the agreed API; they start running once that module lands.
@pytest.mark.parametrize("how", ["truncated", "bit-flipped"])
def test_stage_cache_entry_damaged_is_detected(how, tmp_path, caplog):
    cache = pytest.importorskip("semalign.cache")
    c = cache.StageCache(tmp_path / "stages")
    key = c.key("attribution", "1", {"model": "m", "n": 3})
    c.put("attribution", key, tensors={"scores": torch.arange(64.0)}, meta={"n": 3})
    assert c.get("attribution", key) is not None
    files = [p for p in (tmp_path / "stages").rglob("*") if p.is_file() and p.suffix == ".safetensors"]
    assert files
    _damage(files[0], how)
    with caplog.at_level(logging.WARNING):
        assert c.get("attribution", key) is None
    assert caplog.records
    c.put("attribution", key, tensors={"scores": torch.arange(64.0)}, meta={"n": 3})
    assert c.get("attribution", key) is not None


def _stage_fill(root: str, barrier, q) -> None:
    import semalign.cache as cache

    c = cache.StageCache(root)
    key = c.key("eval", "1", {"x": 1})
    barrier.wait()
    try:
        c.put("eval", key, json_obj={"acc": 0.5})
        q.put("ok" if c.get("eval", key) is not None else "missing")
    except BaseException as exc:  # noqa: BLE001
        q.put(repr(exc))


def test_stage_cache_two_processes_fill_one_entry(tmp_path):
    pytest.importorskip("semalign.cache")
    ctx = mp.get_context("fork")
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_stage_fill, args=(str(tmp_path / "stages"), barrier, q)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [q.get(timeout=5) for _ in procs] == ["ok", "ok"]
