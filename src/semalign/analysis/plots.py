"""Figures of the analysis suite (matplotlib, Agg backend, small PNGs)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

DPI = 100


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _int_ticks(ax, x: bool = True, y: bool = False) -> None:
    from matplotlib.ticker import MaxNLocator

    if x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if y:
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    _plt().close(fig)
    return path


def heatmap(mat: torch.Tensor, path: Path, *, title: str, ylabel: str, xlabel: str,
            path_pairs: Sequence[tuple[int, int]] = (), marked: Sequence[tuple[int, int]] = (),
            vmin: float = 0.0, vmax: float = 1.0) -> Path:
    """Layer x layer matrix (row i = y layer i, starting at 0 = embeddings). ``path_pairs`` (y, x) are drawn as
    a thin line (e.g. the depth map), ``marked`` (y, x) as red squares (the supervised pairs)."""
    plt = _plt()
    m = mat.float().numpy()
    fig, ax = plt.subplots(figsize=(4.6, 4.0))
    im = ax.imshow(m, origin="lower", aspect="auto", cmap="viridis", vmin=vmin, vmax=vmax, interpolation="nearest")
    if path_pairs:
        ys, xs = zip(*path_pairs)
        ax.plot(xs, ys, c="white", lw=0.8, ls="--", alpha=0.8, label="depth map")
    if marked:
        ys, xs = zip(*marked)
        ax.scatter(xs, ys, marker="s", s=40, facecolors="none", edgecolors="red", linewidths=1.5,
                   label="supervised pair")
    if path_pairs or marked:
        ax.legend(loc="upper left", fontsize=6, framealpha=0.6)
    ax.set_title(title, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.tick_params(labelsize=7)
    _int_ticks(ax, True, True)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04).ax.tick_params(labelsize=7)
    fig.tight_layout()
    return _save(fig, path)


def attribution_profiles(profiles: dict[str, list[float]], path: Path, *, marked: dict[str, list[int]] | None = None
                         ) -> Path:
    """Grad x Act per layer, each profile normalised by its maximum, on relative depth l/L."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.2))
    for name, scores in profiles.items():
        L = len(scores)
        top = max(max(scores), 1e-30)
        xs = [(l + 1) / L for l in range(L)]
        ax.plot(xs, [s / top for s in scores], marker="o", ms=3, lw=1.2, label=f"{name} (L={L}, max {top:.3g})")
        for l in (marked or {}).get(name, []):
            ax.scatter([l / L], [scores[l - 1] / top], s=80, facecolors="none", edgecolors="red", linewidths=1.5)
    ax.set_xlabel("relative depth l / L")
    ax.set_ylabel("Grad x Act (normalised)")
    ax.set_title("layer attribution profiles (red circle = critical layer)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def resolution(results: dict[str, dict], path: Path) -> Path:
    """Recomposition cosine per layer, one panel per model, one line (with 10-90% band) per basis kind."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(results), figsize=(4.2 * len(results), 3.2), squeeze=False)
    for ax, (model, res) in zip(axes[0], results.items()):
        xs = res["layers"]
        for kind, r in res["kinds"].items():
            line, = ax.plot(xs, r["mean"], marker="o", ms=2.5, lw=1.2, label=kind)
            ax.fill_between(xs, r["q10"], r["q90"], color=line.get_color(), alpha=0.15)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("layer (0 = embeddings)")
        _int_ticks(ax)
        ax.set_ylabel("cos(h, S S^T h)")
        ax.set_title(f"{model}: resolution of semantics", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)


def parametric(res: dict, path: Path) -> Path:
    """Per student layer: cos and CKA of extracted teacher blocks vs student weights, per projection."""
    plt = _plt()
    xs = res["student_layers"]
    fig, axes = plt.subplots(1, 3, figsize=(12.0, 3.2))
    panels = (("cos", "cosine (flattened)"), ("cka", "linear CKA (rows)"), ("cos_lowrank", f"cos(rank-{res['rank']}, W_S)"))
    for ax, (key, label) in zip(axes, panels):
        for name in res["projections"]:
            line, = ax.plot(xs, [res["layers"][str(k)][name][key] for k in xs], lw=1.1, marker="o", ms=2, label=name)
            if key == "cka":
                ax.plot(xs, [res["layers"][str(k)][name]["cka_null"] for k in xs], lw=0.8, ls=":",
                        color=line.get_color())
            if key == "cos_lowrank":
                ax.plot(xs, [res["layers"][str(k)][name]["pissa_cos"] for k in xs], lw=0.8, ls=":",
                        color=line.get_color())
        ax.set_xlabel("student layer")
        _int_ticks(ax)
        ax.set_title(label + (" (dotted: Gaussian null)" if key == "cka" else
                              " (dotted: PiSSA control)" if key == "cos_lowrank" else ""), fontsize=8)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=6, ncol=2)
    fig.suptitle(f"parametric similarity: extracted teacher block vs student weight ({res['extraction']})", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def alignment(curves: dict[str, list[float]], layers: list[int], path: Path, *, title: str) -> Path:
    """Mean token cosine between student layer k and the aligned teacher layer l(k), per student layer."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    for name, ys in curves.items():
        ax.plot(layers, ys, marker="o", ms=3, lw=1.2, label=name)
    ax.set_xlabel("student layer k (teacher layer = depth map l(k))")
    ax.set_ylabel("mean cos(h_S, M h_T/|h_T|)")
    _int_ticks(ax)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return _save(fig, path)
