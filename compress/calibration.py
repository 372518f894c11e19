"""Layer-by-layer calibration: feed calibration windows through a decoder one layer at a time.

`calibrate` is the one walk GPTQ/RTN, SmoothQuant, Wanda/SparseGPT, magnitude pruning and the
importance scores of structured pruning share: capture the inputs of the first decoder layer
once, then for each layer collect statistics of its Linear inputs, change the layer, and run it
to get the inputs of the next one, so later layers see the already-compressed outputs of earlier
ones. The layer groups come from the model's family (`core.family`).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from core.config import field
from core.data import load_split_or_file, sample_windows, texts_hash, tokenize_joined
from core.errors import UserError
from core.family import Family, decoder_layers


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
    kwargs: dict[str, dict[str, Any]]  # per layer type ("" when all layers share their arguments)


OnGroup = Callable[[int, nn.Module, tuple[str, ...], dict[str, dict[str, torch.Tensor]]], None]
OnLayer = Callable[[int, list[LayerBatch], list[LayerBatch]], None]


def _layer_type(model: nn.Module, index: int) -> str:
    types = getattr(model.config, "layer_types", None)
    return types[index] if types else ""


def _to(value: Any, device: torch.device | str) -> Any:
    if isinstance(value, torch.Tensor):
        return value.to(device=device, dtype=torch.float32 if value.is_floating_point() else value.dtype)
    if isinstance(value, tuple | list):
        return type(value)(_to(v, device) for v in value)
    return value


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, windows: torch.Tensor, batch_size: int, device: str = "cpu"
                         ) -> list[LayerBatch]:
    """The hidden states the first decoder layer receives, and the keyword arguments (masks, rotary
    tables) the first layer of each layer type receives, per batch, in fp32 on `device`.

    The model's forward runs where the model lies, only up to the first layer of the last type.
    """
    layers = decoder_layers(model)
    firsts: dict[str, int] = {}
    for i in range(len(layers)):
        firsts.setdefault(_layer_type(model, i), i)
    last = max(firsts.values())
    captured: list[LayerBatch] = []

    def grab_for(index: int):
        def grab(_module, args, kwargs):
            if index == 0:
                hidden = args[0] if args else kwargs["hidden_states"]
                captured.append(LayerBatch(_to(hidden.detach(), device), {}))
            rest = {k: _to(v, device) for k, v in kwargs.items()
                    if k not in ("hidden_states", "past_key_values", "past_key_value", "cache")}
            rest["use_cache"] = False
            captured[-1].kwargs[_layer_type(model, index)] = rest
            if index == last:
                raise _Stop
        return grab

    handles = [layers[i].register_forward_pre_hook(grab_for(i), with_kwargs=True) for i in sorted(set(firsts.values()))]
    home = next(model.parameters()).device
    try:
        for start in range(0, windows.shape[0], batch_size):
            with contextlib.suppress(_Stop):
                model(windows[start:start + batch_size].to(home), use_cache=False)
    finally:
        for h in handles:
            h.remove()
    return captured


def _layer_output(out: Any) -> torch.Tensor:
    return out[0] if isinstance(out, tuple | list) else out


@torch.no_grad()
def run_layer(layer: nn.Module, batches: list[LayerBatch], layer_type: str = "") -> list[LayerBatch]:
    return [LayerBatch(_layer_output(layer(b.hidden, **b.kwargs[layer_type])), b.kwargs) for b in batches]


@torch.no_grad()
def collect_input_stats(layer: nn.Module, batches: list[LayerBatch], names: Iterable[str],
                        want_hessian: bool = True, layer_type: str = "") -> dict[str, dict[str, torch.Tensor]]:
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
                layer(b.hidden, **b.kwargs[layer_type])
    finally:
        for h in handles:
            h.remove()
    for s in stats.values():
        if want_hessian:
            s["hessian"] = s.pop("xtx") * (2.0 / s["count"])
    return stats


@contextlib.contextmanager
def on_device(layer: nn.Module, device: str | torch.device, keep_changes: bool = True) -> Iterator[nn.Module]:
    """The layer in fp32 on the working device for the duration; back where and as it was after.

    With `keep_changes=False` the layer gets its original tensors back (what the step changed is kept
    elsewhere, e.g. GPTQ's packed integers): no copy of the layer is made at home, and weights that
    were memory-mapped from the checkpoint stay so."""
    param = next(layer.parameters())
    home, dtype = param.device, param.dtype
    originals = None if keep_changes else {name: p.data for name, p in layer.named_parameters()}
    layer.to(device=device, dtype=torch.float32)
    try:
        yield layer
    finally:
        if originals is None:
            layer.to(device=home, dtype=dtype)
        else:
            for name, p in layer.named_parameters():
                p.data = originals[name]


def calibrate(model: nn.Module, windows: torch.Tensor | None, family: Family, on_group: OnGroup, *,
              batch_size: int = 8, device: str | torch.device = "cpu", stats: str | None = "hessian",
              groups: Sequence[tuple[str, ...]] | None = None, true_sequential: bool = True,
              on_layer: OnLayer | None = None, desc: str = "calibration", keep_changes: bool = True) -> None:
    """The one sequential walk over decoder layers that every calibrated step uses.

    Each layer in turn is brought to `device` in fp32 (the rest of the model stays where it is:
    memory is the model at rest plus one working layer and its activations). For each group of
    Linears (the family's forward order, or `groups`), the inputs' statistics are collected on the
    current layer (`stats`: "hessian", "sq" for sums of squares and absmax only, or None) and
    `on_group(layer_index, layer, names, stats)` may change the layer; then the layer runs to give
    the next layer its inputs, so later layers see the already-changed earlier ones. `on_layer`
    sees each layer's inputs and outputs. Without windows (RTN, magnitude) only `on_group` runs.
    `keep_changes=False`: the model at home keeps its original weights (see `on_device`).
    """
    layers = decoder_layers(model)
    todo = list(groups if groups is not None else family.linear_groups)
    if not true_sequential:
        todo = [tuple(n for g in todo for n in g)]
    batches = capture_layer_inputs(model, windows, batch_size, device) if windows is not None else None
    for i, layer in enumerate(tqdm(layers, desc=desc, unit="layer")):
        kind = _layer_type(model, i)
        with on_device(layer, device, keep_changes):
            for group in todo:
                found = {} if batches is None or stats is None else collect_input_stats(
                    layer, batches, group, want_hessian=stats == "hessian", layer_type=kind)
                on_group(i, layer, group, found)
            if batches is not None and (on_layer is not None or i + 1 < len(layers)):
                out = run_layer(layer, batches, kind)
                if on_layer is not None:
                    on_layer(i, batches, out)
                batches = out
