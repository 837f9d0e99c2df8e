"""Choosing the compute dtype: bf16 only where the hardware runs it natively.

bf16 matmuls are ~4.5x faster than fp32 on CPUs with AVX512-BF16 or AMX (e.g. the AMD EPYC machines in
assets.md) but several times *slower* on CPUs without them, where oneDNN emulates bf16 (measured here on an
Intel Xeon with avx512f but no avx512_bf16: 14 GFLOP/s bf16 vs 61 GFLOP/s fp32 on 2 threads). ``--dtype auto``
therefore resolves to bf16 on CUDA devices with bf16 support and on CPUs that advertise ``avx512_bf16`` /
``amx_bf16``, and to fp32 elsewhere. ``SEMALIGN_CPU_BF16=1|0`` overrides the CPU detection.
"""

from __future__ import annotations

import functools
import os

import torch


@functools.lru_cache(maxsize=1)
def cpu_has_native_bf16() -> bool:
    env = os.environ.get("SEMALIGN_CPU_BF16")
    if env is not None:
        return env.strip() not in ("", "0", "false", "no")
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def native_compute_dtype(device: torch.device | str = "cpu") -> str:
    """'bf16' or 'fp32': the fastest safe compute dtype for ``device``."""
    dev = torch.device(device)
    if dev.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    return "bf16" if cpu_has_native_bf16() else "fp32"


def resolve_compute_dtype(dtype: str, device: torch.device | str = "cpu") -> str:
    """Map the user's --dtype (bf16|fp16|fp32|auto) to a concrete one."""
    return native_compute_dtype(device) if dtype == "auto" else dtype
