"""Resolve a model spec (asset name, run dir, HF dir, .gguf file, hub id) and load model + tokenizer.

Every loader goes through :func:`resolve_model`, so a spec means the same thing everywhere. Devices are
chosen only by :func:`resolve_device` ("auto" = CUDA when available, else CPU).
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from ..errors import SemalignError
from ..paths import atomic_write_json
from . import assets
from .save import gguf_dense_kwargs, is_gguf_loaded, safetensors_problem, save_model_dir  # noqa: F401 (re-exported)

if TYPE_CHECKING:  # pragma: no cover
    import torch

log = logging.getLogger(__name__)
_is_gguf_loaded = is_gguf_loaded  # old private name, kept for callers

Kind = Literal["asset", "run", "local", "gguf", "hub"]
HASH_SIDECAR = ".semalign-content-hash.json"
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")
_DTYPES = {"bf16": "bfloat16", "bfloat16": "bfloat16", "fp32": "float32", "float32": "float32",
           "fp16": "float16", "float16": "float16", "auto": "auto", "stored": "stored"}


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points: ``path`` is a directory (or the hub id), ``gguf_file`` a file name in it."""

    kind: Kind
    path: str
    gguf_file: str | None
    display_name: str
    spec: str = ""

    def load_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``from_pretrained(self.path, **kwargs)``."""
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _hub_error(spec: str, err: BaseException | None) -> SemalignError:
    why = "HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache" if _hub_offline() else (
        f"{type(err).__name__}: {err}" if err else "download failed")
    why = why.splitlines()[0][:200] if why else ""
    local = f"; there is also no local directory {spec!r}" if "/" in spec else ""
    return SemalignError(
        f"cannot load {spec!r} from the Hugging Face hub: unreachable or not found ({why}){local}; use an offline "
        f"asset instead ({', '.join(assets.ASSETS.names())}; see `semalign assets list`), a local directory with "
        "config.json, or a .gguf file"
    )


def resolve_model(spec: str | os.PathLike[str], *, fetch: bool = True) -> ResolvedModel:
    """Work out what ``spec`` names; fetch an offline asset that is not in the cache yet (when ``fetch``)."""
    s = str(spec)
    if s in assets.ASSETS:
        d = assets.asset_dir(s, verify=True)
        if d is None:
            if not fetch:
                raise SemalignError(f"asset {s!r} is not fetched yet; run `semalign assets fetch {s}`")
            log.info("asset %s is not in the cache yet; fetching it (one-off)", s)
            d = assets.fetch_asset(s)
        return ResolvedModel("asset", str(d), None, s, s)
    p = Path(s).expanduser()
    if p.is_dir():
        if (p / "student" / "config.json").is_file():
            return ResolvedModel("run", str(p / "student"), None, f"{p.name}/student", s)
        if (p / "config.json").is_file():
            return ResolvedModel("local", str(p), None, p.name, s)
        ggufs = sorted(p.glob("*.gguf"))
        if len(ggufs) == 1:
            return ResolvedModel("gguf", str(p), ggufs[0].name, ggufs[0].stem, s)
        raise SemalignError(
            f"directory {p} has no config.json (nor student/config.json, nor exactly one .gguf file); "
            "point to a Hugging Face model directory, a run directory or a .gguf file"
        )
    if p.is_file() and p.suffix.lower() == ".gguf":
        return ResolvedModel("gguf", str(p.parent), p.name, p.stem, s)
    if p.is_file():
        raise SemalignError(f"{p} is a file but not a .gguf file; pass its directory (with config.json) or a .gguf")
    if _HUB_ID.match(s) and not s.startswith((".", "/", "~")):
        return ResolvedModel("hub", s, None, s, s)
    close = difflib.get_close_matches(s, assets.ASSETS.names(), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    raise SemalignError(
        f"unknown model {s!r}: not an asset name (see `semalign assets list`), not a directory with config.json, "
        f"not a .gguf file, not a hub id (owner/name).{hint}"
    )


def resolve_device(device: str = "auto") -> torch.device:
    """``auto`` -> ``cuda`` if available else ``cpu``; validates explicit choices."""
    import torch

    d = (device or "auto").strip().lower()
    if d == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(d)
    except (RuntimeError, ValueError):
        raise SemalignError(f"unknown device {device!r}; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SemalignError(f"device {device!r} requested but CUDA is not available; use --device cpu or auto")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise SemalignError(f"device {device!r} does not exist ({torch.cuda.device_count()} CUDA devices); "
                                "use cuda:0 or auto")
    return dev


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu") -> torch.dtype | str:
    """Map ``bf16|fp16|fp32|auto|stored`` (or a torch dtype) to what ``from_pretrained(dtype=...)`` takes.

    ``auto`` = the fastest native compute dtype of ``device`` (see :mod:`semalign.models.precision`);
    ``stored`` = the checkpoint's own dtype (transformers' ``"auto"``).
    """
    import torch

    from .precision import native_compute_dtype

    if isinstance(dtype, torch.dtype):
        return dtype
    name = _DTYPES.get(str(dtype).strip().lower())
    if name is None:
        raise SemalignError(f"unknown dtype {dtype!r}; use one of bf16, fp16, fp32, auto")
    if name == "stored":
        return "auto"
    if name == "auto":
        name = _DTYPES[native_compute_dtype(device)]
    return getattr(torch, name)


def check_model_dir(path: Path) -> None:
    """Refuse, with one line naming the fix, a local model directory that cannot load (before transformers does)."""
    fix = "re-download, re-export or re-convert it (assets: `semalign assets fetch NAME --force`)"
    try:
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8-sig"))
    except (OSError, ValueError) as exc:
        raise SemalignError(f"{path}/config.json cannot be read ({type(exc).__name__}); {fix}") from None
    if not isinstance(cfg, dict):
        raise SemalignError(f"{path}/config.json is not a JSON object; {fix}")
    st = sorted(path.glob("*.safetensors"))
    if not st and not any(path.glob("pytorch_model*.bin")):
        raise SemalignError(f"model directory {path} has config.json but no weights (*.safetensors); {fix}")
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        except (OSError, ValueError, KeyError, AttributeError):
            raise SemalignError(f"{index} cannot be read; {fix}") from None
        missing = sorted(s for s in shards if not (path / s).is_file())
        if missing:
            raise SemalignError(f"model directory {path} lacks weight shard(s) {', '.join(missing[:3])}; {fix}")
    for f in st:
        problem = safetensors_problem(f)
        if problem:
            raise SemalignError(f"model directory {path}: {problem}; {fix}")


def _load_failure(rm: ResolvedModel, exc: BaseException) -> SemalignError:
    text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
    if "does not recognize this architecture" in str(exc) or isinstance(exc, KeyError):
        return SemalignError(f"cannot load {rm.spec or rm.path}: its model type is not supported by the installed "
                             f"transformers ({text}); see `semalign ls architectures` for supported models")
    return SemalignError(f"cannot load {rm.spec or rm.path} ({type(exc).__name__}: {text}); check that the "
                         "directory holds a complete Hugging Face model (config.json, weights, tokenizer files)")


def _from_pretrained(cls: Any, rm: ResolvedModel, **kw: Any) -> Any:
    if rm.kind != "hub":
        if rm.gguf_file and "dtype" in kw:  # a model, not a tokenizer
            kw = {**gguf_dense_kwargs(), **kw}
        if rm.kind in ("local", "run", "asset") and "dtype" in kw:
            check_model_dir(Path(rm.path))
        try:
            return cls.from_pretrained(rm.path, **rm.load_kwargs(), **kw)
        except SemalignError:
            raise
        except (OSError, ValueError, KeyError, TypeError, RuntimeError, ImportError) as exc:
            raise _load_failure(rm, exc) from exc
        except Exception as exc:  # safetensors' SafetensorError and other loader-specific errors
            if type(exc).__name__ in ("SafetensorError", "HeaderTooLarge", "UnpicklingError"):
                raise _load_failure(rm, exc) from exc
            raise
    try:
        if _hub_offline():
            kw["local_files_only"] = True
        return cls.from_pretrained(rm.path, **kw)
    except Exception as e:  # hub/network failures come as many types (OSError, httpx, HfHubHTTPError, ...)
        raise _hub_error(rm.spec or rm.path, e) from e


def _as_resolved(spec: str | os.PathLike[str] | ResolvedModel) -> ResolvedModel:
    return spec if isinstance(spec, ResolvedModel) else resolve_model(spec)


def load_tokenizer(spec: str | os.PathLike[str] | ResolvedModel, **kwargs: Any) -> Any:
    """The tokenizer for ``spec`` (any form :func:`resolve_model` accepts)."""
    from transformers import AutoTokenizer

    return _from_pretrained(AutoTokenizer, _as_resolved(spec), **kwargs)


def load_model(spec: str | os.PathLike[str] | ResolvedModel, dtype: str | torch.dtype = "auto",
               device: str = "auto", *, trust_remote_code: bool = False,
               with_tokenizer: bool = True) -> tuple[Any, Any, ResolvedModel]:
    """Load ``(model, tokenizer, resolved)`` in eval mode on ``device`` with ``dtype``."""
    from transformers import AutoModelForCausalLM

    rm = _as_resolved(spec)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    kw: dict[str, Any] = {"dtype": torch_dtype}
    if trust_remote_code:
        kw["trust_remote_code"] = True
    if dev.type != "cpu":
        kw["device_map"] = str(dev)
    shown = "stored dtype" if torch_dtype == "auto" else str(torch_dtype).removeprefix("torch.")
    log.info("loading %s (%s) as %s on %s%s", rm.display_name, rm.kind, shown, dev,
             f" (--dtype {dtype})" if str(dtype) in ("auto", "stored") else "")
    model = _from_pretrained(AutoModelForCausalLM, rm, **kw)
    if dev.type == "cpu":
        model.to(dev)
    model.eval()
    tok = load_tokenizer(rm, **({"trust_remote_code": True} if trust_remote_code else {})) if with_tokenizer else None
    return model, tok, rm


def _weight_files(path: Path) -> list[Path]:
    if path.is_file():
        return [path]
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise SemalignError(f"{path} has no .safetensors files to hash; pass a saved model directory or file")
    return files


def model_content_hash(path_or_model: str | os.PathLike[str] | ResolvedModel | Any) -> str:
    """SHA-256 identifying model weights.

    For a directory (or :class:`ResolvedModel`): over the bytes of its ``*.safetensors`` files (sorted by name;
    a GGUF for GGUF specs), cached in a sidecar keyed by size + mtime so the second call is instant. For an
    in-memory model: over its state dict (names, dtypes, shapes, bytes); that value differs from the file hash.
    """
    if isinstance(path_or_model, ResolvedModel):
        rm = path_or_model
        if rm.kind == "hub":
            raise SemalignError(f"cannot hash hub model {rm.path!r} without downloading it; load and pass the model")
        base = Path(rm.path)
        path_or_model = base / rm.gguf_file if rm.gguf_file else base
    if isinstance(path_or_model, (str, os.PathLike)):
        return _hash_files(Path(path_or_model))
    return _hash_state_dict(path_or_model)


def _hash_files(path: Path) -> str:
    if not path.exists():
        raise SemalignError(f"cannot hash {path}: it does not exist; pass a saved model directory or weights file")
    files = _weight_files(path)
    sidecar = (path if path.is_dir() else path.parent) / HASH_SIDECAR
    key = {f.name: [f.stat().st_size, f.stat().st_mtime_ns] for f in files}
    cache: dict[str, Any] = {}
    with contextlib.suppress(OSError, ValueError):
        cache = json.loads(sidecar.read_text(encoding="utf-8"))
    entry_name = "__dir__" if path.is_dir() else path.name
    entry = cache.get(entry_name)
    if isinstance(entry, dict) and entry.get("key") == key:
        return str(entry["sha256"])
    h = hashlib.sha256()
    for f in files:
        with open(f, "rb") as fh:
            while buf := fh.read(1 << 22):
                h.update(buf)
    digest = h.hexdigest()
    cache[entry_name] = {"key": key, "sha256": digest}
    with contextlib.suppress(OSError):
        atomic_write_json(sidecar, cache)
    return digest


def _hash_state_dict(model: Any) -> str:
    import torch

    state = model.state_dict()
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(t.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


__all__ = [
    "ResolvedModel",
    "load_model",
    "load_tokenizer",
    "model_content_hash",
    "resolve_device",
    "resolve_dtype",
    "resolve_model",
    "save_model_dir",
]
