"""SmoothQuant-style smoothing (Xiao et al. 2023): move activation outliers into the weights.

For a Linear fed by x, scaling input channel j of x by 1/s_j and column j of W by s_j leaves the
product unchanged; with s_j = max|x_j|^a / max|W_:j|^(1-a) per-token int8 activations lose less.
The 1/s is folded into what produces x: the RMSNorm weight feeding q/k/v or gate/up (for
Gemma's (1 + w) norms, into 1 + w) or the up projection's rows (down_proj, whose input is
act(gate) * up; Phi-3's up rows are the second half of gate_up_proj). The smoothed fp model
computes the same function as the original.
"""

from __future__ import annotations

import torch
from torch import nn

from core.family import Family


def smoothed_inputs(family: Family) -> tuple[str, ...]:
    """One Linear per smoothable input (its absmax is the input's): attention, MLP in, MLP down."""
    return family.q_k_v[0], family.gate_up[0], family.down_proj


def _scales(absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float) -> torch.Tensor:
    w_max = torch.stack([w.detach().abs().amax(dim=0) for w in weights]).amax(dim=0).clamp(min=1e-5)
    return (absmax.clamp(min=1e-5).pow(alpha) / w_max.pow(1 - alpha)).clamp(min=1e-5)


@torch.no_grad()
def smooth_inputs(layer: nn.Module, family: Family, name: str, absmax: torch.Tensor, alpha: float = 0.5) -> None:
    """Smooth the input of Linear `name` (one of `smoothed_inputs`) in place, given that input's absmax."""
    if name == family.down_proj:
        down = layer.get_submodule(family.down_proj)
        up = layer.get_submodule(family.gate_up[-1])
        up_rows = up.weight[-down.in_features:]  # the fused gate_up's second half, or all of up_proj
        s = _scales(absmax.to(down.weight.device), [down.weight], alpha)
        up_rows.div_(s[:, None])
        if up.bias is not None:
            up.bias[-down.in_features:].div_(s)
        down.weight.mul_(s[None, :])
        return
    attention = name == family.q_k_v[0]
    norm = layer.get_submodule(family.attn_norm if attention else family.feeds_mlp)
    linears = [layer.get_submodule(n) for n in (family.q_k_v if attention else family.gate_up)]
    s = _scales(absmax.to(norm.weight.device), [m.weight for m in linears], alpha)
    offset = family.norm_offset
    norm.weight.copy_((norm.weight + offset) / s - offset)
    for m in linears:
        m.weight.mul_(s[None, :])
