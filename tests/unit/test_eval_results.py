"""results.json schema, sample logs, the result cache, compare_table and the report section."""

import json
from pathlib import Path

import pytest

from semalign.errors import SemalignError
from semalign.eval import compare_table, evaluate, markdown_table, write_report_section
from semalign.eval.results import REQUIRED_KEYS, check_schema, load_results
from semalign.testing import tiny_model, tiny_tokenizer


pytestmark = pytest.mark.usefixtures("one_thread")


FIXTURES = Path(__file__).resolve().parents[1] / "fixtures" / "eval"


@pytest.fixture(scope="module")
def pair():
    tok = tiny_tokenizer()
    return tiny_model(tokenizer=tok, layers=2), tok


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMALIGN_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_results_schema_and_files(pair, tmp_path, cache):
    model, tok = pair
    out = tmp_path / "out"
    res = evaluate(model, tok, "mmlu,gsm8k,humaneval", data_dir=FIXTURES, allow_code_execution=True,
                   max_new_tokens=4, output_dir=out, progress=False, exclude_ids={"mmlu-test-00001", "HumanEval/2"},
                   model_name="tiny")
    assert all(k in res for k in REQUIRED_KEYS)
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["results"] == json.loads(json.dumps(res["results"]))
    for task in ("mmlu", "gsm8k", "humaneval"):
        r, cfg = res["results"][task], res["configs"][task]
        m = r["primary_metric"]
        assert 0.0 <= r[m] <= 1.0 and f"{m}_stderr" in r and len(r[f"{m}_ci95"]) == 2
        for key in ("num_fewshot", "chat_format", "chat_template_sha256", "seed", "dtype", "batch_size", "source",
                    "data_sha256"):
            assert key in cfg, (task, key)
        lines = (out / f"samples_{task}.jsonl").read_text().splitlines()
        assert len(lines) == r["n"] and "prompt" in json.loads(lines[0])
    assert res["results"]["mmlu"]["n_excluded"] == 1 and res["results"]["mmlu"]["n"] == 10
    assert res["results"]["humaneval"]["n_excluded"] == 1 and res["results"]["humaneval"]["n"] == 2
    assert res["n-samples"]["mmlu"] == {"original": 11, "excluded": 1, "effective": 10}
    assert res["configs"]["gsm8k"]["max_new_tokens"] == 4 and res["configs"]["gsm8k"]["temperature"] == 0.0
    assert res["configs"]["humaneval"]["temperature"] == 0.0 and res["configs"]["humaneval"]["n_samples"] == 1
    assert set(res["breakdown"]["mmlu"]["per_subject"]) == {"abstract_algebra", "astronomy", "high_school_biology"}
    assert {"torch", "transformers", "python", "semalign"} <= set(res["versions"])
    assert res["config"]["model"] == "tiny" and res["config"]["dtype"] == "float32"
    assert not cache.exists()  # no cache_key -> nothing cached
    table = markdown_table(res)
    assert table.startswith("| Task |") and "| mmlu | acc |" in table and "| humaneval | pass@1 |" in table
    assert load_results(out)["results"].keys() == res["results"].keys()


def test_cache_reuses_results_for_the_same_key_and_settings(pair, cache):
    model, tok = pair
    kw = dict(data_dir=FIXTURES, progress=False, cache_key="model-hash-1")
    first = evaluate(model, tok, ["mmlu"], **kw)
    assert first["results"]["mmlu"]["cached"] is False and any(cache.rglob("*.json"))
    second = evaluate(model, tok, ["mmlu"], **kw)
    assert second["results"]["mmlu"]["cached"] is True
    assert second["results"]["mmlu"]["acc"] == first["results"]["mmlu"]["acc"]
    other = evaluate(model, tok, ["mmlu"], **{**kw, "limit": 3})  # a different setting -> recomputed
    assert other["results"]["mmlu"]["cached"] is False
    other_key = evaluate(model, tok, ["mmlu"], **{**kw, "cache_key": "model-hash-2"})
    assert other_key["results"]["mmlu"]["cached"] is False


def test_corrupt_cached_eval_is_recomputed_with_a_warning(pair, cache, caplog):
    model, tok = pair
    kw = dict(data_dir=FIXTURES, progress=False, cache_key="model-hash-3", limit=4)
    first = evaluate(model, tok, ["mmlu"], **kw)
    (data,) = list((cache / "stages" / "eval").glob("*/data.json"))
    data.write_text(data.read_text().replace('"acc"', '"acx"', 1))  # same size, different bytes
    with caplog.at_level("WARNING", logger="semalign.cache"):
        again = evaluate(model, tok, ["mmlu"], **kw)
    assert again["results"]["mmlu"]["cached"] is False and any("corrupt" in r.getMessage() for r in caplog.records)
    assert again["results"]["mmlu"]["acc"] == first["results"]["mmlu"]["acc"]
    assert evaluate(model, tok, ["mmlu"], **kw)["results"]["mmlu"]["cached"] is True


def test_bad_arguments_are_one_line_errors(pair):
    model, tok = pair
    with pytest.raises(SemalignError, match="Did you mean 'mmlu'"):
        evaluate(model, tok, ["mmlx"], progress=False)
    with pytest.raises(SemalignError, match="batch-size"):
        evaluate(model, tok, ["mmlu"], batch_size="big", progress=False)
    with pytest.raises(SemalignError, match="not a directory"):
        evaluate(model, tok, ["mmlu"], data_dir="/nonexistent/dir", progress=False)
    with pytest.raises(SemalignError, match="temperature"):
        evaluate(model, tok, ["humaneval"], allow_code_execution=True, n_samples=3, temperature=0.0,
                 data_dir=FIXTURES, progress=False)


def _res(values: dict, **cfg) -> dict:
    return {"schema_version": 1, "date": "d", "versions": {}, "config": {"dtype": "bfloat16"}, "n-samples": {},
            "results": {t: {"primary_metric": m, m: v, "n": 10, "n_excluded": 0} for t, (m, v) in values.items()},
            "configs": {t: {"num_fewshot": 0, "chat_format": "tokenizer", **cfg} for t in values}}


def test_compare_table_gap_closed():
    teacher = _res({"mmlu": ("acc", 0.50), "gsm8k": ("exact_match", 0.30), "humaneval": ("pass@1", 0.6)})
    before = _res({"mmlu": ("acc", 0.30), "gsm8k": ("exact_match", 0.30), "humaneval": ("pass@1", 0.4)})
    after = _res({"mmlu": ("acc", 0.35), "gsm8k": ("exact_match", 0.32), "humaneval": ("pass@1", 0.3)})
    md, rows = compare_table(teacher, before, after)
    by = {r["task"]: r for r in rows}
    assert by["mmlu"]["gap_closed"] == pytest.approx(0.25)
    assert by["mmlu"]["delta"] == pytest.approx(0.05)
    assert by["gsm8k"]["gap_closed"] is None  # teacher == before
    assert by["humaneval"]["gap_closed"] == pytest.approx(-0.5)
    assert "| mmlu | acc | 50.0 | 30.0 | 35.0 | +5.0 | 25% |" in md
    assert "| gsm8k | exact_match | 30.0 | 30.0 | 32.0 | +2.0 | n/a |" in md
    with pytest.raises(SemalignError, match="not a semalign eval result"):
        compare_table({}, before, after)


def test_report_section_states_settings_and_mismatches():
    t = _res({"mmlu": ("acc", 0.5)}, limit=285)
    b = _res({"mmlu": ("acc", 0.3)}, limit=285)
    a = _res({"mmlu": ("acc", 0.4)}, limit=57)
    md = write_report_section(t, b, a, title="Benchmarks")
    assert md.startswith("## Benchmarks") and "| mmlu | acc |" in md and "50%" in md
    assert "chosen by this project" in md
    assert "`limit` differs" in md
    same = write_report_section(t, b, _res({"mmlu": ("acc", 0.4)}, limit=285))
    assert "differs" not in same
    check_schema(t)


def test_per_task_limits_and_sample_lookup(pair, tmp_path, cache):
    from semalign.eval.results import load_samples
    from semalign.eval.tasks import eval_limits

    assert eval_limits(None, ["mmlu", "gsm8k", "humaneval"]) == {"mmlu": 1000, "gsm8k": 200, "humaneval": None}
    assert eval_limits(5, ["mmlu", "gsm8k"]) == {"mmlu": 5, "gsm8k": 5}
    model, tok = pair
    out = tmp_path / "lim"
    res = evaluate(model, tok, "mmlu,gsm8k", data_dir=FIXTURES, max_new_tokens=2, output_dir=out, progress=False,
                   limit={"mmlu": 6, "gsm8k": 2})
    assert res["results"]["mmlu"]["n"] == 6 and res["results"]["gsm8k"]["n"] == 2
    assert res["configs"]["mmlu"]["limit"] == 6 and res["config"]["limit"] == {"mmlu": 6, "gsm8k": 2}
    assert res["samples_files"] == {"mmlu": "samples_mmlu.jsonl", "gsm8k": "samples_gsm8k.jsonl"}
    assert "acc_prior_corrected" in res["results"]["mmlu"] and "letters" in res["breakdown"]["mmlu"]
    assert len(load_samples(out / "results.json", "mmlu")) == 6 and len(load_samples(out, "gsm8k")) == 2
    with pytest.raises(SemalignError, match="no humaneval results"):
        load_samples(out, "humaneval")
    (out / "samples_mmlu.jsonl").unlink()
    with pytest.raises(SemalignError, match="no per-question records for mmlu"):
        load_samples(out, "mmlu")
