"""Teacher-free training: the teacher's mapped targets (and optional top-k logits) computed once and cached.

SemAlign's targets ``M h_T/|h_T|`` depend only on the teacher, the semantic map, the tokens of an example, the
layer pairs and the interface, never on the student; so they are computed once for the examples a run uses,
stored in the stage cache (stage ``teacher_targets``), and ``fit`` reads them without the teacher resident.

Per example ``i`` (its unpadded length ``L``) the entry holds ``"{i}/L{student_layer}"`` [L, D_S] and, when
``topk`` is set, ``"{i}/topk_ids"`` [L, k] int32, ``"{i}/topk_logprobs"`` [L, k] f32 and ``"{i}/rest_lse"`` [L] f32
(see :mod:`.topk`). Targets are stored in **bfloat16** by default: they are unit-direction vectors mapped by M, and
every layer loss is insensitive to bf16 rounding at this scale (cos(bf16(x), x) > 1 - 1e-5; 8 mantissa bits give
a relative error below 0.4% per component). Pass ``store_dtype=torch.float32`` for bit-faithful targets.

Padding is on the right (``collate``'s default) and attention is causal, so an example's targets do not depend on
the batch it was computed in; that is what makes per-example storage valid.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from ...cache import StageCache, stage_cache
from ...data.prompts import batches as render_batches
from ...fingerprints import example_hash, examples_hash, tensor_hash, tokenizer_hash
from ...models.arch import Internals
from ...models.hooks import capture_layers, run_until
from ...pairing import LayerPair
from .bases import SemanticMap
from .topk import teacher_topk_logprobs

log = logging.getLogger(__name__)

STAGE = "teacher_targets"
VERSION = "1"  # bump when a change moves the stored targets


def example_id(example: dict) -> str:
    """The id :class:`TeacherTargets` indexes an example by (its ``id``, else its content hash)."""
    return str(example["id"]) if example.get("id") is not None else example_hash(example)


def _model_device(model: torch.nn.Module) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def _pair_target(cap, p: LayerPair, interface: str) -> torch.Tensor:
    if p.interpolation:
        lam = p.interpolation["lambda"]
        return ((1 - lam) * cap.interface(p.interpolation["a"], interface).float()
                + lam * cap.interface(p.interpolation["b"], interface).float())
    return cap.interface(p.teacher_layer, interface)


def compute_teacher_targets(t_arch: Internals, smap: SemanticMap, examples_batches: Sequence[dict],
                            pairs: Sequence[LayerPair], interface: str, *, topk: int | None = None,
                            tau: float = 1.0, vocab: int | None = None,
                            store_dtype: torch.dtype = torch.bfloat16) -> list[dict[str, torch.Tensor]]:
    """Per-example targets for right-padded, collated ``examples_batches`` (in order).

    Returns one dict per example: ``"L{student_layer}"`` -> [L, D_S] in ``store_dtype`` (CPU) and, with
    ``topk``, ``"topk_ids"``/``"topk_logprobs"``/``"rest_lse"`` of ``log_softmax(z_T/tau)`` over the first
    ``vocab`` ids (the vocabulary shared with the student; default all). Without ``topk`` the teacher stops after
    the deepest needed layer.
    """
    needed = sorted({l for p in pairs for l in p.teacher_layers_needed()})
    dev = _model_device(t_arch.model)
    out: list[dict[str, torch.Tensor]] = []
    with torch.no_grad():
        for b in examples_batches:
            att = b["attention_mask"]
            lengths = att.sum(-1).tolist()
            for i, L in enumerate(lengths):
                if not bool(att[i, :L].all()):
                    raise ValueError("compute_teacher_targets needs right-padded batches (collate's default)")
            kw = dict(input_ids=b["input_ids"].to(dev), attention_mask=att.to(dev))
            with capture_layers(t_arch, needed, mlp=interface == "mlp_output", detach=True) as cap:
                logits = None
                if topk:
                    logits = t_arch.model(**kw).logits
                else:
                    run_until(t_arch, max(needed), **kw)
                mapped = {p.student_layer: smap.apply(_pair_target(cap, p, interface)) for p in pairs}
            tk = None
            if logits is not None:
                z = logits[..., :vocab] if vocab else logits
                tk = teacher_topk_logprobs(z, topk, tau)
            for i, L in enumerate(lengths):
                row = {f"L{k}": v[i, :L].to(store_dtype).cpu().contiguous() for k, v in mapped.items()}
                if tk is not None:
                    row["topk_ids"] = tk[0][i, :L].to(torch.int32).cpu().contiguous()
                    row["topk_logprobs"] = tk[1][i, :L].float().cpu().contiguous()
                    row["rest_lse"] = tk[2][i, :L].float().cpu().contiguous()
                out.append(row)
    return out


@dataclass
class TeacherTargets:
    """Cached per-example teacher products, indexed by example id; :meth:`batch` pads them to a micro-batch."""

    rows: dict[str, dict[str, torch.Tensor]]
    meta: dict = field(default_factory=dict)
    cache_hit: bool = False

    def batch(self, ids: Sequence[str], length: int, device: torch.device | str = "cpu"
              ) -> tuple[dict[int, torch.Tensor], dict[str, torch.Tensor] | None]:
        """``({student_layer: [B, T, D] f32}, topk or None)`` for examples ``ids`` padded (zeros) to ``length``.

        ``topk`` is ``{"topk_ids": [B,T,k] int64, "topk_logprobs": [B,T,k], "rest_lse": [B,T]}`` (padding:
        id 0, log-prob -inf, rest -inf; those positions are masked by the labels anyway), ready for
        :func:`.topk.kl_source_topk_loss`.
        """
        missing = [i for i in ids if str(i) not in self.rows]
        if missing:
            raise KeyError(f"no cached teacher targets for example(s) {missing[:3]}")
        first = self.rows[str(ids[0])]
        layers = sorted(int(k[1:]) for k in first if k.startswith("L"))
        targets = {}
        for k in layers:
            d = first[f"L{k}"].shape[-1]
            t = torch.zeros(len(ids), length, d, dtype=torch.float32)
            for j, i in enumerate(ids):
                v = self.rows[str(i)][f"L{k}"][:length]
                t[j, : v.shape[0]] = v.float()
            targets[k] = t.to(device)
        topk = None
        if "topk_ids" in first:
            kk = first["topk_ids"].shape[-1]
            tid = torch.zeros(len(ids), length, kk, dtype=torch.long)
            tlp = torch.full((len(ids), length, kk), float("-inf"))
            rest = torch.full((len(ids), length), float("-inf"))
            for j, i in enumerate(ids):
                r = self.rows[str(i)]
                n = min(length, r["topk_ids"].shape[0])
                tid[j, :n], tlp[j, :n], rest[j, :n] = r["topk_ids"][:n].long(), r["topk_logprobs"][:n], r["rest_lse"][:n]
            topk = {"topk_ids": tid.to(device), "topk_logprobs": tlp.to(device), "rest_lse": rest.to(device)}
        return targets, topk


def targets_key_inputs(*, teacher_hash: str, smap: SemanticMap, tokenizer: Any, examples: Sequence[dict],
                       pairs: Sequence[LayerPair], interface: str, max_length: int, teacher_dtype: str,
                       topk: int | None, tau: float, vocab: int | None, store_dtype: torch.dtype) -> dict:
    """What decides the stored targets (documented in docs/cache.md)."""
    from dataclasses import asdict

    return {"teacher": teacher_hash, "semantic_map": smap.meta.get("key") or tensor_hash(smap.M),
            "tokenizer": tokenizer_hash(tokenizer), "examples": examples_hash(examples),
            "pairs": [asdict(p) for p in pairs], "interface": interface, "max_length": int(max_length),
            "teacher_dtype": str(teacher_dtype), "topk": topk, "tau": float(tau) if topk else None,
            "vocab": vocab if topk else None, "store_dtype": str(store_dtype).removeprefix("torch.")}


def cached_teacher_targets(t_arch: Internals, smap: SemanticMap, tokenizer: Any, examples: Sequence[dict],
                           pairs: Sequence[LayerPair], interface: str, *, teacher_hash: str | None,
                           max_length: int, micro_batch: int = 4, topk: int | None = None, tau: float = 1.0,
                           vocab: int | None = None, store_dtype: torch.dtype = torch.bfloat16,
                           cache: StageCache | None = None) -> TeacherTargets:
    """Teacher targets for ``examples`` (deduplicated by id), from the stage cache or computed once and stored.

    ``teacher_hash`` is the teacher's content hash (:func:`semalign.fingerprints.model_key`); ``None`` computes
    without caching. Rendering uses ``tokenizer`` (the student's; SemAlign needs a shared vocabulary).
    """
    seen: dict[str, dict] = {}
    for e in examples:
        seen.setdefault(example_id(e), e)
    uniq = list(seen.values())
    ids = list(seen)
    t_dtype = str(next(t_arch.model.parameters()).dtype).removeprefix("torch.")

    def compute() -> tuple[dict, dict]:
        bs = render_batches(tokenizer, uniq, micro_batch, max_length=max_length)
        rows = compute_teacher_targets(t_arch, smap, bs, pairs, interface, topk=topk, tau=tau, vocab=vocab,
                                       store_dtype=store_dtype)
        tensors = {f"{j}/{name}": t for j, row in enumerate(rows) for name, t in row.items()}
        return tensors, {"ids": ids, "topk": topk, "tau": tau, "vocab": vocab, "interface": interface,
                         "student_layers": [p.student_layer for p in pairs]}

    cache = cache if cache is not None else stage_cache()
    if teacher_hash is None or not cache.enabled:
        tensors, info = compute()
        return TeacherTargets(_unflatten(tensors, ids), info, False)
    inputs = targets_key_inputs(teacher_hash=teacher_hash, smap=smap, tokenizer=tokenizer, examples=uniq, pairs=pairs,
                                interface=interface, max_length=max_length, teacher_dtype=t_dtype, topk=topk, tau=tau,
                                vocab=vocab, store_dtype=store_dtype)
    computed: list[bool] = []

    def _compute():
        computed.append(True)
        return compute()

    entry = cache.get_or_compute(STAGE, VERSION, inputs, _compute)
    info = entry.json or {}
    log.info("teacher targets for %d examples: %s", len(ids), "computed" if computed else "reused from the cache")
    return TeacherTargets(_unflatten(entry.tensors, info.get("ids", ids)), info, not computed)


def _unflatten(tensors: dict[str, torch.Tensor], ids: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    rows: dict[str, dict[str, torch.Tensor]] = {str(i): {} for i in ids}
    for name, t in tensors.items():
        j, _, what = name.partition("/")
        rows[str(ids[int(j)])][what] = t
    return rows
