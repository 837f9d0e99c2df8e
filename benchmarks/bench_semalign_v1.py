"""Benchmark SemAlign v1 on the real offline pair (Qwen2.5-Coder-1.5B-Instruct -> 0.5B-Instruct).

Prints and writes JSON (default benchmarks/results/semalign_v1.json):
- bf16 / fp32 matmul peak of this machine, measured in the same run (2048^3 matmuls); MFU is taken against the
  peak of the dtype the run computed in (`--dtype auto`: bf16 only with native bf16 support);
- asset assembly + conversion (cold: a fresh temporary cache, with --cold-assets; otherwise the recorded
  figures in benchmarks/assets_fetch_timings.json are copied with their provenance);
- wall time per phase of a transfer: model load, attribution, semantic bases + M (cold: cache cleared, warm:
  cached), every training step; tokens/s and MFU of the training step against the measured bf16 peak;
- peak RSS.

MFU counts model FLOPs per token as 2*N_T' (teacher forward up to the deepest supervising layer, no LM head)
+ 6*N_S (student forward + backward, the usual 6N convention; N excludes the input embedding, includes the head).

Usage: python benchmarks/bench_semalign_v1.py [--steps 2] [--task mmlu] [--cold-assets] [--out PATH]
Skips with a message when the real assets are not in the cache (run `semalign assets fetch ...` first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
TEACHER, STUDENT = "qwen2.5-coder-1.5b-instruct", "qwen2.5-coder-0.5b-instruct"


def matmul_peak(dtype: torch.dtype, n: int = 2048, reps: int = 10) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    for _ in range(2):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def block_params(arch, upto: int | None = None) -> int:
    layers = list(arch.layers)[: upto or arch.num_layers]
    return sum(p.numel() for layer in layers for p in layer.parameters())


def _eval_summary(run: Path) -> dict:
    res = json.loads((run / "results.json").read_text()).get("eval", {})
    out = {}
    for who, r in res.items():
        for task, m in (r or {}).get("results", {}).items():
            out.setdefault(task, {})[who] = {k: m.get(k) for k in ("acc", "acc_stderr", "n", "pass@1", "exact_match")
                                             if k in m}
    return out


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--task", default="mmlu")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--eval-tasks", default="mmlu", help="as in `make demo` (empty string: no benchmark eval)")
    ap.add_argument("--eval-limit", type=int, default=57)
    ap.add_argument("--runs", default="cold,warm", help="cold: semantic-map cache cleared; warm: cached")
    ap.add_argument("--cold-assets", action="store_true", help="fetch both models into a fresh temp cache")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "semalign_v1.json"))
    args = ap.parse_args()

    from semalign.artifacts import env_info, peak_rss_mb
    from semalign.config import RunConfig
    from semalign.models.assets import asset_dir, fetch_asset
    from semalign.paths import cache_dir
    from semalign.transfer import run_transfer

    result: dict = {"command": " ".join(["python"] + sys.argv), "env": env_info()}
    torch.set_num_threads(torch.get_num_threads())
    result["matmul_peak_gflops"] = {"bf16": round(matmul_peak(torch.bfloat16), 1),
                                    "fp32": round(matmul_peak(torch.float32), 1)}
    print(f"matmul peak: {result['matmul_peak_gflops']}")

    if args.cold_assets:
        import os

        tmp = Path(tempfile.mkdtemp(prefix="semalign-cold-"))
        old = os.environ.get("SEMALIGN_CACHE")
        os.environ["SEMALIGN_CACHE"] = str(tmp)
        try:
            for name in (STUDENT, TEACHER):
                t = time.perf_counter()
                fetch_asset(name)
                result.setdefault("assets_cold_seconds", {})[name] = round(time.perf_counter() - t, 1)
        finally:
            if old is None:
                os.environ.pop("SEMALIGN_CACHE")
            else:
                os.environ["SEMALIGN_CACHE"] = old
            shutil.rmtree(tmp, ignore_errors=True)
    else:
        rec = ROOT / "benchmarks" / "assets_fetch_timings.json"
        if rec.is_file():
            result["assets_recorded"] = json.loads(rec.read_text())
    if asset_dir(TEACHER) is None or asset_dir(STUDENT) is None:
        print(f"SKIP: {TEACHER} / {STUDENT} are not in the cache; run `semalign assets fetch NAME` first")
        return 0

    runs = {}
    for phase in args.runs.split(","):
        if phase == "cold":
            shutil.rmtree(cache_dir() / "semantic_maps", ignore_errors=True)
        out = Path(tempfile.mkdtemp(prefix=f"semalign-bench-{phase}-")) / "run"
        cfg = RunConfig(task=args.task, data_dir=args.data_dir, steps=args.steps, output=str(out),
                        eval_tasks=args.eval_tasks, eval_limit=args.eval_limit)
        t = time.perf_counter()
        summary = run_transfer(cfg, overwrite=True)
        wall = time.perf_counter() - t
        metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        runs[phase] = {"wall_seconds": round(wall, 1), "timings_seconds": summary["timings_seconds"],
                       "dtype": cfg.dtype if cfg.dtype != "auto" else None, "eval": _eval_summary(out),
                       "prepare_seconds": summary.get("prepare_timings"), "layer_map": summary.get("layer_map"),
                       "steps": [{k: m[k] for k in ("step", "step_seconds", "tokens", "tokens_per_second", "loss")}
                                 for m in metrics], "nll": summary["nll"], "peak_rss_mb": summary["peak_rss_mb"]}
        print(f"{phase}: {wall:.1f} s; phases {summary['timings_seconds']}; prepare {summary.get('prepare_timings')}")
        last = (out, summary, metrics)
    out, summary, metrics = last

    from semalign.models.arch import internals

    from transformers import AutoConfig, AutoModelForCausalLM

    def meta_model(name):  # parameter counts only: build on the meta device, no weights loaded
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(asset_dir(name)))

    ta, sa = internals(meta_model(TEACHER)), internals(meta_model(STUDENT))
    lm = json.loads((out / "layer_map.json").read_text())
    deepest = max(p["teacher_layer"] for p in lm["pairs"])
    n_t = block_params(ta, deepest)
    n_s = block_params(sa) + sa.lm_head.weight.numel()
    flops_per_token = 2 * n_t + 6 * n_s
    from semalign.models.precision import native_compute_dtype

    compute = native_compute_dtype("cpu")  # what --dtype auto resolved to for these runs
    result["compute_dtype"] = compute
    peak = result["matmul_peak_gflops"][compute]
    steps = []
    for m in metrics:
        gflops = flops_per_token * m["tokens"] / m["step_seconds"] / 1e9
        steps.append({"step": m["step"], "seconds": m["step_seconds"], "tokens_per_second": m["tokens_per_second"],
                      "model_gflops": round(gflops, 1), "mfu": round(gflops / peak, 3)})
    result["training_step"] = {"flops_per_token": flops_per_token, "teacher_params_to_deepest_layer": n_t,
                               "student_params_with_head": n_s, "steps": steps}
    result["runs"] = runs
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    for s in steps:
        print(f"step {s['step']}: {s['seconds']} s, {s['tokens_per_second']} tok/s, "
              f"{s['model_gflops']} GFLOP/s, MFU {s['mfu']:.1%} of the {compute} matmul peak")
    print(f"peak RSS {result['peak_rss_mb']} MB")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
