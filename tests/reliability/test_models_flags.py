"""Models and flags: broken weights, odd pairs and bad values end in one line, good odd input succeeds."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import can_mount_tmpfs, cli, refused, transfer_args


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ------------------------------------------------------------------ models
def test_truncated_safetensors_refused(tiny_dirs, data_dir, tmp_path, capsys):
    s = _copy(tiny_dirs[1], tmp_path / "student")
    w = s / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(tiny_dirs[0], s, data_dir, out))
    assert refused(rc, err, "model.safetensors is truncated", "re-download", out=out) and not out.exists()


def test_safetensors_header_garbage_refused(tiny_dirs, data_dir, tmp_path, capsys):
    s = _copy(tiny_dirs[1], tmp_path / "student")
    (s / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all" + b"\0" * 64)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(tiny_dirs[0], s, data_dir, out))
    assert refused(rc, err, "not a readable safetensors file", out=out)


def test_config_without_weights_refused(tiny_dirs, data_dir, tmp_path, capsys):
    s = _copy(tiny_dirs[1], tmp_path / "student")
    (s / "model.safetensors").unlink()
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(tiny_dirs[0], s, data_dir, out))
    assert refused(rc, err, "has config.json but no weights", out=out)


def test_unreadable_config_json_refused(tiny_dirs, data_dir, tmp_path, capsys):
    s = _copy(tiny_dirs[1], tmp_path / "student")
    (s / "config.json").write_text('{"model_type": "qwen2",')
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(tiny_dirs[0], s, data_dir, out))
    assert refused(rc, err, "config.json cannot be read", out=out)


def test_unsupported_architecture_refused(tiny_dirs, data_dir, tmp_path, capsys):
    s = _copy(tiny_dirs[1], tmp_path / "student")
    cfg = json.loads((s / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "no-such-arch", ["NoSuchArchForCausalLM"]
    (s / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(tiny_dirs[0], s, data_dir, out))
    assert refused(rc, err, "not supported", out=out)


def test_architecture_without_semalign_internals_refused(tiny_dirs, data_dir, tmp_path, capsys, tiny_tok):
    from transformers import GPT2Config, GPT2LMHeadModel

    m = GPT2LMHeadModel(GPT2Config(vocab_size=len(tiny_tok), n_embd=32, n_layer=2, n_head=2, n_positions=256))
    d = tmp_path / "gpt2"
    m.save_pretrained(d)
    tiny_tok.save_pretrained(d)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(tiny_dirs[0], d, data_dir, out))
    assert refused(rc, err, out=out) and "gpt2" in err.lower()


def test_different_vocabularies_refused(tiny_dirs, data_dir, tmp_path, capsys):
    from semalign.testing import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer(corpus=["zzz yyy xxx www vvv", "qwerty asdf zxcv", "0 1 2 3"])
    d = tmp_path / "other"
    tiny_model("qwen2", tokenizer=tok, hidden=32, layers=2).save_pretrained(d)
    tok.save_pretrained(d)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(tiny_dirs[0], d, data_dir, out))
    assert refused(rc, err, "vocabularies differ", out=out) and not out.exists()


def test_tokenizer_without_chat_template_runs(tiny_dirs, data_dir, tmp_path, capsys):
    s = _copy(tiny_dirs[1], tmp_path / "student")
    for f in ("tokenizer_config.json",):
        cfg = json.loads((s / f).read_text())
        cfg.pop("chat_template", None)
        (s / f).write_text(json.dumps(cfg))
    for f in s.glob("chat_template.*"):
        f.unlink()
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(tiny_dirs[0], s, data_dir, out))
    assert rc == 0, err
    assert json.loads((out / "summary.json").read_text())["status"] == "completed"


@pytest.mark.parametrize("shape", ["wider", "deeper"])
def test_student_wider_or_deeper_than_teacher_runs(shape, tiny_dirs, tiny_tok, data_dir, tmp_path, capsys):
    from semalign.testing import tiny_model

    kw = {"wider": dict(hidden=96, layers=2), "deeper": dict(hidden=32, layers=6)}[shape]
    d = tmp_path / "student"
    tiny_model("qwen2", tokenizer=tiny_tok, seed=3, **kw).save_pretrained(d)
    tiny_tok.save_pretrained(d)
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(tiny_dirs[0], d, data_dir, out))
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["roundtrip"]["equal"]


def test_cuda_without_cuda_refused(tiny_dirs, data_dir, tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(*tiny_dirs, data_dir, out, "--device", "cuda"))
    assert refused(rc, err, "CUDA is not available", "--device cpu", out=out) and not out.exists()


# ------------------------------------------------------------------ flags
BAD_FLAGS = {
    "steps-zero": (["--steps", "0"], "'steps'"),
    "steps-negative": (["--steps", "-3"], "'steps'"),
    "batch-size-zero": (["--batch-size", "0"], "'batch_size'"),
    "micro-batch-negative": (["--micro-batch", "-1"], "'micro_batch'"),
    "eval-limit-zero": (["--eval-limit", "0"], "'eval_limit'"),
    "nll-examples-negative": (["--nll-examples", "-1"], "'nll_examples'"),
    "lr-nan": (["--lr", "nan"], "'lr'"),
    "lr-inf": (["--lr", "inf"], "'lr'"),
    "lr-negative": (["--lr", "-1e-3"], "'lr'"),
    "section-lr-inf": (["--seeking-lr", "inf"], "'seeking.lr'"),
    "weight-nan": (["--semalign-layer-weight", "nan"], "'semalign.layer_weight'"),
    "steps-not-a-number": (["--steps", "many"], "'many' is not a valid integer"),
}


@pytest.mark.parametrize("case", sorted(BAD_FLAGS))
def test_bad_flag_refused(case, tiny_dirs, data_dir, tmp_path, capsys):
    extra, needle = BAD_FLAGS[case]
    out = tmp_path / "run"
    rc, _, err = cli(capsys, *transfer_args(*tiny_dirs, data_dir, out, *extra))
    lines = [ln for ln in err.splitlines() if ln.strip()]
    if case == "steps-not-a-number":  # click's own usage error: exit 2, no traceback
        assert rc == 2 and needle in err and "Traceback" not in err and not out.exists()
        return
    assert refused(rc, err, needle, out=out) and not out.exists() and len(lines) == 1


def test_eval_limit_zero_refused_by_eval(tiny_dirs, tmp_path, capsys):
    rc, _, err = cli(capsys, "eval", "--model", tiny_dirs[1], "--tasks", "mmlu", "--limit", "0", "--no-cache", "-q")
    assert refused(rc, err, "limit")


def test_output_is_a_file_refused(tiny_dirs, data_dir, tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    rc, _, err = cli(capsys, *transfer_args(*tiny_dirs, data_dir, f))
    assert refused(rc, err, "is an existing file", "choose a directory") and f.read_text() == "keep me"


def test_output_under_a_file_refused(tiny_dirs, data_dir, tmp_path, capsys):
    f = tmp_path / "out.txt"
    f.write_text("keep me")
    rc, _, err = cli(capsys, *transfer_args(*tiny_dirs, data_dir, f / "run"))
    assert refused(rc, err, "lies under the file") and f.read_text() == "keep me"


@pytest.mark.skipif(not can_mount_tmpfs(), reason="needs root to mount a read-only tmpfs")
def test_output_not_writable_refused(tiny_dirs, data_dir, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)]).returncode:
        pytest.skip("cannot mount tmpfs here")
    try:
        rc, _, err = cli(capsys, *transfer_args(*tiny_dirs, data_dir, ro / "run"))
        assert refused(rc, err, "not writable", "choose another --output")
    finally:
        subprocess.run(["umount", str(ro)])
