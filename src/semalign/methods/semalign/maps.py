"""Alternatives to the closed-form semantic map M, for the efficacy study (issue 11; beyond the paper).

* ``ridge``: a linear map fitted on paired teacher/student states of the **extract** split (never the align split
  the student trains on): M = argmin_W sum_t |y_t - W x_t/|x_t| |^2 + lam |W|^2, with x the teacher's interface
  activation at the pair's teacher layer (interpolated when the pair is) and y the student's at the paired layer.
  It calibrates M against what the student actually represents; the cosine layer loss then asks the student to
  move toward the part of its state that the teacher's state predicts.
* ``random_orthogonal``: a seeded semi-orthogonal D_S x D_T map (orthonormal rows): a control with the same shape
  and scale as a real map but no semantics. It must not help.

Both return a :class:`SemanticMap`, so training and targets are unchanged; the closed-form map is still built
(and recorded) for comparison.
"""

from __future__ import annotations

import logging

import torch

from ...data.prompts import batches
from ...errors import SemalignError
from ...models.hooks import capture_layers
from ..base import TransferContext
from .bases import SemanticMap

log = logging.getLogger(__name__)


def random_orthogonal_map(d_s: int, d_t: int, seed: int) -> SemanticMap:
    g = torch.Generator().manual_seed(int(seed))
    a = torch.randn(max(d_s, d_t), min(d_s, d_t), generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)  # orthonormal columns
    q = q * torch.sign(torch.diagonal(r)).unsqueeze(0)
    m = q.T if d_t >= d_s else q  # D_S x D_T with orthonormal rows (or columns when D_S > D_T)
    return SemanticMap(m.float().contiguous(), {"kind": "random_orthogonal", "seed": int(seed),
                                                "shape": [d_s, d_t], "formula": "seeded semi-orthogonal control"})


def _teacher_interface(cap, pair, interface: str) -> torch.Tensor:
    if pair.interpolation:
        lam = pair.interpolation["lambda"]
        return ((1 - lam) * cap.interface(pair.interpolation["a"], interface).float()
                + lam * cap.interface(pair.interpolation["b"], interface).float())
    return cap.interface(pair.teacher_layer, interface).float()


@torch.no_grad()
def fit_ridge_map(ctx: TransferContext, pairs, interface: str, lam_rel: float) -> SemanticMap:
    """Ridge map from unit-normalised teacher activations to student activations, fitted on the extract split."""
    if len(pairs) != 1:
        raise SemalignError("--semalign-map ridge fits one map for one paired layer; use --semalign-top-k-layers 1")
    pair = pairs[0]
    ex = ctx.splits.extract
    tok = ctx.teacher_tokenizer or ctx.tokenizer
    bs = batches(tok, ex, 4, max_length=ctx.config.max_length, train_on_inputs=False)
    d_t, d_s = ctx.t_arch.hidden_size, ctx.s_arch.hidden_size
    gram = torch.zeros(d_t, d_t, dtype=torch.float64)
    cross = torch.zeros(d_t, d_s, dtype=torch.float64)
    yy, n = 0.0, 0
    t_layers = pair.teacher_layers_needed()
    for b in bs:
        kw = {"input_ids": b["input_ids"].to(ctx.device), "attention_mask": b["attention_mask"].to(ctx.device)}
        mask = b["attention_mask"].bool().to(ctx.device)
        with capture_layers(ctx.t_arch, t_layers, mlp=interface == "mlp_output", detach=True) as cap:
            from ...models.hooks import run_until

            run_until(ctx.t_arch, max(t_layers), **kw)
            x = _teacher_interface(cap, pair, interface)[mask].double()
        with capture_layers(ctx.s_arch, [pair.student_layer], mlp=interface == "mlp_output", detach=True) as cap:
            run_until(ctx.s_arch, pair.student_layer, **kw)
            y = cap.interface(pair.student_layer, interface).float()[mask].double()
        x = x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        gram += x.T @ x
        cross += x.T @ y
        yy += float((y * y).sum())
        n += x.shape[0]
    lam = lam_rel * float(torch.trace(gram)) / d_t
    w = torch.linalg.solve(gram + lam * torch.eye(d_t, dtype=torch.float64), cross)  # D_T x D_S
    resid = yy - 2 * float((w * cross).sum()) + float((w * (gram @ w)).sum())
    r2 = 1.0 - resid / max(yy, 1e-300)  # in-sample, uncentred
    meta = {"kind": "ridge", "fitted_on": f"extract split ({len(ex)} examples, {n} tokens)",
            "teacher_layer": pair.teacher_layer, "student_layer": pair.student_layer, "interface": interface,
            "lambda_relative": lam_rel, "lambda": lam, "in_sample_r2_uncentred": r2, "shape": [d_s, d_t],
            "formula": "M = argmin |Y - X_hat M^T|^2 + lam |M|^2, X_hat = unit-normalised teacher activations"}
    log.info("ridge map S%d <- T%d (%s): %d tokens, in-sample R^2 %.3f", pair.student_layer, pair.teacher_layer,
             interface, n, r2)
    return SemanticMap(w.T.float().contiguous(), meta)


def choose_map(ctx: TransferContext, closed_form: SemanticMap, pairs, interface: str) -> SemanticMap:
    """The map the run trains with (``--semalign-map``); the closed-form one stays in the summary for reference."""
    c = ctx.config.semalign
    if c.map == "closed_form":
        return closed_form
    if c.map == "random_orthogonal":
        sm = random_orthogonal_map(ctx.s_arch.hidden_size, ctx.t_arch.hidden_size, ctx.config.seed)
    else:
        sm = fit_ridge_map(ctx, pairs, interface, c.ridge_lambda)
    sm.meta["shared_vocab_bound"] = closed_form.meta.get("shared_vocab_bound")
    sm.meta["shared_ids"] = closed_form.meta.get("shared_ids")
    return sm
