"""Data: every reader in the package against what users' files really contain (docs/reliability.md §Data)."""

from __future__ import annotations

import json

import pytest

from semalign.data.jsonl import read_jsonl

from .conftest import cli, refused, split_file, transfer_args

GOOD = {"messages": [{"role": "user", "content": "What is 1 + 1?\nA. 2\nB. 3\nC. 4\nD. 5\nAnswer:"},
                     {"role": "assistant", "content": "The answer is: A"}]}


def _mmlu_row(i: int, question: str = "What is 2 + 2?") -> dict:
    return {"id": f"q{i}", "subject": "anatomy", "question": question, "choices": ["4", "5", "6", "7"], "answer": "A"}


# ------------------------------------------------------------------ protocol splits: refused with file:line
BAD_SPLITS = {
    "invalid-utf8": (b'{"messages": []}\n' + b'\xff\xfe bad bytes\n', ":2: not valid UTF-8"),
    "broken-line": ((json.dumps(GOOD) + "\n{\"messages\": [\n").encode(), ":2: invalid JSON"),
    "empty-file": (b"", "no examples"),
    "only-blank-lines": (b"\n\n  \n", "no examples"),
    "no-assistant-answer": (json.dumps({"messages": GOOD["messages"][:1]}).encode() + b"\n",
                            "last message must be the assistant"),
    "not-an-object": (b"[1, 2, 3]\n", ":1: expected a JSON object"),
}


@pytest.mark.parametrize("case", sorted(BAD_SPLITS))
def test_protocol_split_refused(case, tiny_dirs, fresh_data, tmp_path, capsys):
    content, needle = BAD_SPLITS[case]
    bad = split_file(fresh_data)
    bad.write_bytes(content)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(*tiny_dirs, fresh_data, out))
    assert refused(rc, err, str(bad), needle, out=out)
    assert not out.exists()  # refused before anything was written


# ------------------------------------------------------------------ protocol splits: odd but valid input is read intact
def _quirky(kind: str) -> tuple[bytes, list[dict]]:
    rows = [json.loads(json.dumps(GOOD)) for _ in range(3)]
    sep = {"u2028": "\u2028", "u2029": "\u2029", "nel": "\u0085"}.get(kind)
    if sep:
        rows[1]["messages"][0]["content"] = f"line one{sep}line two{sep}"
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if kind == "crlf":
        text = text.replace("\n", "\r\n")
    data = text.encode("utf-8")
    if kind == "bom":
        data = b"\xef\xbb\xbf" + data
    if kind == "10mb-line":
        rows[2]["messages"][0]["content"] = "x" * (10 * 1024 * 1024)
        data = "".join(json.dumps(r) + "\n" for r in rows).encode()
    return data, rows


@pytest.mark.parametrize("kind", ["u2028", "u2029", "nel", "bom", "crlf", "10mb-line"])
def test_protocol_split_quirks_read_intact(kind, tmp_path):
    data, rows = _quirky(kind)
    f = tmp_path / "x_align_split.jsonl"
    f.write_bytes(data)
    assert read_jsonl(f) == rows


def test_transfer_completes_on_windows_edited_splits(tiny_dirs, fresh_data, tmp_path, capsys):
    """BOM + CRLF + U+2028 inside a question: the run completes and every record is used."""
    for name in ("extract", "align", "train", "eval"):
        f = split_file(fresh_data, name)
        rows = [json.loads(x) for x in f.read_text().split("\n") if x.strip()]
        rows[0]["messages"][0]["content"] += "\u2028(see above)\u2029"
        f.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode())
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(*tiny_dirs, fresh_data, out))
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"
    assert json.loads((out / "summary.json").read_text())["data"]["extract"] == 4


# ------------------------------------------------------------------ local MMLU (eval --data-dir)
def _eval(capsys, model, data_dir, task="mmlu", *extra):
    return cli(capsys, "eval", "--model", model, "--tasks", task, "--data-dir", data_dir, "--limit", "2",
               "--no-cache", "--no-progress", "-q", *extra)


BAD_MMLU = {
    "broken-line": ((json.dumps(_mmlu_row(0)) + "\n{broken\n").encode(), ":2: invalid JSON"),
    "missing-answer": (json.dumps({k: v for k, v in _mmlu_row(0).items() if k != "answer"}).encode() + b"\n",
                       ":1: the MMLU record has no 'answer' field"),
    "invalid-utf8": (json.dumps(_mmlu_row(0)).encode() + b"\n\xc3\x28\n", ":2: not valid UTF-8"),
    "bad-answer-letter": (json.dumps({**_mmlu_row(0), "answer": "Z"}).encode() + b"\n", ":1: invalid MMLU record"),
}


@pytest.mark.parametrize("case", sorted(BAD_MMLU))
def test_local_mmlu_refused(case, tiny_dirs, tmp_path, capsys):
    content, needle = BAD_MMLU[case]
    f = tmp_path / "d" / "mmlu" / "test.jsonl"
    f.parent.mkdir(parents=True)
    f.write_bytes(content)
    rc, _, err = _eval(capsys, tiny_dirs[1], tmp_path / "d")
    assert refused(rc, err, str(f), needle)


def test_local_mmlu_u2028_bom_crlf_read_intact(tmp_path):
    from semalign.eval.mmlu import load_records

    f = tmp_path / "mmlu" / "test.jsonl"
    f.parent.mkdir(parents=True)
    rows = [_mmlu_row(0, "first\u2028second"), _mmlu_row(1, "plain"), _mmlu_row(2, "nel\u0085here")]
    f.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode())
    docs, src = load_records(tmp_path)
    assert src == str(f) and [d["question"] for d in docs] == ["first\u2028second", "plain", "nel\u0085here"]


# ------------------------------------------------------------------ GSM8K, HumanEval, MBPP local files
def test_gsm8k_broken_line_refused(tiny_dirs, tmp_path, capsys):
    d = tmp_path / "d" / "gsm8k"
    d.mkdir(parents=True)
    (d / "train.jsonl").write_text('{"question": "q", "answer": "x #### 1"}\n{"question": \n')
    (d / "test.jsonl").write_text('{"question": "q", "answer": "x #### 1"}\n')
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(*tiny_dirs, tmp_path / "d", out, task="gsm8k"))
    assert refused(rc, err, str(d / "train.jsonl"), ":2: invalid JSON", out=out)


def test_gsm8k_record_without_answer_refused(tiny_dirs, tmp_path, capsys):
    d = tmp_path / "d" / "gsm8k"
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text('{"question": "How many?"}\n')
    rc, _, err = _eval(capsys, tiny_dirs[1], tmp_path / "d", "gsm8k")
    assert refused(rc, err, str(d / "test.jsonl"), ":1: the record has no 'answer' field")


def test_gsm8k_bom_crlf_read_intact(tmp_path):
    from semalign.data.sources import gsm8k_records

    d = tmp_path / "gsm8k"
    d.mkdir()
    (d / "test.jsonl").write_bytes(b"\xef\xbb\xbf" + b'{"question": "Tom\xe2\x80\xa8has 2", "answer": "1+1 #### 2"}\r\n')
    rows, _ = gsm8k_records("test", tmp_path)
    assert rows == [{"id": "gsm8k-test-0000", "question": "Tom\u2028has 2", "rationale": "1+1", "answer": "2"}]


@pytest.mark.parametrize("content,needle", [
    (b'{"task_id": "HumanEval/0", "prompt": "def f():\\n", "test": "", "entry_point": "f"}\n{oops\n',
     ":2: invalid JSON"),
    (b'{"task_id": "HumanEval/0", "prompt": "def f():\\n", "entry_point": "f"}\n', ":1: the record has no 'test'"),
], ids=["broken-line", "missing-test"])
def test_local_humaneval_refused(content, needle, tiny_dirs, tmp_path, capsys):
    f = tmp_path / "d" / "humaneval" / "HumanEval.jsonl"
    f.parent.mkdir(parents=True)
    f.write_bytes(content)
    rc, _, err = _eval(capsys, tiny_dirs[1], tmp_path / "d", "humaneval", "--allow-code-execution")
    assert refused(rc, err, str(f), needle)


@pytest.mark.parametrize("content,needle", [
    (b'[{"task_id": 11, "prompt": "p", "code": "def f(): pass", "test_list": ["assert f() is None"]},\n', "invalid JSON"),
    (b'[{"task_id": 11, "prompt": "p", "code": "def f(): pass"}]\n', "record 1: the record has no 'test_list'"),
], ids=["broken-json", "missing-test-list"])
def test_local_mbpp_refused(content, needle, tiny_dirs, tmp_path, capsys):
    f = tmp_path / "d" / "mbpp" / "sanitized-mbpp.json"
    f.parent.mkdir(parents=True)
    f.write_bytes(content)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(*tiny_dirs, tmp_path / "d", out, task="mbpp"))
    assert refused(rc, err, str(f), needle, out=out)


# ------------------------------------------------------------------ --exclude-ids
@pytest.mark.parametrize("content,needle", [(b"\xff\xfeid-1\n", ":1: not valid UTF-8"),
                                            (b'["id-1", "id-2"\n', "invalid JSON in --exclude-ids")],
                         ids=["invalid-utf8", "broken-json-list"])
def test_exclude_ids_refused(content, needle, tiny_dirs, tmp_path, capsys):
    f = tmp_path / "ids.json"
    f.write_bytes(content)
    d = tmp_path / "d" / "mmlu"
    d.mkdir(parents=True)
    (d / "test.jsonl").write_text("".join(json.dumps(_mmlu_row(i)) + "\n" for i in range(3)))
    rc, _, err = _eval(capsys, tiny_dirs[1], tmp_path / "d", "mmlu", "--exclude-ids", f)
    assert refused(rc, err, str(f), needle)


def test_exclude_ids_bom_and_crlf_read(tmp_path):
    from semalign.cli.eval_cmd import _read_ids

    a, b = tmp_path / "a.json", tmp_path / "b.txt"
    a.write_bytes(b'\xef\xbb\xbf["q1", "q2"]\r\n')
    b.write_bytes(b"\xef\xbb\xbfq1\r\nq2\r\n")
    assert _read_ids(a) == _read_ids(b) == {"q1", "q2"}


# ------------------------------------------------------------------ --config YAML
BAD_CONFIGS = {
    "invalid-utf8": (b"steps: 2\nteacher: \xff\n", ":2: not valid UTF-8"),
    "broken-yaml": (b"steps: 2\nlr: [1e-3\n", "invalid YAML"),
    "not-a-mapping": (b"- steps\n- 2\n", "must be a YAML mapping"),
    "nan-lr": (b"lr: .nan\n", "'lr'"),
    "unknown-key": (b"stepz: 2\n", "stepz"),
}


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_config_yaml_refused(case, tmp_path, capsys):
    content, needle = BAD_CONFIGS[case]
    f = tmp_path / "run.yaml"
    f.write_bytes(content)
    rc, _, err = cli(capsys, "transfer", "--config", f, "--dry-run")
    assert refused(rc, err, needle)


def test_config_yaml_with_bom_and_crlf_is_read(tmp_path, capsys):
    f = tmp_path / "run.yaml"
    f.write_bytes(b"\xef\xbb\xbfsteps: 3\r\nlr: 0.001\r\nsemalign:\r\n  top_k_layers: 2\r\n")
    rc, out, err = cli(capsys, "transfer", "--config", f, "--dry-run")
    assert rc == 0, err
    assert "steps: 3" in out and "lr: 0.001" in out and "top_k_layers: 2" in out
