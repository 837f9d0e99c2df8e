"""Seeking extraction (spec baselines.md §3.1 steps 1-4), vectorised and memory-bounded.

1. Sensitivity ``S = sum_j |theta * dL_j/dtheta|`` on the teacher, one backward per seed example; each
   parameter's gradient is consumed by a post-accumulate hook (fp32 product, summed in place) and freed at once,
   so at most one parameter's gradient is alive. Full maps are kept only for target matrices; every other layer
   parameter contributes its float64 total to the layer score.
2. Layer selection: the top-L_S teacher layers by summed sensitivity, kept in depth order (i-th kept teacher layer
   -> student layer i). Teacher shallower than the student: every teacher layer is used and student layer k takes
   teacher layer ``max(1, floor(L_T k / L_S))`` (many-to-one, depth-proportional; spec §6 item 9).
3. The contiguous student-shaped window with the largest summed sensitivity, from one float64 summed-area table
   (box sums by four shifted slices, then an argmax; no Python loop over offsets). ``stride`` restricts offsets
   (head-aligned windows); a window spanning a whole axis collapses that axis first (embeddings, LM head).
4. fp32 SVD of the window to rank r: ``B0 = U_r diag(s_r)``, ``A0 = V_r^T``; explained variance recorded.
"""

from __future__ import annotations

import logging
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterable

import torch

from ...errors import SemalignError
from ...models.arch import Internals
from ...pairing import depth_map

log = logging.getLogger(__name__)

EMBED, HEAD = "embed_tokens", "lm_head"
GLOBAL = 0  # "layer" index used for the embedding / LM-head matrices


# ------------------------------------------------------------------------------------------ matrices
def resolve_targets(spec: str, t_arch: Internals, s_arch: Internals, *, rank: int, window: str) -> list[str]:
    """Validate ``--seeking-targets`` (``all`` = every projection + embed_tokens + lm_head) and shapes vs rank."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    if names == ["all"]:
        names = list(s_arch.projection_names) + [EMBED, HEAD]
    allowed = tuple(s_arch.projection_names) + (EMBED, HEAD)
    bad = [n for n in names if n not in allowed]
    if bad or not names:
        raise SemalignError(f"--seeking-targets: unknown matrix {', '.join(bad) or '(none given)'}; choose from "
                            f"{', '.join(allowed)} or 'all'")
    names = list(dict.fromkeys(names))
    if {EMBED, HEAD} & set(names):
        if t_arch.vocab_size != s_arch.vocab_size:
            raise SemalignError(f"--seeking-targets with {EMBED}/{HEAD} needs equal vocabularies (teacher "
                                f"{t_arch.vocab_size}, student {s_arch.vocab_size}); drop them from the targets")
        if s_arch.tied:
            raise SemalignError(f"the student ties its input and output embeddings, so a LoRA on {EMBED}/{HEAD} "
                                "would edit one shared matrix twice; drop embed_tokens and lm_head from "
                                "--seeking-targets")
    if window == "head_aligned" and t_arch.head_dim != s_arch.head_dim:
        raise SemalignError(f"--seeking-window head_aligned is impossible: head_dim differs (teacher "
                            f"{t_arch.head_dim}, student {s_arch.head_dim}), so no window keeps whole heads; use "
                            "--seeking-window independent (see docs/baselines.md)")
    for name in names:
        t_shape = matrix(t_arch, 1, name).shape
        s_shape = matrix(s_arch, 1, name).shape
        if rank > min(s_shape):
            raise SemalignError(f"--seeking-rank {rank} is larger than the student's {name} matrix "
                                f"{tuple(s_shape)} allows (max {min(s_shape)}); lower --seeking-rank")
        if t_shape[0] < s_shape[0] or t_shape[1] < s_shape[1]:
            raise SemalignError(f"teacher {name} {tuple(t_shape)} is smaller than the student's {tuple(s_shape)} "
                                "in some dimension, so no student-shaped window exists; drop it from "
                                "--seeking-targets")
    return names


def matrix(arch: Internals, layer: int, name: str) -> torch.Tensor:
    """The weight in Seeking's orientation: projections/LM head as stored, the embedding transposed [d, V]."""
    if name == HEAD:
        return arch.lm_head.weight
    if name == EMBED:
        return arch.embed.weight.t()
    return arch.projection(layer, name).weight


def strides(name: str, arch: Internals, window: str) -> tuple[int, int]:
    """Offset strides: head-aligned windows move q/k/v rows and o columns by whole heads."""
    if window != "head_aligned":
        return 1, 1
    if name in ("q_proj", "k_proj", "v_proj"):
        return arch.head_dim, 1
    if name == "o_proj":
        return 1, arch.head_dim
    return 1, 1


# ---------------------------------------------------------------------------------------- sensitivity
@dataclass
class Sensitivity:
    maps: dict[str, torch.Tensor]      # "<teacher layer>.<name>" (0 = embed / head) -> fp32, Seeking orientation
    layer_scores: list[float]          # summed sensitivity of teacher layers 1..L_T
    n_examples: int


def _layer_of(name: str, arch: Internals) -> int | None:
    m = re.match(rf"{re.escape(arch.spec.layers)}\.(\d+)\.", name)
    return int(m.group(1)) + 1 if m else None


def accumulate_sensitivity(arch: Internals, batches: Iterable[dict], targets: list[str], *,
                           include_norms: bool = True, loss_fn: Callable | None = None,
                           progress: Callable[[], None] | None = None) -> Sensitivity:
    """``sum_j |theta * grad_j|`` per target matrix (fp32) and per layer (float64), one backward per batch."""
    model = arch.model
    params = dict(model.named_parameters())  # tied weights appear once, under their first name
    ids = {id(p): n for n, p in params.items()}
    keys: dict[str, list[str]] = {}  # param name -> output keys "<layer>.<target>"
    for k in range(1, arch.num_layers + 1):
        for n in targets:
            if n not in (EMBED, HEAD):
                keys.setdefault(f"{arch.projection_path(k, n)}.weight", []).append(f"{k}.{n}")
    for n, mod in ((EMBED, arch.embed), (HEAD, arch.lm_head)):
        if n in targets:
            keys.setdefault(ids[id(mod.weight)], []).append(f"{GLOBAL}.{n}")
    track: dict[str, int] = {}
    for pname in params:
        layer = _layer_of(pname, arch)
        if layer is not None and (include_norms or "norm" not in pname):
            track[pname] = layer
        elif pname in keys:
            track[pname] = GLOBAL
    maps = {p: torch.zeros(params[p].shape, dtype=torch.float32, device=params[p].device) for p in keys}
    layer_sum = torch.zeros(arch.num_layers + 1, dtype=torch.float64)
    saved = {n: p.requires_grad for n, p in params.items()}
    handles = []

    def make_hook(pname: str):
        layer, acc = track[pname], maps.get(pname)

        def hook(p: torch.Tensor) -> None:
            s = (p.detach().float() * p.grad.float()).abs_()
            layer_sum[layer] += float(s.sum(dtype=torch.float64))
            if acc is not None:
                acc.add_(s)
            p.grad = None

        return hook

    loss_fn = loss_fn or (lambda m, b: m(**b).loss)
    n = 0
    was_training = model.training
    try:
        model.eval()
        for pname, p in params.items():
            p.requires_grad_(pname in track)
            if pname in track:
                handles.append(p.register_post_accumulate_grad_hook(make_hook(pname)))
        for b in batches:
            loss = loss_fn(model, b)
            if not torch.isfinite(loss):
                raise SemalignError(f"non-finite teacher loss on seed example {n + 1}; check the data or use "
                                    "--dtype fp32")
            loss.backward()
            n += 1
            if progress is not None:
                progress()
    finally:
        for h in handles:
            h.remove()
        for pname, p in params.items():
            p.grad = None
            p.requires_grad_(saved[pname])
        model.train(was_training)
    out = {}
    for pname, ks in keys.items():
        for key in ks:  # Seeking orientation: the embedding is used transposed [d, V]
            out[key] = maps[pname].t() if key.endswith(f".{EMBED}") else maps[pname]
    return Sensitivity(out, [float(x) for x in layer_sum[1:]], n)


# -------------------------------------------------------------------------------------- layer choice
def select_layers(scores: list[float], num_student_layers: int) -> list[int]:
    """Teacher layer (1-based) for each student layer 1..L_S: top-L_S by score, in depth order."""
    L_T, L_S = len(scores), num_student_layers
    if L_T < L_S:
        log.warning("teacher has %d layers, student %d: using a many-to-one depth-proportional map", L_T, L_S)
        return [depth_map(k, L_T, L_S) for k in range(1, L_S + 1)]
    s = torch.tensor(scores, dtype=torch.float64)
    order = torch.argsort(-s, stable=True)[:L_S]
    return sorted(int(i) + 1 for i in order)


# -------------------------------------------------------------------------------------- window search
def window_sums(S: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """All (n-ns+1) x (m-ms+1) box sums of ``S`` for an ns x ms window, from a float64 summed-area table."""
    n, m = S.shape
    ns, ms = shape
    if ns > n or ms > m or ns < 1 or ms < 1:
        raise SemalignError(f"window {shape} does not fit in a {tuple(S.shape)} matrix")
    S = S.to(torch.float64)
    if ns == n:  # the window spans every row: collapse them first (embeddings, LM head)
        S, n, ns = S.sum(0, keepdim=True), 1, 1
    if ms == m:
        S, m, ms = S.sum(1, keepdim=True), 1, 1
    P = torch.zeros(n + 1, m + 1, dtype=torch.float64, device=S.device)
    P[1:, 1:] = S.cumsum(0).cumsum(1)
    return P[ns:, ms:] - P[: n - ns + 1, ms:] - P[ns:, : m - ms + 1] + P[: n - ns + 1, : m - ms + 1]


def best_window(S: torch.Tensor, shape: tuple[int, int], stride: tuple[int, int] = (1, 1)) -> tuple[int, int, float]:
    """(row offset, column offset, summed sensitivity) of the best window; offsets are multiples of ``stride``;
    ties go to the smallest offsets (row-major)."""
    W = window_sums(S, shape)
    sub = W[:: stride[0], :: stride[1]]
    flat = int(torch.argmax(sub))
    i, j = divmod(flat, sub.shape[1])
    a = i * stride[0] if W.shape[0] > 1 else 0
    b = j * stride[1] if W.shape[1] > 1 else 0
    return a, b, float(sub[i, j])


# -------------------------------------------------------------------------------------------- SVD
@dataclass
class MatrixExtract:
    name: str
    student_layer: int          # 0 for embed_tokens / lm_head
    teacher_layer: int
    row_offset: int
    col_offset: int
    shape: tuple[int, int]      # student shape in Seeking orientation
    teacher_shape: tuple[int, int]
    window_share: float         # window sensitivity / whole-matrix sensitivity
    rank: int
    explained_variance: float   # sum_{i<r} s_i^2 / sum_i s_i^2 of the window
    B: torch.Tensor = field(repr=False)  # [n_s, r] = U_r diag(s_r)
    A: torch.Tensor = field(repr=False)  # [r, m_s] = V_r^T

    @property
    def key(self) -> str:
        return f"{self.student_layer}.{self.name}"

    def record(self) -> dict:
        d = asdict(self)
        d.pop("B"), d.pop("A")
        return d


def svd_factors(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, float]:
    if rank > min(W.shape):
        raise SemalignError(f"rank {rank} is larger than the {tuple(W.shape)} window allows; lower --seeking-rank")
    U, s, Vh = torch.linalg.svd(W.float(), full_matrices=False)
    ev = float((s[:rank].double() ** 2).sum() / (s.double() ** 2).sum().clamp_min(1e-300))
    return U[:, :rank] * s[:rank], Vh[:rank].contiguous(), ev


def extract_matrices(t_arch: Internals, s_arch: Internals, sens: Sensitivity, layer_map: list[int],
                     targets: list[str], *, rank: int, window: str = "independent",
                     progress: Callable[[], None] | None = None) -> list[MatrixExtract]:
    """One :class:`MatrixExtract` per (student layer, target) plus the embedding / LM head when targeted."""
    jobs: list[tuple[int, int, str]] = []
    for k, lt in enumerate(layer_map, start=1):
        jobs += [(k, lt, n) for n in targets if n not in (EMBED, HEAD)]
    jobs += [(GLOBAL, GLOBAL, n) for n in targets if n in (EMBED, HEAD)]
    out = []
    for k, lt, name in jobs:
        S = sens.maps[f"{lt}.{name}"]
        Wt = matrix(t_arch, max(lt, 1), name)
        shape = tuple(matrix(s_arch, max(k, 1), name).shape)
        a, b, val = best_window(S, shape, strides(name, s_arch, window))
        B, A, ev = svd_factors(Wt.detach()[a:a + shape[0], b:b + shape[1]], rank)
        total = float(S.sum(dtype=torch.float64))
        out.append(MatrixExtract(name, k, lt, a, b, shape, tuple(Wt.shape), val / total if total > 0 else 0.0,
                                 rank, ev, B.cpu(), A.cpu()))
        if progress is not None:
            progress()
    return out
