"""Layer-by-layer calibration: feed calibration windows through a decoder one layer at a time.

Shared by GPTQ (and later SparseGPT / Wanda): capture the inputs of the first decoder layer once,
then for each layer collect statistics of its Linear inputs, change the layer, and run it to get
the inputs of the next one, so later layers see the already-compressed outputs of earlier ones.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn


class _Stop(Exception):
    """Raised from a hook to end a forward pass early."""


@dataclass
class LayerBatch:
    hidden: torch.Tensor
    kwargs: dict[str, Any]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__}: no decoder layers at model.model.layers")
    return layers


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int) -> list[LayerBatch]:
    """The hidden states and keyword arguments the first decoder layer receives, per batch."""
    captured: list[LayerBatch] = []

    def grab(_module, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        rest = {k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "past_key_value")}
        rest["use_cache"] = False
        captured.append(LayerBatch(hidden.detach(), rest))
        raise _Stop

    handle = decoder_layers(model)[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, windows.shape[0], batch_size):
            with contextlib.suppress(_Stop):
                model(windows[start:start + batch_size], use_cache=False)
    finally:
        handle.remove()
    return captured


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[LayerBatch]) -> list[LayerBatch]:
    return [LayerBatch(_layer_output(layer(b.hidden, **b.kwargs)), b.kwargs) for b in batches]


@torch.no_grad()
def collect_input_stats(layer: nn.Module, batches: list[LayerBatch], names: Iterable[str],
                        want_hessian: bool = True) -> dict[str, dict[str, torch.Tensor]]:
    """For each named Linear: H = 2/n X^T X (if asked), sum of squares per input channel, absmax, count.

    The forward stops right after the last named module, so early groups cost a fraction of a layer.
    """
    names = list(names)
    stats: dict[str, dict[str, Any]] = {}
    order = {name: i for i, name in enumerate(n for n, _ in layer.named_modules())}
    last = max(names, key=order.__getitem__)
    handles = []

    def hook_for(name: str):
        def hook(_module, inputs, _output):
            x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
            s = stats.setdefault(name, {"count": 0, "sq": x.new_zeros(x.shape[1]),
                                        "absmax": x.new_zeros(x.shape[1])})
            if want_hessian:
                s.setdefault("xtx", x.new_zeros(x.shape[1], x.shape[1]))
                s["xtx"].addmm_(x.t(), x)
            s["sq"] += (x * x).sum(0)
            s["absmax"] = torch.maximum(s["absmax"], x.abs().amax(0))
            s["count"] += x.shape[0]
            if name == last:
                raise _Stop
        return hook

    for name in names:
        handles.append(layer.get_submodule(name).register_forward_hook(hook_for(name)))
    try:
        for b in batches:
            with contextlib.suppress(_Stop):
                layer(b.hidden, **b.kwargs)
    finally:
        for h in handles:
            h.remove()
    for s in stats.values():
        if want_hessian:
            s["hessian"] = s.pop("xtx") * (2.0 / s["count"])
    return stats


SEQUENTIAL_GROUPS = (
    ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"),
    ("self_attn.o_proj",),
    ("mlp.gate_proj", "mlp.up_proj"),
    ("mlp.down_proj",),
)


def sequential_groups(layer: nn.Module, true_sequential: bool = True) -> list[tuple[str, ...]]:
    """Groups of Linears that share inputs, in forward order (only those present in this layer)."""
    present = {name for name, m in layer.named_modules() if isinstance(m, nn.Linear)}
    groups = [tuple(n for n in g if n in present) for g in SEQUENTIAL_GROUPS]
    groups = [g for g in groups if g]
    known = {n for g in groups for n in g}
    if present - known:
        raise ValueError(f"unrecognised Linear layers in decoder layer: {sorted(present - known)}")
    return groups if true_sequential else [tuple(n for g in groups for n in g)]
