"""Vocabulary-defined semantic bases and the closed-form alignment map M (spec §2.1, §2.4, §8.6-8.7, §8.18).

S_X = unit-normalised columns of pinv(W_X) restricted to shared token ids; the decompose/recompose of §2.4 is
h_S = S_S S_T^T h_T/|h_T| = M h_T/|h_T| with M = S_S S_T^T (D_S x D_T).

Numerics [derived]: with the SVD W = U Σ V^T, pinv(W) = A W^T where A = V Σ^-2 V^T = pinv(W^T W) (D x D, built
in float64 from the eigendecomposition of the Gram W^T W with a relative cutoff ``rcond`` on σ). Column i of
pinv(W) is A w_i (w_i = row i of W), so its norm is |A w_i| and

    M = A_S [ Σ_i w^S_i (w^T_i)^T / (|A_S w^S_i| |A_T w^T_i|) ] A_T,

accumulated over vocabulary chunks: the V-dimensional coefficients and the D x V bases are never materialised.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ...errors import SemalignError
from ...models.arch import Internals
from ...paths import atomic_dir

log = logging.getLogger(__name__)

CHUNK = 16384
_PLACEHOLDER = re.compile(r"\[PAD\d+\]|<\|?PAD_?\d+\|?>|<pad_\d+>", re.IGNORECASE)


def shared_vocab_size(t_tok, s_tok, t_rows: int, s_rows: int) -> int:
    """Number of leading token ids both tokenizers produce; refuses different vocabularies.

    Padded LM-head tails (rows beyond the tokenizer, e.g. Qwen2.5's 151,936 rows for 151,665 tokens) and a
    token added to only one model (WizardCoder's pad) are excluded (spec §8.7, §8.18). Up to 0.1% of the ids below
    that bound may decode to different strings: :func:`shared_ids` drops those too.
    """
    return _shared(t_tok, s_tok, t_rows, s_rows)[0]


def shared_ids(t_tok, s_tok, t_rows: int, s_rows: int) -> torch.Tensor:
    """The token ids the semantic bases are built over: below :func:`shared_vocab_size`, same string in both."""
    n, diff = _shared(t_tok, s_tok, t_rows, s_rows)
    keep = torch.ones(n, dtype=torch.bool)
    bad = [i for i in diff if i < n]
    if bad:
        keep[torch.tensor(bad)] = False
    return keep.nonzero().squeeze(-1)


def _shared(t_tok, s_tok, t_rows: int, s_rows: int) -> tuple[int, list[int]]:
    tv, sv = t_tok.get_vocab(), s_tok.get_vocab()
    t_inv = {i: t for t, i in tv.items()}
    s_inv = {i: t for t, i in sv.items()}
    n = min(len(t_inv), len(s_inv), t_rows, s_rows)
    ids = torch.arange(n)
    diff = [i for i in ids.tolist() if t_inv.get(i) != s_inv.get(i)]
    if diff and len(diff) > max(1, n // 1000):
        i = diff[0]
        raise SemalignError(
            f"teacher and student vocabularies differ (e.g. id {i}: {t_inv.get(i)!r} vs {s_inv.get(i)!r}, "
            f"{len(diff)} of {n} ids); SemAlign's semantic bases need a shared, index-aligned vocabulary — "
            "pick a student from the teacher's model family"
        )
    if diff:
        log.warning("%d shared ids map to different strings; they are excluded from the bases", len(diff))
    # GGUF-derived tokenizers list the LM head's padded tail as placeholder tokens ("[PAD151665]" ...) that no
    # text ever produces: drop a trailing run of them (spec §8.18).
    tail = n
    while tail > 0 and _PLACEHOLDER.fullmatch(str(t_inv.get(tail - 1, ""))):
        tail -= 1
    if tail < n:
        log.info("excluding %d placeholder tokens (ids %d..%d) from the semantic bases", n - tail, tail, n - 1)
    return tail, diff


def tensor_digest(t: torch.Tensor) -> str:
    h = hashlib.sha256()
    flat = t.detach().contiguous().cpu().view(-1)
    step = 1 << 24
    for i in range(0, flat.numel(), step):
        h.update(flat[i:i + step].view(torch.uint8).numpy().tobytes() if flat.dtype != torch.bfloat16
                 else flat[i:i + step].view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def effective_head(arch: Internals, fold_final_norm: bool) -> torch.Tensor:
    """LM head as float32 (V x D); optionally W diag(g) with the final-norm gain folded in."""
    w = arch.lm_head_weight().detach().float()
    if fold_final_norm:
        g = arch.final_norm_gain()
        if g is None:
            raise SemalignError("--semalign-fold-final-norm: this model's final norm has no gain vector")
        w = w * g.to(w.device)
    return w


def gram_pinv(w: torch.Tensor, ids: torch.Tensor, rcond: float) -> tuple[torch.Tensor, int]:
    """A = pinv(W^T W) over the selected rows (float64), and the numerical rank kept."""
    d = w.shape[1]
    gram = torch.zeros(d, d, dtype=torch.float64)
    for i in range(0, ids.numel(), CHUNK):
        blk = w[ids[i:i + CHUNK]].double()
        gram += blk.T @ blk
    evals, evecs = torch.linalg.eigh(gram)
    sig = evals.clamp_min(0).sqrt()
    keep = sig > rcond * sig.max()
    inv = torch.where(keep, 1.0 / evals.clamp_min(1e-300), torch.zeros_like(evals))
    return (evecs * inv) @ evecs.T, int(keep.sum())


def basis_norms(w: torch.Tensor, a: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """|pinv(W) e_i| = |A w_i| for the selected ids (float64)."""
    out = torch.empty(ids.numel(), dtype=torch.float64)
    for i in range(0, ids.numel(), CHUNK):
        blk = w[ids[i:i + CHUNK]].double()
        out[i:i + CHUNK] = (blk @ a).norm(dim=1)
    return out


def semantic_bases(w: torch.Tensor, ids: torch.Tensor | None = None, rcond: float = 1e-6) -> torch.Tensor:
    """Explicit S (D x |ids|): unit-norm columns of pinv(W). For analysis and tests (materialises D x V)."""
    ids = torch.arange(w.shape[0]) if ids is None else ids
    a, _ = gram_pinv(w, ids, rcond)
    cols = (w[ids].double() @ a).T  # D x n
    return (cols / cols.norm(dim=0, keepdim=True).clamp_min(1e-300)).float()


@dataclass
class SemanticMap:
    """The alignment map M (D_S x D_T) plus its provenance."""

    M: torch.Tensor
    meta: dict

    def apply(self, h_t: torch.Tensor) -> torch.Tensor:
        """h_S = M h_T/|h_T| per token (float32), for h_T of shape [..., D_T]."""
        h = h_t.float()
        h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return h @ self.M.T.to(h.device)

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file

        with atomic_dir(Path(directory)) as tmp:
            save_file({"M": self.M.contiguous()}, str(tmp / "M.safetensors"))
            (tmp / "meta.json").write_text(json.dumps(self.meta, indent=2))

    @classmethod
    def load(cls, directory: Path) -> "SemanticMap":
        from safetensors.torch import load_file

        directory = Path(directory)
        return cls(load_file(str(directory / "M.safetensors"))["M"], json.loads((directory / "meta.json").read_text()))


@dataclass
class MapStats:
    shared_ids: int
    dropped_teacher: int
    dropped_student: int
    rank_teacher: int
    rank_student: int


def compute_map(w_t: torch.Tensor, w_s: torch.Tensor, n_shared: int | torch.Tensor, rcond: float = 1e-6,
                min_norm: float = 1e-8) -> tuple[torch.Tensor, MapStats]:
    """Closed-form M = S_S S_T^T over the first ``n_shared`` ids, or over the given id tensor (float32 result,
    float64 accumulation)."""
    ids = n_shared if isinstance(n_shared, torch.Tensor) else torch.arange(n_shared)
    n_shared = int(ids.numel())
    a_t, r_t = gram_pinv(w_t, ids, rcond)
    a_s, r_s = gram_pinv(w_s, ids, rcond)
    n_t = basis_norms(w_t, a_t, ids)
    n_s = basis_norms(w_s, a_s, ids)
    ok_t = n_t > min_norm * n_t.max()
    ok_s = n_s > min_norm * n_s.max()
    keep = ok_t & ok_s
    scale = torch.where(keep, 1.0 / (n_t * n_s).clamp_min(1e-300), torch.zeros_like(n_t))
    x = torch.zeros(w_s.shape[1], w_t.shape[1], dtype=torch.float64)
    for i in range(0, n_shared, CHUNK):
        sl = slice(i, i + CHUNK)
        ws = w_s[ids[sl]].double() * scale[sl].unsqueeze(1)
        x += ws.T @ w_t[ids[sl]].double()
    m = a_s @ x @ a_t
    stats = MapStats(n_shared, int((~ok_t).sum()), int((~ok_s).sum()), r_t, r_s)
    return m.float(), stats


def build_semantic_map(t_arch: Internals, s_arch: Internals, t_tok, s_tok, *, rcond: float = 1e-6,
                       fold_final_norm: bool = False, cache_root: Path | None = None) -> SemanticMap:
    """M for a teacher/student pair, cached by (head hashes, rcond, folding, shared ids)."""
    n_shared = shared_vocab_size(t_tok, s_tok, t_arch.vocab_size, s_arch.vocab_size)
    ids = shared_ids(t_tok, s_tok, t_arch.vocab_size, s_arch.vocab_size)
    w_t = effective_head(t_arch, fold_final_norm).cpu()
    w_s = effective_head(s_arch, fold_final_norm).cpu()
    key = hashlib.sha256(json.dumps({
        "t": tensor_digest(w_t), "s": tensor_digest(w_s), "rcond": rcond, "fold": fold_final_norm,
        "n": n_shared, "ids": tensor_digest(ids), "v": 2}).encode()).hexdigest()[:24]
    if cache_root is not None:
        cached = load_cached_map(Path(cache_root) / key)
        if cached is not None:
            return cached
    m, stats = compute_map(w_t, w_s, ids, rcond)
    meta = {"key": key, "shape": list(m.shape), "rcond": rcond, "fold_final_norm": fold_final_norm,
            "shared_vocab_bound": n_shared, "excluded_mismatched_ids": n_shared - int(ids.numel()),
            "teacher_head_rows": t_arch.vocab_size, "student_head_rows": s_arch.vocab_size,
            "tokenizer_sizes": [len(t_tok), len(s_tok)], **asdict(stats),
            "formula": "M = S_S S_T^T, S_X = unit-norm columns of pinv(W_X) over shared ids"}
    sm = SemanticMap(m, meta)
    if cache_root is not None:
        save_cached_map(sm, Path(cache_root) / key)
    return sm


def load_cached_map(entry: Path) -> SemanticMap | None:
    """A cache entry whose checksums match, else ``None`` (a bad entry is removed with a warning)."""
    from ...paths import remove_entry, verify_manifest

    if not entry.is_dir():
        return None
    problem = verify_manifest(entry)
    if problem is None:
        try:
            sm = SemanticMap.load(entry)
            log.info("semantic map: cache hit %s", entry)
            return sm
        except Exception as exc:  # noqa: BLE001 - any unreadable entry is recomputed
            problem = f"unreadable ({type(exc).__name__})"
    log.warning("semantic-map cache entry %s is invalid (%s); removing it and recomputing", entry, problem)
    remove_entry(entry)
    return None


def save_cached_map(sm: SemanticMap, entry: Path) -> None:
    """Write a checksummed entry; concurrent writers of one key both succeed and one copy stays."""
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from ...paths import publish_dir, write_manifest

    tmp = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.tmp-", dir=entry.parent))
        save_file({"M": sm.M.contiguous()}, str(tmp / "M.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(sm.meta, indent=2))
        write_manifest(tmp)
        publish_dir(tmp, entry)
    except Exception as exc:  # a full or read-only cache must not fail the run
        from ...paths import os_error_from

        exc = os_error_from(exc) or exc
        if not isinstance(exc, OSError):
            raise
        log.warning("could not cache the semantic map in %s (%s); continuing without the cache", entry,
                    exc.strerror or exc)
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
