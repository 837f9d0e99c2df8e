"""A content-addressed stage cache: every expensive product is computed at most once per machine.

An entry is a function of the hashes of what determines it. :meth:`StageCache.key` hashes the canonical JSON of
``{stage, version, inputs}`` (``inputs`` holds content hashes of models and data plus the settings that matter;
``version`` is the code version of the stage, bumped when a change moves its output). Entries live under
``<root>/<stage>/<key>/``::

    tensors.safetensors   (optional) named tensors
    data.json             (optional) a JSON object
    manifest.json         key, stage, inputs, created, size, sha256 + size of every file (written last)

Writes go to a temporary sibling directory that is renamed into place, so a reader sees a complete entry or
none; when two processes fill the same key both succeed and one valid entry remains. :meth:`get` verifies every
file against the manifest: a truncated or bit-flipped entry is deleted with a warning and recomputed, never used.
The cache is bounded (``SEMALIGN_CACHE_MAX_GB``, default 20): after a write, least-recently *used* entries go
first. ``SEMALIGN_NO_CACHE=1`` (or ``--no-cache``) turns every lookup into a miss and every write into a no-op.
The key of each stage is documented in docs/cache.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Iterator

from .errors import SemalignError
from .paths import cache_dir, remove_entry

log = logging.getLogger(__name__)

NO_CACHE_ENV = "SEMALIGN_NO_CACHE"
MAX_GB_ENV = "SEMALIGN_CACHE_MAX_GB"
DEFAULT_MAX_GB = 20.0
MANIFEST = "manifest.json"
TENSORS = "tensors.safetensors"
DATA = "data.json"
FORMAT = 1


def _truthy(v: str | None) -> bool:
    return (v or "").strip().lower() in {"1", "true", "yes", "on"}


def _canon(o: Any) -> Any:
    """JSON fallback for key inputs: paths, dtypes, sets and tuples get one stable spelling."""
    if isinstance(o, (set, frozenset)):
        return sorted(_canon(x) for x in o)
    if isinstance(o, Path):
        return str(o)
    return str(o)


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, default=_canon)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _max_bytes() -> int:
    raw = os.environ.get(MAX_GB_ENV)
    try:
        gb = float(raw) if raw else DEFAULT_MAX_GB
    except ValueError:
        raise SemalignError(f"{MAX_GB_ENV}={raw!r} is not a number; set it to the cache bound in GB (e.g. 20)") from None
    return int(gb * 1e9)


@dataclass
class Entry:
    """One cache entry: ``tensors`` (loaded on first access), ``json`` (object or None), ``meta`` (the manifest)."""

    path: Path | None
    meta: dict
    json: Any = None
    _tensors: dict | None = field(default=None, repr=False)

    @property
    def tensors(self) -> dict:
        if self._tensors is None:
            if self.path is not None and (self.path / TENSORS).is_file():
                from safetensors.torch import load_file

                self._tensors = load_file(str(self.path / TENSORS))
            else:
                self._tensors = {}
        return self._tensors

    @property
    def key(self) -> str:
        return str(self.meta.get("key", ""))


class StageCache:
    """Content-addressed store of stage products (see module docstring).

    ``root`` defaults to ``cache_dir()/"stages"`` (``$SEMALIGN_CACHE`` respected); ``enabled=False`` or
    ``SEMALIGN_NO_CACHE=1`` disables it; ``max_bytes`` defaults to ``$SEMALIGN_CACHE_MAX_GB`` (20 GB).
    """

    def __init__(self, root: Path | None = None, *, enabled: bool = True, max_bytes: int | None = None):
        self.root = Path(root) if root is not None else cache_dir() / "stages"
        self.enabled = enabled and not _truthy(os.environ.get(NO_CACHE_ENV))
        self.max_bytes = _max_bytes() if max_bytes is None else int(max_bytes)

    # ------------------------------------------------------------------ keys and paths
    @staticmethod
    def key(stage: str, version: str, inputs: dict) -> str:
        """sha256 of the canonical JSON of ``{stage, version, inputs}``."""
        blob = canonical_json({"stage": stage, "version": str(version), "inputs": inputs})
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()

    def entry_dir(self, stage: str, key: str) -> Path:
        if not stage or "/" in stage or stage.startswith("."):
            raise ValueError(f"invalid stage name {stage!r}")
        return self.root / stage / key

    # ------------------------------------------------------------------ read
    def get(self, stage: str, key: str) -> Entry | None:
        """The verified entry, or None (miss, disabled, or corrupt — a corrupt entry is deleted with a warning)."""
        if not self.enabled:
            return None
        d = self.entry_dir(stage, key)
        if not d.is_dir():
            return None
        entry, why = self._verify(d)
        if entry is None:
            log.warning("cache entry %s/%s is corrupt (%s); deleting it and recomputing", stage, key[:12], why)
            self._remove(d)
            return None
        with contextlib.suppress(OSError):
            os.utime(d)  # last access, for LRU eviction
        return entry

    def _verify(self, d: Path) -> tuple[Entry | None, str]:
        try:
            meta = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None, "no manifest"
        except (OSError, ValueError) as e:
            return None, f"unreadable manifest ({type(e).__name__})"
        files = meta.get("files")
        if not isinstance(files, dict):
            return None, "manifest has no file list"
        for name, rec in files.items():
            p = d / name
            try:
                size = p.stat().st_size
            except OSError:
                return None, f"{name} is missing"
            if size != rec.get("size"):
                return None, f"{name} has {size} bytes, expected {rec.get('size')} (truncated?)"
            if _sha256_file(p) != rec.get("sha256"):
                return None, f"{name} fails its sha256 checksum"
        obj = None
        if DATA in files:
            try:
                obj = json.loads((d / DATA).read_text(encoding="utf-8"))
            except ValueError:
                return None, f"{DATA} is not valid JSON"
        return Entry(d, meta, obj), ""

    # ------------------------------------------------------------------ write
    def put(self, stage: str, key: str, tensors: dict | None = None, meta: dict | None = None,
            json_obj: Any = None) -> Entry:
        """Store an entry atomically (temp dir + rename) and return it; a no-op returning an in-memory
        entry when the cache is disabled or not writable. ``meta`` (e.g. ``{"inputs": ...}``) goes into the
        manifest. When another process stored the same key first, its (verified) entry is kept."""
        info = {"key": key, "stage": stage, "format": FORMAT, **(meta or {})}
        if not self.enabled:
            return Entry(None, info, json_obj, dict(tensors) if tensors else {})
        final = self.entry_dir(stage, key)
        try:
            final.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{key[:16]}-", dir=final.parent))
        except OSError as e:
            log.warning("cannot write the stage cache under %s (%s); continuing without it", self.root, e)
            return Entry(None, info, json_obj, dict(tensors) if tensors else {})
        try:
            self._write(tmp, info, tensors, json_obj)
            entry = self._publish(tmp, final, stage, key)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        self.evict(keep={final})
        return entry

    def _write(self, tmp: Path, info: dict, tensors: dict | None, json_obj: Any) -> None:
        files: dict[str, dict] = {}
        if tensors:
            from safetensors.torch import save_file

            save_file({k: _own_storage(v) for k, v in tensors.items()}, str(tmp / TENSORS))
            files[TENSORS] = {}
        if json_obj is not None:
            (tmp / DATA).write_text(json.dumps(json_obj, default=str), encoding="utf-8")
            files[DATA] = {}
        for name in files:
            p = tmp / name
            files[name] = {"size": p.stat().st_size, "sha256": _sha256_file(p)}
        now = time.time()
        info.update(files=files, size=sum(f["size"] for f in files.values()), created_unix=now,
                    created=time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(now)))
        with open(tmp / MANIFEST, "w", encoding="utf-8") as f:
            json.dump(info, f, indent=1, default=str)
            f.flush()
            os.fsync(f.fileno())

    def _publish(self, tmp: Path, final: Path, stage: str, key: str) -> Entry:
        for _ in range(3):
            try:
                os.rename(tmp, final)  # atomic; fails if another process published first
                entry, why = self._verify(final)
                if entry is None:  # pragma: no cover - only if the disk lies
                    raise SemalignError(f"cache entry {final} failed verification right after writing ({why})")
                return entry
            except OSError:
                if not final.exists():
                    raise
            existing = self.get(stage, key)  # the other writer's entry; get() removes it if corrupt
            if existing is not None:
                return existing
        raise SemalignError(f"could not store cache entry {final}; check the disk or run `semalign cache clear`")

    def _remove(self, d: Path) -> None:
        """Move aside, then delete, so a concurrent reader never sees a half-deleted entry as valid."""
        remove_entry(d)

    # ------------------------------------------------------------------ compute once
    def get_or_compute(self, stage: str, version: str, inputs: dict,
                       compute: Callable[[], tuple[dict | None, Any]]) -> Entry:
        """The cached entry for ``(stage, version, inputs)``, computing and storing it on a miss.

        ``compute()`` returns ``(tensors or None, json object or None)``. Concurrent callers for the same key wait
        on a lock, so the product is computed once; the lock is advisory (a crashed holder releases it).
        """
        key = self.key(stage, version, inputs)
        hit = self.get(stage, key)
        if hit is not None:
            log.debug("cache hit %s/%s", stage, key[:12])
            return hit
        with self._lock(stage, key):
            hit = self.get(stage, key)
            if hit is not None:
                return hit
            t0 = time.perf_counter()
            tensors, obj = compute()
            secs = round(time.perf_counter() - t0, 3)
            return self.put(stage, key, tensors, {"version": str(version), "inputs": inputs,
                                                  "compute_seconds": secs}, obj)

    @contextlib.contextmanager
    def _lock(self, stage: str, key: str) -> Iterator[None]:
        if not self.enabled:
            yield
            return
        try:
            import fcntl

            lock_dir = self.root / ".locks"
            lock_dir.mkdir(parents=True, exist_ok=True)
            f = open(lock_dir / f"{stage}-{key[:32]}.lock", "a+")
        except (ImportError, OSError):
            yield
            return
        try:
            fcntl.flock(f, fcntl.LOCK_EX)
            yield
        finally:
            with contextlib.suppress(OSError):
                fcntl.flock(f, fcntl.LOCK_UN)
            f.close()

    # ------------------------------------------------------------------ inventory
    def _entry_dirs(self) -> Iterator[Path]:
        if not self.root.is_dir():
            return
        for sd in sorted(self.root.iterdir()):
            if sd.is_dir() and not sd.name.startswith("."):
                for d in sorted(sd.iterdir()):
                    if d.is_dir() and not d.name.startswith("."):
                        yield d

    def ls(self) -> list[dict]:
        """One row per entry: stage, key, size (bytes), created, last access, path, inputs (unverified)."""
        rows = []
        for d in self._entry_dirs():
            try:
                meta = json.loads((d / MANIFEST).read_text(encoding="utf-8"))
            except (OSError, ValueError):
                meta = {}
            try:
                accessed = d.stat().st_mtime
            except OSError:
                continue
            rows.append({"stage": d.parent.name, "key": d.name, "size": int(meta.get("size") or _dir_size(d)),
                         "created": meta.get("created"), "created_unix": meta.get("created_unix"),
                         "accessed_unix": accessed, "path": str(d), "inputs": meta.get("inputs"),
                         "complete": bool(meta)})
        return rows

    def du(self) -> dict[str, dict]:
        """``{stage: {"entries": n, "bytes": b}}`` plus a ``"total"`` row."""
        out: dict[str, dict] = {}
        for r in self.ls():
            s = out.setdefault(r["stage"], {"entries": 0, "bytes": 0})
            s["entries"] += 1
            s["bytes"] += r["size"]
        out["total"] = {"entries": sum(v["entries"] for v in out.values()),
                        "bytes": sum(v["bytes"] for v in out.values())}
        return out

    def clear(self, older_than: timedelta | None = None, stage: str | None = None) -> tuple[int, int]:
        """Delete entries (only those not used for ``older_than``; only of ``stage``). Returns (entries, bytes)."""
        cutoff = time.time() - older_than.total_seconds() if older_than is not None else None
        n = b = 0
        for r in self.ls():
            if stage and r["stage"] != stage:
                continue
            if cutoff is not None and r["accessed_unix"] > cutoff:
                continue
            self._remove(Path(r["path"]))
            n, b = n + 1, b + r["size"]
        return n, b

    def evict(self, keep: set[Path] | None = None) -> int:
        """Delete least-recently-used entries until the cache fits ``max_bytes``. Returns the number deleted."""
        rows = self.ls()
        total = sum(r["size"] for r in rows)
        if total <= self.max_bytes:
            return 0
        keep = {Path(p) for p in (keep or set())}
        n = 0
        for r in sorted(rows, key=lambda r: r["accessed_unix"]):
            if total <= self.max_bytes:
                break
            if Path(r["path"]) in keep:
                continue
            self._remove(Path(r["path"]))
            total -= r["size"]
            n += 1
            log.info("cache: evicted %s/%s (%s, least recently used)", r["stage"], r["key"][:12], human_bytes(r["size"]))
        return n


def _own_storage(t):
    """A contiguous CPU tensor that owns its storage (safetensors refuses views that share memory)."""
    t = t.detach().cpu().contiguous()
    if t.untyped_storage().nbytes() != t.numel() * t.element_size() or t.storage_offset():
        t = t.clone()
    return t


def _dir_size(d: Path) -> int:
    return sum(p.stat().st_size for p in d.rglob("*") if p.is_file())


def human_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"  # pragma: no cover


def stage_cache(enabled: bool = True) -> StageCache:
    """The default cache (root ``cache_dir()/"stages"``, resolved now so ``SEMALIGN_CACHE`` changes apply)."""
    return StageCache(enabled=enabled)


def parse_age(text: str) -> timedelta:
    """``7d``, ``12h``, ``30m``, ``45s``, ``2w`` -> timedelta (one-line error otherwise)."""
    import re

    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text or "")
    if not m:
        raise SemalignError(f"--older-than {text!r}: use a number and a unit, e.g. 7d, 12h, 30m, 2w")
    n, unit = float(m.group(1)), m.group(2)
    return timedelta(seconds=n * {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}[unit])
