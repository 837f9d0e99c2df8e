"""The unbiased pass@k estimator (Chen et al., 2021, "Evaluating Large Language Models Trained on Code").

For one problem with ``n`` samples of which ``c`` are correct, the probability that at least one of ``k``
samples drawn without replacement passes is ``1 - C(n-c, k) / C(n, k)``. It is computed as the numerically
stable product ``1 - prod_{i=n-c+1}^{n} (1 - k / i)``.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``n`` samples, ``c`` of them correct."""
    if n < 1 or k < 1:
        raise ValueError(f"pass@k needs n >= 1 and k >= 1 (got n={n}, k={k})")
    if not 0 <= c <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n (got n={n}, c={c})")
    if k > n:
        raise ValueError(f"pass@{k} is undefined with only n={n} samples; draw at least k samples")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def mean_pass_at_k(counts: Iterable[tuple[int, int]], k: int) -> tuple[float, float]:
    """Mean pass@k over problems given ``(n, c)`` per problem, with the standard error of that mean."""
    vals = [pass_at_k(n, c, k) for n, c in counts]
    if not vals:
        return float("nan"), float("nan")
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, float("nan")
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var / len(vals))


def valid_ks(n: int, ks: Sequence[int] = (1, 10, 100)) -> list[int]:
    """The ks in ``ks`` that ``n`` samples per problem can estimate."""
    return [k for k in ks if k <= n]
