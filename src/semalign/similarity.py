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


# -- batched forms (added for the analysis suite; the functions above are unchanged) --------------------------


def gram_features(xs: torch.Tensor | list[torch.Tensor], chunk: int = 8) -> torch.Tensor:
    """Frobenius-normalised, token-centred Grams of k row sets, flattened: [k, n*n] float32.

    ``xs`` is [k, n, d] or a list of k tensors [n, d_i] (widths may differ). Centring is done in float32 on the
    rows; the Frobenius norm is reduced in float64. Cost O(k n^2 d); memory 4 k n^2 bytes.
    """
    items = list(xs) if isinstance(xs, list) else list(xs.unbind(0))
    n = items[0].shape[0]
    out = torch.empty(len(items), n * n, dtype=torch.float32)
    for i in range(0, len(items), chunk):
        for j, x in enumerate(items[i:i + chunk], start=i):
            xc = center_rows(x.float())
            g = xc @ xc.T
            out[j] = (g / g.double().norm().clamp_min(1e-300).float()).reshape(-1)
    return out


def cka_from_grams(gx: torch.Tensor, gy: torch.Tensor, chunk: int = 1 << 20) -> torch.Tensor:
    """Linear CKA matrix [kx, ky] from :func:`gram_features` outputs (inner products accumulated in float64)."""
    acc = torch.zeros(gx.shape[0], gy.shape[0], dtype=torch.float64)
    for i in range(0, gx.shape[1], chunk):
        acc += gx[:, i:i + chunk].double() @ gy[:, i:i + chunk].double().T
    return acc.clamp(0.0, 1.0).float()


def cka_matrix_fast(xs: torch.Tensor | list[torch.Tensor], ys: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
    """Same values as :func:`cka_matrix` via centred Grams: O((kx + ky) n^2 d + kx ky n^2) instead of
    O(kx ky n p q); the better choice for layer x layer heat-maps with n of a few thousand tokens."""
    return cka_from_grams(gram_features(xs), gram_features(ys))


def cosine_flat(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-30) -> float:
    """Cosine between two tensors of equal shape, flattened (float64 reduction)."""
    x, y = a.reshape(-1).double(), b.reshape(-1).double()
    return float((x @ y) / (x.norm() * y.norm()).clamp_min(eps))
