"""Layer Gradient x Activation for all decoder layers in ONE backward pass (spec §2.2, §8.1).

For each teacher layer l, ``g_l = dL/dh_l`` (L = per-example mean NLL of the gold response tokens, summed over
the examples of a batch, so every example keeps its own normaliser) and ``I_l = Agg(sum_{t,d} g_l * a_l)``.

``positions`` chooses the tokens t summed over:

* ``response`` (default, spec §8.1): the positions whose next-token label is supervised (the same positions the
  output loss reads);
* ``all``: every non-pad position (what Captum's ``LayerGradientXActivation`` sums; kept for comparison).

``target`` chooses the activation a_l multiplied by the gradient:

* ``block_output`` (spec): a_l = h_l, the block output;
* ``residual``: a_l = Delta_l = h_l - h_{l-1}, the block's residual contribution (the supervision interface).
  Since h_l = h_{l-1} + Delta_l, dL/dDelta_l = dL/dh_l = g_l.

Why ``residual`` exists [derived]: the last block's output reaches the loss only through the final RMSNorm, which
is scale-invariant (norm(c h) = norm(h)), so by Euler's theorem sum_d g_L * h_L = 0 at every position. Under the
spec's signed aggregation the last layer can therefore never be critical, whatever the positions. The residual
contribution Delta_L is not a radial direction of the norm's input, so its signed score is not forced to zero.
(The ``abs`` aggregation, sum |g*a|, also scores every layer.)

Aggregation across examples (per example: the signed sum over the chosen positions and channels):

* ``abs_of_sum`` (default): mean over examples of |sum_{t,d} g*a|
* ``sum``: mean over examples of the signed sum
* ``mean``: mean over examples of the signed mean over (t, d)
* ``abs``: mean over examples of sum_{t,d} |g*a|

Cost: no parameter gradients (activations only), and the LM head runs only at the supervised positions (the
forward stops after the final norm; the head is applied to the gathered positions). Examples may be batched
(right padding, attention-masked): results equal batch size 1 up to float rounding (tested). With
``positions='all'`` and ``target='block_output'`` this equals Captum's ``LayerGradientXActivation`` on layer
outputs with ``multiply_by_inputs=True`` (tested).
"""

from __future__ import annotations

import contextlib
import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..faults import fault_point
from ..models.arch import Internals
from ..models.hooks import capture_layers, supervised_logits, supervised_positions
from ..paths import atomic_write_json

log = logging.getLogger(__name__)

AGGREGATES = ("abs_of_sum", "sum", "mean", "abs")
POSITIONS = ("response", "all")
TARGETS = ("block_output", "residual")


@dataclass
class LayerScores:
    scores: list[float]                 # I_l for l = 1..L (index 0 is layer 1)
    aggregate: str
    n_examples: int
    per_example: list[list[float]] = field(default_factory=list)  # signed sums, example x layer
    model: str = ""
    positions: str = "response"
    target: str = "block_output"
    dtype: str = ""

    def top(self, k: int = 1) -> list[int]:
        order = sorted(range(1, len(self.scores) + 1), key=lambda l: (-self.scores[l - 1], l))
        return order[:k]

    def margin(self) -> dict:
        """The top layer, the runner-up and the relative margin (top - next) / |top|: how safely the choice stands."""
        if len(self.scores) < 2:
            return {"top": self.top(1)[0] if self.scores else None, "next": None, "relative_margin": None}
        a, b = self.top(2)
        s1, s2 = self.scores[a - 1], self.scores[b - 1]
        return {"top": a, "next": b, "top_score": s1, "next_score": s2,
                "relative_margin": (s1 - s2) / abs(s1) if s1 else None}

    def save(self, path: Path) -> None:
        atomic_write_json(Path(path), {"indexing": "1-based", "objective": "mean NLL of gold response tokens",
                                       "method": "grad_x_act (one backward, forward hooks)",
                                       "margin": self.margin(), **asdict(self)})

    @classmethod
    def load(cls, path: Path) -> "LayerScores":
        d = json.loads(Path(path).read_text())
        return cls(d["scores"], d["aggregate"], d["n_examples"], d.get("per_example", []), d.get("model", ""),
                   d.get("positions", "all"), d.get("target", "block_output"), d.get("dtype", ""))


def per_example_nll(arch: Internals, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward to the final norm, LM head at supervised positions only; returns (sum of per-example mean NLLs,
    [B] per-example means). The graph stays attached to any activations captured by the caller's hooks."""
    ids, lab = batch["input_ids"], batch["labels"]
    pos = supervised_positions(lab)
    logits, y, bi = supervised_logits(arch, batch)
    nll = torch.nn.functional.cross_entropy(logits.float(), y, reduction="none")
    sums = torch.zeros(ids.shape[0], dtype=nll.dtype, device=nll.device).index_add(0, bi, nll)
    counts = pos.sum(1).clamp_min(1).to(nll.dtype)
    means = sums / counts
    return means.sum(), means


def layer_grad_x_act(arch: Internals, batch: dict[str, torch.Tensor], *, positions: str = "response",
                     target: str = "block_output") -> torch.Tensor:
    """Per-example, per-layer [signed sum, abs sum, signed mean] of g*a for one batch: a tensor [3, B, L]."""
    L = arch.num_layers
    b = {k: v.to(arch.device) for k, v in batch.items()}
    with capture_layers(arch, range(1, L + 1), inputs=target == "residual") as cap:
        loss, _ = per_example_nll(arch, b)
        outs = [cap.outputs[k] for k in range(1, L + 1)]
        ins = [cap.inputs[k] for k in range(1, L + 1)] if target == "residual" else None
    grads = torch.autograd.grad(loss, outs)
    if positions == "response":
        mask = supervised_positions(b["labels"])
    else:
        mask = b["attention_mask"].bool()
    m = mask.unsqueeze(-1).float()
    signed, absval = [], []
    for k, g in enumerate(grads):
        a = outs[k].detach().float()
        if ins is not None:
            a = a - ins[k].detach().float()
        ga = g.float() * a * m
        signed.append(ga.sum(dim=(1, 2)))
        absval.append(ga.abs().sum(dim=(1, 2)))
    s, ab = torch.stack(signed, 1), torch.stack(absval, 1)
    count = (m.sum(dim=(1, 2)) * outs[0].shape[-1]).clamp_min(1)
    return torch.stack([s, ab, s / count.unsqueeze(1)], 0)


@contextlib.contextmanager
def _as_dtype(model: torch.nn.Module, dtype: torch.dtype | None):
    """Temporarily cast a frozen model (e.g. a bf16 teacher to fp32 for attribution; bf16 -> fp32 -> bf16 is exact)."""
    if dtype is None:
        yield
        return
    before = {p.dtype for p in model.parameters()}
    if before == {dtype}:
        yield
        return
    params = {n: p.dtype for n, p in model.named_parameters()}
    bufs = {n: b.dtype for n, b in model.named_buffers()}
    model.to(dtype)
    try:
        yield
    finally:
        with torch.no_grad():
            for n, p in model.named_parameters():
                if p.dtype != params[n]:
                    p.data = p.data.to(params[n])
            for n, b in model.named_buffers():
                if n in bufs and b.dtype != bufs[n]:
                    b.data = b.data.to(bufs[n])


def attribute_layers(arch: Internals, examples_batches: list[dict[str, torch.Tensor]], *,
                     aggregate: str = "abs_of_sum", positions: str = "response", target: str = "block_output",
                     dtype: torch.dtype | None = torch.float32, progress=None) -> LayerScores:
    """Grad x Act scores of every decoder layer: one forward + one backward per batch, for all layers at once.

    ``dtype``: the precision attribution runs in (default float32: close scores must not be reordered by bf16
    rounding; the model is cast for the duration and restored exactly). ``None`` keeps the model's dtype.
    """
    from ..errors import SemalignError

    if aggregate not in AGGREGATES:
        raise SemalignError(f"unknown aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
    if positions not in POSITIONS:
        raise SemalignError(f"unknown attribution positions {positions!r}; choose one of {', '.join(POSITIONS)}")
    if target not in TARGETS:
        raise SemalignError(f"unknown attribution target {target!r}; choose one of {', '.join(TARGETS)}")
    model = arch.model
    was_training = model.training
    model.eval()
    req = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)  # gradients wrt activations only: no parameter .grad buffers
    # Activations must require grad even though parameters do not: make the embeddings output require grad.
    handle = arch.embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    rows = []
    try:
        with _as_dtype(model, dtype):
            used = str(next(model.parameters()).dtype).removeprefix("torch.")
            for b in examples_batches:
                rows.append(layer_grad_x_act(arch, b, positions=positions, target=target))
                fault_point("attribution")
                if progress is not None:
                    progress()
    finally:
        handle.remove()
        for p, r in zip(model.parameters(), req):
            p.requires_grad_(r)
        model.train(was_training)
    allr = torch.cat(rows, 1)  # [3, N, L]
    signed, absval, meanv = allr[0], allr[1], allr[2]
    if aggregate == "abs_of_sum":
        scores = signed.abs().mean(0)
    elif aggregate == "sum":
        scores = signed.mean(0)
    elif aggregate == "mean":
        scores = meanv.mean(0)
    else:
        scores = absval.mean(0)
    return LayerScores([float(x) for x in scores], aggregate, int(signed.shape[0]),
                       [[float(x) for x in row] for row in signed], positions=positions, target=target, dtype=used)
