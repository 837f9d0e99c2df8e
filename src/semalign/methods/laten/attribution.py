"""LaTen's static neuron-level attribution (spec baselines.md §2.1, §6 items 3, 8, 13; bugs B3-B5 fixed).

Everything is read at the last input position T of ``prompt + answer[:-1]``; the target y* is the answer's last
token after stripping trailing ``. " space ) newline , ]`` (falling back to the raw answer when that leaves
nothing, B5). One forward pass per example and model captures, with hooks on native modules, h_in, h_mid, h_out
of every block, the MLP coefficients (down_proj input) and the o_proj input z.

Logit lens: ``z(v) = W_U (g * v / s)`` with s frozen per example from the last block output: the RMSNorm factor
``sqrt(mean(h^2) + eps)`` (default) or the official code's ``sqrt(sqrt(Var(h) + 1e-5) + 1e-6)``
(``original_scaling=True``, bug B3).

* layer scores  I_attn(l) = lp(h_mid) - lp(h_in),  I_ffn(l) = lp(h_out) - lp(h_mid)
* FFN neuron i  lp(h_mid + m_i W_down[:, i]) - lp(h_mid)
* attention channel c  lp(h_in + z_c W_O[:, c]) - lp(h_in)   (all key positions, not just T: B4 fixed)

Neuron scores never form per-neuron residual vectors: ``z(base + a_i u_i) = z(base) + (a_i / s) W_U (g * u_i)``,
so one vocabulary chunk of ``W_U diag(g) U`` (shared by every example) plus a running log-sum-exp gives exact
scores with memory bounded by :data:`CHUNK_BYTES`. On CPU the exact pass costs V*d*n multiply-adds per layer
(minutes per layer for a 151,936-token vocabulary); ``lens_vocab=K`` keeps each example's top-K base-logit tokens
exact and takes the rest of the normaliser to first order (measured on Qwen2.5-Coder-0.5B, K=2048: >= 99.8% of the
top-10% neurons agree with the exact scores, ~30x faster; see docs/baselines.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from ...data.prompts import prompt_ids
from ...errors import SemalignError
from ...models.arch import Internals

log = logging.getLogger(__name__)

STRIP = '. ")\n,]'  # trailing characters removed before choosing y* (official code)
CHUNK_BYTES = 256 * 2**20  # fp32 working-set bound of one vocabulary chunk in the neuron-score pass


def check_supported(arch: Internals) -> None:
    """LaTen's neuron contributions need blocks whose MLP output is added to the residual unchanged."""
    block = arch.layer(1)
    if arch.spec.family not in ("llama", "qwen2") or hasattr(block, "post_feedforward_layernorm"):
        raise SemalignError(f"LaTen supports sequential pre-norm blocks (llama, qwen2); {arch.model_type!r} adds "
                            "normalised sub-layer outputs to the residual, so single-neuron contributions are "
                            "not additive; use another method for this model")


def attribution_input(tokenizer, example: dict) -> tuple[list[int], int]:
    """(input ids = prompt + answer without its last token, target y*) for one chat example."""
    answer = example["messages"][-1]["content"]
    stripped = answer.rstrip(STRIP + " ") or answer
    if not stripped.strip():
        raise SemalignError(f"example {example.get('id', '?')!r} has an empty answer; LaTen needs a target token")
    ids = prompt_ids(tokenizer, example["messages"][:-1]) + tokenizer(stripped, add_special_tokens=False)["input_ids"]
    if len(ids) < 2:
        raise SemalignError(f"example {example.get('id', '?')!r} is too short for attribution")
    return ids[:-1], ids[-1]


@dataclass
class Capture:
    """Per-example activations at position T (fp32, CPU), stacked over the model's layers."""

    target: int
    scale: float
    h_in: torch.Tensor    # [L, d]
    h_mid: torch.Tensor   # [L, d]
    h_out: torch.Tensor   # [L, d]
    coeff: torch.Tensor   # [L, d_ff]  down_proj input
    z_o: torch.Tensor     # [L, n_heads * head_dim]  o_proj input
    logprob: float        # the model's own log p(y*) (the lens at the last layer must reproduce it)


def lens_scale(h_last: torch.Tensor, eps: float, original: bool) -> float:
    h = h_last.double()
    if original:
        return float(torch.sqrt(torch.sqrt(h.var(unbiased=False) + 1e-5) + 1e-6))
    return float(torch.sqrt((h * h).mean() + eps))


@torch.no_grad()
def capture(arch: Internals, ids: list[int], target: int, *, original_scaling: bool = False) -> Capture:
    """One forward pass with hooks; only position T is kept."""
    L = arch.num_layers
    rec: dict[str, list] = {k: [None] * L for k in ("h_in", "h_out", "f", "coeff", "z_o")}
    handles = []

    def last(t: torch.Tensor) -> torch.Tensor:
        return t[0, -1].detach().float().cpu()

    try:
        for k in range(1, L + 1):
            i = k - 1

            def block_hook(_m, args, kwargs, out, i=i):
                h = args[0] if args else kwargs["hidden_states"]
                rec["h_in"][i] = last(h)
                rec["h_out"][i] = last(out[0] if isinstance(out, tuple) else out)

            def mlp_hook(_m, _a, out, i=i):
                rec["f"][i] = last(out[0] if isinstance(out, tuple) else out)

            def down_pre(_m, args, i=i):
                rec["coeff"][i] = last(args[0])

            def o_pre(_m, args, i=i):
                rec["z_o"][i] = last(args[0])

            handles += [arch.layer(k).register_forward_hook(block_hook, with_kwargs=True),
                        arch.mlp(k).register_forward_hook(mlp_hook),
                        arch.projection(k, "down_proj").register_forward_pre_hook(down_pre),
                        arch.projection(k, "o_proj").register_forward_pre_hook(o_pre)]
        x = torch.tensor([ids], device=arch.device)
        logits = arch.model(input_ids=x, attention_mask=torch.ones_like(x), logits_to_keep=1).logits[0, -1]
    finally:
        for h in handles:
            h.remove()
    h_in, h_out, f = (torch.stack(rec[k]) for k in ("h_in", "h_out", "f"))
    eps = float(getattr(arch.config, "rms_norm_eps", 1e-6))
    lp = float(torch.log_softmax(logits.float(), -1)[target])
    return Capture(target, lens_scale(h_out[-1], eps, original_scaling), h_in, h_out - f, h_out,
                   torch.stack(rec["coeff"]), torch.stack(rec["z_o"]), lp)


class Lens:
    """The frozen-scale logit lens of one model."""

    def __init__(self, arch: Internals):
        self.W = arch.lm_head.weight.detach()
        gain = arch.final_norm_gain()
        self.g = (gain if gain is not None else torch.ones(arch.hidden_size)).float().to(self.W.device)
        bias = getattr(arch.lm_head, "bias", None)
        self.bias = bias.detach().float() if bias is not None else None

    def _rows(self, a: int, b: int) -> torch.Tensor:
        return self.W[a:b].float()

    def logprob(self, v: torch.Tensor, scale: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """log p(target | v) for vectors v [N, d] with per-row scale [N] and target [N]."""
        x = (v.float().to(self.W.device) * self.g) / scale.float().to(self.W.device)[:, None]
        V = self.W.shape[0]
        rows = max(1, CHUNK_BYTES // (4 * max(1, x.shape[0])))
        lse = torch.full((x.shape[0],), -float("inf"), device=x.device)
        for a in range(0, V, rows):
            z = x @ self._rows(a, a + rows).T
            if self.bias is not None:
                z = z + self.bias[a:a + rows]
            lse = torch.logaddexp(lse, torch.logsumexp(z, -1))
        t = target.to(self.W.device)
        zt = (x * self.W[t].float()).sum(-1) + (self.bias[t] if self.bias is not None else 0.0)
        return (zt - lse).cpu()

    def base_logits(self, x0: torch.Tensor) -> torch.Tensor:
        """Full-vocabulary logits [E, V] of already scaled vectors x0 = g * v / s."""
        V = self.W.shape[0]
        rows = max(1, CHUNK_BYTES // (4 * max(1, x0.shape[0])))
        z = torch.cat([x0 @ self._rows(a, a + rows).T for a in range(0, V, rows)], -1)
        return z + self.bias if self.bias is not None else z

    def weighted_rows(self, p: torch.Tensor) -> torch.Tensor:
        """``p @ W_U`` [E, d] in fp32, chunked over the vocabulary (no full fp32 copy of a bf16 head)."""
        V = self.W.shape[0]
        rows = max(1, CHUNK_BYTES // (4 * self.W.shape[1]))
        return sum(p[:, a:a + rows] @ self._rows(a, a + rows) for a in range(0, V, rows))

    def contribution_scores(self, base: torch.Tensor, coef: torch.Tensor, U: torch.Tensor, scale: torch.Tensor,
                            target: torch.Tensor, vocab: int | None = None) -> torch.Tensor:
        """[E, n] = lp(base_e + coef_e,i U[:, i]) - lp(base_e) for every column i of U [d, n].

        Exact by default. ``vocab=K`` (a CPU-budget approximation) keeps the union of each example's top-K base-logit
        tokens and the targets exact and replaces the rest of the normaliser by its first-order (mean-shift) term:
        ``log sum_tail exp(z0 + delta) ~ LSE_tail(z0) + E_p_tail[delta]``.
        """
        dev = self.W.device
        E, n = coef.shape
        s = scale.float().to(dev)
        x0 = (base.float().to(dev) * self.g) / s[:, None]                      # [E, d]
        a = coef.float().to(dev) / s[:, None]                                 # [E, n]
        GU = self.g[:, None] * U.float().to(dev)                              # [d, n]
        t = target.to(dev)
        z_full = self.base_logits(x0)                                         # [E, V]
        V = z_full.shape[1]
        lse0 = torch.logsumexp(z_full, -1)
        zt0 = z_full.gather(1, t[:, None])[:, 0]
        zt = zt0[:, None] + a * (self.W[t].float() @ GU)                      # target logits [E, n]
        lse = torch.full((E, n), -float("inf"), device=dev)
        if vocab is None or vocab >= V:
            ids = torch.arange(V, device=dev)
        else:
            ids = torch.unique(torch.cat([torch.topk(z_full, vocab, -1).indices.flatten(), t]))
            tail = z_full.clone()
            tail[:, ids] = -float("inf")
            lse_tail = torch.logsumexp(tail, -1)                              # [E]
            p_tail = torch.softmax(tail, -1)                                  # [E, V], zero on the kept set
            mean_shift = a * (self.weighted_rows(p_tail) @ GU)                 # E_tail[delta_i], first order
            lse = torch.logaddexp(lse, lse_tail[:, None] + mean_shift)
        rows = max(1, CHUNK_BYTES // (4 * n * 2))  # M plus one [Vc, n] temporary
        for lo in range(0, ids.numel(), rows):
            idx = ids[lo:lo + rows]
            M = self.W[idx].float() @ GU                                      # [Vc, n], shared by all examples
            z0 = z_full[:, idx]                                               # [E, Vc]
            for e in range(E):
                chunk = torch.logsumexp(torch.addcmul(z0[e][:, None], M, a[e][None, :]), 0)
                lse[e] = torch.logaddexp(lse[e], chunk)
        return ((zt - lse) - (zt0 - lse0)[:, None]).cpu()


def layer_scores(lens: Lens, caps: list[Capture]) -> tuple[torch.Tensor, torch.Tensor]:
    """(I_attn [E, L], I_ffn [E, L]) from one batched lens pass over h_in, h_mid, h_out of every layer."""
    E, L = len(caps), caps[0].h_in.shape[0]
    v = torch.stack([torch.stack([c.h_in, c.h_mid, c.h_out], 1) for c in caps])   # [E, L, 3, d]
    s = torch.tensor([c.scale for c in caps]).repeat_interleave(L * 3)
    y = torch.tensor([c.target for c in caps]).repeat_interleave(L * 3)
    lp = lens.logprob(v.reshape(E * L * 3, -1), s, y).view(E, L, 3)
    return lp[..., 1] - lp[..., 0], lp[..., 2] - lp[..., 1]


def neuron_scores(arch: Internals, lens: Lens, caps: list[Capture], layers: list[int], kind: str,
                  vocab: int | None = None) -> torch.Tensor:
    """[E, len(layers), n] scores of FFN neurons (``kind='ffn'``) or attention channels (``'attn'``)."""
    s = torch.tensor([c.scale for c in caps])
    y = torch.tensor([c.target for c in caps])
    out = []
    for k in layers:
        i = k - 1
        if kind == "ffn":
            base = torch.stack([c.h_mid[i] for c in caps])
            coef = torch.stack([c.coeff[i] for c in caps])
            U = arch.projection(k, "down_proj").weight.detach()
        else:
            base = torch.stack([c.h_in[i] for c in caps])
            coef = torch.stack([c.z_o[i] for c in caps])
            U = arch.projection(k, "o_proj").weight.detach()
        out.append(lens.contribution_scores(base, coef, U, s, y, vocab))
    return torch.stack(out, 1) if out else torch.zeros(len(caps), 0, 0)


# ------------------------------------------------------------------------------------------- selection
def neuron_counts(s_arch: Internals, rate: float) -> dict[str, int]:
    """k per module family on both sides (spec §2.1): floor(rate * student width), at least 1."""
    if not 0 < rate <= 1:
        raise SemalignError(f"--laten-transfer-rate {rate} is outside (0, 1]; use e.g. 0.1")
    widths = {"ffn": s_arch.intermediate_size, "attn": s_arch.num_heads * s_arch.head_dim,
              "v": s_arch.num_kv_heads * s_arch.head_dim}
    ks = {k: int(rate * w) for k, w in widths.items()}
    if min(ks.values()) < 1:
        raise SemalignError(f"--laten-transfer-rate {rate} selects no neuron in some module of the student "
                            f"(widths {widths}); raise it")
    return ks


def kv_row_scores(ch: torch.Tensor, arch: Internals) -> torch.Tensor:
    """Attention-channel scores [..., n_heads*hd] -> v_proj row scores [..., n_kv*hd] (sum over the query heads
    that read each KV row under GQA; spec §6 item 8, option b)."""
    group = arch.num_heads // arch.num_kv_heads
    shp = ch.shape[:-1]
    return ch.reshape(*shp, arch.num_kv_heads, group, arch.head_dim).sum(-2).reshape(*shp, -1)


@dataclass
class Location:
    """Where to inject: paired layers per family and rank-paired neuron indices (teacher, student) per module."""

    attn_pairs: list[tuple[int, int]]
    ffn_pairs: list[tuple[int, int]]
    idx: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)  # module -> ([N,k], [N,k])

    def pairs(self, module: str) -> list[tuple[int, int]]:
        return self.ffn_pairs if module in ("up_proj", "down_proj") else self.attn_pairs

    def describe(self) -> dict:
        return {"attn_pairs": self.attn_pairs, "ffn_pairs": self.ffn_pairs,
                "k": {m: int(t.shape[1]) for m, (t, _) in self.idx.items()}}


def _top_layers(scores: torch.Tensor, n: int) -> list[int]:
    order = torch.argsort(-scores.double(), stable=True)[:n]
    return sorted(int(i) + 1 for i in order)


def _topk(scores: torch.Tensor, k: int) -> torch.Tensor:
    return torch.topk(scores.double(), k, dim=-1, sorted=True).indices


class Locator:
    """Scores once for all examples, then :meth:`locate` any group of them (averaging scores over the group)."""

    def __init__(self, t_arch: Internals, s_arch: Internals, t_caps: list[Capture], s_caps: list[Capture],
                 rate: float, modules: list[str], vocab: int | None = None):
        for a in (t_arch, s_arch):
            check_supported(a)
        self.t_arch, self.s_arch, self.modules, self.vocab = t_arch, s_arch, modules, vocab
        self.k = neuron_counts(s_arch, rate)
        t_w = {"ffn": t_arch.intermediate_size, "attn": t_arch.num_heads * t_arch.head_dim,
               "v": t_arch.num_kv_heads * t_arch.head_dim}
        for fam, k in self.k.items():
            if k > t_w[fam]:
                raise SemalignError(f"LaTen needs {k} teacher neurons per layer in {fam} but the teacher has only "
                                    f"{t_w[fam]}; lower --laten-transfer-rate")
        self.n_layers = min(t_arch.num_layers, s_arch.num_layers)
        self.t_lens, self.s_lens = Lens(t_arch), Lens(s_arch)
        self.t_caps, self.s_caps = t_caps, s_caps
        self.t_layer = layer_scores(self.t_lens, t_caps)
        self.s_layer = layer_scores(self.s_lens, s_caps)
        self._cache: dict[tuple[str, str, int], torch.Tensor] = {}

    def _neurons(self, side: str, kind: str, layers: list[int]) -> torch.Tensor:
        """[E, len(layers), n] for all examples, computed once per (side, kind, layer)."""
        arch, lens, caps = ((self.t_arch, self.t_lens, self.t_caps) if side == "t"
                            else (self.s_arch, self.s_lens, self.s_caps))
        todo = [k for k in layers if (side, kind, k) not in self._cache]
        if todo:
            res = neuron_scores(arch, lens, caps, todo, kind, self.vocab)
            for j, k in enumerate(todo):
                self._cache[(side, kind, k)] = res[:, j]
        return torch.stack([self._cache[(side, kind, k)] for k in layers], 1)

    def prefetch(self, groups: list[list[int]]) -> None:
        """Compute neuron scores for the union of layers any group will select (one pass per layer)."""
        for side in ("t", "s"):
            for fam in ("attn", "ffn"):
                need: set[int] = set()
                for g in groups:
                    need.update(self._layers(side, fam, g))
                self._neurons(side, fam, sorted(need))

    def _layers(self, side: str, fam: str, group: list[int]) -> list[int]:
        scores = (self.t_layer if side == "t" else self.s_layer)[0 if fam == "attn" else 1]
        return _top_layers(scores[group].mean(0), self.n_layers)

    def locate(self, group: list[int]) -> Location:
        out = Location([], [])
        for fam in ("attn", "ffn"):
            tl, sl = self._layers("t", fam, group), self._layers("s", fam, group)
            setattr(out, f"{fam}_pairs", list(zip(tl, sl)))
            ts = self._neurons("t", fam, tl)[group].mean(0)   # [N, n_T]
            ss = self._neurons("s", fam, sl)[group].mean(0)   # [N, n_S]
            if fam == "ffn":
                pair = (_topk(ts, self.k["ffn"]), _topk(ss, self.k["ffn"]))
                for m in ("up_proj", "down_proj"):
                    if m in self.modules:
                        out.idx[m] = pair
            else:
                if "o_proj" in self.modules:
                    out.idx["o_proj"] = (_topk(ts, self.k["attn"]), _topk(ss, self.k["attn"]))
                if "v_proj" in self.modules:
                    out.idx["v_proj"] = (_topk(kv_row_scores(ts, self.t_arch), self.k["v"]),
                                         _topk(kv_row_scores(ss, self.s_arch), self.k["v"]))
        return out
