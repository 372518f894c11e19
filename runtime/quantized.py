"""Quantized weights the runtime can load: the GPTQ v1 checkpoint layout and dynamic INT8.

GPTQ v1 layout (what GPTQModel, vLLM and TGI read): for a Linear of shape (out, in) and `b` bits,
`qweight` int32 (in * b / 32, out) packs input rows little-end first; `qzeros` int32
(groups, out * b / 32) packs (zero - 1) along the output dim; `scales` fp16 (groups, out);
`g_idx` int32 (in,) maps each input column to its group. A partial last group is valid
(in=576, group 128: 5 groups). W[o, i] = scales[g, o] * (q[i, o] - (stored_zero[g, o] + 1)), g = g_idx[i].
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from core.errors import UserError
from core.family import decoder_layers, family_of, layer_prefix, model_type_of

SUPPORTED_BITS = (4, 8)


def pack_rows(q: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack unsigned ints (rows, cols) along rows: (rows * bits / 32, cols) int32."""
    per = 32 // bits
    if q.shape[0] % per:
        raise ValueError(f"{q.shape[0]} rows is not a multiple of {per} (needed to pack {bits}-bit values)")
    q = q.to(torch.int64).view(q.shape[0] // per, per, q.shape[1])
    shifts = (torch.arange(per, dtype=torch.int64) * bits).view(1, per, 1)
    packed = (q << shifts).sum(dim=1)
    return (packed - ((packed >> 31) << 32)).to(torch.int32)  # two's complement into int32


def unpack_rows(packed: torch.Tensor, bits: int) -> torch.Tensor:
    per = 32 // bits
    shifts = (torch.arange(per, dtype=torch.int32, device=packed.device) * bits).view(1, per, 1)
    q = (packed.unsqueeze(1) >> shifts) & ((1 << bits) - 1)
    return q.reshape(packed.shape[0] * per, packed.shape[1])


def pack_cols(q: torch.Tensor, bits: int) -> torch.Tensor:
    return pack_rows(q.t().contiguous(), bits).t().contiguous()


def unpack_cols(packed: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_rows(packed.t().contiguous(), bits).t().contiguous()


def pack_gptq(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
              bits: int) -> dict[str, torch.Tensor]:
    """q (out, in) ints in [0, 2^bits); scales/zeros (groups, out); g_idx (in,) -> checkpoint tensors."""
    maxq = (1 << bits) - 1
    return {
        "qweight": pack_rows(q.t().contiguous(), bits),
        "qzeros": pack_cols((zeros.to(torch.int64) - 1) & maxq, bits),
        "scales": scales.to(torch.float16).contiguous(),
        "g_idx": g_idx.to(torch.int32).contiguous(),
    }


def dequantize_gptq(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor,
                    bits: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (out, in) weight the checkpoint stands for."""
    q = unpack_rows(qweight, bits)  # (in, out)
    zeros = (unpack_cols(qzeros, bits) + 1) & ((1 << (bits + 1)) - 1)  # (groups, out)
    g = g_idx.long()
    w = scales.float()[g] * (q.float() - zeros.float()[g])
    return w.t().contiguous().to(dtype)


class GPTQLinear(nn.Module):
    """A Linear stored in the GPTQ layout; dequantizes once and keeps the dense weight for speed.

    The dense copy trades memory for CPU speed on the PyTorch path; packed int4 kernels come from
    the ONNX export (MatMulNBits).
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group_size = in_features, out_features, bits, group_size
        groups = math.ceil(in_features / (group_size if group_size > 0 else in_features))
        per = 32 // bits
        self.register_buffer("qweight", torch.zeros(in_features // per, out_features, dtype=torch.int32))
        self.register_buffer("qzeros", torch.zeros(groups, out_features // per, dtype=torch.int32))
        self.register_buffer("scales", torch.zeros(groups, out_features, dtype=torch.float16))
        self.register_buffer("g_idx", torch.zeros(in_features, dtype=torch.int32))
        self.register_buffer("bias", torch.zeros(out_features, dtype=torch.float16) if bias else None)
        self._dense: torch.Tensor | None = None
        self.compute_dtype = torch.float32

    def logical_parameters(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    def dequantized(self) -> torch.Tensor:
        return dequantize_gptq(self.qweight, self.qzeros, self.scales, self.g_idx, self.bits, self.compute_dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._dense is None or self._dense.device != x.device:
            self._dense = self.dequantized().to(x.device)
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return nn.functional.linear(x.to(self._dense.dtype), self._dense, bias).to(x.dtype)


class Int8DynamicLinear(nn.Module):
    """Per-output-channel int8 weights, per-token dynamic int8 activations (symmetric).

    The arithmetic is exact integer products rescaled in fp32, emulated with fp32 matmuls on the CPU
    (the fast int8 CPU kernels live in ONNX Runtime); accuracy is what this module is for.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("weight_int8", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features, dtype=torch.float32))
        self.register_buffer("bias", torch.zeros(out_features) if bias else None)
        self._w: torch.Tensor | None = None

    def logical_parameters(self) -> int:
        return self.in_features * self.out_features + (self.out_features if self.bias is not None else 0)

    @staticmethod
    def quantize_tokens(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scale = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0
        return torch.round(x / scale).clamp(-127, 127), scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._w is None or self._w.device != x.device:
            self._w = self.weight_int8.to(device=x.device, dtype=torch.float32)
        xq, xs = self.quantize_tokens(x.float())
        y = nn.functional.linear(xq, self._w) * xs * self.weight_scale
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def quantize_int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = weight.abs().amax(dim=1).clamp(min=1e-8) / 127.0
    q = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scale.float()


def _replace(model: nn.Module, names: list[str], make) -> None:
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        old = getattr(parent, child)
        setattr(parent, child, make(old))


def quantized_module_names(model: nn.Module, config: dict[str, Any]) -> list[str]:
    """Linear layers the quantization_config covers: the decoder projections its family names; never lm_head."""
    family = family_of(model.config)
    if family is None:
        raise UserError(f"model_type {model_type_of(model.config)!r}: no decoder-family adapter, so its quantized "
                        "Linears are unknown")
    skip = set(config.get("modules_to_not_convert") or [])
    names = [layer_prefix(i) + n for i in range(len(decoder_layers(model))) for n in family.linear_names]
    return [n for n in names if n not in skip]


def build_quantized_model(config_dict: dict[str, Any]) -> nn.Module:
    """An empty model whose target Linears are replaced by quantized modules (weights to be loaded)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    quant = dict(config_dict["quantization_config"])
    plain = {k: v for k, v in config_dict.items() if k not in ("quantization_config", "transformers_version")}
    config = AutoConfig.for_model(**plain)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    names = quantized_module_names(model, quant)
    method = quant.get("quant_method")
    if method == "gptq":
        _replace(model, names, lambda m: GPTQLinear(m.in_features, m.out_features, quant["bits"],
                                                    quant["group_size"], m.bias is not None))
    elif method == "shrinkwrap-int8-dynamic":
        _replace(model, names, lambda m: Int8DynamicLinear(m.in_features, m.out_features, m.bias is not None))
    else:
        raise ValueError(f"unsupported quant_method {method!r}")
    return model


def load_quantized_model(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load a GPTQ (v1 layout) or dynamic-INT8 artifact for the PyTorch path."""
    from safetensors.torch import load_file

    path = Path(path)
    config_dict = json.loads((path / "config.json").read_text(encoding="utf-8"))
    model = build_quantized_model(config_dict)
    state = {}
    for file in sorted(path.glob("*.safetensors")):
        state.update(load_file(file))
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and model.config.tie_word_embeddings)]
    if missing or unexpected:
        raise ValueError(f"{path}: checkpoint does not match the model (missing {missing[:3]}, "
                         f"unexpected {unexpected[:3]})")
    model.tie_weights()
    return model.eval().to(device)
