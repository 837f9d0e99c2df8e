"""The content-addressed stage cache: keys, checksums, atomic concurrent writes, eviction, --no-cache, clear."""

from __future__ import annotations

import json
import logging
import multiprocessing as mp
import os
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from semalign.cache import MANIFEST, TENSORS, StageCache, parse_age, stage_cache
from semalign.errors import SemalignError
from semalign.stages import Stages, timed_stage


@pytest.fixture
def cache(tmp_path) -> StageCache:
    return StageCache(tmp_path / "stages")


def _entries(root: Path) -> list[Path]:
    return [d for s in root.iterdir() if s.is_dir() and not s.name.startswith(".")
            for d in s.iterdir() if not d.name.startswith(".")]


def test_key_is_canonical_and_sensitive_to_every_part():
    k = StageCache.key("nll", "1", {"a": 1, "b": [1, 2], "p": Path("/x")})
    assert k == StageCache.key("nll", "1", {"p": "/x", "b": [1, 2], "a": 1})  # order and Path spelling ignored
    assert len(k) == 64
    assert k != StageCache.key("nll", "2", {"a": 1, "b": [1, 2], "p": "/x"})
    assert k != StageCache.key("eval", "1", {"a": 1, "b": [1, 2], "p": "/x"})
    assert k != StageCache.key("nll", "1", {"a": 2, "b": [1, 2], "p": "/x"})


def test_put_get_roundtrip_with_manifest(cache):
    key = cache.key("s", "1", {"x": 1})
    t = {"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.bfloat16)}
    cache.put("s", key, t, {"inputs": {"x": 1}}, {"answer": 42})
    e = cache.get("s", key)
    assert e is not None and e.json == {"answer": 42}
    assert torch.equal(e.tensors["a"], t["a"]) and e.tensors["b"].dtype == torch.bfloat16
    m = json.loads((e.path / MANIFEST).read_text())
    assert m["key"] == key and m["inputs"] == {"x": 1} and m["size"] > 0
    assert set(m["files"]) == {TENSORS, "data.json"} and all(len(f["sha256"]) == 64 for f in m["files"].values())
    assert cache.get("s", cache.key("s", "1", {"x": 2})) is None


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "no_manifest"])
def test_corrupt_entry_is_detected_deleted_and_recomputed(cache, damage, caplog):
    calls = []

    def compute():
        calls.append(1)
        return {"w": torch.randn(64, 64)}, {"n": len(calls)}

    e = cache.get_or_compute("attr", "1", {"m": "h"}, compute)
    f = e.path / TENSORS
    if damage == "truncate":
        data = f.read_bytes()
        f.write_bytes(data[: len(data) // 2])
    elif damage == "bitflip":
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x01  # same size, one bit of one float changed
        f.write_bytes(bytes(data))
    else:
        (e.path / MANIFEST).unlink()
    with caplog.at_level(logging.WARNING, logger="semalign.cache"):
        again = cache.get_or_compute("attr", "1", {"m": "h"}, compute)
    assert len(calls) == 2 and again.json == {"n": 2}  # recomputed, never used
    assert any("corrupt" in r.getMessage() for r in caplog.records)
    assert cache.get("attr", again.key) is not None  # the fresh entry is valid


def test_get_or_compute_hits_after_the_first_call(cache):
    calls = []
    for _ in range(3):
        e = cache.get_or_compute("nll", "1", {"m": 1}, lambda: (calls.append(1), (None, {"nll": 1.5}))[1])
        assert e.json == {"nll": 1.5}
    assert len(calls) == 1


def _put_same_key(root: str, barrier, q) -> None:
    try:
        torch.set_num_threads(1)
        c = StageCache(Path(root))
        key = c.key("t", "1", {"same": True})
        barrier.wait()
        for _ in range(5):
            e = c.put("t", key, {"x": torch.arange(50_000, dtype=torch.float32)}, {"pid": os.getpid()}, {"ok": 1})
            assert torch.equal(e.tensors["x"], torch.arange(50_000, dtype=torch.float32))
        q.put("ok")
    except BaseException as exc:  # noqa: BLE001
        q.put(f"{type(exc).__name__}: {exc}")


def _compute_same_key(root: str, barrier, q) -> None:
    try:
        c = StageCache(Path(root))
        barrier.wait()

        def compute():
            with open(Path(root).parent / "computations.log", "a") as f:
                f.write(f"{os.getpid()}\n")
            time.sleep(0.3)
            return None, {"v": 7}

        q.put(c.get_or_compute("t", "1", {"k": 2}, compute).json["v"])
    except BaseException as exc:  # noqa: BLE001
        q.put(f"{type(exc).__name__}: {exc}")


@pytest.mark.parametrize("target", [_put_same_key, _compute_same_key])
def test_two_processes_fill_the_same_key(tmp_path, target):
    ctx = mp.get_context("spawn")  # fork after torch's thread pools started can hang the child
    root = tmp_path / "stages"
    barrier, q = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=target, args=(str(root), barrier, q)) for _ in range(2)]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join(120)
        results = [q.get(timeout=10) for _ in procs]
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    assert all(p.exitcode == 0 for p in procs)
    if target is _put_same_key:
        assert results == ["ok", "ok"]
    else:
        assert results == [7, 7]
        assert len((tmp_path / "computations.log").read_text().split()) == 1  # computed once (lock)
    entries = _entries(root)
    assert len(entries) == 1
    assert StageCache(root).get(entries[0].parent.name, entries[0].name) is not None
    assert not [p for p in (root / "t").iterdir() if p.name.startswith((".tmp-", ".del-"))]  # no debris


def test_lru_eviction_keeps_recently_used_entries(tmp_path):
    c = StageCache(tmp_path / "stages", max_bytes=10**9)
    keys = []
    for i in range(4):
        k = c.key("s", "1", {"i": i})
        e = c.put("s", k, {"x": torch.zeros(25_000)})  # ~100 KB each
        os.utime(e.path, (1000 + i, 1000 + i))  # i = 0 is the least recently used
        keys.append(k)
    assert c.get("s", keys[0]) is not None  # touching entry 0 makes entry 1 the oldest
    one = c.du()["total"]["bytes"] / 4
    c.max_bytes = int(3.5 * one)
    k = c.key("s", "1", {"i": 4})
    c.put("s", k, {"x": torch.zeros(25_000)})
    left = {r["key"] for r in c.ls()}
    assert keys[1] not in left and keys[2] not in left  # the two least recently used went
    assert {keys[0], keys[3], k} <= left
    assert c.du()["total"]["bytes"] <= c.max_bytes


def test_max_gb_from_env(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMALIGN_CACHE_MAX_GB", "0.5")
    assert StageCache(tmp_path).max_bytes == 500_000_000
    monkeypatch.setenv("SEMALIGN_CACHE_MAX_GB", "lots")
    with pytest.raises(SemalignError, match="SEMALIGN_CACHE_MAX_GB"):
        StageCache(tmp_path)


def test_no_cache_env_and_flag_disable_reads_and_writes(tmp_path, monkeypatch):
    root = tmp_path / "stages"
    StageCache(root).put("s", "k" * 64, None, None, {"v": 1})
    monkeypatch.setenv("SEMALIGN_NO_CACHE", "1")
    c = StageCache(root)
    assert not c.enabled and c.get("s", "k" * 64) is None
    calls = []
    for _ in range(2):
        e = c.get_or_compute("s", "1", {"a": 1}, lambda: (calls.append(1), ({"t": torch.ones(2)}, {"v": 2}))[1])
        assert e.json == {"v": 2} and torch.equal(e.tensors["t"], torch.ones(2)) and e.path is None
    assert len(calls) == 2 and len(_entries(root)) == 1  # nothing new written
    monkeypatch.delenv("SEMALIGN_NO_CACHE")
    assert not stage_cache(enabled=False).enabled and stage_cache().enabled


def test_default_root_follows_semalign_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMALIGN_CACHE", str(tmp_path / "c"))
    assert stage_cache().root == tmp_path / "c" / "stages"


def test_clear_older_than_and_by_stage(cache):
    old = cache.put("a", cache.key("a", "1", {}), None, None, {"v": 1})
    os.utime(old.path, (time.time() - 10 * 86400,) * 2)
    cache.put("a", cache.key("a", "1", {"n": 1}), None, None, {"v": 2})
    cache.put("b", cache.key("b", "1", {}), None, None, {"v": 3})
    n, _ = cache.clear(older_than=parse_age("7d"))
    assert n == 1 and {r["stage"] for r in cache.ls()} == {"a", "b"} and len(cache.ls()) == 2
    assert cache.clear(stage="b")[0] == 1 and [r["stage"] for r in cache.ls()] == ["a"]
    assert cache.clear()[0] == 1 and cache.ls() == []


def test_parse_age():
    assert parse_age("7d") == timedelta(days=7) and parse_age("12h") == timedelta(hours=12)
    assert parse_age("1.5m") == timedelta(seconds=90)
    with pytest.raises(SemalignError, match="7d"):
        parse_age("a week")


def test_stages_time_and_cache(cache):
    st = Stages(cache=cache)
    with st("load"):
        pass
    assert st.run("double", lambda x: 2 * x, 4) == 8
    calls = []
    for _ in range(2):
        v = st.cached_json("nll", "1", {"m": 1}, lambda: (calls.append(1), {"nll": 2.0})[1], name="nll_teacher")
        assert v == {"nll": 2.0}
    assert len(calls) == 1 and st.hits["nll_teacher"] is True
    assert set(st.timings) == {"load", "double", "nll_teacher"}
    t: dict = {}
    with pytest.raises(RuntimeError):
        with timed_stage("boom", t):
            raise RuntimeError("x")
    assert "boom" in t


def test_put_accepts_views_that_share_storage(cache):
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    rows = {f"r{i}": base[i, :3] for i in range(3)}  # contiguous views of one storage
    e = cache.put("s", cache.key("s", "1", {"views": 1}), rows)
    assert all(torch.equal(e.tensors[k], v) for k, v in rows.items())
