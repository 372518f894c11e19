"""Batched greedy decoding over a static KV cache, replayed from CUDA graphs (one per batch bucket).

gpt-fast's recipe for launch-bound small models: fixed-shape buffers (tokens, positions, cache
column, validity mask, KV cache) so one decode step is a fixed sequence of kernels; q/k/v and
gate/up fused into single matmuls; the step (optionally `torch.compile`d, which fuses the
elementwise work) captured once per batch-size bucket and replayed. The step also advances its
own inputs (argmax -> next token, position + 1), so the decode loop is graph replays and nothing
else: no host synchronisation until the end. Prompts of different lengths are left-padded: each
row keeps its own rotary positions and the padded cache columns are masked out, so results match
unpadded greedy decoding. Works on the CPU too (no graphs), which is what the tests check.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from core.errors import UserError
from core.family import (
    activation,
    attend,
    attn_softcap,
    final_softcap,
    head_dim,
    kv_heads,
    require,
    rotary_tables,
    rotate,
    sliding_window,
)

BUCKETS = (1, 2, 4, 8, 16, 32, 64)


class StaticDecoder(nn.Module):
    def __init__(self, model: nn.Module, max_batch: int, max_len: int, dtype: torch.dtype | None = None):
        super().__init__()
        cfg = model.config
        try:
            family = require(cfg, "generate.static")
        except UserError as exc:
            raise ValueError(str(exc)) from None
        device = next(model.parameters()).device
        dtype = dtype or next(model.parameters()).dtype
        inner = model.model
        self.family = family
        self.heads, self.kv_heads, self.head_dim = cfg.num_attention_heads, kv_heads(cfg), head_dim(cfg)
        self.eps = getattr(cfg, "rms_norm_eps", 1e-6)
        self.max_batch, self.max_len = max_batch, max_len
        self.windows = [sliding_window(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.attn_softcap, self.final_softcap = attn_softcap(cfg), final_softcap(cfg)
        self.gelu = "gelu" in activation(cfg)
        self.scale = inner.layers[0].self_attn.scaling
        self.embed_scale = (torch.tensor(cfg.hidden_size ** 0.5, dtype=dtype, device=device)
                            if family.scaled_embedding else None)

        def w(t: torch.Tensor) -> torch.Tensor:
            return t.detach().to(device=device, dtype=dtype).contiguous()

        def norm(module: nn.Module) -> torch.Tensor:
            return w(module.weight.float() + family.norm_offset)

        def cat(names: tuple[str, ...], layer: nn.Module, what: str) -> torch.Tensor | None:
            parts = [getattr(layer.get_submodule(n), what) for n in names]
            return None if parts[0] is None else w(torch.cat(parts))

        self.embed = w(inner.embed_tokens.weight)
        self.layers = []
        for i, layer in enumerate(inner.layers):
            p = {"attn_norm": norm(layer.input_layernorm), "mlp_norm": norm(layer.get_submodule(family.feeds_mlp)),
                 "wqkv": cat(family.q_k_v, layer, "weight"), "bqkv": cat(family.q_k_v, layer, "bias"),
                 "wo": w(layer.get_submodule(family.out_proj).weight), "w13": cat(family.gate_up, layer, "weight"),
                 "w2": w(layer.get_submodule(family.down_proj).weight),
                 "rope": cfg.layer_types[i] if family.rope_per_layer_type else ""}
            if family.qk_norm:
                p["q_norm"], p["k_norm"] = norm(layer.self_attn.q_norm), norm(layer.self_attn.k_norm)
            if family.sandwich_norms:
                p["post_attn_norm"] = norm(layer.post_attention_layernorm)
                p["post_mlp_norm"] = norm(layer.post_feedforward_layernorm)
            self.layers.append(p)
        self.norm = norm(inner.norm)
        self.lm_head = w(model.lm_head.weight)
        positions = torch.arange(max_len, device=device)[None]
        probe = torch.zeros(1, device=device, dtype=torch.float32)
        self.rope = {kind: (cos[0].to(dtype), sin[0].to(dtype))  # (max_len, rotary dims) per layer type
                     for kind, (cos, sin) in rotary_tables(model, probe, positions).items()}
        self.cos, self.sin = next(iter(self.rope.values()))  # the fused kernels' (plain Llama layers: one table)
        # one cache per batch bucket and layer: whole tensors, so the compiled step updates them in
        # place (a write into a view of a bigger cache makes Inductor copy the whole cache back)
        self.caches: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self.valid = torch.zeros(max_batch, max_len, dtype=torch.bool, device=device)
        # the decode step's static inputs, advanced in place by the step itself
        self.tokens = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.pos = torch.zeros(max_batch, 1, dtype=torch.long, device=device)
        self.col = torch.zeros(1, dtype=torch.long, device=device)
        self.dtype, self.device = dtype, device
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.step_fn = self.decode_step
        self.timings = (0.0, 0.0)  # prefill and decode seconds of the last `generate`

    @property
    def unfusable(self) -> list[str]:
        """What the fused Triton kernels (plain Llama layers) do not compute for this model."""
        reasons = [name for name, present in (
            ("q/k/v biases", self.layers[0]["bqkv"] is not None), ("q/k norms", self.family.qk_norm),
            ("sandwich norms", self.family.sandwich_norms), ("scaled embeddings", self.embed_scale is not None),
            ("sliding windows", any(self.windows)), ("GELU MLP", self.gelu), ("soft-capping", self.final_softcap or self.attn_softcap),
            ("partial rotary", self.cos.shape[-1] != self.head_dim), ("per-layer rotary", len(self.rope) > 1),
            ("attention scale", abs(self.scale - self.head_dim ** -0.5) > 1e-9)) if present]
        return reasons

    def _rms(self, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, weight.shape, weight, self.eps)

    def cache(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if batch not in self.caches:
            shape = (batch, self.kv_heads, self.max_len, self.head_dim)
            self.caches[batch] = [(torch.zeros(shape, device=self.device, dtype=self.dtype),
                                   torch.zeros(shape, device=self.device, dtype=self.dtype)) for _ in self.layers]
        return self.caches[batch]

    def forward(self, tokens: torch.Tensor, pos: torch.Tensor, col: torch.Tensor) -> torch.Tensor:
        """tokens/pos (B, T); col (T,) cache columns shared by the rows -> logits (B, T, vocab)."""
        return self.logits(self.features(self.hidden(self.embed_tokens(tokens), pos, col)))

    def embed_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        x = F.embedding(tokens, self.embed)
        return x if self.embed_scale is None else x * self.embed_scale

    def features(self, hidden: torch.Tensor) -> torch.Tensor:
        """The final norm of the last layer's output: what the LM head reads (and an EAGLE head too)."""
        return self._rms(hidden, self.norm)

    def logits(self, features: torch.Tensor, lm_head: torch.Tensor | None = None) -> torch.Tensor:
        logits = features @ (self.lm_head if lm_head is None else lm_head).t()
        if self.final_softcap is not None:
            logits = torch.tanh(logits / self.final_softcap) * self.final_softcap
        return logits

    def hidden(self, x: torch.Tensor, pos: torch.Tensor, col: torch.Tensor, layers: slice = slice(None)
               ) -> torch.Tensor:
        """Input embeddings x (B, T, hidden) through every layer (or `layers`), eagerly -> the last one's output."""
        b, t = x.shape[:2]
        rope = {kind: (cos[pos][:, None], sin[pos][:, None]) for kind, (cos, sin) in self.rope.items()}  # (B,1,T,R)
        columns = torch.arange(self.max_len, device=self.device)
        causal = columns[None, None, None, :] <= col[None, None, :, None]
        masks = {w: self.valid[:b, None, None, :] & causal & (
            True if w is None else columns[None, None, None, :] > col[None, None, :, None] - w)
            for w in set(self.windows)}  # columns differ as positions do within a row, padding or not
        q_size, kv_size = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for p, window, (k_cache, v_cache) in zip(self.layers[layers], self.windows[layers], self.cache(b)[layers],
                                                 strict=True):
            h = self._rms(x, p["attn_norm"])
            qkv = h @ p["wqkv"].t() if p["bqkv"] is None else F.linear(h, p["wqkv"], p["bqkv"])
            q, k, v = (part.view(b, t, -1, self.head_dim).transpose(1, 2)
                       for part in qkv.split([q_size, kv_size, kv_size], dim=-1))
            if "q_norm" in p:
                q, k = self._rms(q, p["q_norm"]), self._rms(k, p["k_norm"])
            cos, sin = rope[p["rope"]]
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            k_cache[:, :, col] = k
            v_cache[:, :, col] = v
            o = attend(q, k_cache, v_cache, masks[window], self.scale, self.attn_softcap)
            o = o.transpose(1, 2).reshape(b, t, q_size) @ p["wo"].t()
            x = x + (self._rms(o, p["post_attn_norm"]) if "post_attn_norm" in p else o)
            gate, up = (self._rms(x, p["mlp_norm"]) @ p["w13"].t()).chunk(2, dim=-1)
            m = ((F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * up) @ p["w2"].t()
            x = x + (self._rms(m, p["post_mlp_norm"]) if "post_mlp_norm" in p else m)
        return x

    def decode_step(self, batch: int, tokens: torch.Tensor | None = None, next_tokens: torch.Tensor | None = None
                    ) -> None:
        """One token for `batch` rows from the static inputs; writes the argmax back as the next input.

        `tokens` / `next_tokens` ((batch, 1); both default to `self.tokens`) let a caller chain
        steps through its own buffer (the speculative draft records its proposals that way).
        """
        tokens = self.tokens[:batch] if tokens is None else tokens
        self.valid[:batch].index_fill_(1, self.col, True)
        logits = self.forward(tokens, self.pos[:batch], self.col)
        (tokens if next_tokens is None else next_tokens).copy_(logits[:, -1:].argmax(-1))
        self.pos[:batch].add_(1)
        self.col.add_(1)

    def _fused_layers(self, tokens: torch.Tensor | None, caches: list, attention, x: torch.Tensor | None = None,
                      layers: slice = slice(None)) -> torch.Tensor:
        """Embedding (or the given inputs x), then each layer (of `layers`) in five Triton kernels;
        `attention(qkv, k_cache, v_cache)` is the varying one."""
        x = F.embedding(tokens, self.embed) if x is None else x
        for p, (k_cache, v_cache) in zip(self.layers[layers], caches[layers], strict=True):
            x = self.fused_tail(p, x, attention(self.fused_qkv(p, x), k_cache, v_cache))
        return x

    def fused_qkv(self, p: dict, x: torch.Tensor) -> torch.Tensor:
        """Layer p's RMSNorm + fused q/k/v projection of x (M, hidden) -> (M, (H + 2 KV) D), one kernel."""
        from runtime.triton_decode import fused_linear

        return fused_linear(x, p["wqkv"], norm=p["attn_norm"], eps=self.eps)

    def fused_tail(self, p: dict, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """Layer p after attention: o-projection + residual, RMSNorm + gate/up + SwiGLU, down + residual."""
        from runtime.triton_decode import fused_linear

        h = fused_linear(o, p["wo"], residual=x)
        return fused_linear(fused_linear(h, p["w13"], norm=p["mlp_norm"], eps=self.eps, swiglu=True), p["w2"],
                            residual=h)

    def fused_step(self, batch: int, tokens: torch.Tensor | None = None, next_tokens: torch.Tensor | None = None
                   ) -> None:
        """`decode_step` in five Triton kernels per layer (runtime/triton_decode.py); CUDA or interpreter."""
        from runtime.triton_decode import decode_attention, finish_step, fused_linear

        tokens = self.tokens[:batch] if tokens is None else tokens

        def attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
            return decode_attention(qkv, k_cache, v_cache, self.cos, self.sin, self.pos[:batch], self.col,
                                    self.valid[:batch], self.heads, self.kv_heads, self.head_dim)
        x = self._fused_layers(tokens[:, 0], self.cache(batch), attention)
        fused_linear(x, self.lm_head, norm=self.norm, eps=self.eps, argmax_into=self.best[:batch])
        finish_step(self.best[:batch], tokens if next_tokens is None else next_tokens, self.pos[:batch], self.col)

    def verify_step(self, tokens: torch.Tensor, features: torch.Tensor | None = None) -> torch.Tensor:
        """Row 0's greedy next token after each of T consecutive tokens (T, 1) -> (T,); their k/v enter the cache.

        They sit at positions `pos[0]..` and cache columns `col..`; neither is advanced (the caller
        moves them past what it accepts). `features` (T, hidden), if given, receives their final-norm
        hidden states (an EAGLE head's input).
        """
        hidden = self.run_rows(self.embed_tokens(tokens[:, 0]))
        if features is not None:
            features.copy_(self.features(hidden))
        return self.greedy(hidden)

    def greedy(self, hidden: torch.Tensor, eager: bool = False, lm_head: torch.Tensor | None = None) -> torch.Tensor:
        """The greedy token after each row of last-layer outputs (T, hidden): the final norm, the LM head (or the
        given rows of it: an index into them) and the argmax in one kernel when the fused kernels are in use."""
        if eager or self.step_fn != self.fused_step:
            return self.logits(self.features(hidden), lm_head).argmax(-1)
        lm_head = self.lm_head if lm_head is None else lm_head
        from runtime.triton_decode import ARGMAX_EMPTY, fused_linear, unpack_argmax

        best = self.best[:hidden.shape[0]]
        fused_linear(hidden, lm_head, norm=self.norm, eps=self.eps, argmax_into=best)
        argmax = unpack_argmax(best)
        best.fill_(ARGMAX_EMPTY)
        return argmax

    def run_rows(self, x: torch.Tensor, eager: bool = False, layers: slice = slice(None)) -> torch.Tensor:
        """Row 0's T consecutive inputs x (T, hidden) at positions `pos[0]..`, cache columns `col..` -> the last
        layer's output (T, hidden) (of `layers`: a KV-sharing exit runs the first ones, its verify pass the
        rest); their k/v enter the cache, pos/col are not advanced. The fused kernels when in use (small T),
        else (or `eager`) the PyTorch layers."""
        count = x.shape[0]
        if eager or self.step_fn != self.fused_step:
            offsets = torch.arange(count, device=self.device)
            self.valid[:1].index_fill_(1, self.col + offsets, True)
            return self.hidden(x[None], self.pos[:1] + offsets, self.col + offsets, layers)[0]
        from runtime.triton_decode import verify_attention

        def attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> torch.Tensor:
            return verify_attention(qkv, k_cache, v_cache, self.cos, self.sin, self.pos[0], self.col, self.valid[:1],
                                    self.heads, self.kv_heads, self.head_dim)
        return self._fused_layers(None, self.cache(1), attention, x=x, layers=layers)

    @classmethod
    def fastest(cls, model: nn.Module, max_batch: int, max_len: int) -> StaticDecoder:
        """With the fused kernels where they compute this model on CUDA; else the eager step (on CUDA still
        replayed from a graph)."""
        decoder = cls(model, max_batch, max_len)
        if decoder.device.type == "cuda" and not decoder.unfusable:
            decoder.use_fused_kernels()
        return decoder

    def use_fused_kernels(self) -> None:
        """Decode with `fused_step` (needs Triton; on the CPU only under TRITON_INTERPRET=1)."""
        from runtime.triton_decode import ARGMAX_EMPTY

        if self.unfusable:
            raise ValueError(f"the fused kernels compute plain Llama layers; this {self.family.name} model has "
                             f"{', '.join(self.unfusable)}")
        self.best = torch.full((max(self.max_batch, 64),), ARGMAX_EMPTY, dtype=torch.long, device=self.device)
        self.step_fn = self.fused_step

    def compile(self) -> None:
        """Fuse the step's elementwise work with Inductor (captured in our own graphs afterwards)."""
        self.step_fn = torch.compile(self.decode_step, fullgraph=True, dynamic=False)

    def state(self, batch: int) -> list[torch.Tensor]:
        """Every buffer a decode step of `batch` rows writes."""
        return [self.tokens, self.pos, self.col, self.valid, *(t for kv in self.cache(batch) for t in kv)]

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]], new_tokens: int) -> int:
        """Left-padded prompts through the model (eager) into the cache; the batch bucket used.

        Leaves the first greedy token in `tokens` and positions / cache column after the prompts.
        """
        n = len(prompts)
        batch = next((b for b in BUCKETS if b >= n), n)
        width = max(map(len, prompts))
        if batch > self.max_batch or width + new_tokens > self.max_len:
            raise ValueError(f"batch {batch} / length {width + new_tokens} exceed the static cache "
                             f"({self.max_batch} x {self.max_len})")
        padded = torch.zeros(batch, width, dtype=torch.long)
        pos = torch.zeros(batch, width, dtype=torch.long)
        self.valid.zero_()
        for i, p in enumerate(prompts + [prompts[0]] * (batch - n)):  # filler rows repeat the first prompt
            pad = width - len(p)
            padded[i, pad:] = torch.tensor(p)
            pos[i, pad:] = torch.arange(len(p))
            self.valid[i, pad:width] = True
        col = torch.arange(width, device=self.device)
        x = self.embed_tokens(padded.to(self.device))
        self.prompt_features = self.features(self.hidden(x, pos.to(self.device), col))  # (batch, width, hidden)
        logits = self.logits(self.prompt_features[:, -1:])
        self.tokens[:batch] = logits.argmax(-1)
        self.pos[:batch] = pos[:, -1:].to(self.device) + 1
        self.col.fill_(width)
        return batch

    @torch.inference_mode()
    def generate(self, prompts: list[list[int]], new_tokens: int, use_graph: bool | None = None
                 ) -> list[list[int]]:
        """Greedy continuation of each prompt (no stop token): `new_tokens` ids per prompt."""
        use_graph = self.device.type == "cuda" if use_graph is None else use_graph
        started = time.perf_counter()
        batch = self.prefill(prompts, new_tokens)
        out = torch.empty(batch, new_tokens, dtype=torch.long, device=self.device)
        out[:, 0] = self.tokens[:batch, 0]
        if use_graph and batch not in self.graphs:
            self.graphs[batch] = capture_graph(lambda: self.step_fn(batch), self.state(batch))
        self._sync()
        prefilled = time.perf_counter()
        for i in range(1, new_tokens):
            if use_graph:
                self.graphs[batch].replay()
            else:
                self.step_fn(batch)
            out[:, i] = self.tokens[:batch, 0]
        result = out[:len(prompts)].tolist()  # (synchronises)
        self.timings = (prefilled - started, time.perf_counter() - prefilled)
        return result

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def capture_graph(step: Callable[[], None], state: list[torch.Tensor]) -> torch.cuda.CUDAGraph:
    """A CUDA graph of `step`, after warm-up runs (compilation) on a side stream; `state` is put back after."""
    saved = [t.clone() for t in state]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    for buffer, old in zip(state, saved, strict=True):
        buffer.copy_(old)  # the warm-up runs advanced the state: put it back
    return graph
