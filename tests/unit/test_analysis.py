"""Analysis suite pieces on tiny models: token pooling, one-pass attribution/sensitivity, frame operators and the
resolution check, parametric similarity, HTML embedding, comparison reports."""

from __future__ import annotations

import json
import math
import re

import pytest
import torch

from semalign.analysis import cka as ckamod
from semalign.analysis.activations import collect, common_prefix_len, select_tokens
from semalign.render.html import markdown_to_html
from semalign.analysis.parametric import (best_window, extract, matrix_metrics, parametric_similarity,
                                          seeking_windows, window_sums)
from semalign.analysis.resolution import (pinv_frame_operator, random_frame_operator, recomposition_cosines,
                                          resolution_check)
from semalign.attribution.layers import attribute_layers
from semalign.data.prompts import batches
from semalign.methods.semalign.bases import semantic_bases
from semalign.models.arch import internals
from semalign.testing import tiny_model, tiny_pair


@pytest.fixture(scope="module")
def pair():
    t, s, tok = tiny_pair("qwen2")
    return t.float(), s.float(), tok


def _examples(n: int) -> list[dict]:
    return [{"id": f"e{i}", "messages": [
        {"role": "user", "content": f"The following are multiple choice questions. What is {i} + {i + 1}?"},
        {"role": "assistant", "content": f"The answer is: {'ABCD'[i % 4]}"}]} for i in range(n)]


@pytest.fixture(scope="module")
def bs(pair):
    return batches(pair[2], _examples(4), 1, max_length=128, train_on_inputs=True)


# -- token selection -------------------------------------------------------------------------------------------

def test_common_prefix_and_selection(bs):
    p = common_prefix_len(bs)
    ids = [b["input_ids"][0] for b in bs]
    assert p > 0 and all(torch.equal(i[:p], ids[0][:p]) for i in ids)
    assert not all(int(i[p]) == int(ids[0][p]) for i in ids)
    sel = select_tokens(bs)
    assert sel.prefix_len == p and sel.n_kept == sum(len(i) - p for i in ids)
    assert common_prefix_len(bs[:1]) == 1  # one example: only the attention-sink token is dropped
    full = select_tokens(bs, keep_prefix=True)
    assert full.n_kept == sum(len(i) for i in ids)
    a, b = select_tokens(bs, max_tokens=17, seed=3), select_tokens(bs, max_tokens=17, seed=3)
    assert a.n_kept == 17 and all(torch.equal(x, y) for x, y in zip(a.masks, b.masks))


# -- one pass: states, attribution, sensitivity ----------------------------------------------------------------

def test_collect_states_and_attribution_match_reference(pair, bs):
    t = internals(pair[0])
    sel = select_tokens(bs)
    res = collect(t, bs, sel, attribution=True)
    assert res.states.shape == (t.num_layers + 1, sel.n_kept, t.hidden_size)
    ref = attribute_layers(t, bs)
    assert res.attribution.scores == pytest.approx(ref.scores, rel=1e-4, abs=1e-7)
    # h_0 is the embedding of the kept tokens
    emb = t.embed(bs[0]["input_ids"])[sel.masks[0]].float()
    assert torch.allclose(res.states[0, : emb.shape[0]], emb, atol=1e-6)
    assert all(not p.requires_grad or p.grad is None for p in t.model.parameters())


def test_collect_sensitivity_matches_manual(pair, bs):
    t = internals(pair[0])
    name = t.projection_path(2, "up_proj") + ".weight"
    param = t.model.get_parameter(name)
    res = collect(t, bs[:2], select_tokens(bs[:2]), sensitivity={name: param})
    manual = torch.zeros_like(param)
    for b in bs[:2]:
        param.requires_grad_(True)
        out = t.model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        lab = b["labels"][:, 1:]
        m = lab != -100
        loss = torch.nn.functional.cross_entropy(out.logits[:, :-1][m].float(), lab[m])
        (g,) = torch.autograd.grad(loss, [param])
        manual += (param.detach() * g).abs()
        param.requires_grad_(False)
    assert torch.allclose(res.sensitivity[name], manual, rtol=1e-4, atol=1e-8)


# -- frame operators and the resolution check ------------------------------------------------------------------

def test_pinv_frame_operator_equals_explicit_bases():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(300, 12, generator=g) * torch.linspace(0.2, 2.0, 12)
    w[295:] = 0.0  # padded rows are dropped
    P, meta = pinv_frame_operator(w)
    S = semantic_bases(w[:295]).double()
    assert meta["dropped"] == 5 and meta["rank"] == 12
    assert torch.allclose(P, S @ S.T, rtol=1e-5, atol=1e-5 * float(P.abs().max()))


def test_random_frames_gaussian_is_nearly_tight_uniform_is_not():
    pg, _ = random_frame_operator(16, 4000, kind="random", seed=0)
    pu, _ = random_frame_operator(16, 4000, kind="random_uniform", seed=0)
    h = torch.randn(200, 16, generator=torch.Generator().manual_seed(1))
    assert float(recomposition_cosines(h, pg).mean()) > 0.95
    assert float(recomposition_cosines(h, pu).mean()) < 0.6


def _tight_frame_head(v: int, d: int) -> torch.Tensor:
    """Equal-norm tight frame (harmonic frame): rows [cos(2 pi i k / V), sin(2 pi i k / V)], k = 1..d/2."""
    i = torch.arange(v, dtype=torch.float64)[:, None]
    k = torch.arange(1, d // 2 + 1, dtype=torch.float64)[None]
    ang = 2 * math.pi * i * k / v
    return torch.cat([ang.cos(), ang.sin()], 1).float() / math.sqrt(d / 2)


def test_resolution_check_output_beats_random_on_well_conditioned_head(pair, bs):
    model = tiny_model("qwen2", tokenizer=pair[2], hidden=32, layers=2, seed=5).float()
    arch = internals(model)
    with torch.no_grad():
        arch.lm_head.weight.copy_(_tight_frame_head(arch.vocab_size, arch.hidden_size))
    states = collect(arch, bs, select_tokens(bs)).states
    res, ops = resolution_check(arch, states, arch.vocab_size, ("output", "input", "random"), keep_operators=("output",))
    out, rnd = res["kinds"]["output"]["mean"], res["kinds"]["random"]["mean"]
    assert all(o > r for o, r in zip(out, rnd))
    assert min(out) > 0.999  # tight frame: S S^T is a multiple of the identity
    assert ops["output"].shape == (32, 32)
    assert res["head_vs_embedding"]["rel_fro_diff"] > 0


# -- parametric similarity -------------------------------------------------------------------------------------

def test_best_window_matches_brute_force():
    g = torch.Generator().manual_seed(2)
    s = torch.rand(9, 11, generator=g)
    sums = window_sums(s, 4, 3)
    brute = torch.tensor([[float(s[a:a + 4, b:b + 3].sum()) for b in range(9)] for a in range(6)], dtype=torch.float64)
    assert torch.allclose(sums, brute, atol=1e-9)
    a, b, share = best_window(s, 4, 3)
    assert (a, b) == divmod(int(brute.argmax()), 9)
    assert share == pytest.approx(float(brute.max()) / float(s.sum()))
    s2 = torch.zeros(6, 6)
    s2[3:5, 2:4] = 1.0
    assert best_window(s2, 2, 2)[:2] == (3, 2)


def test_extract_and_metrics():
    w = torch.randn(10, 8)
    blk, info = extract(w, (4, 3), "leading")
    assert torch.equal(blk, w[:4, :3]) and info["method"] == "leading"
    blk, info = extract(w, (4, 3), "seeking-run", offsets=(2, 5))
    assert torch.equal(blk, w[2:6, 5:8]) and info["row_offset"] == 2
    ws = torch.randn(64, 32)
    m = matrix_metrics(ws, ws, rank=4)
    assert m["cos"] == pytest.approx(1.0) and m["cka"] == pytest.approx(1.0, abs=1e-5)
    assert 0 < m["pissa_cos"] < 1 and m["cos_lowrank"] == pytest.approx(m["pissa_cos"], abs=1e-3)
    r = matrix_metrics(torch.randn(64, 32), ws, rank=4)
    assert abs(r["cos"]) < 0.1 and r["cos_remaining"] < 0


def test_parametric_similarity_tiny_pair_and_seeking_windows(pair, tmp_path):
    t, s = internals(pair[0]), internals(pair[1])
    res = parametric_similarity(t, s, method="leading", rank=4)
    assert res["student_layers"] == [1, 2] and res["teacher_layers"] == [2, 4]
    assert set(res["layers"]["1"]) == set(s.projection_names)
    rec = res["layers"]["2"]["up_proj"]
    assert rec["student_shape"] == list(s.projection(2, "up_proj").weight.shape)
    assert rec["extraction"]["method"] == "leading"
    (tmp_path / "seeking").mkdir()
    (tmp_path / "seeking" / "extraction.json").write_text(json.dumps({"matrices": [
        {"name": "up_proj", "student_layer": 1, "teacher_layer": 3, "row_offset": 7, "col_offset": 2,
         "shape": list(s.projection(1, "up_proj").weight.shape)}]}))
    assert (1, "up_proj") in seeking_windows(tmp_path)
    res2 = parametric_similarity(t, s, method="auto", run_dir=tmp_path, rank=4, projections=("up_proj",))
    assert res2["teacher_layers"][0] == 3
    assert res2["layers"]["1"]["up_proj"]["extraction"] == {"method": "seeking-run", "row_offset": 7, "col_offset": 2}


# -- CKA maps --------------------------------------------------------------------------------------------------

def test_cka_maps_and_depth_path():
    g = torch.Generator().manual_seed(0)
    sets = {"teacher": torch.randn(5, 30, 8, generator=g), "student": torch.randn(3, 30, 4, generator=g)}
    maps = ckamod.cka_maps(sets)
    assert set(maps) == {"teacher_x_teacher", "student_x_student", "teacher_x_student"}
    assert maps["teacher_x_student"].shape == (5, 3)
    assert torch.allclose(maps["teacher_x_teacher"].diagonal(), torch.ones(5), atol=1e-5)
    assert ckamod.depth_path(28, 24)[:7] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4), (5, 5), (7, 6)]


# -- HTML and comparison reports -------------------------------------------------------------------------------

def _png(path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1, 1))
    ax.plot([0, 1])
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=30)
    plt.close(fig)


def test_markdown_to_html_is_self_contained(tmp_path):
    _png(tmp_path / "plots" / "a.png")
    md = ("# T\n\n![a](plots/a.png)\n\n![gone](plots/missing.png)\n\n![ext](https://example.com/x.png)\n\n"
          "[paper](https://arxiv.org/abs/2510.24208) and <script>alert(1)</script>\n\n| a | b |\n|---|---|\n| 1 | 2 |\n")
    page = markdown_to_html(md, tmp_path, "t")
    assert page.count("data:image/png;base64,") == 1
    assert not re.search(r'(src|href)\s*=\s*"https?:', page)
    assert "image not available: plots/missing.png" in page and "<table>" in page and "<script>" not in page
    assert "https://arxiv.org/abs/2510.24208" in page  # kept as text


def test_compare_report_tolerates_schemas(tmp_path):
    from semalign.report import write_compare_report

    _png(tmp_path / "plots" / "scores.png")
    results = {"task": "mmlu", "teacher": "T", "rows": [
        {"method": "semalign", "nll": {"student_after": 1.23}, "eval": {"mmlu": {"acc": 0.4}}, "run_dir": "runs/a"},
        {"method": "seeking", "nll": {"student_after": None}, "wall_seconds": 12.5},
        "not a row"]}
    p = write_compare_report(tmp_path, results)
    md = p.read_text()
    assert "| method | nll.student_after | eval.mmlu.acc | wall_seconds |" in md and "runs/a/report.html" in md
    page = (tmp_path / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1
    write_compare_report(tmp_path, [{"name": "x"}])
    write_compare_report(tmp_path, {"methods": {"lora-sft": {"acc": 0.3}}})
    assert "lora-sft" in (tmp_path / "report.md").read_text()
    write_compare_report(tmp_path, {})
    assert "No per-method rows" in (tmp_path / "report.md").read_text()


def test_compare_report_with_compare_schema(tmp_path):
    from semalign.report import write_compare_report

    root = tmp_path / "out"
    comp = root / "compare"
    (root / "runs" / "semalign").mkdir(parents=True)
    _png(comp / "bars.png")
    res = {"task": "mmlu", "methods": ["semalign"], "eval_tasks": ["mmlu"], "teacher": "T", "student": "S", "seed": 42,
           "rows": [{"name": "teacher", "kind": "teacher", "status": "completed", "metrics": {"mmlu": 0.5},
                     "stderr": {"mmlu": 0.03}, "nll": 1.0, "run_dir": None, "gap_closed": {}},
                    {"name": "semalign", "kind": "method", "status": "failed", "metrics": {"mmlu": None},
                     "stderr": {}, "nll": None, "run_dir": str(root / "runs" / "semalign"), "error": "boom",
                     "gap_closed": {"mmlu": None}}]}
    (comp).mkdir(exist_ok=True)
    (comp / "results.json").write_text(json.dumps(res))
    md = write_compare_report(comp).read_text()  # reads results.json itself
    assert "| name | kind | status | mmlu |" in md and "50.0 ± 3.0" in md
    assert "[semalign](../runs/semalign/report.html)" in md and "**semalign**: boom" in md
    (comp / "table.md").write_text("| Model | mmlu (%) |\n|---|---|\n| teacher | 50.0 |\n")
    md = write_compare_report(comp, res).read_text()
    assert "| Model | mmlu (%) |" in md
    page = (comp / "report.html").read_text()
    assert page.count("data:image/png;base64,") == 1 and not re.search(r'(src|href)="https?:', page)
