"""Benchmark the evaluation harness on the real offline models.

1. Generation throughput on the student (Qwen2.5-Coder-0.5B-Instruct): the same chat prompts generated at batch 1
   and batched (length-bucketed, left-padded, KV cache), each for exactly ``--gen-tokens`` new tokens
   (end-of-sequence ignored so both runs do the same work). Reports tokens/s and the speed-up (target >= 5x).
2. Wall time of each task (``--tasks``, ``--task-limit`` examples each) on both models (teacher and student),
   with the primary metric, so the cost of a full evaluation can be extrapolated.

Skips a model with a clear message when its asset is not in the cache (``semalign assets fetch NAME``).
Writes JSON (default benchmarks/results/bench_eval.json) and prints it.

Usage: python benchmarks/bench_eval.py [--dtype fp32] [--threads 1] [--gen-prompts 16] [--gen-tokens 64]
       [--tasks mmlu,gsm8k,humaneval,mbpp] [--task-limit 16] [--data-dir ../shared/data] [--skip-tasks] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"

PROMPTS = [
    "Write a python function that returns the n-th Fibonacci number.",
    "Explain what a hash map is in two sentences.",
    "Write a python function to check whether a string is a palindrome.",
    "What is the capital of France? Answer briefly.",
    "Write a python function that merges two sorted lists.",
    "Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
    "How many clips did Natalia sell altogether in April and May?",
    "Write a python function computing the greatest common divisor of two integers.",
    "List three uses of the Python `collections` module.",
    "Write a python function that flattens a nested list.",
    "Describe binary search.",
    "Write a python function that counts vowels in a string.",
    "Why is the sky blue? One paragraph.",
    "Write a python function to transpose a matrix given as a list of lists.",
    "Write a python class for a stack with push, pop and peek.",
    "Write a python function that returns the prime factors of n.",
    "What does the `yield` keyword do in Python?",
]


def asset_path(name: str) -> Path | None:
    from semalign.models import assets

    try:
        return assets.asset_dir(name)
    except Exception:  # noqa: BLE001
        return None


def peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench_generation(model, tok, n_prompts: int, new_tokens: int, batch1_prompts: int) -> dict:
    from semalign.eval.generate import GenStats, generate
    from semalign.eval.prompting import encode, render

    texts = [render(tok, PROMPTS[i % len(PROMPTS)], "", "tokenizer") for i in range(n_prompts)]
    ids = [encode(tok, t) for t in texts]
    generate(model, tok, ids[:1], max_new_tokens=4, batch_size=1)  # warm-up
    s1 = GenStats()
    generate(model, tok, ids[:batch1_prompts], max_new_tokens=new_tokens, batch_size=1, ignore_eos=True, stats=s1)
    sb = GenStats()
    generate(model, tok, ids, max_new_tokens=new_tokens, batch_size=n_prompts, ignore_eos=True, stats=sb)
    return {"prompts_batch1": batch1_prompts, "prompts_batched": n_prompts, "new_tokens_per_prompt": new_tokens,
            "prompt_tokens_mean": round(sum(map(len, ids)) / len(ids), 1),
            "batch1": s1.to_dict(), "batched": sb.to_dict(),
            "speedup": round(sb.tokens_per_s / s1.tokens_per_s, 2) if s1.tokens_per_s else None}


def bench_refill(model, tok, n: int, new_tokens: int, data_dir: str | None) -> dict:
    """GSM8K-style answers of uneven length: static batches vs refilled batches (same greedy outputs)."""
    from semalign.data import sources
    from semalign.eval.generate import GenStats, generate
    from semalign.eval.gsm8k import PROMPT
    from semalign.eval.prompting import encode, render

    rows, _ = sources.gsm8k_records("test", Path(data_dir) if data_dir else None)
    ids = [encode(tok, render(tok, PROMPT.format(question=r["question"]), "", "tokenizer")) for r in rows[:n]]
    out = {}
    texts = {}
    for name, refill in (("static", False), ("refill", True)):
        st = GenStats()
        res = generate(model, tok, ids, max_new_tokens=new_tokens, batch_size=16, refill=refill, stats=st)
        out[name] = st.to_dict()
        texts[name] = [r.token_ids for r in res]
    out["same_outputs"] = texts["static"] == texts["refill"]
    out["speedup"] = round(out["refill"]["tokens_per_s"] / out["static"]["tokens_per_s"], 2)
    return out


def bench_tasks(model, tok, name: str, tasks: list[str], limit: int, data_dir: str | None) -> dict:
    from semalign.errors import SemalignError
    from semalign.eval import evaluate

    out = {}
    for t in tasks:
        t0 = time.perf_counter()
        try:
            res = evaluate(model, tok, [t], limit=limit, allow_code_execution=True, data_dir=data_dir,
                           progress=False, log_samples=False, model_name=name)
        except SemalignError as e:
            out[t] = {"skipped": e.message}
            print(f"  {t}: skipped ({e.message})", file=sys.stderr)
            continue
        r = res["results"][t]
        m = r["primary_metric"]
        out[t] = {"n": r["n"], "wall_s": round(time.perf_counter() - t0, 1), m: r[m],
                  "per_example_s": round((time.perf_counter() - t0) / max(1, r["n"]), 2),
                  "generation": res.get("generation", {}).get(t)}
        print(f"  {name} {t}: {m}={r[m]} n={r['n']} wall={out[t]['wall_s']}s", file=sys.stderr)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dtype", default="fp32", help="bf16 or fp32 (fp32 is faster on CPUs without AVX512-BF16/AMX)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--gen-prompts", type=int, default=16)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--batch1-prompts", type=int, default=4, help="prompts timed one at a time")
    ap.add_argument("--tasks", default="mmlu,gsm8k,humaneval,mbpp")
    ap.add_argument("--task-limit", type=int, default=16)
    ap.add_argument("--data-dir", default=str(ROOT.parent / "shared" / "data"))
    ap.add_argument("--skip-tasks", action="store_true")
    ap.add_argument("--skip-generation", action="store_true")
    ap.add_argument("--refill-prompts", type=int, default=0,
                    help="also time static vs refilled batches on this many GSM8K prompts (0 = skip)")
    ap.add_argument("--refill-tokens", type=int, default=256)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "bench_eval.json"))
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    from semalign.models.load import load_model

    host = {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "loadavg_start": os.getloadavg()}
    from semalign.artifacts import env_info

    report: dict = {"host": host, "env": env_info(),
                    "dtype": args.dtype, "generation": None, "tasks": {}}
    data_dir = args.data_dir if Path(args.data_dir).is_dir() else None
    for name in (STUDENT, TEACHER):
        if args.skip_tasks and (name != STUDENT or args.skip_generation):
            continue
        if asset_path(name) is None:
            msg = f"asset {name} is not in the cache; run `semalign assets fetch {name}` first"
            print(f"skip: {msg}", file=sys.stderr)
            report["tasks"][name] = {"skipped": msg}
            continue
        t0 = time.perf_counter()
        model, tok, _ = load_model(name, dtype=args.dtype, device="cpu")
        load_s = time.perf_counter() - t0
        print(f"{name}: loaded in {load_s:.1f}s", file=sys.stderr)
        if name == STUDENT and not args.skip_generation:
            report["generation"] = {"model": name, **bench_generation(model, tok, args.gen_prompts, args.gen_tokens,
                                                                      args.batch1_prompts)}
            if args.refill_prompts:
                report["generation"]["refill"] = bench_refill(model, tok, args.refill_prompts, args.refill_tokens,
                                                              data_dir)
                print(f"  refill: {report['generation']['refill']}", file=sys.stderr)
            g = report["generation"]
            print(f"  generation: batch1 {g['batch1']['tokens_per_s']} tok/s, batch {args.gen_prompts} "
                  f"{g['batched']['tokens_per_s']} tok/s, speed-up {g['speedup']}x", file=sys.stderr)
        if not args.skip_tasks:
            report["tasks"][name] = {"load_s": round(load_s, 1), "limit": args.task_limit,
                                     **bench_tasks(model, tok, name, [t for t in args.tasks.split(",") if t],
                                                   args.task_limit, data_dir)}
        del model
    report["host"]["loadavg_end"] = os.getloadavg()
    report["peak_rss_mb"] = round(peak_rss_mb(), 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
