"""SmoothQuant-style smoothing (Xiao et al. 2023): move activation outliers into the weights.

For a Linear fed by x, scaling input channel j of x by 1/s_j and column j of W by s_j leaves the
product unchanged; with s_j = max|x_j|^a / max|W_:j|^(1-a) per-token int8 activations lose less.
The 1/s is folded into what produces x: the RMSNorm weight (q/k/v, gate/up) or the up
projection's rows (down_proj, whose input is silu(gate) * up). The smoothed fp model computes
the same function as the original.
"""

from __future__ import annotations

import torch
from torch import nn

SMOOTHED_INPUTS = ("self_attn.q_proj", "mlp.gate_proj", "mlp.down_proj")


def _scales(absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)
    return (absmax.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_layer(layer: nn.Module, absmax: dict[str, torch.Tensor], alpha: float = 0.5) -> None:
    """Smooth one Llama decoder layer in place given input absmax per Linear name."""
    attn, mlp = layer.self_attn, layer.mlp
    pairs = ((layer.input_layernorm, [attn.q_proj, attn.k_proj, attn.v_proj], "self_attn.q_proj"),
             (layer.post_attention_layernorm, [mlp.gate_proj, mlp.up_proj], "mlp.gate_proj"))
    for norm, linears, key in pairs:
        s = _scales(absmax[key].to(norm.weight.device), [m.weight for m in linears], alpha)
        norm.weight.div_(s)
        for m in linears:
            m.weight.mul_(s[None, :])
    s = _scales(absmax["mlp.down_proj"].to(mlp.up_proj.weight.device), [mlp.down_proj.weight], alpha)
    mlp.up_proj.weight.div_(s[:, None])
    mlp.down_proj.weight.mul_(s[None, :])
