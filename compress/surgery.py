"""Structured surgery on Llama-family models: drop decoder layers, MLP channels, KV head groups.

Each function returns a new, physically smaller standard Hugging Face model whose config states
the new shapes, so `transformers` loads the result with no custom code. Uniform shapes across
layers are kept because the HF config has one intermediate size and one head count.
"""

from __future__ import annotations

import torch
from torch import nn


def _fresh(model: nn.Module, **overrides) -> nn.Module:
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict({**model.config.to_dict(), **overrides})
    return AutoModelForCausalLM.from_config(config, dtype=next(model.parameters()).dtype)


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """A copy with only decoder layers `keep` (embeddings, final norm and head copied)."""
    new = _fresh(model, num_hidden_layers=len(keep))
    state = {}
    for key, value in model.state_dict().items():
        if key.startswith("model.layers."):
            idx = int(key.split(".")[2])
            if idx in keep:
                state[key.replace(f"model.layers.{idx}.", f"model.layers.{keep.index(idx)}.", 1)] = value
        else:
            state[key] = value
    new.load_state_dict(state, strict=True)
    return new.eval()


def keep_mlp_channels(model: nn.Module, keep: list[torch.Tensor]) -> nn.Module:
    """Keep intermediate channels `keep[i]` (same count in every layer) of each layer's MLP."""
    sizes = {len(k) for k in keep}
    if len(sizes) != 1:
        raise ValueError("every layer must keep the same number of MLP channels")
    new = _fresh(model, intermediate_size=sizes.pop())
    state = model.state_dict()
    for i, idx in enumerate(keep):
        idx = torch.as_tensor(idx).sort().values
        p = f"model.layers.{i}.mlp."
        for name in ("gate_proj", "up_proj"):
            state[p + name + ".weight"] = state[p + name + ".weight"][idx]
        state[p + "down_proj.weight"] = state[p + "down_proj.weight"][:, idx]
    new.load_state_dict(state, strict=True)
    return new.eval()


def keep_kv_groups(model: nn.Module, keep: list[list[int]]) -> nn.Module:
    """Keep KV heads `keep[i]` of each layer, with the query heads that read them (GQA-aware)."""
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    per_group = cfg.num_attention_heads // cfg.num_key_value_heads
    sizes = {len(k) for k in keep}
    if len(sizes) != 1 or 0 in sizes:
        raise ValueError("every layer must keep the same, non-zero number of KV heads")
    kept = sizes.pop()
    new = _fresh(model, num_key_value_heads=kept, num_attention_heads=kept * per_group, head_dim=head_dim)
    state = model.state_dict()
    for i, groups in enumerate(keep):
        groups = sorted(groups)
        kv_rows = torch.cat([torch.arange(g * head_dim, (g + 1) * head_dim) for g in groups])
        q_heads = [g * per_group + j for g in groups for j in range(per_group)]
        q_rows = torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in q_heads])
        p = f"model.layers.{i}.self_attn."
        state[p + "q_proj.weight"] = state[p + "q_proj.weight"][q_rows]
        for name in ("k_proj", "v_proj"):
            state[p + name + ".weight"] = state[p + name + ".weight"][kv_rows]
        for name in ("q_proj", "k_proj", "v_proj"):
            bias = state.get(p + name + ".bias")
            if bias is not None:
                state[p + name + ".bias"] = bias[q_rows if name == "q_proj" else kv_rows]
        state[p + "o_proj.weight"] = state[p + "o_proj.weight"][:, q_rows]
    new.load_state_dict(state, strict=True)
    return new.eval()
