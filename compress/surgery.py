"""Structured surgery on decoder models: drop decoder layers, MLP channels, KV head groups.

Each function returns a new, physically smaller standard Hugging Face model whose config states
the new shapes, so `transformers` loads the result with no custom code. Uniform shapes across
layers are kept because the HF config has one intermediate size and one head count. The family
adapter says where the projections are (separate or fused, with or without biases).
"""

from __future__ import annotations

import torch
from torch import nn

from core.family import Family, head_dim, kv_heads, layer_prefix


def _fresh(model: nn.Module, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict({**model.config.to_dict(), **overrides})
    return AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)


def _take(state: dict[str, torch.Tensor], name: str, rows: torch.Tensor | None = None,
          cols: torch.Tensor | None = None) -> None:
    """Keep `rows` (and the bias entries) and/or `cols` of Linear `name`'s weight, in place in `state`."""
    if rows is not None:
        state[name + ".weight"] = state[name + ".weight"][rows]
        if name + ".bias" in state:
            state[name + ".bias"] = state[name + ".bias"][rows]
    if cols is not None:
        state[name + ".weight"] = state[name + ".weight"][:, cols]


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy with only decoder layers `keep` (embeddings, final norm and head copied; per-layer
    attention types, such as Gemma's sliding/full alternation, follow their layers)."""
    overrides: dict = {"num_hidden_layers": len(keep)}
    if getattr(model.config, "layer_types", None):
        overrides["layer_types"] = [model.config.layer_types[i] for i in keep]
    new = _fresh(model, **overrides)
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            idx = int(key.split(".")[2])
            if idx in keep:
                state[key.replace(layer_prefix(idx), layer_prefix(keep.index(idx)), 1)] = value
        else:
            state[key] = value
    new.load_state_dict(state, strict=True)
    return new.eval()


def keep_mlp_channels(model: nn.Module, keep: list[torch.Tensor], family: Family) -> nn.Module:
    """Keep intermediate channels `keep[i]` (same count in every layer) of each layer's MLP."""
    sizes = {len(k) for k in keep}
    if len(sizes) != 1:
        raise ValueError("every layer must keep the same number of MLP channels")
    new = _fresh(model, intermediate_size=sizes.pop())
    inter = model.config.intermediate_size
    state = model.state_dict()
    for i, idx in enumerate(keep):
        idx = torch.as_tensor(idx).sort().values
        p = layer_prefix(i)
        if family.fused_gate_up:  # rows [0, inter) are the gate, [inter, 2 inter) the up projection
            _take(state, p + family.gate_up[0], rows=torch.cat([idx, idx + inter]))
        else:
            for name in family.gate_up:
                _take(state, p + name, rows=idx)
        _take(state, p + family.down_proj, cols=idx)
    new.load_state_dict(state, strict=True)
    return new.eval()


def keep_kv_groups(model: nn.Module, keep: list[list[int]], family: Family) -> nn.Module:
    """Keep KV heads `keep[i]` of each layer, with the query heads that read them (GQA-aware)."""
    cfg = model.config
    dim, n_kv = head_dim(cfg), kv_heads(cfg)
    per_group = cfg.num_attention_heads // n_kv
    sizes = {len(k) for k in keep}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError("every layer must keep the same, non-zero number of KV heads")
    kept = sizes.pop()
    new = _fresh(model, num_key_value_heads=kept, num_attention_heads=kept * per_group, head_dim=dim)
    state = model.state_dict()

    def rows(heads: list[int], offset: int = 0) -> torch.Tensor:
        return torch.cat([torch.arange(offset + h * dim, offset + (h + 1) * dim) for h in heads])

    for i, groups in enumerate(keep):
        groups = sorted(groups)
        q_heads = [g * per_group + j for g in groups for j in range(per_group)]
        p = layer_prefix(i)
        if family.fused_qkv:  # rows: all q heads, then k heads, then v heads
            q_size, kv_size = cfg.num_attention_heads * dim, n_kv * dim
            _take(state, p + family.q_k_v[0], rows=torch.cat([rows(q_heads), rows(groups, q_size),
                                                               rows(groups, q_size + kv_size)]))
        else:
            q, k, v = family.q_k_v
            _take(state, p + q, rows=rows(q_heads))
            _take(state, p + k, rows=rows(groups))
            _take(state, p + v, rows=rows(groups))
        _take(state, p + family.out_proj, cols=rows(q_heads))
    new.load_state_dict(state, strict=True)
    return new.eval()
