"""Decoder families: what every step needs to know about an architecture, keyed by `model_type`.

One table instead of the Llama layout written into each step. A `Family` names the decoder
layers, the Linear groups in forward order (true-sequential calibration), the norm -> Linear
pairs (smoothing), the fused layouts (Phi-3's qkv_proj and gate_up_proj), and the features a
forward of our own must honour: q/k norms, (1 + w) norms, sandwich norms, scaled embeddings,
soft-capping, sliding windows, partial rotary. `STEP_SUPPORT` says which steps run for which
family; `require(config, step)` refuses an unsupported pair before any work, in one line.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from core.errors import UserError

ATTN, MLP = "self_attn", "mlp"


@dataclass(frozen=True)
class Family:
    name: str
    q_k_v: tuple[str, ...] = (f"{ATTN}.q_proj", f"{ATTN}.k_proj", f"{ATTN}.v_proj")
    out_proj: str = f"{ATTN}.o_proj"
    gate_up: tuple[str, ...] = (f"{MLP}.gate_proj", f"{MLP}.up_proj")
    down_proj: str = f"{MLP}.down_proj"
    attn_norm: str = "input_layernorm"
    mlp_norm: str = "post_attention_layernorm"
    # Gemma: post_attention_layernorm normalises the attention output; pre_feedforward feeds the MLP
    sandwich_norms: bool = False
    norm_offset: float = 0.0  # Gemma's RMSNorm multiplies by (1 + w)
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head's q and k before rotary
    scaled_embedding: bool = False  # Gemma: embeddings times sqrt(hidden)
    rope_per_layer_type: bool = False  # Gemma 3: local and global layers have their own rotary base
    # onnxruntime-genai 0.18's builder reads this family right (else the torch.onnx exporter runs: fp32/int8 only)
    onnx_builder: bool = True

    @property
    def fused_qkv(self) -> bool:
        return len(self.q_k_v) == 1

    @property
    def fused_gate_up(self) -> bool:
        return len(self.gate_up) == 1

    @property
    def linear_groups(self) -> tuple[tuple[str, ...], ...]:
        """Linears that share an input, in forward order."""
        return (self.q_k_v, (self.out_proj,), self.gate_up, (self.down_proj,))

    @property
    def linear_names(self) -> tuple[str, ...]:
        return tuple(n for g in self.linear_groups for n in g)

    @property
    def feeds_mlp(self) -> str:
        """The norm whose output is the MLP's input."""
        return "pre_feedforward_layernorm" if self.sandwich_norms else self.mlp_norm


FAMILIES: dict[str, Family] = {
    "llama": Family("llama"),
    "mistral": Family("mistral"),  # sliding-window attention
    "qwen2": Family("qwen2"),  # q/k/v biases, optional sliding window
    "qwen3": Family("qwen3", qk_norm=True),
    "gemma2": Family("gemma2", sandwich_norms=True, norm_offset=1.0, scaled_embedding=True),  # + soft-capping
    "gemma3_text": Family("gemma3_text", sandwich_norms=True, norm_offset=1.0, scaled_embedding=True, qk_norm=True,
                          rope_per_layer_type=True, onnx_builder=False),
    "phi3": Family("phi3", q_k_v=(f"{ATTN}.qkv_proj",), gate_up=(f"{MLP}.gate_up_proj",),
                   onnx_builder=False),  # + partial rotary
}

# The steps every family is checked on, as the CLI names them. A reason refuses the pair.
STEPS = ("reference", "quantize.gptq", "quantize.rtn", "quantize.dynamic-int8", "prune.layers", "prune.mlp",
         "prune.heads", "prune.wanda", "prune.sparsegpt", "distill", "export.onnx", "export.tensorrt_llm",
         "generate.paged", "generate.static", "serve")
_TRT = "the TensorRT-LLM exporter writes the Llama layout only (TensorRT-LLM's other converters are not mirrored)"
_GENERIC_OK = ("reference", "quantize.fp16", "quantize.bf16", "export.onnx")  # and distill with init: config
STEP_SUPPORT: dict[str, dict[str, str]] = {  # family -> step -> reason it is refused
    "llama": {},
    "mistral": {"export.tensorrt_llm": _TRT},
    "qwen2": {"export.tensorrt_llm": _TRT},
    "qwen3": {"export.tensorrt_llm": _TRT},
    "gemma2": {"export.tensorrt_llm": _TRT},
    "gemma3_text": {"export.tensorrt_llm": _TRT},
    "phi3": {"export.tensorrt_llm": _TRT},
}


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if isinstance(config, dict) else getattr(config, key, default)


def model_type_of(config: Any) -> str:
    return str(_get(config, "model_type") or "?")


def family_of(config: Any) -> Family | None:
    """The family of a config (object or dict), or None for an architecture we do not describe."""
    return FAMILIES.get(model_type_of(config))


def supported(config: Any, step: str) -> str | None:
    """None if `step` runs for this config's family, else the reason it does not."""
    model_type = model_type_of(config)
    if model_type not in FAMILIES:
        if step in _GENERIC_OK:
            return None
        known = ", ".join(FAMILIES)
        return f"no decoder-family adapter for it (known: {known}); this step needs one"
    return STEP_SUPPORT[model_type].get(step)


def require(config: Any, step: str) -> Family | None:
    """The family, or a one-line refusal naming the family and the step, before any work is done."""
    reason = supported(config, step)
    if reason is not None:
        raise UserError(f"model_type {model_type_of(config)!r}: {step} is not supported: {reason}")
    return family_of(config)


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    layers = getattr(getattr(model, "model", None), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise UserError(f"{type(model).__name__}: no decoder layers at model.layers")
    return layers


def layer_prefix(index: int) -> str:
    return f"model.layers.{index}."


# --- shapes and attention features read from the config (an object or its dict) ------------------------

def head_dim(config: Any) -> int:
    return _get(config, "head_dim") or _get(config, "hidden_size") // _get(config, "num_attention_heads")


def kv_heads(config: Any) -> int:
    return _get(config, "num_key_value_heads") or _get(config, "num_attention_heads")


def sliding_window(config: Any, layer: int) -> int | None:
    """Keys a query at position p sees in this layer: positions > p - window (None: all)."""
    window = _get(config, "sliding_window")
    if not window:
        return None
    types = _get(config, "layer_types")
    if types:
        return window if types[layer] == "sliding_attention" else None
    return window if model_type_of(config) == "mistral" else None


def attn_softcap(config: Any) -> float | None:
    return _get(config, "attn_logit_softcapping") or None


def final_softcap(config: Any) -> float | None:
    return _get(config, "final_logit_softcapping") or None


def activation(config: Any) -> str:
    return _get(config, "hidden_activation") or _get(config, "hidden_act", "silu")


# --- the pieces of a layer's forward our own runtimes compute -------------------------------------

def project_qkv(family: Family, attn: nn.Module, h: torch.Tensor, heads: int, kv: int, dim: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (…, heads, dim), k and v (…, kv, dim) from the layer's own modules (biases, fused qkv, q/k norms)."""
    if family.fused_qkv:
        qkv = attn.get_submodule(family.q_k_v[0].split(".", 1)[1])(h)
        q, k, v = qkv.split([heads * dim, kv * dim, kv * dim], dim=-1)
    else:
        q, k, v = (attn.get_submodule(n.split(".", 1)[1])(h) for n in family.q_k_v)
    q, k, v = (t.unflatten(-1, (-1, dim)) for t in (q, k, v))
    if family.qk_norm:
        q, k = attn.q_norm(q), attn.k_norm(k)
    return q, k, v


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX-style rotary on the first cos.shape[-1] dims (the rest pass through: partial rotary)."""
    rot = cos.shape[-1]
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    half = rot // 2
    rotated = torch.cat([-x_rot[..., half:], x_rot[..., :half]], dim=-1)
    out = x_rot * cos + rotated * sin
    return out if x_pass.shape[-1] == 0 else torch.cat([out, x_pass], dim=-1)


def rotary_tables(model: nn.Module, x: torch.Tensor, positions: torch.Tensor
                  ) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """cos/sin per layer type ("" when every layer shares one)."""
    inner, config = model.model, model.config
    family = family_of(config)
    if family is not None and family.rope_per_layer_type:
        return {t: inner.rotary_emb(x, positions, t) for t in sorted(set(config.layer_types))}
    return {"": inner.rotary_emb(x, positions)}


def layer_rotary(model: nn.Module, tables: dict[str, tuple[torch.Tensor, torch.Tensor]], layer: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    return tables[""] if "" in tables else tables[model.config.layer_types[layer]]


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None) -> torch.Tensor:
    """Causal (and sliding-window) mask, True = attend: (queries, keys)."""
    mask = k_pos[None, :] <= q_pos[:, None]
    if window is not None:
        mask &= k_pos[None, :] > q_pos[:, None] - window
    return mask


def sdpa_without_cudnn(cudnn: bool = False):
    """SDPA's backends but cuDNN's: it builds an execution plan per new shape (tens of ms on the H200), and
    decoding steps bring a new one every time (True: let it, for benchmarks)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
    return sdpa_kernel(backends + [SDPBackend.CUDNN_ATTENTION] * cudnn)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float,
           softcap: float | None) -> torch.Tensor:
    """Attention over (B, H, T, D) with GQA; soft-capped logits (Gemma 2) need the explicit form."""
    if softcap is None:
        return torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=True)
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = torch.tanh(scores / softcap) * softcap
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)  # a fully masked (padding) row stays finite
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def layer_tail(family: Family, layer: nn.Module, x: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
    """Residual stream after a layer, given its attention output (before o_proj is applied here)."""
    o = layer.self_attn.get_submodule(family.out_proj.split(".", 1)[1])(attn_out)
    if family.sandwich_norms:
        x = x + layer.post_attention_layernorm(o)
        return x + layer.post_feedforward_layernorm(layer.mlp(layer.pre_feedforward_layernorm(x)))
    x = x + o
    return x + layer.mlp(layer.post_attention_layernorm(x))


def final_logits(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    logits = model.lm_head(hidden).float()
    cap = final_softcap(model.config)
    return logits if cap is None else torch.tanh(logits / cap) * cap
