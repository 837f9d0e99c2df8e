"""Tables never cut what a user copies (names, paths) at 80 columns; `semalign env` reports what decides speed."""

from __future__ import annotations

import json

from semalign.cli.main import main


def test_assets_list_prints_names_and_paths_whole_at_80_columns(tmp_path, monkeypatch, capsys):
    from semalign.models import assets

    monkeypatch.setenv("COLUMNS", "80")
    name = "qwen2.5-coder-1.5b-instruct"
    long_path = tmp_path / ("a-rather-long-cache-directory-name-" * 3) / "models" / name
    monkeypatch.setattr(assets, "list_assets", lambda: [
        {"name": name, "architecture": "qwen2", "fetched": True, "path": str(long_path), "disk_size": "3.6 GB",
         "licence": "Apache-2.0 upstream (Qwen); the chunk packages state no licence"}])
    assert main(["assets", "list"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out
    assert any(name in line for line in out.splitlines() if line.startswith("│"))  # one table cell, whole
    assert f"{name}: {long_path}" in out.splitlines()


def test_ls_losses_names_whole(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "40")
    assert main(["ls", "losses"]) == 0
    out = capsys.readouterr().out
    assert "…" not in out and "output:kl_source" in out and "layer:fisher_logits" in out


def test_env_reports_cpu_flags_dtype_and_threads(capsys):
    assert main(["env"]) == 0
    info = json.loads(capsys.readouterr().out)
    cpu = info["cpu"]
    assert {"model", "flags", "dtype_auto", "torch_threads", "native_bf16"} <= set(cpu)
    assert cpu["dtype_auto"]["cpu"] in ("bf16", "fp32")
    if cpu["flags"] is not None:
        assert {"avx512_bf16", "amx_bf16"} <= set(cpu["flags"])
    assert info["stage_cache"]["root"].endswith("stages")
