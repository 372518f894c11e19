"""An independent reader of TensorRT-LLM's Llama checkpoint: the forward pass as TensorRT-LLM defines it,
in numpy, from `config.json` and the rank files alone (no Shrinkwrap, no transformers).

What it encodes (TensorRT-LLM 1.2.x, `tensorrt_llm/models/llama/model.py` and `layers/`): RMSNorm
x * rsqrt(mean(x^2) + norm_epsilon) * w; Attention with a fused qkv Linear whose output is q | k | v
for this rank's heads; rotary `rope_gpt_neox` (the two halves of each head rotated, rotary_base);
GatedMLP proj(act(fc(x)) * gate(x)); row-parallel layers (dense, proj) summed over the ranks; the
LM head split over the (padded) vocabulary. Groupwise weight-only layers (W4A16_GPTQ / W8A16_GPTQ,
before TensorRT-LLM's GPU layout step) hold signed integers [K, N], `weights_scaling_factor` and
`zero` [K / group, N]: w = q * scale + zero.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file


class Reader:
    def __init__(self, folder: str | Path, swap_fc_gate: bool = False):
        folder = Path(folder)
        self.config = json.loads((folder / "config.json").read_text())
        tp = self.config["mapping"]["tp_size"]
        names = [folder / f"rank{r}.safetensors" for r in range(tp)]
        if not names[0].exists():
            names = [folder / f"rank{r}.prelayout.safetensors" for r in range(tp)]
        self.ranks = [{k: v.astype(np.float32) if v.dtype != np.int8 else v for k, v in load_file(n).items()}
                      for n in names]
        self.swap = swap_fc_gate
        q = self.config["quantization"]
        self.group = q.get("group_size") if q.get("quant_algo") else None

    def weight(self, rank: int, name: str) -> np.ndarray:
        """[out, in] for this rank, dequantized when groupwise-quantized."""
        t = self.ranks[rank]
        w = t[f"{name}.weight"]
        if w.dtype != np.int8:
            return w
        scale, zero = t[f"{name}.weights_scaling_factor"], t[f"{name}.zero"]
        groups = np.arange(w.shape[0]) // self.group
        return (w.astype(np.float32) * scale[groups] + zero[groups]).T

    def norm(self, x: np.ndarray, w: np.ndarray) -> np.ndarray:
        eps = self.config["norm_epsilon"]
        return x / np.sqrt((x * x).mean(-1, keepdims=True) + eps) * w

    def rope(self, x: np.ndarray, positions: np.ndarray) -> np.ndarray:
        d = x.shape[-1]
        inv = self.config["rotary_base"] ** (-np.arange(0, d, 2, dtype=np.float64) / d)
        angles = positions[:, None] * inv[None]  # [T, d/2]
        cos, sin = np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos[:, None] - b * sin[:, None], b * cos[:, None] + a * sin[:, None]], -1)

    def logits(self, ids: list[int]) -> np.ndarray:
        c = self.config
        tp, hd = c["mapping"]["tp_size"], c["head_size"]
        heads = c["num_attention_heads"] // tp
        kv = max(c["num_key_value_heads"] // tp, 1)
        x = self.ranks[0]["transformer.vocab_embedding.weight"][ids]
        t = len(ids)
        positions = np.arange(t, dtype=np.float64)
        causal = np.triu(np.full((t, t), -np.inf, dtype=np.float32), 1)
        act = {"silu": lambda v: v / (1 + np.exp(-v))}[c["hidden_act"]]
        for i in range(c["num_hidden_layers"]):
            p = f"transformer.layers.{i}."
            h = self.norm(x, self.ranks[0][p + "input_layernorm.weight"])
            out = np.zeros_like(x)
            for r in range(tp):
                qkv = h @ self.weight(r, p + "attention.qkv").T
                if p + "attention.qkv.bias" in self.ranks[r]:
                    qkv = qkv + self.ranks[r][p + "attention.qkv.bias"]
                q = qkv[:, : heads * hd].reshape(t, heads, hd)
                k = qkv[:, heads * hd: (heads + kv) * hd].reshape(t, kv, hd)
                v = qkv[:, (heads + kv) * hd:].reshape(t, kv, hd)
                q, k = self.rope(q, positions), self.rope(k, positions)
                k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
                scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + causal
                scores = np.exp(scores - scores.max(-1, keepdims=True))
                probs = scores / scores.sum(-1, keepdims=True)
                attn = np.einsum("hqk,khd->qhd", probs, v).reshape(t, heads * hd)
                out += attn @ self.weight(r, p + "attention.dense").T  # row-parallel: partial sums
            x = x + out
            h = self.norm(x, self.ranks[0][p + "post_layernorm.weight"])
            out = np.zeros_like(x)
            for r in range(tp):
                fc, gate = self.weight(r, p + "mlp.fc"), self.weight(r, p + "mlp.gate")
                if self.swap:
                    fc, gate = gate, fc
                out += (act(h @ fc.T) * (h @ gate.T)) @ self.weight(r, p + "mlp.proj").T
            x = x + out
        x = self.norm(x, self.ranks[0]["transformer.ln_f.weight"])
        head = np.concatenate([self.ranks[r]["lm_head.weight"] for r in range(tp)])
        return (x @ head.T)[:, : c["vocab_size"]]
