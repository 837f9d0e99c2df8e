"""Forward-hook context managers on native module names (no patched modeling code).

Every hook is removed when the ``with`` block exits, also on exceptions.
``capture_layers`` records, per 1-based decoder layer, the block input ``h_{l-1}`` and output ``h_l``;
the residual contribution is ``Delta_l = h_l - h_{l-1}`` (spec §8 item 5). Tensors keep their autograd
graph unless ``detach=True`` so gradient x activation for all layers needs one backward pass.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Iterable, Iterator, Literal

import torch

from .arch import Internals

Interface = Literal["residual", "block_output", "mlp_output"]
INTERFACES: tuple[str, ...] = ("residual", "block_output", "mlp_output")


def _first_tensor(x):
    if isinstance(x, torch.Tensor):
        return x
    if isinstance(x, (tuple, list)) and x and isinstance(x[0], torch.Tensor):
        return x[0]  # transformers 4.x decoder layers return (hidden_states, ...)
    raise TypeError(f"cannot find a hidden-state tensor in {type(x).__name__}")


@dataclass
class LayerCapture:
    inputs: dict[int, torch.Tensor] = field(default_factory=dict)
    outputs: dict[int, torch.Tensor] = field(default_factory=dict)
    mlp_outputs: dict[int, torch.Tensor] = field(default_factory=dict)

    def interface(self, k: int, kind: str) -> torch.Tensor:
        """The activation of layer ``k`` at a supervision interface."""
        if kind == "residual":
            return self.outputs[k] - self.inputs[k]
        if kind == "block_output":
            return self.outputs[k]
        if kind == "mlp_output":
            return self.mlp_outputs[k]
        raise ValueError(f"unknown interface {kind!r}; choose one of {', '.join(INTERFACES)}")

    def clear(self) -> None:
        self.inputs.clear()
        self.outputs.clear()
        self.mlp_outputs.clear()


@contextlib.contextmanager
def capture_layers(
    arch: Internals,
    layers: Iterable[int],
    *,
    inputs: bool = True,
    mlp: bool = False,
    detach: bool = False,
    dtype: torch.dtype | None = None,
    retain_grad: bool = False,
) -> Iterator[LayerCapture]:
    """Capture block inputs/outputs (and optionally MLP outputs) of the given 1-based layers."""
    cap = LayerCapture()
    handles = []

    def _prep(t: torch.Tensor) -> torch.Tensor:
        if detach:
            t = t.detach()
        if dtype is not None:
            t = t.to(dtype)
        if retain_grad and t.requires_grad:
            t.retain_grad()
        return t

    try:
        for k in sorted(set(layers)):
            block = arch.layer(k)

            def out_hook(_m, args, kwargs, output, k=k):
                if inputs:
                    h_in = args[0] if args else kwargs["hidden_states"]
                    cap.inputs[k] = _prep(h_in)
                cap.outputs[k] = _prep(_first_tensor(output))

            handles.append(block.register_forward_hook(out_hook, with_kwargs=True))
            if mlp:
                def mlp_hook(_m, _args, output, k=k):
                    cap.mlp_outputs[k] = _prep(_first_tensor(output))

                handles.append(arch.mlp(k).register_forward_hook(mlp_hook))
        yield cap
    finally:
        for h in handles:
            h.remove()


class _StopForward(Exception):
    pass


@contextlib.contextmanager
def stop_after_layer(arch: Internals, k: int) -> Iterator[None]:
    """Abort the forward pass right after block ``k`` (saves teacher compute above the deepest paired layer).

    Use with :func:`run_until`.
    """
    def hook(_m, _a, _o):
        raise _StopForward

    h = arch.layer(k).register_forward_hook(hook)
    try:
        yield
    finally:
        h.remove()


def run_until(arch: Internals, k: int, **forward_kwargs) -> None:
    """Run ``arch.model(**forward_kwargs)`` but stop after block ``k`` (captures must be set up by the caller)."""
    with stop_after_layer(arch, k):
        try:
            arch.model(**forward_kwargs)
        except _StopForward:
            pass


class _StopAtHead(Exception):
    pass


@contextlib.contextmanager
def _final_norm_output(arch: Internals) -> Iterator[dict]:
    """Capture the final norm's output and stop the forward there (the LM head then runs only where needed)."""
    box: dict[str, torch.Tensor] = {}

    def hook(_m, _a, out):
        box["h"] = out
        raise _StopAtHead

    h = arch.final_norm.register_forward_hook(hook)
    try:
        yield box
    finally:
        h.remove()


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions t whose next-token label (t + 1) is supervised."""
    m = torch.zeros_like(labels, dtype=torch.bool)
    m[:, :-1] = labels[:, 1:] != -100
    return m


def supervised_logits(arch: Internals, batch: dict[str, torch.Tensor]
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Logits only at the supervised positions: ``(logits [N, V], next-token targets [N], example index [N])``.

    The forward stops after the final norm and the LM head runs on the gathered positions, so no [B, T, V] tensor
    is ever made (151,936 x T floats per example on Qwen). A model whose forward never calls its final-norm module
    falls back to its full logits. The graph stays attached to activations captured by the caller's hooks.
    """
    ids, att, lab = batch["input_ids"], batch["attention_mask"], batch["labels"]
    pos = supervised_positions(lab)
    out = None
    with _final_norm_output(arch) as box:
        try:
            out = arch.model(input_ids=ids, attention_mask=att)
        except _StopAtHead:
            pass
    bi, ti = pos.nonzero(as_tuple=True)
    if "h" in box:
        logits = arch.lm_head(box["h"][bi, ti])
    else:
        logits = out.logits[bi, ti]
    return logits, lab[bi, ti + 1], bi


def run_to_input(arch: Internals, k: int, **forward_kwargs) -> torch.Tensor:
    """``h_{k-1}``: the hidden state entering block ``k`` (``k = L + 1``: the final norm's input, i.e. the last
    block's output), from ``arch.model(**forward_kwargs)`` stopped there; nothing above it runs."""
    module = arch.final_norm if k == arch.num_layers + 1 else arch.layer(k)
    box: list[torch.Tensor] = []

    def hook(_m, args, kwargs):
        box.append(args[0] if args else kwargs["hidden_states"])
        raise _StopForward

    h = module.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        arch.model(**forward_kwargs)
    except _StopForward:
        pass
    finally:
        h.remove()
    if not box:
        raise RuntimeError(f"the forward pass never reached block {k}")
    return box[0]
