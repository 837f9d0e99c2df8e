import torch

from semalign.models import precision


def test_env_override_and_resolution(monkeypatch):
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv("SEMALIGN_CPU_BF16", "1")
    assert precision.native_compute_dtype("cpu") == "bf16"
    precision.cpu_has_native_bf16.cache_clear()
    monkeypatch.setenv("SEMALIGN_CPU_BF16", "0")
    assert precision.native_compute_dtype(torch.device("cpu")) == "fp32"
    assert precision.resolve_compute_dtype("auto", "cpu") == "fp32"
    assert precision.resolve_compute_dtype("bf16", "cpu") == "bf16"
    precision.cpu_has_native_bf16.cache_clear()
