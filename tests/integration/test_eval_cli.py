"""`semalign eval` end to end on a tiny model saved to disk, with fixture data (no network, no real assets)."""

import json
from pathlib import Path

import pytest

from semalign.testing import tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("tiny-model")
    tok = tiny_tokenizer()
    tiny_model(tokenizer=tok, layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    return d


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SEMALIGN_CACHE", str(tmp_path / "cache"))


def _run(argv):
    from semalign.cli.main import main

    return main(argv)


def test_eval_cli_all_tasks(model_dir, tmp_path, capsys):
    out = tmp_path / "eval"
    excl = tmp_path / "used.json"
    excl.write_text(json.dumps(["mmlu-test-00003", "mbpp-12"]))
    rc = _run(["eval", "--model", str(model_dir), "--tasks", "mmlu,gsm8k,humaneval,mbpp", "--data-dir", str(FIXTURES),
               "--allow-code-execution", "--max-new-tokens", "6", "--dtype", "fp32", "--limit", "6",
               "--exclude-ids", str(excl), "--output", str(out), "--no-progress", "-q"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert "| Task | Metric |" in captured.out and "| mbpp | pass@1 |" in captured.out
    res = json.loads((out / "results.json").read_text())
    assert set(res["results"]) == {"mmlu", "gsm8k", "humaneval", "mbpp"}
    assert res["results"]["mmlu"]["n"] == 6 and res["results"]["mmlu"]["n_excluded"] == 1
    assert res["results"]["mbpp"]["n"] == 1 and res["results"]["mbpp"]["n_excluded"] == 1  # 600 is not in 11-510
    assert res["config"]["model_hash"] and res["config"]["dtype"] == "float32"
    assert res["configs"]["mbpp"]["mbpp_set"] == "test"
    for task in res["results"]:
        assert (out / f"samples_{task}.jsonl").is_file()
    # the second run hits the cache keyed by the model's content hash
    rc = _run(["eval", "--model", str(model_dir), "--tasks", "mmlu", "--data-dir", str(FIXTURES), "--dtype", "fp32",
               "--limit", "6", "--exclude-ids", str(excl), "--output", str(tmp_path / "again"), "--no-progress", "-q"])
    assert rc == 0
    again = json.loads((tmp_path / "again" / "results.json").read_text())
    assert again["results"]["mmlu"]["cached"] is True
    assert again["results"]["mmlu"]["acc"] == res["results"]["mmlu"]["acc"]


def test_eval_cli_refuses_code_without_flag(model_dir, capsys):
    rc = _run(["eval", "--model", str(model_dir), "--tasks", "humaneval", "--data-dir", str(FIXTURES)])
    err = capsys.readouterr().err
    assert rc == 2 and "--allow-code-execution" in err and "sandbox" in err


def test_eval_cli_unknown_task(model_dir, capsys):
    rc = _run(["eval", "--model", str(model_dir), "--tasks", "gsm9k"])
    assert rc == 2 and "Did you mean 'gsm8k'" in capsys.readouterr().err


def test_exclude_ids_file_formats(tmp_path):
    from semalign.cli.eval_cmd import _read_ids

    (tmp_path / "a.json").write_text(json.dumps(["x", 1]))
    (tmp_path / "b.json").write_text(json.dumps({"ids": ["y"]}))
    (tmp_path / "c.json").write_text(json.dumps({"splits": {"train": {"ids": ["t1"]}, "align": {"ids": ["a1"]},
                                                            "eval": {"ids": ["e1"]}}}))
    (tmp_path / "d.txt").write_text("mbpp-248\n\nmbpp-427\n")
    assert _read_ids(tmp_path / "a.json") == {"x", "1"}
    assert _read_ids(tmp_path / "b.json") == {"y"}
    assert _read_ids(tmp_path / "c.json") == {"t1", "a1"}
    assert _read_ids(tmp_path / "d.txt") == {"mbpp-248", "mbpp-427"}
    assert _read_ids(None) is None


def test_eval_baseline_paired(model_dir, tmp_path, capsys):
    base = tmp_path / "base"
    common = ["eval", "--model", str(model_dir), "--tasks", "mmlu", "--data-dir", str(FIXTURES), "--limit", "8",
              "--no-progress", "-q"]
    assert _run(common + ["--output", str(base)]) == 0
    capsys.readouterr()
    out = tmp_path / "new"
    assert _run(common + ["--output", str(out), "--baseline", str(base / "results.json"),
                          "--teacher-results", str(base)]) == 0
    printed = capsys.readouterr().out
    assert "McNemar p" in printed and "prior-corrected" in printed and "MMLU letters" in printed
    p = json.loads((out / "results.json").read_text())["paired"]
    assert p["baseline"].endswith("results.json") and p["mmlu"]["n"] == 8 and p["mmlu"]["diff"] == 0
    assert p["mmlu"]["mcnemar_p"] == 1.0
    # without --output the paired table is still printed
    assert _run(common + ["--baseline", str(base)]) == 0
    assert "McNemar p" in capsys.readouterr().out
    # a baseline without per-question records: one-line error before any model is loaded
    (base / "samples_mmlu.jsonl").unlink()
    assert _run(common + ["--baseline", str(base)]) == 2
    err = capsys.readouterr().err
    assert "no per-question records for mmlu" in err and len(err.strip().splitlines()) == 1
