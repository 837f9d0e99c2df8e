"""Uncertainty for evaluation metrics: standard errors and 95% intervals."""

from __future__ import annotations

import math
from typing import Sequence

Z95 = 1.959963984540054


def binomial(k: int, n: int) -> dict:
    """Accuracy ``k/n`` with the sample standard error sqrt(p(1-p)/(n-1)) (as lm-eval) and a Wilson 95% interval."""
    if n <= 0:
        return {"value": float("nan"), "stderr": float("nan"), "ci95": [float("nan"), float("nan")]}
    p = k / n
    se = math.sqrt(p * (1 - p) / (n - 1)) if n > 1 else float("nan")
    z2 = Z95 * Z95
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = Z95 * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return {"value": p, "stderr": se, "ci95": [max(0.0, centre - half), min(1.0, centre + half)]}


def mean(values: Sequence[float]) -> dict:
    """Mean with its standard error and a normal 95% interval (for per-problem pass@k values)."""
    n = len(values)
    if n == 0:
        return {"value": float("nan"), "stderr": float("nan"), "ci95": [float("nan"), float("nan")]}
    m = sum(values) / n
    if n < 2:
        return {"value": m, "stderr": float("nan"), "ci95": [float("nan"), float("nan")]}
    se = math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1) / n)
    return {"value": m, "stderr": se, "ci95": [max(0.0, m - Z95 * se), min(1.0, m + Z95 * se)]}


def put(metrics: dict, name: str, st: dict) -> None:
    """Store ``name``, ``name_stderr`` and ``name_ci95`` (rounded) in ``metrics``."""
    metrics[name] = _r(st["value"])
    metrics[f"{name}_stderr"] = _r(st["stderr"])
    metrics[f"{name}_ci95"] = [_r(x) for x in st["ci95"]]


def _r(x: float) -> float | None:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return None
    return round(float(x), 6)
