"""The "resolution of semantics" check (spec semalign.md §2.1, v1 §3.2 / Fig. 2), done in ONE model.

Decompose a hidden state on unit-norm bases s_i (coefficients a_i = cos(h, s_i)) and recompose
r = sum_i a_i s_i = S S^T h / |h|. The check is cos(h, r) per token and layer. ``P = S S^T`` is a D x D
(frame) operator, accumulated over vocabulary chunks, so the V-dimensional coefficients and the D x V bases are
never materialised (for Qwen2.5, V = 151,936). ``cos(h, P h)`` does not depend on the scale of P.

Basis kinds:

* ``output``: unit-norm columns of pinv(W_head) (the paper's semantic bases): with A = pinv(W^T W),
  column i is A w_i, so P = A [sum_i w_i w_i^T / |A w_i|^2] A;
* ``output_folded``: the same for W_head diag(g), the final-norm gain folded in (spec §8.6): the head then acts
  on the raw residual stream up to the RMS scale, so these bases live in the space of h itself;
* ``input``: the same with the input embedding matrix E in place of W_head;
* ``random``: Gaussian D x V bases with unit-norm columns (the brief's null);
* ``random_uniform``: non-negative U[0,1) D x V bases, unit-norm columns (a non-centred null).

[derived] For V >> D, Gaussian unit vectors form a nearly tight frame (P ~ (V/D) I, relative deviation
~ sqrt(D/V)), so Gaussian bases *also* give cos ~ 1; a non-centred random basis has P dominated by one
direction (the mean), which gives the "roughly orthogonal" recomposition the paper reports for random vectors.
Rows of W whose basis norm is below ``min_norm`` x max (padded vocabulary rows) are dropped (spec §8.18).
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from ..errors import SemalignError
from ..methods.semalign.bases import tensor_digest

log = logging.getLogger(__name__)

BASIS_KINDS = ("output", "output_folded", "input", "random", "random_uniform")
CHUNK = 16384


def pinv_frame_operator(w: torch.Tensor, n_ids: int | None = None, *, rcond: float = 1e-6,
                        min_norm: float = 1e-8) -> tuple[torch.Tensor, dict]:
    """P = S S^T (float64, D x D) for S = unit-norm columns of pinv(W[:n_ids]); stats of the construction.

    The Gram W^T W = Q diag(lam) Q^T is accumulated and diagonalised in float64 (same cutoff as
    :func:`semalign.methods.semalign.bases.gram_pinv`); the two further passes over the vocabulary work in the
    orthogonal eigenbasis, Y = W Q (float32 products, float64 accumulation): |pinv(W) e_i|^2 = sum_j Y_ij^2 / lam_j^2
    and P = Q Lam^+ [Y^T diag(1/|pinv(W) e_i|^2) Y] Lam^+ Q^T.
    """
    n = w.shape[0] if n_ids is None else min(n_ids, w.shape[0])
    d = w.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, CHUNK):
        blk = w[i:min(n, i + CHUNK)].double()
        gram += blk.T @ blk
    lam, q = torch.linalg.eigh(gram)
    sig = lam.clamp_min(0).sqrt()
    keep_dir = sig > rcond * sig.max()
    inv = torch.where(keep_dir, 1.0 / lam.clamp_min(1e-300), torch.zeros_like(lam))
    qf = q.float()
    norms = torch.empty(n, dtype=torch.float64)
    for i in range(0, n, CHUNK):
        y = (w[i:min(n, i + CHUNK)].float() @ qf).double()
        norms[i:i + y.shape[0]] = ((y * inv) ** 2).sum(1).sqrt()
    keep = norms > min_norm * norms.max()
    scale = torch.where(keep, 1.0 / norms.clamp_min(1e-300) ** 2, torch.zeros_like(norms))
    x = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, n, CHUNK):
        y = w[i:min(n, i + CHUNK)].float() @ qf
        x += ((y * scale[i:i + y.shape[0], None].float()).T @ y).double()
    P = (q * inv) @ x @ (q * inv).T
    return P, {"bases": int(keep.sum()), "dropped": int((~keep).sum()), "rank": int(keep_dir.sum()), "rcond": rcond}


def random_frame_operator(d: int, v: int, *, kind: str = "random", seed: int = 0) -> tuple[torch.Tensor, dict]:
    """P = S S^T for V random unit-norm columns in R^D (Gaussian or U[0,1)), generated in seeded chunks."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, v, CHUNK):
        c = min(CHUNK, v - i)
        blk = torch.randn(c, d, generator=g) if kind == "random" else torch.rand(c, d, generator=g)
        blk = blk / blk.norm(dim=1, keepdim=True).clamp_min(1e-12)
        x += (blk.T @ blk).double()
    return x, {"bases": v, "distribution": "gaussian" if kind == "random" else "uniform[0,1)", "seed": seed}


def frame_operator(kind: str, arch, n_ids: int, *, rcond: float = 1e-6, seed: int = 0,
                   cache_root: Path | None = None) -> tuple[torch.Tensor, dict]:
    """The D x D operator of ``kind`` for one model (``arch``: :class:`~semalign.models.arch.Internals`)."""
    if kind not in BASIS_KINDS:
        raise ValueError(f"unknown basis kind {kind!r}; choose from {', '.join(BASIS_KINDS)}")
    d = arch.hidden_size
    if kind.startswith("random"):
        return random_frame_operator(d, n_ids, kind=kind, seed=seed)
    mod = arch.embed if kind == "input" else arch.lm_head
    w = mod.weight.detach().float().cpu()
    if kind == "output_folded":
        g = arch.final_norm_gain()
        if g is None:
            raise SemalignError("basis kind output_folded: this model's final norm has no gain vector")
        w = w * g.cpu()
    path = None
    if cache_root is not None:
        key = hashlib.sha256(json.dumps({"w": tensor_digest(w), "n": n_ids, "rcond": rcond, "v": 1}).encode())
        path = Path(cache_root) / f"{key.hexdigest()[:24]}.pt"
        if path.is_file():
            blob = torch.load(path, weights_only=True)
            return blob["P"], {**json.loads(blob["meta"]), "cached": True}
    P, meta = pinv_frame_operator(w, n_ids, rcond=rcond)
    del w
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"P": P, "meta": json.dumps(meta)}, tmp)
        tmp.replace(path)
    return P, meta


def recomposition_cosines(states: torch.Tensor, P: torch.Tensor) -> torch.Tensor:
    """cos(h, P h) for states [..., N, D] -> [..., N] (float32 products; P is symmetric)."""
    h = states.float()
    r = h @ P.float()
    return torch.nn.functional.cosine_similarity(h, r, dim=-1, eps=1e-12)


def summarise(cos: torch.Tensor) -> dict[str, list[float]]:
    """Per-layer mean, std, 10th and 90th percentile of token cosines ([L+1, N] -> lists of L+1)."""
    q = torch.quantile(cos.double(), torch.tensor([0.1, 0.9], dtype=torch.float64), dim=-1)
    return {"mean": [float(x) for x in cos.mean(-1)], "std": [float(x) for x in cos.std(-1)],
            "q10": [float(x) for x in q[0]], "q90": [float(x) for x in q[1]]}


def resolution_check(arch, states: torch.Tensor, n_ids: int, kinds: tuple[str, ...] = BASIS_KINDS, *,
                     rcond: float = 1e-6, seed: int = 0, cache_root: Path | None = None,
                     keep_operators: tuple[str, ...] = ()) -> tuple[dict, dict[str, torch.Tensor]]:
    """Per-layer recomposition cosines for every basis kind; also returns the operators named in
    ``keep_operators`` (e.g. ``("output",)`` for the student's self-recomposition heat-map)."""
    out: dict = {"layers": list(range(states.shape[0])), "n_tokens": int(states.shape[1]), "kinds": {}}
    ops: dict[str, torch.Tensor] = {}
    for kind in kinds:
        P, meta = frame_operator(kind, arch, n_ids, rcond=rcond, seed=seed, cache_root=cache_root)
        out["kinds"][kind] = {**summarise(recomposition_cosines(states, P)), "meta": meta}
        if kind in keep_operators:
            ops[kind] = P
        log.info("resolution check %s: mean cosine over layers %.3f", kind,
                 sum(out["kinds"][kind]["mean"]) / states.shape[0])
    out["tied_embeddings"] = bool(getattr(arch, "tied", False))
    out["head_vs_embedding"] = head_vs_embedding(arch)
    return out, ops


def head_vs_embedding(arch) -> dict | None:
    """How close the LM head is to the input embedding (equal when tied; GGUF-derived checkpoints may store an
    untied copy): relative Frobenius difference and mean row cosine, in float32 chunks."""
    w, e = arch.lm_head.weight, arch.embed.weight
    if w.shape != e.shape:
        return None
    diff = tot = cos = 0.0
    for i in range(0, w.shape[0], CHUNK):
        a, b = w[i:i + CHUNK].detach().float(), e[i:i + CHUNK].detach().float()
        diff += float(((a - b) ** 2).sum())
        tot += float((a ** 2).sum())
        cos += float(torch.nn.functional.cosine_similarity(a, b, dim=-1, eps=1e-12).sum())
    return {"rel_fro_diff": (diff / max(tot, 1e-300)) ** 0.5, "mean_row_cos": cos / w.shape[0]}
