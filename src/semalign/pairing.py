"""Layer pairing (spec semalign.md §2.3, §3.3a) in integer arithmetic; the result is data (``LayerMap``).

Layers are 1-based: teacher ``1..L_T``, student ``1..L_S``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from .errors import SemalignError


def depth_map(k: int, L_T: int, L_S: int) -> int:
    """l^T_k = max(1, floor(L_T * k / L_S)) computed exactly with integers."""
    if L_T < 1 or L_S < 1:
        raise SemalignError(f"both models need at least one layer (got teacher {L_T}, student {L_S})")
    if not 1 <= k <= L_S:
        raise SemalignError(f"student layer {k} is out of range 1..{L_S}")
    return max(1, (L_T * k) // L_S)


def full_depth_map(L_T: int, L_S: int) -> list[int]:
    return [depth_map(k, L_T, L_S) for k in range(1, L_S + 1)]


def k_dagger(critical: int, L_T: int, L_S: int) -> int:
    """Nearest deeper-or-equal student index whose mapped teacher layer is >= ``critical`` (else L_S)."""
    if not 1 <= critical <= L_T:
        raise SemalignError(f"teacher layer {critical} is out of range 1..{L_T}")
    for k in range(1, L_S + 1):
        if depth_map(k, L_T, L_S) >= critical:
            return k
    return L_S


def interpolation(k: int, L_T: int, L_S: int) -> tuple[int, int, float]:
    """(a, b, lambda) with target (1 - lambda) h_a + lambda h_b at the exact student depth (§2.3)."""
    from fractions import Fraction

    u = Fraction(L_T * k, L_S)
    a = max(1, min(int(u), L_T - 1)) if L_T > 1 else 1
    b = a + 1 if L_T > 1 else 1
    lam = float(min(max(u - a, 0), 1)) if L_T > 1 else 0.0
    return a, b, lam


@dataclass
class LayerPair:
    student_layer: int
    teacher_layer: int
    critical_teacher_layer: int | None = None
    score: float | None = None
    interpolation: dict | None = None  # {"a": int, "b": int, "lambda": float}

    def teacher_layers_needed(self) -> list[int]:
        if self.interpolation:
            return sorted({self.interpolation["a"], self.interpolation["b"]})
        return [self.teacher_layer]


@dataclass
class LayerMap:
    teacher_layers: int
    student_layers: int
    strategy: str
    interface: str
    pairs: list[LayerPair] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {
            "teacher_layers": self.teacher_layers, "student_layers": self.student_layers,
            "strategy": self.strategy, "interface": self.interface, "indexing": "1-based (h_0 = embeddings)",
            "depth_map": {str(k): depth_map(k, self.teacher_layers, self.student_layers)
                          for k in range(1, self.student_layers + 1)},
            "pairs": [asdict(p) for p in self.pairs], "notes": self.notes,
        }

    @classmethod
    def from_json(cls, d: dict) -> "LayerMap":
        return cls(d["teacher_layers"], d["student_layers"], d["strategy"], d["interface"],
                   [LayerPair(**p) for p in d["pairs"]], d.get("notes", []))

    def describe(self) -> str:
        parts = []
        for p in self.pairs:
            src = (f"{1 - p.interpolation['lambda']:.3f}*T{p.interpolation['a']} + "
                   f"{p.interpolation['lambda']:.3f}*T{p.interpolation['b']}") if p.interpolation else f"T{p.teacher_layer}"
            crit = f" (critical T{p.critical_teacher_layer})" if p.critical_teacher_layer else ""
            parts.append(f"S{p.student_layer} <- {src}{crit}")
        return "; ".join(parts)


def critical_pairs(scores: list[float], L_S: int, *, top_k: int = 1, depth_exact: bool = False,
                   interface: str = "residual") -> LayerMap:
    """SemAlign v1: top-k teacher layers by score, each paired through k-dagger (§2.3, §8.2-8.3).

    The top-k teacher layers by score are the critical layers; if two land on the same k-dagger, the
    higher-scoring one is kept (so fewer than k pairs may result; spec §8.2).
    """
    L_T = len(scores)
    if top_k < 1:
        raise SemalignError("--semalign-top-k-layers must be at least 1")
    order = sorted(range(1, L_T + 1), key=lambda l: (-scores[l - 1], l))
    lm = LayerMap(L_T, L_S, "v1-critical-kdagger", interface)
    used: set[int] = set()
    for crit in order[:top_k]:
        k = k_dagger(crit, L_T, L_S)
        if k in used:
            lm.notes.append(f"critical T{crit} maps to S{k} already paired with a higher-scoring layer; skipped")
            continue
        used.add(k)
        pair = LayerPair(k, depth_map(k, L_T, L_S), crit, float(scores[crit - 1]))
        if depth_exact:
            a, b, lam = interpolation(k, L_T, L_S)
            pair.interpolation = {"a": a, "b": b, "lambda": lam}
        lm.pairs.append(pair)
    lm.pairs.sort(key=lambda p: p.student_layer)
    if L_T < L_S:
        lm.notes.append("teacher is shallower than the student: teacher layers are shared by adjacent student layers")
    return lm


def windowed_argmax_pairs(scores: list[float], L_S: int, *, interface: str = "residual") -> LayerMap:
    """One source layer per target layer (§3.3a): argmax of the score within each depth window."""
    L_T = len(scores)
    lm = LayerMap(L_T, L_S, "frontier-window-argmax", interface)
    prev = 0
    for k in range(1, L_S + 1):
        hi = depth_map(k, L_T, L_S)
        window = list(range(prev + 1, hi + 1))
        if window:
            best = max(window, key=lambda l: (scores[l - 1], -l))
        else:
            best = hi
            lm.notes.append(f"S{k}: empty window (teacher shallower); fell back to depth map T{hi}")
        lm.pairs.append(LayerPair(k, best, None, float(scores[best - 1])))
        prev = max(prev, hi)
    return lm
