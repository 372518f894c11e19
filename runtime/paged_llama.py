"""Our forward for Llama-family models over the paged KV cache.

The weights stay in the Hugging Face modules (so fp32/bf16/GPTQ/INT8 layers all work); only the
attention bookkeeping is ours: new tokens of many sequences run as one flat batch through the
projections and MLPs, and attend per sequence to their own blocks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from runtime.kv_cache import BlockPool, Sequence


class PagedLlama:
    def __init__(self, model: torch.nn.Module, block_size: int = 16, num_blocks: int = 1024):
        cfg = model.config
        self.model = model.eval()
        self.config = cfg
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
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
        masks = [torch.arange(b, device=self.device)[None, :] <= torch.arange(a, b, device=self.device)[:, None]
                 for _, a, b in spans]
        x = inner.embed_tokens(ids)[None]
        cos, sin = inner.rotary_emb(x, positions[None])
        for li, layer in enumerate(inner.layers):
            attn = layer.self_attn
            h = layer.input_layernorm(x)
            q = attn.q_proj(h).view(1, n, self.heads, self.head_dim).transpose(1, 2)
            k = attn.k_proj(h).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            v = attn.v_proj(h).view(1, n, self.kv_heads, self.head_dim).transpose(1, 2)
            q, k = apply_rotary_pos_emb(q, k, cos, sin)
            outs, offset = [], 0
            for i, (_, a, b) in enumerate(spans):
                m = b - a
                self.pool.write(li, new_slots[i], k[0, :, offset:offset + m].transpose(0, 1),
                                v[0, :, offset:offset + m].transpose(0, 1))
                keys, values = self.pool.read(li, all_slots[i])
                outs.append(F.scaled_dot_product_attention(
                    q[:, :, offset:offset + m], keys.transpose(0, 1)[None].to(q.dtype),
                    values.transpose(0, 1)[None].to(q.dtype), attn_mask=masks[i], scale=attn.scaling,
                    enable_gqa=True))
                offset += m
            o = torch.cat(outs, dim=2).transpose(1, 2).reshape(1, n, self.heads * self.head_dim)
            x = x + attn.o_proj(o)
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        x = inner.norm(x)[0]
        results, offset = [], 0
        for i, (s, a, b) in enumerate(spans):
            last = last_only[i] if isinstance(last_only, list) else last_only
            rows = x[offset + (b - a) - 1: offset + (b - a)] if last else x[offset: offset + (b - a)]
            results.append(self.model.lm_head(rows).float())
            offset += b - a
            s.cached = b
        return results
