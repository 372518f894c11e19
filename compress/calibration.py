"""Layer-by-layer calibration: feed calibration windows through a decoder one layer at a time.

Shared by GPTQ (and later SparseGPT / Wanda): capture the inputs of the first decoder layer once,
then for each layer collect statistics of its Linear inputs, change the layer, and run it to get
the inputs of the next one, so later layers see the already-compressed outputs of earlier ones.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from runtime.config import field
from runtime.errors import UserError
from train.data import load_split_or_file, sample_windows, texts_hash, tokenize_joined


@dataclass
class CalibrationFlags:
    """The calibration flags every calibrated step shares (quantize, prune)."""

    calibration: str | None = field(None, help="calibration file (.txt/.jsonl/.parquet; default: corpus train split)")
    text_field: str = field("text", help="text field of a JSONL/Parquet calibration file")
    n_samples: int = field(128, help="calibration windows")
    seq_len: int = field(512, help="tokens per calibration window")
    batch_size: int = field(8, help="calibration windows per forward pass")
    seed: int = field(0, help="seed for sampling calibration windows")

    def validate_calibration(self) -> None:
        for name in ("n_samples", "seq_len", "batch_size"):
            if getattr(self, name) < 1:
                raise UserError(f"{name}: must be positive, got {getattr(self, name)}")
        if self.calibration is not None:
            if not Path(self.calibration).is_file():
                raise UserError(f"calibration: file not found: {self.calibration}")
            if Path(self.calibration).stat().st_size == 0:
                raise UserError(f"calibration: file is empty: {self.calibration}")


def calibration_windows(flags: CalibrationFlags, tokenizer: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Random windows from the calibration text, and what the manifest records about them."""
    texts = load_split_or_file(flags.calibration, "train", flags.text_field)
    windows = sample_windows(tokenize_joined(tokenizer, texts), flags.n_samples, flags.seq_len, flags.seed)
    info = {"source": flags.calibration or "lee_background.cor articles 0-199", "texts_sha256": texts_hash(texts),
            "windows_sha256": hashlib.sha256(windows.numpy().tobytes()).hexdigest(),
            "n_samples": flags.n_samples, "seq_len": flags.seq_len, "seed": flags.seed}
    return windows, info


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
