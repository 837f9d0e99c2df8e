"""Benchmarks for the baselines (CPU): window search, LaTen logit-lens neuron scores, and `compare` on the tiny pair.

Usage::

    python benchmarks/bench_compare.py window            # vectorised summed-area search vs a Python double loop
    python benchmarks/bench_compare.py lens [--model qwen2.5-coder-0.5b-instruct] [--layers 5,20] [--vocab 2048]
    python benchmarks/bench_compare.py tiny              # `semalign compare` on the tiny pair, all methods

``lens`` needs the real asset in the cache; it prints exact vs ``lens_vocab`` timings and the agreement of the
top-10% neuron sets. Everything prints one JSON line per measurement.
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


def bench_window(n: int = 8960, m: int = 1536, ns: int = 4864, ms: int = 896) -> None:
    from semalign.methods.seeking.extract import best_window

    S = torch.rand(n, m)
    t0 = time.perf_counter()
    a, b, v = best_window(S, (ns, ms))
    t_vec = time.perf_counter() - t0
    # the original's Python double loop, timed on a strided sample of offsets and extrapolated
    S64 = S.double()
    P = torch.zeros(n + 1, m + 1, dtype=torch.float64)
    P[1:, 1:] = S64.cumsum(0).cumsum(1)
    offsets = [(i, j) for i in range(0, n - ns + 1, 97) for j in range(0, m - ms + 1, 97)]
    t0 = time.perf_counter()
    for i, j in offsets:
        float(P[i + ns, j + ms] - P[i, j + ms] - P[i + ns, j] + P[i, j])
    per = (time.perf_counter() - t0) / len(offsets)
    total = (n - ns + 1) * (m - ms + 1)
    print(json.dumps({"bench": "window", "matrix": [n, m], "window": [ns, ms], "offsets": total,
                      "vectorised_s": round(t_vec, 3), "python_loop_s_extrapolated": round(per * total, 1),
                      "best": [a, b]}))


def bench_lens(model: str, layers: list[int], vocab: int, examples: int) -> None:
    from semalign.data.tasks import build_splits
    from semalign.methods.laten.attribution import Lens, attribution_input, capture, neuron_scores
    from semalign.models.arch import internals
    from semalign.models.load import load_model

    m, tok, _ = load_model(model, dtype="fp32", device="cpu")
    arch = internals(m)
    splits = build_splits("mmlu", seed=42, sizes=(examples, 0, 0))
    caps = []
    for ex in splits.extract[:examples]:
        ids, y = attribution_input(tok, ex)
        caps.append(capture(arch, ids, y))
    lens = Lens(arch)
    k = int(0.1 * arch.intermediate_size)
    for layer in layers:
        t0 = time.perf_counter()
        exact = neuron_scores(arch, lens, caps, [layer], "ffn")[:, 0]
        t_exact = time.perf_counter() - t0
        t0 = time.perf_counter()
        approx = neuron_scores(arch, lens, caps, [layer], "ffn", vocab=vocab)[:, 0]
        t_approx = time.perf_counter() - t0
        overlap = [len(set(torch.topk(exact[e], k).indices.tolist()) & set(torch.topk(approx[e], k).indices.tolist()))
                   / k for e in range(len(caps))]
        print(json.dumps({"bench": "lens", "model": model, "layer": layer, "examples": len(caps), "vocab": vocab,
                          "exact_s": round(t_exact, 2), "approx_s": round(t_approx, 2),
                          "top10pct_overlap_min": round(min(overlap), 4),
                          "max_abs_diff": float((exact - approx).abs().max()),
                          "max_abs_score": float(exact.abs().max())}))


def bench_tiny() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from conftest import mmlu_like, write_protocol_dir

    from semalign.cli.main import main
    from semalign.testing import save_tiny_pair

    root = Path(tempfile.mkdtemp())
    try:
        write_protocol_dir(root / "data", "mmlu", mmlu_like)
        (root / "data" / "mmlu").mkdir()
        shutil.copy(Path(__file__).resolve().parents[1] / "tests" / "fixtures" / "eval" / "mmlu" / "test.jsonl",
                    root / "data" / "mmlu" / "test.jsonl")
        t, s = save_tiny_pair(root / "m", "qwen2")
        t0 = time.perf_counter()
        rc = main(["compare", "--teacher", str(t), "--student", str(s), "--data-dir", str(root / "data"),
                   "--output", str(root / "cmp"), "--steps", "2", "--eval-limit", "8", "--dtype", "fp32", "-q"])
        res = json.loads((root / "cmp" / "compare" / "results.json").read_text())
        print(json.dumps({"bench": "tiny-compare", "rc": rc, "wall_s": round(time.perf_counter() - t0, 2),
                          "per_method_s": {r["name"]: r["wall_seconds"] for r in res["rows"]}}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["window", "lens", "tiny"])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--layers", default="5,20")
    ap.add_argument("--vocab", type=int, default=2048)
    ap.add_argument("--examples", type=int, default=3)
    a = ap.parse_args()
    from semalign.artifacts import env_info

    print(json.dumps({"bench": "env", "env": env_info()}))  # what decides speed here (CPU flags, dtype, threads)
    if a.what == "window":
        bench_window()
    elif a.what == "lens":
        bench_lens(a.model, [int(x) for x in a.layers.split(",")], a.vocab, a.examples)
    else:
        bench_tiny()


if __name__ == "__main__":
    main()
