"""Layer Gradient x Activation for all decoder layers in ONE backward pass (spec §2.2, §8.1).

For each teacher layer l, ``g_l = dL/dh_l`` (L = mean NLL of the gold response tokens) and
``I_l = Agg_{t,d}(g_l * h_l)``. Per example, the signed sum over supervised tokens and channels is formed,
then aggregated across examples:

* ``abs_of_sum`` (default): mean over examples of |sum_{t,d} g*h|
* ``sum``: mean over examples of the signed sum
* ``mean``: mean over examples of the signed mean over (t, d)
* ``abs``: mean over examples of sum_{t,d} |g*h|

Matches Captum's ``LayerGradientXActivation`` (layer outputs, multiply_by_inputs) — tested.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..faults import fault_point
from ..models.arch import Internals
from ..models.hooks import capture_layers
from ..paths import atomic_write_json

log = logging.getLogger(__name__)

AGGREGATES = ("abs_of_sum", "sum", "mean", "abs")


@dataclass
class LayerScores:
    scores: list[float]                 # I_l for l = 1..L (index 0 is layer 1)
    aggregate: str
    n_examples: int
    per_example: list[list[float]] = field(default_factory=list)  # signed sums, example x layer
    model: str = ""

    def top(self, k: int = 1) -> list[int]:
        order = sorted(range(1, len(self.scores) + 1), key=lambda l: (-self.scores[l - 1], l))
        return order[:k]

    def save(self, path: Path) -> None:
        atomic_write_json(Path(path), {"indexing": "1-based", "objective": "mean NLL of gold response tokens",
                                       "method": "grad_x_act (one backward, forward hooks)", **asdict(self)})

    @classmethod
    def load(cls, path: Path) -> "LayerScores":
        d = json.loads(Path(path).read_text())
        return cls(d["scores"], d["aggregate"], d["n_examples"], d.get("per_example", []), d.get("model", ""))


def _supervised_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    lg = logits[:, :-1].float()
    lab = labels[:, 1:]
    mask = lab != -100
    return torch.nn.functional.cross_entropy(lg[mask], lab[mask])


def layer_grad_x_act(arch: Internals, batch: dict[str, torch.Tensor], *, positions: str = "response"
                     ) -> torch.Tensor:
    """Per-example, per-layer signed sum of g*h for ONE example batch. Returns [B, L] plus abs variant.

    ``positions``: 'response' sums over positions whose next-token label is supervised (+ the rest, where the
    gradient is zero except through attention) — we sum over all non-pad positions, since g is exactly the
    gradient of the response loss wrt every position's activation.
    """
    model = arch.model
    L = arch.num_layers
    dev = arch.device
    b = {k: v.to(dev) for k, v in batch.items()}
    with capture_layers(arch, range(1, L + 1), inputs=False) as cap:
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        acts = [cap.outputs[k] for k in range(1, L + 1)]
    loss = _supervised_nll(out.logits, b["labels"])
    grads = torch.autograd.grad(loss, acts)
    mask = b["attention_mask"].unsqueeze(-1).float()
    signed = torch.stack([(g.float() * a.detach().float() * mask).sum(dim=(1, 2)) for g, a in zip(grads, acts)], 1)
    absval = torch.stack([(g.float() * a.detach().float() * mask).abs().sum(dim=(1, 2)) for g, a in zip(grads, acts)], 1)
    count = mask.sum(dim=(1, 2)) * acts[0].shape[-1]
    return torch.stack([signed, absval, signed / count.unsqueeze(1)], 0)  # [3, B, L]


def attribute_layers(arch: Internals, examples_batches: list[dict[str, torch.Tensor]], *,
                     aggregate: str = "abs_of_sum", progress=None) -> LayerScores:
    """Grad x Act scores of every decoder layer. One forward+backward per batch (batch size 1 recommended:
    the objective is the per-example mean response NLL, so batching would mix examples' normalisers)."""
    if aggregate not in AGGREGATES:
        from ..errors import SemalignError

        raise SemalignError(f"unknown aggregate {aggregate!r}; choose one of {', '.join(AGGREGATES)}")
    was_training = arch.model.training
    arch.model.eval()
    req = [p.requires_grad for p in arch.model.parameters()]
    for p in arch.model.parameters():
        p.requires_grad_(False)  # gradients wrt activations only: no parameter .grad buffers
    # Activations must require grad even though parameters do not: make the embeddings output require grad.
    handle = arch.embed.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
    rows_signed, rows_abs, rows_mean = [], [], []
    try:
        for b in examples_batches:
            r = layer_grad_x_act(arch, b)
            rows_signed.append(r[0])
            rows_abs.append(r[1])
            rows_mean.append(r[2])
            fault_point("attribution")
            if progress is not None:
                progress()
    finally:
        handle.remove()
        for p, r in zip(arch.model.parameters(), req):
            p.requires_grad_(r)
        arch.model.train(was_training)
    signed = torch.cat(rows_signed)  # [N, L]
    if aggregate == "abs_of_sum":
        scores = signed.abs().mean(0)
    elif aggregate == "sum":
        scores = signed.mean(0)
    elif aggregate == "mean":
        scores = torch.cat(rows_mean).mean(0)
    else:
        scores = torch.cat(rows_abs).mean(0)
    return LayerScores([float(x) for x in scores], aggregate, int(signed.shape[0]),
                       [[float(x) for x in row] for row in signed])
