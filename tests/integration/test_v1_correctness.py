"""SemAlign v1 correctness defects (issue 9): each has a test that fails on the defect and passes on the fix."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from semalign.cli.main import main
from tests.conftest import mmlu_like, write_protocol_dir

FIXTURE_MMLU = Path(__file__).resolve().parents[1] / "fixtures" / "eval" / "mmlu"


@pytest.fixture(scope="module")
def bf16_pair(tmp_path_factory, tiny_dirs):
    """The tiny pair with the student stored in bf16 (as the real asset cache is)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    t, s = tiny_dirs
    root = tmp_path_factory.mktemp("bf16-student")
    m = AutoModelForCausalLM.from_pretrained(s, dtype=torch.float32)
    # scale the weights up so bf16 rounding of the stored student is not what decides the test
    m.to(torch.bfloat16).save_pretrained(root)
    AutoTokenizer.from_pretrained(s).save_pretrained(root)
    return t, root


@pytest.fixture(scope="module")
def mmlu_data(tmp_path_factory):
    root = write_protocol_dir(tmp_path_factory.mktemp("data"), "mmlu", mmlu_like, sizes=(4, 12, 16, 8))
    shutil.copytree(FIXTURE_MMLU, root / "mmlu")
    return root


def _run(pair, data, out, *extra):
    t, s = pair
    return main(["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir", str(data),
                 "--output", str(out), "--steps", "2", "--batch-size", "4", "--micro-batch", "2",
                 "--nll-examples", "4", "--eval-tasks", "mmlu", "--eval-limit", "8", "-q", *extra])


def _answers(run: Path, who: str) -> list[tuple[str, str]]:
    rows = [json.loads(x) for x in (run / "eval" / who / "samples_mmlu.jsonl").read_text().splitlines()]
    return [(r["doc_id"] if "doc_id" in r else r.get("id"), r["pred"]) for r in rows]


def test_lr_zero_changes_nothing_and_both_sides_use_one_dtype(bf16_pair, mmlu_data, tmp_path, monkeypatch):
    """Defect 1: before (stored bf16) and after (fp32 export) were evaluated in different precisions."""
    monkeypatch.setenv("SEMALIGN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    assert _run(bf16_pair, mmlu_data, out, "--lr", "0") == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"]["student_before"] == summary["precision"]["student_after"] == "float32"
    res = json.loads((out / "results.json").read_text())
    assert res["nll"]["student_before"]["nll"] == res["nll"]["student_after"]["nll"]
    assert res["nll"]["student_before"]["dtype"] == res["nll"]["student_after"]["dtype"] == "float32"
    before = [json.loads(x) for x in (out / "eval" / "student_before" / "samples_mmlu.jsonl").read_text().splitlines()]
    after = [json.loads(x) for x in (out / "eval" / "student_after" / "samples_mmlu.jsonl").read_text().splitlines()]
    assert [b["pred"] for b in before] == [a["pred"] for a in after]
    assert [b["logprobs"] for b in before] == [a["logprobs"] for a in after]
    assert res["precision"]["student_before"] == "float32"


def test_every_step_gets_the_configured_lr(tiny_dirs, mmlu_data, tmp_path):
    """Defect 2: OneCycle gave the 2nd of 2 steps lr 1.2e-10; the default schedule gives each step the peak."""
    out = tmp_path / "run"
    t, s = tiny_dirs
    assert main(["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir",
                 str(mmlu_data), "--output", str(out), "--steps", "3", "--batch-size", "4", "--micro-batch", "2",
                 "--nll-examples", "2", "--lr", "3e-4", "-q"]) == 0
    lrs = [json.loads(x)["lr"] for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([3e-4] * 3)


def test_output_term_and_micro_batches_cover_response_positions(tiny_dirs, mmlu_data, tmp_path, monkeypatch):
    """Defect 3 + micro-batch weighting: on MMLU (train_on_inputs) the output term sees only the answer tokens,
    and the step loss does not depend on how the batch is split into micro-batches."""
    from semalign.data.prompts import render_example
    from semalign.methods.semalign import losses

    seen: list[int] = []
    orig = losses.OUTPUT_LOSSES.get("cos_label")

    def spy(logits, labels, **kw):
        seen.append(int((labels[:, 1:] != -100).sum()))
        return orig(logits, labels, **kw)

    monkeypatch.setitem(losses.OUTPUT_LOSSES._items, "cos_label", spy)
    t, s = tiny_dirs
    metrics = {}
    for mb in (4, 1):
        out = tmp_path / f"run{mb}"
        seen.clear()
        assert main(["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir",
                     str(mmlu_data), "--output", str(out), "--steps", "1", "--batch-size", "4", "--micro-batch",
                     str(mb), "--nll-examples", "2", "--semalign-lora-dropout", "0", "-q"]) == 0
        metrics[mb] = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
        if mb == 4:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(s)
            from semalign.data.tasks import build_splits

            sp = build_splits("mmlu", data_dir=mmlu_data, seed=42)
            import random

            from semalign.methods.semalign.recipe import step_examples

            class C:  # the minimal context step_examples reads
                splits = sp
                config = type("cfg", (), {"batch_size": 4})()

            ex = step_examples(C, 0, random.Random(42))
            want = sum(sum(1 for x in render_example(tok, e, train_on_inputs=False)["labels"] if x != -100)
                       for e in ex)
            full = sum(sum(1 for x in render_example(tok, e, train_on_inputs=True)["labels"] if x != -100) for e in ex)
            assert sum(seen) == want < full
    for k in ("loss", "layer_loss", "output_loss"):
        assert metrics[1][k] == pytest.approx(metrics[4][k], rel=1e-4, abs=1e-6), k


def test_attribution_file_records_positions_dtype_and_margin(tiny_dirs, mmlu_data, tmp_path):
    """Defect 4: attribution sums over response positions (prompt masked even on MMLU), in fp32, with a margin."""
    out = tmp_path / "run"
    t, s = tiny_dirs
    assert main(["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir",
                 str(mmlu_data), "--output", str(out), "--steps", "1", "--batch-size", "4", "--nll-examples", "2",
                 "-q"]) == 0
    att = json.loads((out / "attribution" / "teacher.json").read_text())
    assert att["positions"] == "response" and att["dtype"] == "float32" and att["target"] == "block_output"
    assert att["margin"]["top"] == max(range(1, len(att["scores"]) + 1), key=lambda l: att["scores"][l - 1])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["attribution"]["margin"]["next"] is not None


def test_packaged_pool_gives_extract_and_align_protocol_sizes(monkeypatch):
    """Defect 5: a small packaged pool shrank extract/align to almost nothing (GSM8K: 1/5/72)."""
    from semalign.data import tasks
    from semalign.errors import SemalignError

    def pool_of(n):
        return lambda d: ([{"id": f"x{i}", "messages": [{"role": "user", "content": f"q{i}"},
                                                        {"role": "assistant", "content": "a"}]} for i in range(n)],
                          None, f"test pool ({n})")

    spec = tasks.get_task("humaneval")
    monkeypatch.setitem(tasks.TASKS._items, "humaneval", spec.__class__(**{**spec.__dict__, "pool": pool_of(164)}))
    sp = tasks.build_splits("humaneval")
    assert (len(sp.extract), len(sp.align)) == (20, 80)
    assert len(sp.eval) >= 20 and len(sp.train) == 164 - 100 - len(sp.eval)
    monkeypatch.setitem(tasks.TASKS._items, "humaneval", spec.__class__(**{**spec.__dict__, "pool": pool_of(100)}))
    with pytest.raises(SemalignError, match="--data-dir"):
        tasks.build_splits("humaneval")


def test_mismatched_ids_are_excluded_from_the_map():
    """Also: ids that decode to different strings were only logged as excluded; now M is built without them."""
    from semalign.methods.semalign.bases import compute_map, shared_ids

    class Tok:
        def __init__(self, vocab):
            self.v = vocab

        def get_vocab(self):
            return self.v

    n = 3000
    tv = {f"t{i}": i for i in range(n)}
    sv = dict(tv)
    del sv["t7"]
    sv["other"] = 7
    ids = shared_ids(Tok(tv), Tok(sv), n, n)
    assert 7 not in ids.tolist() and ids.numel() == n - 1
    torch.manual_seed(0)
    w_t, w_s = torch.randn(n, 12), torch.randn(n, 8)
    m_ids, st = compute_map(w_t, w_s, ids)
    keep = torch.tensor([i for i in range(n) if i != 7])
    m_ref, _ = compute_map(w_t[keep], w_s[keep], n - 1)
    assert st.shared_ids == n - 1
    assert torch.allclose(m_ids, m_ref, atol=1e-5)
    m_all, _ = compute_map(w_t, w_s, n)
    assert not torch.allclose(m_all, m_ref, atol=1e-7)


def test_kl_source_runs_over_shared_ids_only():
    from semalign.methods.semalign.losses import kl_divergence, kl_source_loss

    torch.manual_seed(0)
    s, t = torch.randn(1, 5, 40), torch.randn(1, 5, 40)
    labels = torch.tensor([[-100, -100, 3, 4, 5]])
    got = kl_source_loss(s, labels, teacher_logits=t, shared_vocab=30)
    want = kl_divergence(t[0, 1:4, :30], s[0, 1:4, :30]).mean()
    assert float(got) == pytest.approx(float(want), rel=1e-5)


def test_inactive_frontier_adapters_run_dropout_in_eval_mode(tiny_dirs):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from semalign.methods.semalign.recipe import freeze_inactive_dropout

    m = AutoModelForCausalLM.from_pretrained(tiny_dirs[1])
    pm = get_peft_model(m, LoraConfig(r=2, lora_dropout=0.5, target_modules=["down_proj"]))
    for n, p in pm.named_parameters():
        p.requires_grad_("layers.1." in n and "lora_" in n)
    pm.train()
    freeze_inactive_dropout(pm)
    mods = {n: mod for n, mod in pm.named_modules() if hasattr(mod, "lora_dropout") and hasattr(mod, "lora_A")}
    assert mods and all(mod.lora_dropout.training == ("layers.1." in n) for n, mod in mods.items())
