"""Filesystem locations: the user cache (wheels, GGUF files, converted models, data) and atomic writes."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

CACHE_ENV = "SEMALIGN_CACHE"


def cache_dir() -> Path:
    """Root of the user cache: ``$SEMALIGN_CACHE`` or ``$XDG_CACHE_HOME/semalign`` (``~/.cache/semalign``)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "semalign"


@contextlib.contextmanager
def atomic_dir(final: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; rename it to ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        aside = final.parent / f".{final.name}.old"
        if final.exists():  # move the old version aside first: a kill now leaves it recoverable (recover_dirs)
            if aside.exists():
                shutil.rmtree(aside)
            os.replace(final, aside)
        os.replace(tmp, final)
        if aside.exists():
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def os_error_from(exc: BaseException, where: str | Path | None = None) -> OSError | None:
    """The OSError hidden in a library error's text (safetensors reports a full disk as ``SafetensorError``)."""
    import errno
    import re

    if isinstance(exc, OSError):
        return exc
    m = re.search(r"os error (\d+)", str(exc))
    if m:
        code = int(m.group(1))
        return OSError(code, os.strerror(code), str(where) if where else None)
    if "No space left on device" in str(exc):
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(where) if where else None)
    return None


def recover_dirs(root: Path) -> None:
    """After a crash: put back directories :func:`atomic_dir` had moved aside, drop its unfinished temp dirs."""
    root = Path(root)
    if not root.is_dir():
        return
    for p in sorted(root.rglob(".*.old"), key=lambda q: len(q.parts), reverse=True):
        final = p.parent / p.name[1:-len(".old")]
        if p.is_dir() and not final.exists():
            os.replace(p, final)
        elif p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
    for p in list(root.rglob(".*.tmp-*")):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(OSError):
                p.unlink()


# ------------------------------------------------------------------ checksummed cache entries
MANIFEST = "MANIFEST.sha256.json"


def sha256_of(path: Path) -> str:
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        while buf := f.read(1 << 22):
            h.update(buf)
    return h.hexdigest()


def write_manifest(directory: Path) -> None:
    """Record size and SHA-256 of every file in ``directory`` (recursively) in its manifest."""
    directory = Path(directory)
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": sha256_of(p)}
             for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(directory / MANIFEST, {"version": 1, "files": files})


def verify_manifest(directory: Path) -> str | None:
    """``None`` when every file listed in the manifest is present with its size and SHA-256, else the problem."""
    directory = Path(directory)
    try:
        files = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return "missing or unreadable checksum manifest"
    for name, want in files.items():
        p = directory / name
        try:
            if p.stat().st_size != want["size"]:
                return f"{name}: size {p.stat().st_size} != {want['size']} (truncated?)"
            if sha256_of(p) != want["sha256"]:
                return f"{name}: checksum mismatch (corrupted)"
        except OSError:
            return f"{name}: missing"
    return None


def publish_dir(tmp: Path, final: Path) -> bool:
    """Move a finished cache entry into place unless another process got there first (then drop ``tmp``).

    Returns True when ``tmp`` became ``final``. Entries are content-addressed, so both copies are equal.
    """
    try:
        os.rename(tmp, final)
        return True
    except OSError:
        if not final.is_dir():
            raise
        shutil.rmtree(tmp, ignore_errors=True)
        return False


def remove_entry(directory: Path) -> None:
    """Remove a bad cache entry without disturbing a concurrent reader's view (rename, then delete)."""
    directory = Path(directory)
    trash = directory.parent / f".{directory.name}.tmp-bad-{os.getpid()}"
    try:
        os.rename(directory, trash)
    except OSError:
        return
    shutil.rmtree(trash, ignore_errors=True)


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file + rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")
