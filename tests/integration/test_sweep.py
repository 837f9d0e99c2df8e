"""`semalign sweep` on the tiny pair: a 2x1 grid runs, writes table/plot/report, resumes, refuses bad grids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from semalign.cli.main import main
from semalign.sweep import load_grid

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SEMALIGN_CACHE", str(tmp_path / "cache"))


def _grid(tmp_path, tiny_dirs, data, **extra) -> Path:
    t, s = tiny_dirs
    g = {"base": {"teacher": str(t), "student": str(s), "task": "mmlu", "data_dir": str(data), "steps": 1,
                  "batch_size": 4, "micro_batch": 2, "nll_examples": 2, "eval_limit": 6, "dtype": "fp32",
                  "semalign": {"trainable": "lora"}},
         "grid": {"lr": [1.0e-3, 3.0e-3]}, "reference": "lr=0.001"}
    g.update(extra)
    p = tmp_path / "grid.yaml"
    p.write_text(yaml.safe_dump(g))
    return p


def test_sweep_runs_writes_and_resumes(tiny_dirs, eval_data_dir, tmp_path, monkeypatch, capsys):
    grid = _grid(tmp_path, tiny_dirs, eval_data_dir)
    out = tmp_path / "sw"
    assert main(["sweep", str(grid), "--output", str(out), "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert [r["name"] for r in res["rows"]] == ["teacher", "student", "lr=0.001", "lr=0.003"]
    assert all(r["status"] == "completed" for r in res["rows"]), [r.get("error") for r in res["rows"]]
    a, b = res["rows"][2:]
    assert a["vs_student"]["mmlu"]["n"] == 6 and "gap_closed_ci95" in a["vs_student"]["mmlu"]
    assert a["vs_reference"] == {} and b["vs_reference"]["mmlu"]["n"] == 6
    assert b["overrides"] == {"lr": 0.003} and (out / "runs" / b["dir"] / "student" / "config.json").is_file()
    manifests = {(out / "runs" / r["dir"] / "data_manifest.json").read_text() for r in (a, b)}
    assert len(manifests) == 1  # same splits for every row
    table = (out / "table.md").read_text()
    assert "Δ vs student" in table and "Δ vs lr=0.001" in table and "(reference)" in table
    assert "training diagnostics" in table and a["training"]["steps"] == 1 and "layer_loss_first" in a["training"]
    assert (out / "plot.png").stat().st_size > 1000
    assert "plot.png" in (out / "report.md").read_text()
    assert "data:image/png;base64," in (out / "report.html").read_text()
    capsys.readouterr()
    # resume: finished rows are skipped (no transfer runs)
    import semalign.transfer

    def boom(*a, **k):
        raise AssertionError("a finished row was rerun")

    monkeypatch.setattr(semalign.transfer, "run_transfer", boom)
    assert main(["sweep", str(grid), "--output", str(out), "--resume", "-q"]) == 0
    res2 = json.loads((out / "results.json").read_text())
    assert all(r["reused"] for r in res2["rows"][2:])
    assert res2["rows"][3]["vs_student"]["mmlu"]["diff"] == b["vs_student"]["mmlu"]["diff"]
    # an existing output without --resume is refused
    assert main(["sweep", str(grid), "--output", str(out), "-q"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.parametrize("extra,msg", [
    ({"grid": {"lrr": [1, 2]}}, "unknown config field 'lrr'; did you mean 'lr'?"),
    ({"grid": {}}, "the grid has no rows"),
    ({"grid": {"lr": []}}, "needs a non-empty list"),
    ({"grid": {"seed": [1, 2]}}, "changes 'seed', which every row shares"),
    ({"reference": "nope"}, "reference 'nope' is not a row"),
    ({"runs": [{"name": "x", "set": {"semalign.trainable": "half"}}]}, "row 'x': invalid config value"),
    ({"colour": 1}, "unknown top-level key 'colour'"),
])
def test_bad_grids_are_one_line_errors(tiny_dirs, eval_data_dir, tmp_path, capsys, extra, msg):
    grid = _grid(tmp_path, tiny_dirs, eval_data_dir, **extra)
    assert main(["sweep", str(grid), "--output", str(tmp_path / "o"), "-q"]) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()


def test_grid_expansion_and_examples(tiny_dirs, eval_data_dir, tmp_path, capsys):
    grid = _grid(tmp_path, tiny_dirs, eval_data_dir, grid={"lr": [1.0e-3], "semalign.trainable": ["lora", "full"]},
                 runs=[{"name": "paper", "set": {"steps": 2, "method": "semalign"}}], reference="paper")
    g = load_grid(grid)
    assert [r.name for r in g.rows] == ["lr=0.001,semalign.trainable=lora", "lr=0.001,semalign.trainable=full",
                                        "paper"]
    assert g.rows[1].config.semalign.trainable == "full" and g.rows[2].config.steps == 2
    assert g.rows[0].dir == "lr-0.001__semalign.trainable-lora"
    assert main(["sweep", str(grid), "--dry-run"]) == 0
    assert "3 rows, reference: paper" in capsys.readouterr().out
    root = Path(__file__).resolve().parents[2] / "examples"
    for f in sorted(root.glob("sweep_*.yaml")):
        assert load_grid(f).rows, f


def test_incremental_row_evaluation_equals_full(tiny_dirs, eval_data_dir, tmp_path):
    """eval_from_block: rows are scored from the untouched student's stored block inputs (the tiny student has 2
    blocks; v1 trains block 1 or 2), giving the same letter log-probs as a full evaluation of each export."""
    full = tmp_path / "full"
    inc = tmp_path / "inc"
    assert main(["sweep", str(_grid(tmp_path, tiny_dirs, eval_data_dir)), "--output", str(full), "-q"]) == 0
    g2 = tmp_path / "g2"
    g2.mkdir()
    assert main(["sweep", str(_grid(g2, tiny_dirs, eval_data_dir, eval_from_block=2)), "--output", str(inc),
                 "-q"]) == 0
    a = json.loads((full / "results.json").read_text())["rows"]
    b = json.loads((inc / "results.json").read_text())["rows"]
    for ra, rb in zip(a[2:], b[2:]):
        sa = [json.loads(x) for x in (full / "eval" / ra["dir"] / "samples_mmlu.jsonl").read_text().splitlines()]
        sb = [json.loads(x) for x in (inc / "eval" / rb["dir"] / "samples_mmlu.jsonl").read_text().splitlines()]
        assert [x["logprobs"] for x in sa] == [x["logprobs"] for x in sb]
        assert rb["incremental"]["lowest_changed_block"] >= 1
        if rb["incremental"]["lowest_changed_block"] >= 2:
            assert rb["incremental"]["suffix_batches"] > 0 and rb["incremental"]["full_batches"] == 0


def test_teacher_evaluation_can_wait_for_a_resume(tiny_dirs, eval_data_dir, tmp_path):
    out = tmp_path / "sw"
    g = _grid(tmp_path, tiny_dirs, eval_data_dir, teacher_eval=False)
    assert main(["sweep", str(g), "--output", str(out), "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["rows"][0]["status"] == "skipped" and not (out / "eval" / "teacher").exists()
    assert "acc_teacher" not in res["rows"][2]["vs_student"]["mmlu"]
    g2 = _grid(tmp_path, tiny_dirs, eval_data_dir)  # teacher_eval back on: --resume adds the teacher and gap closed
    assert main(["sweep", str(g2), "--output", str(out), "--resume", "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["rows"][0]["status"] == "completed" and all(r["reused"] for r in res["rows"][2:])
    assert "acc_teacher" in res["rows"][2]["vs_student"]["mmlu"] and "gap_closed" in res["rows"][2]["vs_student"]["mmlu"]
