"""End to end: `semalign analyze` on a tiny transfer run directory and on a tiny pair; report.html self-contained."""

from __future__ import annotations

import json
import re

import pytest

from semalign.cli.main import main

FAST = ["--n-samples", "3", "--bases", "output,output_folded,input,random", "--rank", "4", "--no-cache", "-q"]


@pytest.fixture(scope="module")
def run_dir(tiny_dirs, data_dir, tmp_path_factory):
    t, s = tiny_dirs
    out = tmp_path_factory.mktemp("analyze") / "run"
    assert main(["transfer", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir", str(data_dir),
                 "--output", str(out), "--steps", "1", "--batch-size", "2", "--micro-batch", "2",
                 "--nll-examples", "2", "--lr", "1e-3", "-q"]) == 0
    return out


def _self_contained(page: str) -> None:
    assert not re.search(r'(src|href)\s*=\s*["\']?https?:', page), "external asset or link in report.html"
    assert "<link" not in page and "<script" not in page


def test_analyze_run_dir(run_dir, capsys):
    assert main(["analyze", str(run_dir), *FAST]) == 0
    a = run_dir / "analysis"
    index = json.loads((a / "analysis.json").read_text())
    assert index["mode"] == "run" and index["student_after"].endswith("student")
    for name in ("cka.json", "resolution.json", "parametric.json", "alignment.json", "attribution.json",
                 "attribution.png", "resolution.png", "parametric.png", "alignment.png",
                 "cka_teacher_x_teacher.png", "cka_student_x_student.png", "cka_teacher_x_student.png",
                 "cka_aligned_teacher_x_student.png", "cka_student_before_x_after.png",
                 "cka_teacher_x_student_after.png"):
        assert (a / name).is_file(), name
    cka = json.loads((a / "cka.json").read_text())["maps"]
    before_after = cka["student_before_x_after"]
    assert len(before_after) == 3 and all(abs(before_after[i][i] - 1) < 0.2 for i in range(3))
    assert set(json.loads((a / "attribution.json").read_text())) == {"teacher", "student", "student_after"}
    assert set(json.loads((a / "alignment.json").read_text())) >= {"before", "after", "depth_map"}
    md = (run_dir / "report.md").read_text()
    assert "## Analysis" in md and "analysis/cka_teacher_x_student.png" in md
    page = (run_dir / "report.html").read_text()
    _self_contained(page)
    figures = [f["file"] for f in index["figures"]]
    pngs = re.findall(r'src="data:image/png;base64,', page)
    # every analysis figure + layer map + loss curve is embedded
    assert len(pngs) == len(figures) + 2
    assert "image not available" not in page


def test_analyze_pair(tiny_dirs, data_dir, tmp_path):
    t, s = tiny_dirs
    out = tmp_path / "pair"
    assert main(["analyze", "--teacher", str(t), "--student", str(s), "--task", "mmlu", "--data-dir", str(data_dir),
                 "--output", str(out), "--no-attribution", "--extraction", "leading", *FAST]) == 0
    index = json.loads((out / "analysis.json").read_text())
    assert index["mode"] == "pair" and not (out / "attribution.json").exists()
    for f in index["figures"]:
        assert (out / f["file"]).stat().st_size > 1000
    assert (out / "cka_teacher_x_student.png").is_file() and not (out / "cka_student_before_x_after.png").exists()
    page = (out / "report.html").read_text()
    _self_contained(page)
    assert page.count("data:image/png;base64,") == len(index["figures"])
    par = json.loads((out / "parametric.json").read_text())
    assert par["layers"]["1"]["up_proj"]["extraction"]["method"] == "leading"


@pytest.mark.parametrize("args, msg", [
    (["analyze", "--teacher", "x"], "both --teacher and --student"),
    (["analyze", "--extraction", "magic", "--teacher", "a", "--student", "b"], "--extraction"),
])
def test_analyze_errors(args, msg, capsys, tmp_path):
    assert main(args) == 2
    err = capsys.readouterr().err
    assert msg in err and len(err.strip().splitlines()) == 1


def test_analyze_not_a_run_dir(tmp_path, capsys):
    assert main(["analyze", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
