"""Our forward for decoder-only models over the paged KV cache, for every family `core.family` describes.

The weights stay in the Hugging Face modules (so fp32/bf16/GPTQ/INT8 layers all work); only the
attention bookkeeping is ours. A decode-only step (one new token per sequence, the common case
under load) runs as one batch: one KV write and one paged-attention call per layer
(`runtime.paged_attention`: a Triton kernel on CUDA), and on CUDA the whole step is replayed from a
CUDA graph captured per batch-size bucket, its metadata (tokens, positions, slots, block tables,
lengths) in static buffers. Steps with prompt chunks (runtime/paged_chunks.py) run every new token
as one row of the decode kernels where the fused kernels apply (a CUDA graph per token-count bucket),
else as one flat batch through the projections and MLPs, attending as a padded batch or per sequence. The
family adapter supplies what differs between architectures (fused or biased projections, q/k
norms, sandwich norms, sliding windows, soft-capping).

Where a model's layers are plain Llama layers in float weights (`StaticDecoder.unfusable` is empty)
and Triton runs, the decode step uses the static decoder's fused layer kernels instead of the HF
modules: five kernels per layer (norm + q/k/v, rotary + KV write + paged attention, o + residual,
norm + gate/up + SwiGLU, down + residual), about 150 per step instead of ~1,200.
"""

from __future__ import annotations

import numpy as np
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
from runtime.paged_attention import (
    advance_decode,
    kernel_applies,
    paged_decode_attention,
    paged_qkv_decode_attention,
)
from runtime.paged_chunks import ROW_BUCKETS, ChunkSteps
from runtime.static_decode import StaticDecoder, capture_graph

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def bucket(n: int) -> int | None:
    """The smallest graph bucket holding n rows (None: more rows than the largest)."""
    return next((b for b in BUCKETS if b >= n), None)


def fused_weights(model: torch.nn.Module, context: int) -> StaticDecoder | None:
    """The fused kernels' weights (a `StaticDecoder`'s), where those kernels compute this model: plain
    `nn.Linear` projections (not GPTQ/INT8 modules) of a family with nothing `unfusable`."""
    family = require(model.config, "generate.paged")
    layer = model.model.layers[0]
    names = (*family.q_k_v, family.out_proj, *family.gate_up, family.down_proj)
    if any(type(layer.get_submodule(n)) is not torch.nn.Linear for n in names) or (
            type(model.lm_head) is not torch.nn.Linear):
        return None
    static = StaticDecoder(model, max_batch=1, max_len=context)
    return None if static.unfusable else static


class PagedDecoder(ChunkSteps):
    def __init__(self, model: torch.nn.Module, block_size: int = 16, num_blocks: int = 1024,
                 fused: bool | None = None):
        """fused: decode steps through the fused layer kernels (None: on CUDA where they apply; True:
        wherever they apply, Triton's interpreter included, for tests; False: never)."""
        cfg = model.config
        self.family = require(cfg, "generate.paged")
        self.model = model.eval()
        self.config = cfg
        self.head_dim, self.heads, self.kv_heads = head_dim(cfg), cfg.num_attention_heads, kv_heads(cfg)
        self.windows = [sliding_window(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.softcap = attn_softcap(cfg)
        self.batched_decode = True  # decode-only steps in one attention call (False: per sequence, for benchmarks)
        self.keep_features = False  # leave `features` (an EAGLE draft's input): token-rows steps or HF modules then
        self.decode_features = torch.empty(0)  # the last HF-module decode step's final-norm rows
        self.features: list[torch.Tensor] = []  # per sequence of the last step (keep_features): its new rows' final-norm states
        param = next(model.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        self.device = param.device
        self.flat_prefill = self.device.type == "cuda"  # prompt chunks in one call (the CPU is faster per sequence)
        # cuDNN's attention builds an execution plan per new shape (tens of ms), and every step of prompt
        # chunks has a new one: SDPA may pick any backend but that one (True: let it, for benchmarks)
        self.cudnn_attention = False
        # one block more than the pool hands out: the padding rows of a graph bucket write there
        self.pool = BlockPool(num_blocks + 1, block_size, cfg.num_hidden_layers, self.kv_heads, self.head_dim,
                              dtype=dtype, device=self.device)
        self.scratch = self.pool.free.pop()  # the last block, never allocated
        self.pool.num_blocks = num_blocks
        probe = torch.zeros(1, self.heads, self.head_dim, device=self.device, dtype=dtype)
        applies = kernel_applies(probe, self.pool.k[0], self.softcap, interpreter=bool(fused))
        self.use_graphs = self.device.type == "cuda" and applies
        self.graphs: dict[tuple[int, bool, bool], tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.row_graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]] = {}
        self.max_spans = 64  # sequences per token-rows graph step (`warm_up` sets the server's max_running)
        context = getattr(cfg, "max_position_embeddings", None) or num_blocks * block_size
        self.max_table = min(num_blocks, -(-context // block_size))  # block-table width of the graphs' buffers
        wanted = self.device.type == "cuda" if fused is None else fused
        self.fused = fused_weights(model, context) if wanted and applies else None
        self.use_fused = self.fused is not None  # False: the HF modules' step (benchmarks compare the two)
        # steps with prompt chunks as token rows of the decode kernels (fused path; False: the padded batch)
        self.token_rows = self.device.type == "cuda"

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], last_only: bool | list[bool] = True, ends: list[int] | None = None
                ) -> list[torch.Tensor]:
        """Run each sequence's not-yet-cached tokens (up to `ends`, for chunked prefill); logits per sequence
        (of its last new token, or of all of them; `last_only` may differ per sequence)."""
        spans = [(s, s.cached, len(s.tokens) if ends is None else ends[i]) for i, s in enumerate(seqs)]
        for s, _, end in spans:
            self.pool.reserve(s, end)
        # features come from the token-rows step (every step, when they are wanted) and the HF modules' pass;
        # the fused decode step and its graphs do not produce them
        if self.batched_decode and self.use_fused and self.token_rows and (
                self.keep_features or any(b - a != 1 for _, a, b in spans)):
            return self._token_rows(spans, last_only)
        if not self.batched_decode or (self.keep_features and (self.use_fused or self.use_graphs)):
            return self._general(spans, last_only)
        # one new token: the batched decode step; longer spans (prompt chunks): the general pass
        single = [i for i, (_, a, b) in enumerate(spans) if b - a == 1]
        longer = [i for i, (_, a, b) in enumerate(spans) if b - a != 1]
        results: list[torch.Tensor | None] = [None] * len(spans)
        features: list[torch.Tensor | None] = [None] * len(spans)
        if single:
            logits = self._decode([spans[i] for i in single])
            for row, i in enumerate(single):
                results[i] = logits[row:row + 1]
                features[i] = self.decode_features[row:row + 1]
                spans[i][0].cached = spans[i][2]
        if longer:
            keep = [last_only[i] for i in longer] if isinstance(last_only, list) else last_only
            for i, out in zip(longer, self._general([spans[i] for i in longer], keep), strict=True):
                results[i] = out
            for i, rows in zip(longer, self.features, strict=True):
                features[i] = rows
        if self.keep_features:
            self.features = features
        return results

    @torch.inference_mode()
    def run_layers(self, seq: Sequence, start: int, end: int, x: torch.Tensor, layers: range) -> torch.Tensor:
        """Layers `layers` (HF modules) over positions start..end-1 of `seq` from their inputs x (1, n, hidden):
        their K/V enter those layers' cache, attention reads positions 0..end-1 there. `seq.cached` is left
        alone (the caller knows which layers hold what): a self-speculative draft runs the first layers, its
        verification the rest."""
        self.pool.reserve(seq, end)
        inner = self.model.model
        positions = torch.arange(start, end, device=self.device)
        new_slots, all_slots = self.pool.slots(seq, start, end), self.pool.slots(seq, 0, end)
        masks = {w: attention_mask(positions, torch.arange(end, device=self.device), w) for w in set(self.windows)}
        tables = rotary_tables(self.model, x, positions[None])
        for li in layers:
            layer = inner.layers[li]
            q, k, v = self._qkv(li, layer, x, tables)
            self.pool.write(li, new_slots, k[0].transpose(0, 1), v[0].transpose(0, 1))
            keys, values = self.pool.read(li, all_slots)
            o = attend(q, keys.transpose(0, 1)[None].to(q.dtype), values.transpose(0, 1)[None].to(q.dtype),
                       masks[self.windows[li]], layer.self_attn.scaling, self.softcap)
            x = layer_tail(self.family, layer, x, o.transpose(1, 2).reshape(1, end - start, self.heads * self.head_dim))
        return x

    # --- decode-only steps: one batch, eager or replayed from a CUDA graph --------------------------------

    META = ("ids", "positions", "blocks", "offsets", "lengths")  # one column each, then the block table

    def _decode_inputs(self, spans: list, rows: int, width: int) -> torch.Tensor:
        """Host-built metadata of a decode step in one flat int32 array (one copy to the device): the `META`
        columns of `rows` entries each, then the (rows, width) block table; padding rows write to the
        scratch block."""
        bs, n = self.pool.block_size, len(spans)
        columns = np.zeros((len(self.META), rows), dtype=np.int32)
        columns[:, :n] = np.array([(s.tokens[a], a, s.block_table[a // bs], a % bs, b) for s, a, b in spans],
                                  dtype=np.int32).reshape(n, len(self.META)).T
        columns[2, n:], columns[4, n:] = self.scratch, 1
        tables = np.zeros((rows, width), dtype=np.int32)
        tables[n:] = self.scratch  # every column: a multi-step decode advances padding rows too
        for i, (s, _, _) in enumerate(spans):
            tables[i, :len(s.block_table)] = s.block_table
        return torch.from_numpy(np.concatenate([columns.ravel(), tables.ravel()]))

    def _step_args(self, meta: torch.Tensor, rows: int) -> dict[str, torch.Tensor]:
        """`_decode_step`'s keyword arguments: contiguous views of the flat metadata."""
        args = {name: meta[i * rows:(i + 1) * rows] for i, name in enumerate(self.META)}
        args["block_tables"] = meta[len(self.META) * rows:].view(rows, -1)
        return args

    def _graph_rows(self, n: int, width: int) -> int | None:
        """The graph bucket a decode step of n rows, `width` blocks wide, replays in (None: run it eagerly)."""
        rows = bucket(n)
        return rows if self.use_graphs and rows is not None and width <= self.max_table else None

    def _decode(self, spans: list) -> torch.Tensor:
        n, width = len(spans), max(len(s.block_table) for s, _, _ in spans)
        rows = self._graph_rows(n, width)
        if rows is None:
            return self._decode_step(**self._step_args(self._decode_inputs(spans, n, width).to(self.device), n))
        graph, meta, logits = self._graph(rows, advance=False)
        meta.copy_(self._decode_inputs(spans, rows, self.max_table), non_blocking=True)
        graph.replay()
        return logits[:n].clone()  # the graph's output buffer is overwritten by the next replay

    def _graph(self, rows: int, advance: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        key = (rows, self.use_fused, advance)
        if key not in self.graphs:
            self.graphs[key] = self._capture(rows, advance)
        return self.graphs[key]

    @torch.inference_mode()
    def decode_greedy(self, seqs: list[Sequence], steps: int) -> list[list[int]]:
        """`steps` greedy decode steps of sequences that each have one uncached token, without a host round
        trip between steps: each step's argmax becomes the next step's input on the device, and positions,
        lengths and KV slots advance there (vLLM's multi-step scheduling). The new tokens per sequence;
        afterwards each cache holds the input token and the first steps - 1 new ones (cached += steps)."""
        spans = [(s, s.cached, s.cached + 1) for s in seqs]
        for s, a, _ in spans:
            self.pool.reserve(s, a + steps)
        n = len(spans)
        width = max(len(s.block_table) for s in seqs)
        rows = self._graph_rows(n, width)
        tokens = torch.empty(steps, n, dtype=torch.int32, device=self.device)
        if rows is not None:
            graph, meta, _ = self._graph(rows, advance=True)
            meta.copy_(self._decode_inputs(spans, rows, self.max_table), non_blocking=True)
            for j in range(steps):
                graph.replay()
                tokens[j].copy_(meta[:n])  # the ids column: this step's argmax
        else:
            meta = self._decode_inputs(spans, n, width).to(self.device)
            for j in range(steps):
                self._advance_step(meta, n)
                tokens[j].copy_(meta[:n])
        for s in seqs:
            s.cached += steps
        return tokens.t().tolist()

    def _advance_step(self, meta: torch.Tensor, rows: int) -> torch.Tensor:
        """One decode step over the flat metadata, then the metadata of the next: its argmax as the input ids,
        positions and lengths + 1, and the KV slot of the new position from the block table. Fused: the LM
        head folds each row's argmax into a packed int64 (no logits written) and one kernel advances the
        metadata; returns those packed values (else the logits)."""
        args = self._step_args(meta, rows)
        bs = self.pool.block_size
        tables = args["block_tables"]  # (the last step's advance may point past the reserved blocks: unused)
        if self.use_fused:
            from runtime.triton_decode import ARGMAX_EMPTY, fused_linear

            f = self.fused
            best = torch.full((rows,), ARGMAX_EMPTY, dtype=torch.int64, device=self.device)
            fused_linear(self._fused_hidden(args["ids"], args["blocks"], args["offsets"], tables, args["lengths"]),
                         f.lm_head, norm=f.norm, eps=f.eps, argmax_into=best)
            advance_decode(best, args["ids"], args["positions"], args["lengths"], args["blocks"], args["offsets"],
                           tables, bs)
            return best
        logits = self._decode_step(**args)
        args["ids"].copy_(logits.argmax(-1))
        args["positions"].add_(1)
        args["lengths"].add_(1)
        column = (args["positions"] // bs).long().clamp(max=tables.shape[1] - 1)
        args["blocks"].copy_(tables.gather(1, column[:, None])[:, 0])
        args["offsets"].copy_(args["positions"] % bs)
        return logits

    def warm_up(self, max_rows: int, max_tokens: int = 0) -> None:
        """Capture the decode graphs of every bucket up to `max_rows` (and, where steps with prompt chunks run
        as token rows, their graphs up to `max_tokens` rows) and run one step of prompt chunks now (a server,
        before its first request), so no request waits for a capture or a kernel compilation."""
        self.max_spans = max(max_rows, 1)
        if self.use_graphs and self.fused is not None:
            self.compile_fused_shapes()
        if self.flat_prefill:
            seqs = [Sequence(list(range(1, 1 + n))) for n in (17, 40)]  # a step of prompt chunks, then freed
            for s in seqs:
                self.pool.admit(s, reuse_prefix=False)
            self.forward(seqs)
            for s in seqs:
                self.pool.free_sequence(s)
        if self.use_graphs:
            for rows in BUCKETS[:BUCKETS.index(bucket(max_rows) or BUCKETS[-1]) + 1]:
                for advance in (False, True):
                    self._graph(rows, advance)
            if self.use_fused and self.token_rows:
                for rows in ROW_BUCKETS:
                    self._row_graph(rows)
                    if rows >= max_tokens:
                        break

    def compile_fused_shapes(self) -> None:
        """Run the fused projections and the LM head once at every row count whose Triton variant differs
        (GEMV for 1-8 rows, GEMM row tiles 16/32/64, each with a row count that is a multiple of 16 and one
        that is not: Triton specialises on it), so a prompt chunk of a new size never stalls the running
        batch for a kernel compilation."""
        from runtime.triton_decode import GEMV_MAX_ROWS, fused_linear

        f = self.fused
        p = f.layers[0]
        for rows in (*range(1, GEMV_MAX_ROWS + 1), 9, 16, 17, 32, 33, 64):
            x = torch.zeros(rows, f.embed.shape[1], device=self.device, dtype=f.dtype)
            f.fused_qkv(p, x)
            f.fused_tail(p, x, torch.zeros(rows, self.heads * self.head_dim, device=self.device, dtype=f.dtype))
            fused_linear(x, f.lm_head, norm=f.norm, eps=f.eps)

    def _capture(self, rows: int, advance: bool) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """A CUDA graph of one decode step of `rows` rows over a static metadata buffer (`max_table` blocks
        wide), with `advance` also the next step's metadata (`_advance_step`); its warm-up runs write only
        to the scratch block, so no state needs putting back."""
        meta = self._decode_inputs([], rows, self.max_table).to(self.device)
        output: dict[str, torch.Tensor] = {}

        def step() -> None:  # the last call, inside the capture, is the graph's
            output["logits"] = (self._advance_step(meta, rows) if advance else
                                self._decode_step(**self._step_args(meta, rows)))

        return capture_graph(step, []), meta, output["logits"]

    def _qkv(self, li: int, layer: torch.nn.Module, x: torch.Tensor, tables: dict
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Layer li's q, k (rotated) and v for the tokens of x: (1, heads, tokens, head_dim)."""
        cos, sin = (t[:, None] for t in layer_rotary(self.model, tables, li))
        q, k, v = (t.transpose(1, 2) for t in project_qkv(self.family, layer.self_attn, layer.input_layernorm(x),
                                                         self.heads, self.kv_heads, self.head_dim))
        return rotate(q, cos, sin), rotate(k, cos, sin), v

    def _fused_qkv(self, li: int, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`_qkv` through the fused kernels (prompt chunks: one norm + q/k/v GEMM over all their tokens)."""
        n = x.shape[1]
        qkv = self.fused.fused_qkv(self.fused.layers[li], x[0])
        q, k, v = (t.view(1, n, -1, self.head_dim).transpose(1, 2) for t in qkv.split(
            [self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim], dim=-1))
        return rotate(q, *rope), rotate(k, *rope), v

    def _tail(self, li: int, layer: torch.nn.Module, x: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """o-projection, residual and MLP of layer li: fused kernels where they apply, else the HF modules."""
        if not self.use_fused:
            return layer_tail(self.family, layer, x, o)
        return self.fused.fused_tail(self.fused.layers[li], x[0], o[0].contiguous())[None]

    def _decode_step(self, ids: torch.Tensor, positions: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
                     block_tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Logits (rows, vocab) of one new token per row; writes its K/V at (blocks, offsets)."""
        if self.use_fused:
            return self._fused_decode_step(ids, blocks, offsets, block_tables, lengths)
        inner = self.model.model
        rows = ids.shape[0]
        x = inner.embed_tokens(ids)[None]
        tables = rotary_tables(self.model, x, positions[None])
        for li, layer in enumerate(inner.layers):
            attn = layer.self_attn
            q, k, v = self._qkv(li, layer, x, tables)
            self.pool.k[li, blocks, offsets] = k[0].transpose(0, 1).to(self.pool.k.dtype)
            self.pool.v[li, blocks, offsets] = v[0].transpose(0, 1).to(self.pool.v.dtype)
            o = paged_decode_attention(q[0].transpose(0, 1), self.pool.k[li], self.pool.v[li], block_tables,
                                       lengths, attn.scaling, self.windows[li], self.softcap)
            x = layer_tail(self.family, layer, x, o.reshape(1, rows, self.heads * self.head_dim).to(x.dtype))
        self.decode_features = inner.norm(x)[0]
        return final_logits(self.model, self.decode_features)

    def _fused_decode_step(self, ids: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
                           block_tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        from runtime.triton_decode import fused_linear

        f = self.fused
        return fused_linear(self._fused_hidden(ids, blocks, offsets, block_tables, lengths), f.lm_head, norm=f.norm,
                            eps=f.eps)

    def _fused_hidden(self, ids: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
                      block_tables: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """The fused decode step's last layer output (before the final norm and the LM head)."""
        f = self.fused
        pools = [(self.pool.k[li], self.pool.v[li]) for li in range(len(f.layers))]

        def attention(qkv: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
            return paged_qkv_decode_attention(qkv, f.cos, f.sin, k_pool, v_pool, blocks, offsets, block_tables,
                                              lengths, self.heads, f.scale)
        return f._fused_layers(ids, pools, attention)
