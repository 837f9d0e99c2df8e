"""Each bad input ends with a one-line error naming the problem and the fix, and no half-written output."""

from __future__ import annotations

import json

import pytest

from semalign.cli.main import main


def run(capsys, *args) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(list(args))
    err = capsys.readouterr().err.strip()
    return rc, err


def base(tiny_dirs, data_dir, out):
    t, s = tiny_dirs
    return ["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir", str(data_dir),
            "--output", str(out), "--steps", "2", "--batch-size", "4", "--micro-batch", "2", "--nll-examples", "2", "-q"]


def one_line(err: str) -> bool:
    return err.startswith("error: ") and len(err.splitlines()) == 1 and "Traceback" not in err


def test_unknown_model_name(tiny_dirs, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = base(tiny_dirs, data_dir, out)
    args[args.index("--teacher") + 1] = "no-such-model"
    rc, err = run(capsys, *args)
    assert rc == 2 and one_line(err) and "no-such-model" in err and "semalign assets list" in err
    assert not out.exists()


def test_unknown_model_path(tiny_dirs, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = base(tiny_dirs, data_dir, out)
    args[args.index("--student") + 1] = str(tmp_path / "missing" / "dir")
    rc, err = run(capsys, *args)
    assert rc == 2 and one_line(err) and not out.exists()


def test_unknown_task(tiny_dirs, data_dir, tmp_path, capsys):
    out = tmp_path / "run"
    args = base(tiny_dirs, data_dir, out)
    args[args.index("--task") + 1] = "mmlux"
    rc, err = run(capsys, *args)
    assert rc == 2 and one_line(err) and "Did you mean 'mmlu'" in err and not out.exists()


def test_unknown_method(tiny_dirs, data_dir, tmp_path, capsys):
    rc, err = run(capsys, *base(tiny_dirs, data_dir, tmp_path / "r"), "--method", "semalgn")
    assert rc == 2 and one_line(err) and "semalign" in err


def test_vocabularies_differ(tiny_dirs, data_dir, tmp_path, capsys):
    from semalign.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(corpus=["zzz yyy xxx www vvv", "qwerty asdf zxcv", "0 1 2 3"])
    other = tiny_model("qwen2", tokenizer=tok, hidden=32, layers=2)
    d = tmp_path / "other"
    other.save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "run"
    args = base(tiny_dirs, data_dir, out)
    args[args.index("--student") + 1] = str(d)
    rc, err = run(capsys, *args)
    assert rc == 2 and one_line(err) and "vocabularies differ" in err and not out.exists()


@pytest.mark.parametrize("content,needle", [("", "no examples"), ('{"messages": [}\n', ":1: invalid JSON"),
                                            ('{"messages": []}\n{"x": 1}\n', ":1:"),
                                            ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\nnot json\n', ":2: invalid JSON")])
def test_malformed_or_empty_jsonl(tiny_dirs, tmp_path, capsys, content, needle):
    from tests.conftest import mmlu_like, write_protocol_dir

    root = write_protocol_dir(tmp_path / "data", "mmlu", mmlu_like)
    bad = root / "pkt-splits" / "mmlu" / "mmlu_align_split.jsonl"
    bad.write_text(content)
    out = tmp_path / "run"
    rc, err = run(capsys, *base(tiny_dirs, root, out))
    assert rc == 2 and one_line(err) and str(bad) in err and needle in err
    assert not out.exists()


def test_non_finite_loss_stops_and_keeps_last_good_state(tiny_dirs, data_dir, tmp_path, capsys, monkeypatch):
    import torch

    from semalign.methods.semalign import losses

    calls = {"n": 0}
    real = losses.LAYER_LOSSES.get("cosine")

    def flaky(*a, **k):
        calls["n"] += 1
        v = real(*a, **k)
        return v * float("nan") if calls["n"] > 2 else v  # step 1 = 2 micro-batches, then NaN

    monkeypatch.setitem(losses.LAYER_LOSSES._items, "cosine", flaky)
    out = tmp_path / "run"
    rc, err = run(capsys, *base(tiny_dirs, data_dir, out))
    assert rc == 2 and one_line(err) and "non-finite loss" in err and "step 2" in err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "failed"
    state = json.loads((out / "checkpoints" / "v1" / "trainer_state.json").read_text())
    assert state["step"] == 1  # the last good state
    saved = torch.load(out / "checkpoints" / "v1" / "state.pt", weights_only=False)
    assert all(torch.isfinite(t).all() for t in saved["trainables"].values())
    assert not (out / "student").exists()
    assert not list(out.glob(".*tmp*"))


def test_bad_flag_value(tiny_dirs, data_dir, tmp_path, capsys):
    rc, err = run(capsys, *base(tiny_dirs, data_dir, tmp_path / "r"), "--laten-transfer-rate", "1.5")
    assert rc == 2 and one_line(err) and "transfer_rate" in err and "(0, 1]" in err
