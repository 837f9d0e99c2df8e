"""Similarity measures as pure tensor functions (float32/64, no model code).

* ``linear_cka(X, Y)``: linear CKA (Kornblith et al., 2019) between two sets of n representations
  (rows), X: n x p, Y: n x q. Invariant to isotropic scaling, orthogonal transforms and mean shifts.
* ``centered_gram(X)``: token-centred Gram matrix, Frobenius-normalised.
* ``cosine_rows``: per-row cosine.
"""

from __future__ import annotations

import torch


def center_rows(x: torch.Tensor) -> torch.Tensor:
    """Subtract the mean over rows (the n axis, dim -2)."""
    return x - x.mean(dim=-2, keepdim=True)


def centered_gram(x: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """G = (Hx)(Hx)^T / |(Hx)(Hx)^T|_F for x of shape [..., n, d]."""
    xc = center_rows(x.float())
    g = xc @ xc.transpose(-1, -2)
    return g / g.flatten(-2).norm(dim=-1).clamp_min(eps)[..., None, None]


def linear_cka(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Linear CKA between row sets x [..., n, p] and y [..., n, q] (feature-space form, O(n p q))."""
    xc, yc = center_rows(x.double()), center_rows(y.double())
    cross = (xc.transpose(-1, -2) @ yc).flatten(-2).norm(dim=-1) ** 2
    nx = (xc.transpose(-1, -2) @ xc).flatten(-2).norm(dim=-1)
    ny = (yc.transpose(-1, -2) @ yc).flatten(-2).norm(dim=-1)
    return (cross / (nx * ny).clamp_min(eps)).to(torch.float32)


def cosine_rows(x: torch.Tensor, y: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(x.float(), y.float(), dim=-1, eps=eps)


def cka_matrix(xs: list[torch.Tensor], ys: list[torch.Tensor]) -> torch.Tensor:
    """CKA between every pair (xs[i], ys[j]); each entry is n x d_i with the same n rows."""
    out = torch.zeros(len(xs), len(ys))
    for i, x in enumerate(xs):
        for j, y in enumerate(ys):
            out[i, j] = linear_cka(x, y)
    return out
