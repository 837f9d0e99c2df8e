"""Reload every exported student of a `semalign compare` folder in *stock* transformers (and Seeking's adapter in
PEFT) and re-score it, to show the exports are what the table reports.

Usage::

    python benchmarks/check_exports.py runs/compare-real-mmlu [--methods seeking,lora-sft] [--out FILE]

For each completed method row it loads ``<run>/student`` with ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer`` (no semalign loader), evaluates the comparison's eval tasks with the same limit, data and
excluded training ids (no result cache), and compares the primary metric and, for MMLU, every question's predicted
letter and choice log-probabilities with the comparison's own ``samples_<task>.jsonl``. For Seeking it also applies
``<run>/**/adapter_config.json``'s adapter to the original student with ``PeftModel.from_pretrained`` and checks
the same. Prints one JSON line per check and writes them all to ``--out`` (default
``benchmarks/results/check_exports.json``). Exit status 1 if any score differs.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _samples(path: Path) -> dict[str, dict]:
    if not path.is_file():
        return {}
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {r["id"]: r for r in rows}


def _score(model, tok, cfg: dict, used: set[str], tasks: list[str]) -> tuple[dict, dict[str, dict]]:
    from semalign.eval import evaluate

    with tempfile.TemporaryDirectory() as tmp:
        res = evaluate(model, tok, tasks, limit=cfg.get("eval_limit"), data_dir=cfg.get("data_dir"),
                       allow_code_execution=bool(cfg.get("allow_code_execution")), exclude_ids=used,
                       output_dir=tmp, log_samples=True, progress=False, cache_key=None)
        samples = {t: _samples(Path(tmp) / f"samples_{t}.jsonl") for t in tasks}
    return res, samples


def _compare(name: str, how: str, res: dict, samples: dict, row: dict, ref_samples: dict, secs: float) -> dict:
    out = {"method": name, "loaded_with": how, "seconds": round(secs, 1), "tasks": {}}
    ok = True
    for task, r in res["results"].items():
        m = r.get("primary_metric", "acc")
        want = (row.get("metrics") or {}).get(task)
        got = r.get(m)
        t = {"metric": m, "reported": want, "reloaded": got, "same_score": want is not None and abs(got - want) < 1e-9}
        ref = ref_samples.get(task) or {}
        mine = samples.get(task) or {}
        if ref and mine:
            common = sorted(set(ref) & set(mine))
            t["n_compared"] = len(common)
            t["same_predictions"] = sum(ref[i].get("pred") == mine[i].get("pred") for i in common)
            diffs = [abs(ref[i]["logprobs"][k] - mine[i]["logprobs"][k]) for i in common
                     if "logprobs" in ref[i] and "logprobs" in mine[i] for k in ref[i]["logprobs"]]
            if diffs:
                t["max_abs_logprob_diff"] = max(diffs)
        ok = ok and t["same_score"]
        out["tasks"][task] = t
    out["ok"] = ok
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("compare_dir")
    ap.add_argument("--methods", default=None, help="comma-separated subset (default: every completed method)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "check_exports.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from semalign.data.tasks import build_splits

    root = Path(args.compare_dir)
    results = json.loads((root / "compare" / "results.json").read_text())
    cfg = yaml.safe_load((root / "compare" / "config.yaml").read_text())
    tasks = results.get("eval_tasks") or []
    if not tasks:
        print("the comparison evaluated no tasks (--eval-tasks none); nothing to re-score", file=sys.stderr)
        return 2
    used = build_splits(cfg["task"], data_dir=cfg.get("data_dir"), seed=cfg.get("seed", 42)).used_ids()
    wanted = set(args.methods.split(",")) if args.methods else None
    checks = []
    for row in results["rows"]:
        if row.get("kind") != "method" or row.get("status") not in ("ok", "completed", None):
            continue
        name = row["name"]
        if wanted and name not in wanted:
            continue
        run = Path(row["run_dir"])
        if not run.is_absolute() and not run.exists():
            run = root / "runs" / name
        ref = {t: _samples(root / "eval" / name / f"samples_{t}.jsonl") for t in tasks}
        t0 = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(run / "student", dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(run / "student")
        res, samples = _score(model, tok, cfg, used, tasks)
        checks.append(_compare(name, "AutoModelForCausalLM(student/)", res, samples, row, ref,
                               time.perf_counter() - t0))
        print(json.dumps(checks[-1]), flush=True)
        del model
        for adapter_cfg in sorted(run.rglob("adapter_config.json")):
            from peft import PeftModel

            base_path = json.loads(adapter_cfg.read_text())["base_model_name_or_path"]
            t0 = time.perf_counter()
            base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
            model = PeftModel.from_pretrained(base, str(adapter_cfg.parent))
            res, samples = _score(model, AutoTokenizer.from_pretrained(base_path), cfg, used, tasks)
            checks.append(_compare(name, f"PeftModel({adapter_cfg.parent.relative_to(run)}/ on {base_path})", res,
                                   samples, row, ref, time.perf_counter() - t0))
            print(json.dumps(checks[-1]), flush=True)
            del model, base
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    from semalign.artifacts import env_info

    tmp.write_text(json.dumps({"compare_dir": str(root), "checks": checks, "env": env_info()}, indent=1))
    tmp.replace(out)
    return 0 if checks and all(c["ok"] for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
