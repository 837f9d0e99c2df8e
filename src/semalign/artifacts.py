"""Run directory layout and metadata capture.

``runs/<name>/``: config.resolved.yaml, command.txt, env.json, data_manifest.json, attribution/, layer_map.json,
semantic_map/, checkpoints/, student/ (merged HF model), metrics.jsonl, summary.json, results.json, report.md,
plots/. Everything is written atomically (temp + rename); a crashed run never leaves half a file.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import SemalignError
from .paths import atomic_write_json, atomic_write_text

PACKAGES = ("torch", "transformers", "tokenizers", "peft", "accelerate", "safetensors", "numpy", "pydantic",
            "gguf", "matplotlib", "captum")


def package_versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for name in ("semalign",) + PACKAGES:
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = None
    return out


def git_revision() -> str | None:
    try:
        here = Path(__file__).resolve().parent
        r = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return r.stdout.strip() or None
    except Exception:  # noqa: BLE001
        return None


SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8")


def cpu_info() -> dict[str, Any]:
    """What decides CPU speed here: the model name, the bf16/AMX-relevant flags, torch's kernel level and what
    ``--dtype auto`` resolves to (see :mod:`semalign.models.precision`)."""
    import torch

    from .models.precision import cpu_has_native_bf16, native_compute_dtype

    model, flags = None, set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key, _, val = line.partition(":")
                key = key.strip()
                if key == "model name" and model is None:
                    model = val.strip()
                elif key == "flags" and not flags:
                    flags = set(val.split())
    except OSError:
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except Exception:  # noqa: BLE001 - older torch
        capability = None
    return {"model": model or platform.processor() or platform.machine(),
            "flags": {f: f in flags for f in SPEED_FLAGS} if flags else None,
            "torch_cpu_capability": capability, "native_bf16": cpu_has_native_bf16(),
            "dtype_auto": {"cpu": native_compute_dtype("cpu"),
                           **({"cuda": native_compute_dtype("cuda")} if torch.cuda.is_available() else {})},
            "torch_threads": torch.get_num_threads(), "torch_interop_threads": torch.get_num_interop_threads(),
            "cpu_count": os.cpu_count(),
            "affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}


def env_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu": cpu_info(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda_available": torch.cuda.is_available(),
        "cuda_devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
        "packages": package_versions(),
        "git_revision": git_revision(),
        "hf_offline": os.environ.get("HF_HUB_OFFLINE"),
    }
    return info


def peak_rss_mb() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024.0 if sys.platform != "darwin" else r / 2**20


def check_output_dir(out: Path) -> None:
    """Refuse an ``--output`` that cannot become a run directory (a file, under a file, or not writable)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise SemalignError(f"--output {out} is an existing file, not a directory; choose a directory path")
    probe = out
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise SemalignError(f"--output {out} lies under the file {probe}; choose a directory path")
    if probe.exists() and not os.access(probe, os.W_OK | os.X_OK):
        raise SemalignError(f"--output {out} is not writable ({probe} is read-only or not ours); "
                            "choose another --output")


@dataclass
class RunDir:
    root: Path

    def __post_init__(self) -> None:
        self.root = Path(self.root)

    # paths -------------------------------------------------------------------------------------
    def path(self, *parts: str) -> Path:
        return self.root.joinpath(*parts)

    @property
    def student_dir(self) -> Path:
        return self.path("student")

    @property
    def checkpoint_dir(self) -> Path:
        return self.path("checkpoints")

    # lifecycle ---------------------------------------------------------------------------------
    @classmethod
    def create(cls, root: str | Path, *, resume: bool = False, overwrite: bool = False) -> "RunDir":
        root = Path(root)
        check_output_dir(root)
        if resume:
            from .paths import recover_dirs

            recover_dirs(root)  # a killed run may have left a checkpoint moved aside or temp dirs
        if root.exists() and any(root.iterdir()) and not (resume or overwrite):
            raise SemalignError(
                f"output directory {root} already exists; pass --resume to continue it, "
                "--overwrite to replace it, or choose another --output"
            )
        if root.exists() and overwrite and not resume:
            import shutil

            shutil.rmtree(root)
        if resume and not root.exists():
            raise SemalignError(f"cannot --resume: {root} does not exist; drop --resume to start a new run")
        root.mkdir(parents=True, exist_ok=True)
        return cls(root)

    def write_json(self, name: str, obj: Any) -> Path:
        p = self.path(name)
        atomic_write_json(p, obj)
        return p

    def write_text(self, name: str, text: str) -> Path:
        p = self.path(name)
        atomic_write_text(p, text)
        return p

    def read_json(self, name: str) -> Any:
        return json.loads(self.path(name).read_text())

    def write_summary(self, summary: dict) -> None:
        """Write summary.json even on a full disk: the final status must never stay "running".

        Tries an atomic write; if that fails (no space for a new file), overwrites the existing file in place
        with a compact status record that fits in its blocks; if that fails too, removes it.
        """
        p = self.path("summary.json")
        try:
            atomic_write_json(p, summary)
            return
        except OSError:
            pass
        small = {k: summary[k] for k in ("status", "method", "task", "error") if k in summary}
        try:
            size = p.stat().st_size
            text = json.dumps(small)
            if len(text) > size - 1:
                small["error"] = str(small.get("error", ""))[: max(0, size - 80)]
                text = json.dumps(small)
            if len(text) > size - 1:
                raise OSError("no room")
            with open(p, "r+", encoding="utf-8") as f:
                f.write(text + " " * (size - len(text) - 1) + "\n")
            return
        except OSError:
            pass
        try:
            p.unlink()
        except OSError:
            pass

    def write_command(self, argv: list[str] | None = None) -> None:
        argv = argv if argv is not None else sys.argv
        self.write_text("command.txt", " ".join(shlex.quote(a) for a in argv) + "\n")

    def log_metrics(self, record: dict) -> None:
        """Append one JSON line to metrics.jsonl (flushed, so an interrupted run keeps its history)."""
        record = {"time": round(time.time(), 3), **record}
        step = record.get("step")
        if not getattr(self, "_metrics_checked", False) and isinstance(step, int):
            # First line this process writes: drop lines of this step and later that a killed run logged
            # before it could checkpoint them, so a resumed run never repeats a step in metrics.jsonl.
            self._metrics_checked = True
            if any(m.get("step") is not None and m["step"] >= step for m in self.metrics()):
                self.truncate_metrics(step - 1)
        with open(self.path("metrics.jsonl"), "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()

    def metrics(self) -> list[dict]:
        p = self.path("metrics.jsonl")
        if not p.exists():
            return []
        out = []
        for line in p.read_text(encoding="utf-8", errors="replace").split("\n"):
            if line.strip():
                try:
                    out.append(json.loads(line))
                except ValueError:  # a line torn by a killed process: not a record
                    continue
        return out

    def truncate_metrics(self, after_step: int) -> None:
        """Drop metric lines of steps after ``after_step`` (used when resuming from a checkpoint)."""
        keep = [m for m in self.metrics() if m.get("step") is None or m["step"] <= after_step]
        atomic_write_text(self.path("metrics.jsonl"), "".join(json.dumps(m) + "\n" for m in keep))
