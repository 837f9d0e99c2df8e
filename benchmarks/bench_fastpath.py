"""Side-by-side benchmark of issue 10 items 3-4: the same SemAlign v1 transfer through the full path
(``--no-fast-path``: the whole student every step, LM head at every position, full after-evaluation) and the fast
path (frozen prefix stored per example, head at response rows, incremental MMLU evaluation), in one run on one
machine; then ``make demo`` cold (empty ``SEMALIGN_CACHE``: assets fetched and converted) and warm.

Each transfer runs in its own child process (same seed, same config), so each has its own peak RSS. Written JSON
(default benchmarks/results/fastpath.json, ``--tiny``: fastpath_tiny.json):
- ``paths.{full,fast}``: wall, per-phase seconds (load, NLL, eval before/after, prepare, fit, export), per step:
  seconds, tokens, tokens/s, teacher-target seconds, prefix seconds, and derived tokens/s of the student part
  (step minus teacher targets minus prefix computation) and of a step whose prefixes are already stored;
- ``speedup``: fast over full for each of those, for ``fit`` and ``eval_after``;
- ``equal``: layer maps, per-step losses (max relative difference), MMLU answers and letter log-probs after;
- ``demo``: ``make demo`` cold / warm wall and peak RSS (``--skip-demo`` to leave it out).

Usage: python benchmarks/bench_fastpath.py [--steps 2] [--eval-limit 57] [--skip-demo] [--out PATH]
       python benchmarks/bench_fastpath.py --tiny      # tiny random pair built in-process: proves the plumbing
Real mode skips with a message when the Qwen pair is not in the asset cache (`semalign assets fetch NAME`).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"


def child(spec: str) -> int:
    """Run one transfer (``run_transfer(**spec)``) and print its summary, metrics and MMLU samples as JSON."""
    from semalign.config import make_config
    from semalign.transfer import run_transfer

    spec = json.loads(spec)
    t = time.perf_counter()
    summary = run_transfer(make_config(spec), overwrite=True)
    wall = time.perf_counter() - t
    out = Path(spec["output"])
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    f = out / "eval" / "student_after" / "samples_mmlu.jsonl"
    samples = [json.loads(x) for x in f.read_text().splitlines()] if f.is_file() else []
    print("@@RESULT@@" + json.dumps({"wall": wall, "summary": summary, "metrics": metrics,
                                     "answers": [(s["id"], s["pred"], s["logprobs"]) for s in samples]}))
    return 0


def run_child(spec: dict, env: dict) -> dict:
    p = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], env=env, capture_output=True, text=True)
    if p.returncode != 0:
        raise SystemExit(f"transfer failed (rc {p.returncode}):\n{p.stderr[-3000:]}")
    line = next(x for x in p.stdout.splitlines() if x.startswith("@@RESULT@@"))
    return json.loads(line[len("@@RESULT@@"):])


def path_record(r: dict) -> dict:
    s = r["summary"]
    steps = []
    for m in r["metrics"]:
        student = max(1e-9, m["step_seconds"] - m.get("teacher_seconds", 0.0) - m.get("prefix_seconds", 0.0))
        stored = max(1e-9, m["step_seconds"] - m.get("prefix_seconds", 0.0))
        steps.append({k: m.get(k) for k in ("step", "step_seconds", "tokens", "tokens_per_second", "teacher_seconds",
                                             "prefix_seconds", "loss", "layer_loss", "output_loss")}
                     | {"student_tokens_per_second": round(m["tokens"] / student, 1),
                        "stored_prefix_tokens_per_second": round(m["tokens"] / stored, 1),
                        "fast_path": m.get("fast_path")})
    return {"wall_seconds": round(r["wall"], 2), "timings_seconds": s.get("timings_seconds"),
            "peak_rss_mb": s.get("peak_rss_mb"), "layer_map": s.get("layer_map"), "steps": steps,
            "incremental_eval": s.get("incremental_eval")}


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def compare(full: dict, fast: dict, rf: dict, rq: dict) -> tuple[dict, dict]:
    def ratio(key):
        a, b = _mean([s[key] for s in fast["steps"]]), _mean([s[key] for s in full["steps"]])
        return round(a / b, 2) if a and b else None

    tf, tq = full["timings_seconds"] or {}, fast["timings_seconds"] or {}
    speed = {"step_tokens_per_second": ratio("tokens_per_second"),
             "student_step_tokens_per_second": ratio("student_tokens_per_second"),
             "stored_prefix_step_tokens_per_second": ratio("stored_prefix_tokens_per_second"),
             **{f"{k}_time": round(tf[k] / tq[k], 2) for k in ("fit", "eval_after") if tf.get(k) and tq.get(k)},
             "wall": round(full["wall_seconds"] / fast["wall_seconds"], 2)}
    rel = max((abs(a[k] - b[k]) / max(1e-12, abs(b[k])) for a, b in zip(fast["steps"], full["steps"])
               for k in ("loss", "layer_loss", "output_loss")), default=0.0)
    lp = [abs(x - y) for (_, _, a), (_, _, b) in zip(rq["answers"], rf["answers"]) for x, y in
          zip(a.values(), b.values())]
    equal = {"layer_map": fast["layer_map"] == full["layer_map"], "losses_max_rel_diff": rel,
             "answers_equal": [a[:2] for a in rq["answers"]] == [a[:2] for a in rf["answers"]],
             "letter_logprob_max_abs_diff": max(lp, default=0.0), "n_answers": len(rq["answers"])}
    return speed, equal


def timed(cmd: list[str], env: dict, cwd: Path) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    t = time.perf_counter()
    p = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"command": " ".join(cmd), "rc": p.returncode, "wall_seconds": round(wall, 1),
            "peak_rss_mb_children": round(peak / 1024, 1), "peak_rss_note": "max over child processes so far"
            if peak == before else "this command's largest process", "tail": p.stdout[-600:] if p.returncode else ""}


def tiny_setup(root: Path) -> tuple[dict, list[str]]:
    sys.path.insert(0, str(ROOT))
    from semalign.testing import save_tiny_pair
    from tests.conftest import mmlu_like, write_protocol_dir

    t, s = save_tiny_pair(root / "pair", "qwen2", teacher_layers=8, student_layers=8, teacher_hidden=128,
                          student_hidden=96)
    data = write_protocol_dir(root / "data", "mmlu", mmlu_like, sizes=(8, 64, 16, 16))
    shutil.copytree(ROOT / "tests" / "fixtures" / "eval" / "mmlu", data / "mmlu")
    base = {"teacher": str(t), "student": str(s), "data_dir": str(data), "eval_limit": 16, "dtype": "fp32"}
    cli = ["transfer", "--teacher", str(t), "--student", str(s), "--data-dir", str(data), "--eval-tasks", "mmlu",
           "--eval-limit", "16", "--steps", "2"]
    return base, cli


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--tiny", action="store_true", help="tiny random pair built in-process (no assets needed)")
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--eval-limit", type=int, default=57)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--skip-demo", action="store_true")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.child:
        return child(args.child)

    from semalign.artifacts import env_info

    out_path = Path(args.out or ROOT / "benchmarks" / "results" / ("fastpath_tiny.json" if args.tiny else "fastpath.json"))
    tmp = Path(tempfile.mkdtemp(prefix="semalign-bench-fast-"))
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""))
    result: dict = {"command": " ".join(["python"] + sys.argv), "mode": "tiny" if args.tiny else "real",
                    "env": env_info()}
    if args.tiny:
        base, demo_cli = tiny_setup(tmp)
    else:
        from semalign.models.assets import asset_dir

        if asset_dir(TEACHER) is None or asset_dir(STUDENT) is None:
            print(f"SKIP: {TEACHER} / {STUDENT} are not in the asset cache; run `semalign assets fetch NAME` first")
            return 0
        base, demo_cli = {"eval_limit": args.eval_limit}, []
    base |= {"task": "mmlu", "eval_tasks": "mmlu", "steps": args.steps, "seed": args.seed}
    result["config"] = base
    raw = {}
    for name, fast in (("full", False), ("fast", True)):
        raw[name] = run_child(base | {"fast_path": fast, "output": str(tmp / name)}, env)
        print(f"{name}: {raw[name]['wall']:.1f} s, phases {raw[name]['summary'].get('timings_seconds')}")
    paths = {k: path_record(v) for k, v in raw.items()}
    result["paths"] = paths
    result["speedup"], result["equal"] = compare(paths["full"], paths["fast"], raw["full"], raw["fast"])
    print("speed-up (fast / full):", result["speedup"])
    print("equal:", result["equal"])

    if not args.skip_demo:
        cache = tmp / "cold-cache"
        cache.mkdir()
        denv = dict(env, SEMALIGN_CACHE=str(cache))
        if args.tiny:  # the demo's command on the tiny pair (no assets to fetch)
            cmd = [sys.executable, "-c", "import sys; from semalign.cli.main import main; sys.exit(main(sys.argv[1:]))",
                   *demo_cli, "-q", "--overwrite", "--output"]
        else:
            cmd = ["make", "demo", "ARGS=--overwrite --output"]
        result["demo"] = {}
        for phase in ("cold", "warm"):
            run_dir = str(tmp / f"demo-{phase}")
            c = cmd + [run_dir] if args.tiny else cmd[:-1] + [f"{cmd[-1]} {run_dir}"]
            result["demo"][phase] = timed(c, denv, ROOT)
            print(f"demo {phase}: {result['demo'][phase]['wall_seconds']} s (rc {result['demo'][phase]['rc']})")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print(f"wrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
