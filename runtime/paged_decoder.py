"""Our forward for decoder-only models over the paged KV cache, for every family `core.family` describes.

The weights stay in the Hugging Face modules (so fp32/bf16/GPTQ/INT8 layers all work); only the
attention bookkeeping is ours: new tokens of many sequences run as one flat batch through the
projections and MLPs, and attend per sequence to their own blocks. The family adapter supplies
what differs between architectures (fused or biased projections, q/k norms, sandwich norms,
sliding windows, soft-capping).
"""

from __future__ import annotations

import torch

from core.family import (
    attend,
    attention_mask,
    attn_softcap,
    final_logits,
    head_dim,
    kv_heads,
    layer_rotary,
    layer_tail,
    project_qkv,
    require,
    rotary_tables,
    rotate,
    sliding_window,
)
from runtime.kv_cache import BlockPool, Sequence


class PagedDecoder:
    def __init__(self, model: torch.nn.Module, block_size: int = 16, num_blocks: int = 1024):
        cfg = model.config
        self.family = require(cfg, "generate.paged")
        self.model = model.eval()
        self.config = cfg
        self.head_dim, self.heads, self.kv_heads = head_dim(cfg), cfg.num_attention_heads, kv_heads(cfg)
        self.windows = [sliding_window(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.softcap = attn_softcap(cfg)
        param = next(model.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        self.device = param.device
        self.pool = BlockPool(num_blocks, block_size, cfg.num_hidden_layers, self.kv_heads, self.head_dim,
                              dtype=dtype, device=self.device)

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], last_only: bool | list[bool] = True, ends: list[int] | None = None
                ) -> list[torch.Tensor]:
        """Run each sequence's not-yet-cached tokens (up to `ends`, for chunked prefill); logits per sequence
        (of its last new token, or of all of them; `last_only` may differ per sequence)."""
        inner = self.model.model
        spans = [(s, s.cached, len(s.tokens) if ends is None else ends[i]) for i, s in enumerate(seqs)]
        for s, _, end in spans:
            self.pool.reserve(s, end)
        ids = torch.tensor([t for s, a, b in spans for t in s.tokens[a:b]], device=self.device)
        positions = torch.cat([torch.arange(a, b) for _, a, b in spans]).to(self.device)
        n = ids.numel()
        new_slots = [self.pool.slots(s, a, b) for s, a, b in spans]
        all_slots = [self.pool.slots(s, 0, b) for s, _, b in spans]
        masks = {w: [attention_mask(torch.arange(a, b, device=self.device), torch.arange(b, device=self.device), w)
                     for _, a, b in spans] for w in set(self.windows)}
        x = inner.embed_tokens(ids)[None]
        tables = rotary_tables(self.model, x, positions[None])
        for li, layer in enumerate(inner.layers):
            attn = layer.self_attn
            cos, sin = (t[:, None] for t in layer_rotary(self.model, tables, li))
            q, k, v = (t.transpose(1, 2) for t in project_qkv(self.family, attn, layer.input_layernorm(x),
                                                             self.heads, self.kv_heads, self.head_dim))
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            outs, offset = [], 0
            for i, (_, a, b) in enumerate(spans):
                m = b - a
                self.pool.write(li, new_slots[i], k[0, :, offset:offset + m].transpose(0, 1),
                                v[0, :, offset:offset + m].transpose(0, 1))
                keys, values = self.pool.read(li, all_slots[i])
                outs.append(attend(q[:, :, offset:offset + m], keys.transpose(0, 1)[None].to(q.dtype),
                                   values.transpose(0, 1)[None].to(q.dtype), masks[self.windows[li]][i],
                                   attn.scaling, self.softcap))
                offset += m
            o = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, n, self.heads * self.head_dim)
            x = layer_tail(self.family, layer, x, o)
        x = inner.norm(x)[0]
        results, offset = [], 0
        for i, (s, a, b) in enumerate(spans):
            last = last_only[i] if isinstance(last_only, list) else last_only
            rows = x[offset + (b - a) - 1: offset + (b - a)] if last else x[offset: offset + (b - a)]
            results.append(final_logits(self.model, rows))
            offset += b - a
            s.cached = b
        return results
