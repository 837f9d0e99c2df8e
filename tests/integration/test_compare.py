"""`semalign compare` on the tiny pair: every method on identical splits, one table, one plot; errors are one line."""

from __future__ import annotations

import json

import pytest

from semalign.cli.main import main
from semalign.compare import _gap, markdown, parse_overrides
from semalign.errors import SemalignError


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Keep the eval result cache of these tests out of the user's cache directory."""
    monkeypatch.setenv("SEMALIGN_CACHE", str(tmp_path / "cache"))


def _args(tiny_dirs, data, out, methods, *extra):
    t, s = tiny_dirs
    return ["compare", "--teacher", str(t), "--student", str(s), "--data-dir", str(data), "--output", str(out),
            "--methods", methods, "--steps", "1", "--eval-limit", "6", "--dtype", "fp32", "--set", "micro_batch=4",
            "--set", "nll_examples=2", "--set", "seeking.seed_examples=2", "--set", "laten.samples_per_step=4",
            "--set", "lora_sft.batch_size=4", "--set", "logit_kd.batch_size=4", "--set", "seeking.batch_size=4",
            "-q", *extra]


def test_compare_all_methods(tiny_dirs, eval_data_dir, tmp_path):
    out = tmp_path / "cmp"
    methods = "semalign,seeking,laten,lora-sft,logit-kd"
    assert main(_args(tiny_dirs, eval_data_dir, out, methods)) == 0
    res = json.loads((out / "compare" / "results.json").read_text())
    names = [r["name"] for r in res["rows"]]
    assert names == ["teacher", "student", *methods.split(",")]
    assert all(r["status"] == "completed" for r in res["rows"]), [r.get("error") for r in res["rows"]]
    for r in res["rows"]:
        assert r["metrics"]["mmlu"] is not None and r["nll"] is not None
        assert r["peak_rss_mb"] > 0 and (r["wall_seconds"] or r["eval_seconds"]) is not None
    for r in res["rows"][2:]:
        assert "mmlu" in r["gap_closed"] and "nll" in r["gap_closed"]
        assert (out / "runs" / r["name"] / "student" / "config.json").is_file()
    # identical splits and seeds for every method
    manifests = {json.dumps(json.loads((out / "runs" / m / "data_manifest.json").read_text())["splits"], sort_keys=True)
                 for m in methods.split(",")}
    assert len(manifests) == 1
    table = (out / "compare" / "table.md").read_text()
    assert "| teacher |" in table and "| logit-kd |" in table and "gap closed" in table
    assert (out / "compare" / "bars.png").stat().st_size > 1000
    report = (out / "compare" / "report.md").read_text()
    assert "lora-sft" in report and "bars.png" in report
    html = (out / "compare" / "report.html").read_text()
    assert "data:image/png;base64," in html
    # resume reuses the finished runs
    assert main(_args(tiny_dirs, eval_data_dir, out, "lora-sft", "--resume")) == 0


def test_compare_errors_are_one_line(tiny_dirs, eval_data_dir, tmp_path, capsys):
    assert main(_args(tiny_dirs, eval_data_dir, tmp_path / "a", "seeking,latem")) == 2
    err = capsys.readouterr().err
    assert "unknown method 'latem'" in err and "laten" in err and len(err.strip().splitlines()) == 1
    assert main(_args(tiny_dirs, eval_data_dir, tmp_path / "b", "laten", "--set", "laten.transfer_rate=2")) == 2
    assert "transfer rate must be in (0, 1]" in capsys.readouterr().err
    assert main(_args(tiny_dirs, eval_data_dir, tmp_path / "c", "seeking", "--set", "seeking.rank=64")) == 0
    res = json.loads((tmp_path / "c" / "compare" / "results.json").read_text())
    row = res["rows"][-1]
    assert row["status"] == "failed" and "lower --seeking-rank" in row["error"]


def test_helpers():
    assert parse_overrides(["a.b=3", "c=x", "a.d=0.5"]) == {"a": {"b": 3, "d": 0.5}, "c": "x"}
    with pytest.raises(SemalignError):
        parse_overrides(["novalue"])
    assert _gap(0.6, 0.5, 0.7) == pytest.approx(0.5) and _gap(0.6, 0.5, 0.5) is None
    res = {"eval_tasks": ["mmlu"], "task": "mmlu", "teacher": "t", "student": "s", "seed": 1, "steps": 2,
           "eval_limit": 3, "splits": {}, "rows": [
               {"name": "teacher", "metrics": {"mmlu": 0.7}, "stderr": {"mmlu": 0.1}, "status": "completed"},
               {"name": "x", "metrics": {"mmlu": None}, "stderr": {}, "status": "failed", "error": "boom",
                "gap_closed": {"mmlu": None}}]}
    md = markdown(res)
    assert "70.0 ± 10.0" in md and "failed (boom)" in md


def test_compare_paired_statistics(tiny_dirs, eval_data_dir, tmp_path):
    out = tmp_path / "cmp"
    assert main(_args(tiny_dirs, eval_data_dir, out, "lora-sft")) == 0
    res = json.loads((out / "compare" / "results.json").read_text())
    assert res["eval_limits"] == {"mmlu": 6}
    row = res["rows"][-1]
    p = row["paired"]["mmlu"]
    assert p["n"] == 6 and 0 <= p["mcnemar_p"] <= 1 and "gap_closed_ci95" in p and "prior_corrected" in p
    assert set(row["letters"]["pred_shares"]) == set("ABCD")
    table = (out / "compare" / "table.md").read_text()
    assert "Paired against the untouched student" in table and "McNemar p" in table
    assert "knowledge vs format" in table and "prior-corrected" in table
