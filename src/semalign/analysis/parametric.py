"""Parametric similarity of extracted teacher parameters vs the student's own (NI's metric, baselines.md §5.3 (i)).

For each student layer k and its teacher layer l (v1 depth map, spec §2.3) and each projection
(q/k/v/o/gate/up/down), a student-shaped sub-matrix W_ext is taken from the teacher weight (nn.Linear
orientation [out, in]) and compared with the student weight W_S:

* ``cos``: cosine of the flattened matrices (NI's "parametric structural similarity");
* ``cka``: linear CKA with the n_S rows as samples (scale/orthogonal-invariant view of the same question);
  ``cka_null``: the same for a Gaussian matrix of the same shape (CKA of independent matrices is not 0);
* ``cos_lowrank``: cos(B0 A0, W_S) with B0 A0 the rank-r truncated SVD of W_ext (NI's "Seeking LoRA vs
  Original"); ``cos_remaining``: cos(B0 A0, W_S - B0 A0) ("LoRA vs Remaining"); ``pissa_cos``:
  cos(rank-r part of W_S, W_S) (NI's PiSSA control, aligned by construction).

Extraction (documented, simple, vectorised):

* ``seeking-run``: the windows a Seeking run chose (``RUN_DIR/seeking/extraction.json`` offsets);
* ``sensitivity``: Seeking's contiguous window with the largest summed sensitivity sum_j |theta * g_j| over the
  analysis examples (2-D summed-area table, exhaustive, float64; :func:`best_window`);
* ``leading``: the leading block W_T[:n_S, :m_S].
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..models.arch import Internals
from ..pairing import depth_map
from ..similarity import cosine_flat

log = logging.getLogger(__name__)

EXTRACTIONS = ("auto", "seeking-run", "sensitivity", "leading")


def window_sums(score: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Sum of ``score`` over every h x w window: [n-h+1, m-w+1] (float64 summed-area table)."""
    s = torch.zeros(score.shape[0] + 1, score.shape[1] + 1, dtype=torch.float64)
    s[1:, 1:] = score.double().cumsum(0).cumsum(1)
    return s[h:, w:] - s[:-h, w:] - s[h:, :-w] + s[:-h, :-w]


def best_window(score: torch.Tensor, h: int, w: int) -> tuple[int, int, float]:
    """(row offset, column offset, share of the total) of the h x w window with the largest summed score;
    ties go to the smallest (row, column)."""
    if h > score.shape[0] or w > score.shape[1]:
        raise ValueError(f"window {h}x{w} does not fit in {tuple(score.shape)}")
    sums = window_sums(score, h, w)
    idx = int(torch.argmax(sums.reshape(-1)))  # first maximum in row-major order
    a, b = divmod(idx, sums.shape[1])
    total = float(score.double().sum())
    return a, b, float(sums[a, b]) / total if total > 0 else 0.0


def lowrank(w: torch.Tensor, r: int, seed: int = 0) -> torch.Tensor:
    """Rank-r truncated SVD of w (float32): exact for small matrices, else randomised with 6 power iterations."""
    r = min(r, *w.shape)
    if min(w.shape) <= 256:
        u, s, vh = torch.linalg.svd(w.float(), full_matrices=False)
        return (u[:, :r] * s[:r]) @ vh[:r]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        u, s, v = torch.svd_lowrank(w.float(), q=min(r + 8, *w.shape), niter=6)
    return (u[:, :r] * s[:r]) @ v[:, :r].T


def cka_rows(x: torch.Tensor, y: torch.Tensor) -> float:
    """Linear CKA with rows as samples, float32 products on the smaller side, float64 reductions."""
    xc = x.float() - x.float().mean(0, keepdim=True)
    yc = y.float() - y.float().mean(0, keepdim=True)
    if xc.shape[0] <= max(xc.shape[1], yc.shape[1]):  # sample-space (Gram) form
        kx, ky = xc @ xc.T, yc @ yc.T
        num = (kx.double() * ky.double()).sum()
        den = kx.double().norm() * ky.double().norm()
    else:
        num = (xc.T @ yc).double().norm() ** 2
        den = (xc.T @ xc).double().norm() * (yc.T @ yc).double().norm()
    return float(num / den.clamp_min(1e-300))


def matrix_metrics(w_ext: torch.Tensor, w_s: torch.Tensor, rank: int, seed: int = 0) -> dict[str, float]:
    ba = lowrank(w_ext, rank, seed)
    g = torch.Generator().manual_seed(seed)
    null = torch.randn(w_s.shape, generator=g)
    return {"cos": cosine_flat(w_ext, w_s), "cka": cka_rows(w_ext, w_s), "cka_null": cka_rows(null, w_s),
            "cos_lowrank": cosine_flat(ba, w_s), "cos_remaining": cosine_flat(ba, w_s.float() - ba),
            "pissa_cos": cosine_flat(lowrank(w_s, rank, seed), w_s)}


def seeking_windows(run_dir: Path) -> dict[tuple[int, str], dict]:
    """(student layer, projection) -> {teacher_layer, row_offset, col_offset, shape} from a Seeking run."""
    p = Path(run_dir) / "seeking" / "extraction.json"
    if not p.is_file():
        return {}
    try:
        recs = json.loads(p.read_text()).get("matrices", [])
        return {(int(r["student_layer"]), str(r["name"])): r for r in recs
                if int(r.get("student_layer", 0)) > 0 and "row_offset" in r and "col_offset" in r}
    except (ValueError, KeyError, TypeError) as exc:
        log.warning("ignoring unreadable %s (%s)", p, exc)
        return {}


def extract(w_t: torch.Tensor, shape: tuple[int, int], method: str, *, score: torch.Tensor | None = None,
            offsets: tuple[int, int] | None = None) -> tuple[torch.Tensor, dict]:
    """A student-shaped block of the teacher weight, and where it came from."""
    h, w = shape
    if offsets is not None:
        a, b = offsets
        info = {"method": "seeking-run", "row_offset": a, "col_offset": b}
    elif method == "sensitivity" and score is not None:
        a, b, share = best_window(score, h, w)
        info = {"method": "sensitivity", "row_offset": a, "col_offset": b, "window_share": share}
    else:
        a = b = 0
        info = {"method": "leading", "row_offset": 0, "col_offset": 0}
    return w_t[a:a + h, b:b + w], info


def parametric_similarity(t_arch: Internals, s_arch: Internals, *, method: str = "leading",
                          sensitivity: dict[str, torch.Tensor] | None = None, run_dir: Path | None = None,
                          projections: tuple[str, ...] | None = None, rank: int = 16, seed: int = 0,
                          progress=None) -> dict:
    """Per student layer and projection: the metrics of :func:`matrix_metrics` plus the extraction record."""
    L_T, L_S = t_arch.num_layers, s_arch.num_layers
    names = tuple(n for n in (projections or s_arch.projection_names) if n in t_arch.projection_names)
    windows = seeking_windows(run_dir) if run_dir is not None and method in ("auto", "seeking-run") else {}
    sens = sensitivity or {}
    out: dict = {"projections": list(names), "rank": rank, "student_layers": list(range(1, L_S + 1)),
                 "teacher_layers": [], "layers": {}, "extraction": method}
    for k in range(1, L_S + 1):
        rec = windows.get((k, names[0])) if names else None
        l_t = int(rec["teacher_layer"]) if rec and rec.get("teacher_layer") else depth_map(k, L_T, L_S)
        out["teacher_layers"].append(l_t)
        per: dict = {}
        for name in names:
            w_s = s_arch.projection(k, name).weight.detach().float().cpu()
            w_t = t_arch.projection(l_t, name).weight.detach().float().cpu()
            shape = (min(w_s.shape[0], w_t.shape[0]), min(w_s.shape[1], w_t.shape[1]))
            if shape != tuple(w_s.shape):
                w_s = w_s[: shape[0], : shape[1]]  # teacher narrower than the student: compare the common block
            r = windows.get((k, name))
            offs = None
            if r is not None:
                rs = tuple(r.get("shape") or shape)
                offs = (int(r["row_offset"]), int(r["col_offset"])) if rs == shape else (
                    int(r["col_offset"]), int(r["row_offset"]))  # stored transposed
            score = sens.get(t_arch.projection_path(l_t, name) + ".weight")
            m = "sensitivity" if method in ("auto", "sensitivity") and score is not None else method
            block, info = extract(w_t, shape, m, score=score, offsets=offs)
            per[name] = {**matrix_metrics(block, w_s, rank, seed + k), "extraction": info,
                         "student_shape": list(shape), "teacher_shape": list(w_t.shape), "teacher_layer": l_t}
        out["layers"][str(k)] = per
        if progress is not None:
            progress()
    used = sorted({out["layers"][str(k)][n]["extraction"]["method"] for k in range(1, L_S + 1) for n in names})
    out["extraction"] = ",".join(used) or method
    out["means"] = {n: {key: sum(out["layers"][str(k)][n][key] for k in range(1, L_S + 1)) / L_S
                        for key in ("cos", "cka", "cka_null", "cos_lowrank", "cos_remaining", "pissa_cos")}
                    for n in names}
    return out
