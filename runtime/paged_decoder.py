"""Our forward for decoder-only models over the paged KV cache, for every family `core.family` describes.

The weights stay in the Hugging Face modules (so fp32/bf16/GPTQ/INT8 layers all work); only the
attention bookkeeping is ours. A decode-only step (one new token per sequence, the common case
under load) runs as one batch: one KV write and one paged-attention call per layer
(`runtime.paged_attention`: a Triton kernel on CUDA), and on CUDA the whole step is replayed from a
CUDA graph captured per batch-size bucket, its metadata (tokens, positions, slots, block tables,
lengths) in static buffers. Prefill and mixed steps run the new tokens of many sequences as one
flat batch through the projections and MLPs and attend per sequence to their own blocks. The
family adapter supplies what differs between architectures (fused or biased projections, q/k
norms, sandwich norms, sliding windows, soft-capping).

Where a model's layers are plain Llama layers in float weights (`StaticDecoder.unfusable` is empty)
and Triton runs, the decode step uses the static decoder's fused layer kernels instead of the HF
modules: five kernels per layer (norm + q/k/v, rotary + KV write + paged attention, o + residual,
norm + gate/up + SwiGLU, down + residual), about 150 per step instead of ~1,200.
"""

from __future__ import annotations

import itertools

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
    rope_and_write,
)
from runtime.static_decode import StaticDecoder, capture_graph

BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
ROW_BUCKETS = (16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # token rows of a step with prompt chunks, under graphs
PADDED_LIMIT = 1 << 26  # spans x longest chunk x longest sequence up to which chunks attend in one call


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


class PagedDecoder:
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
        self.keep_features = False  # leave `features` (an EAGLE draft's input): no fused step or graphs then
        self.decode_features = torch.empty(0)  # the last HF-module decode step's final-norm rows
        self.features: list[torch.Tensor] = []  # per sequence of the last `_general` call: its new rows' final-norm states
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
        # features come from the HF-module decode step; the fused step and its graphs do not produce them
        if not self.batched_decode or (self.keep_features and (self.use_fused or self.use_graphs)):
            return self._general(spans, last_only)
        if self.use_fused and self.token_rows and any(b - a != 1 for _, a, b in spans):
            return self._token_rows(spans, last_only)
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
        """Host-built metadata of a step in one flat int32 array (one copy to the device): the `META` columns
        of `rows` entries each, one per new token (position p of a span sees positions <= p), then the
        (rows, width) block table; padding rows write to the scratch block."""
        bs = self.pool.block_size
        entries = [(s.tokens[p], p, s.block_table[p // bs], p % bs, p + 1) for s, a, b in spans for p in range(a, b)]
        n = len(entries)
        columns = np.zeros((len(self.META), rows), dtype=np.int32)
        columns[:, :n] = np.array(entries, dtype=np.int32).reshape(n, len(self.META)).T
        columns[2, n:], columns[4, n:] = self.scratch, 1
        tables = np.zeros((rows, width), dtype=np.int32)
        tables[n:] = self.scratch  # every column: a multi-step decode advances padding rows too
        row = 0
        for s, a, b in spans:
            tables[row:row + b - a, :len(s.block_table)] = s.block_table
            row += b - a
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
        if self.use_graphs and self.fused is not None:
            self.compile_fused_shapes()
        if self.flat_prefill:
            seqs = [Sequence(list(range(1, 1 + n))) for n in (17, 40)]  # a step of prompt chunks, then freed
            for s in seqs:
                self.pool.admit(s, reuse_prefix=False)
            self.forward(seqs)
            for s in seqs:
                self.pool.free_sequence(s)
        self.max_spans = max(max_rows, 1)
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

    # --- prefill and mixed steps ----------------------------------------------------------------------

    ROW_META = ("ids", "positions", "blocks", "offsets", "lengths", "table_rows")  # then one table per sequence

    def _token_rows(self, spans: list, last_only: bool | list[bool]) -> list[torch.Tensor]:
        """A step with prompt chunks through the fused kernels, every new token one row of the decode step's
        metadata (its position, its sequence's block table): per layer the fused projection, one kernel that
        rotates and writes every row's K/V, then the paged decode kernel over all rows (row p sees positions
        <= p, so causality needs no mask). Five launches per layer whatever the chunks, replayed from a CUDA
        graph per token-count bucket (`ROW_BUCKETS`); the LM head runs on the wanted rows only."""
        from runtime.triton_decode import fused_linear

        n, width = sum(b - a for _, a, b in spans), max(len(s.block_table) for s, _, _ in spans)
        rows = next((r for r in ROW_BUCKETS if r >= n), None)
        if self.use_graphs and rows is not None and width <= self.max_table and len(spans) <= self.max_spans:
            graph, meta, hidden = self._row_graph(rows)
            meta.copy_(self._row_inputs(spans, rows, self.max_table, self._span_rows(rows)), non_blocking=True)
            graph.replay()
        else:
            meta = self._row_inputs(spans, n, width, len(spans) + 1).to(self.device)
            hidden = self._rows_step(**self._row_args(meta, n, width))
        wanted, start = [], 0  # every span's last row, or all of its rows
        for i, (s, a, b) in enumerate(spans):
            last = last_only[i] if isinstance(last_only, list) else last_only
            wanted.append(range(start + b - a - 1 if last else start, start + b - a))
            start += b - a
            s.cached = b
        index = torch.tensor([r for span_rows in wanted for r in span_rows], device=self.device)
        f = self.fused
        logits = fused_linear(hidden.index_select(0, index), f.lm_head, norm=f.norm, eps=f.eps)
        return list(logits.split([len(r) for r in wanted]))

    def _span_rows(self, rows: int) -> int:
        """Block-table rows of a token-rows graph of `rows` rows: its sequences', then the padding rows' one."""
        return min(rows, self.max_spans) + 1

    def _row_inputs(self, spans: list, rows: int, width: int, span_rows: int) -> torch.Tensor:
        """A token-rows step's metadata in one flat int32 array: the `ROW_META` columns (`rows` entries; padding
        rows write to the scratch block and read table row len(spans), all scratch), then `span_rows` block
        tables `width` wide, one per sequence."""
        bs = self.pool.block_size
        columns = np.zeros((len(self.ROW_META), rows), dtype=np.int32)
        columns[2], columns[4], columns[5] = self.scratch, 1, len(spans)
        tables = np.zeros((span_rows, width), dtype=np.int32)
        tables[len(spans):] = self.scratch
        at = 0
        for i, (s, a, b) in enumerate(spans):
            table = np.asarray(s.block_table, dtype=np.int32)
            positions = np.arange(a, b, dtype=np.int32)
            columns[:, at:at + b - a] = (s.tokens[a:b], positions, table[positions // bs], positions % bs,
                                         positions + 1, np.full(b - a, i, dtype=np.int32))
            tables[i, :len(table)] = table
            at += b - a
        return torch.from_numpy(np.concatenate([columns.ravel(), tables.ravel()]))

    def _row_args(self, meta: torch.Tensor, rows: int, width: int) -> dict[str, torch.Tensor]:
        """`_rows_step`'s keyword arguments: views of the flat metadata (tables `width` wide)."""
        args = {name: meta[i * rows:(i + 1) * rows] for i, name in enumerate(self.ROW_META)}
        args["block_tables"] = meta[len(self.ROW_META) * rows:].view(-1, width)
        return args

    def _rows_step(self, ids: torch.Tensor, positions: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
                   lengths: torch.Tensor, table_rows: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
        """The last layer's output rows (before the final norm) of `_token_rows`' step."""
        f = self.fused
        pools = [(self.pool.k[li], self.pool.v[li]) for li in range(len(f.layers))]

        def attention(qkv: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor) -> torch.Tensor:
            q = rope_and_write(qkv, f.cos, f.sin, positions, blocks, offsets, k_pool, v_pool, self.heads)
            return paged_decode_attention(q, k_pool, v_pool, block_tables, lengths, f.scale, interpreter=True,
                                          table_rows=table_rows).view(q.shape[0], -1)
        return f._fused_layers(ids, pools, attention)

    def _row_graph(self, rows: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor]:
        """The CUDA graph of `_rows_step` over `rows` token rows (captured on first use or by `warm_up`); its
        warm-up runs write only to the scratch block."""
        if rows not in self.row_graphs:
            meta = self._row_inputs([], rows, self.max_table, self._span_rows(rows)).to(self.device)
            output: dict[str, torch.Tensor] = {}

            def step() -> None:
                output["hidden"] = self._rows_step(**self._row_args(meta, rows, self.max_table))
            self.row_graphs[rows] = capture_graph(step, []), meta, output["hidden"]
        return self.row_graphs[rows]

    def _padded_layout(self, spans: list) -> dict:
        """Prompt chunks of several sequences as one padded batch (B spans, the longest chunk's queries, the
        longest sequence's keys): where each query row comes from in the flat token order, the pool slots of
        each span's keys (padding: the scratch block) and a mask per attention window. A padding query row
        sees key 0 only, so no softmax row is empty."""
        dev, bs = self.device, self.pool.block_size
        b_count, lq, lk = len(spans), max(b - a for _, a, b in spans), max(b for _, _, b in spans)
        q_index = np.zeros((b_count, lq), dtype=np.int64)
        q_pos = np.full((b_count, lq), -1, dtype=np.int64)
        blocks = np.full((b_count, lk), self.scratch, dtype=np.int64)
        ends = np.array([b for _, _, b in spans], dtype=np.int64)
        offset = 0
        for i, (s, a, b) in enumerate(spans):
            q_index[i, :b - a] = np.arange(offset, offset + b - a)
            q_pos[i, :b - a] = np.arange(a, b)
            table = np.asarray(s.block_table, dtype=np.int64)
            blocks[i, :b] = table[np.arange(b) // bs]
            offset += b - a
        q_pos_t, k_pos = torch.from_numpy(q_pos).to(dev), torch.arange(lk, device=dev)
        valid_q = q_pos_t >= 0
        base = (k_pos[None, None, :] <= q_pos_t[:, :, None]) & (k_pos[None, None, :] < torch.from_numpy(ends).to(
            dev)[:, None, None])
        masks = {}
        for w in set(self.windows):
            m = base if w is None else base & (k_pos[None, None, :] > q_pos_t[:, :, None] - w)
            masks[w] = (m | (~valid_q[:, :, None] & (k_pos == 0)[None, None, :]))[:, None]
        offsets = torch.arange(lk, device=dev) % bs
        valid_rows = torch.from_numpy(np.flatnonzero(q_pos.ravel() >= 0)).to(dev)  # no sync per layer
        return {"q_index": torch.from_numpy(q_index).to(dev), "valid_rows": valid_rows, "masks": masks,
                "keys_at": (torch.from_numpy(blocks).to(dev), offsets.expand(b_count, lk))}

    def _padded_attention(self, li: int, q: torch.Tensor, layout: dict, scale: float) -> torch.Tensor:
        """Attention of the flat queries q (n, heads, head_dim) as the padded batch of `layout`:
        (n, heads * head_dim) in the flat order. Heads are repeated for GQA so SDPA can take its fused
        masked kernel (its GQA mode with a mask falls back to the plain math, which writes the whole score
        matrix)."""
        blocks, offsets = layout["keys_at"]
        keys = self.pool.k[li][blocks, offsets].transpose(1, 2).to(q.dtype)  # (B, kv_heads, Lk, head_dim)
        values = self.pool.v[li][blocks, offsets].transpose(1, 2).to(q.dtype)
        queries = q[layout["q_index"]].transpose(1, 2)  # (B, heads, Lq, head_dim)
        mask = layout["masks"][self.windows[li]]
        if self.softcap is None:
            rep = self.heads // self.kv_heads
            keys, values = keys.repeat_interleave(rep, dim=1), values.repeat_interleave(rep, dim=1)
            o = torch.nn.functional.scaled_dot_product_attention(queries, keys, values, attn_mask=mask, scale=scale)
        else:
            o = attend(queries, keys, values, mask, scale, self.softcap)
        rows = o.transpose(1, 2).reshape(-1, self.heads * self.head_dim)  # (B * Lq, heads * head_dim)
        return rows.index_select(0, layout["valid_rows"])

    def _general(self, spans: list, last_only: bool | list[bool]) -> list[torch.Tensor]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        backends = [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
        with sdpa_kernel(backends + [SDPBackend.CUDNN_ATTENTION] * self.cudnn_attention):
            return self._chunks(spans, last_only)

    def _chunks(self, spans: list, last_only: bool | list[bool]) -> list[torch.Tensor]:
        inner = self.model.model
        ids = torch.tensor([t for s, a, b in spans for t in s.tokens[a:b]], device=self.device)
        positions = torch.cat([torch.arange(a, b) for _, a, b in spans]).to(self.device)
        n = ids.numel()
        new_slots = [self.pool.slots(s, a, b) for s, a, b in spans]
        padded = len(spans) * max(b - a for _, a, b in spans) * max(b for _, _, b in spans)
        flat = self.flat_prefill and len(spans) > 1 and padded <= PADDED_LIMIT
        if flat:  # every span in one attention call: a padded batch of the chunks over their sequences' keys
            layout = self._padded_layout(spans)
            new_at = tuple(torch.cat([slot[j] for slot in new_slots]) for j in (0, 1))
        else:
            all_slots = [self.pool.slots(s, 0, b) for s, _, b in spans]
            masks = {w: [attention_mask(torch.arange(a, b, device=self.device), torch.arange(b, device=self.device),
                                        w) for _, a, b in spans] for w in set(self.windows)}
        x = inner.embed_tokens(ids)[None]
        tables = (None if flat and self.use_fused else
                  (self.fused.cos[positions][None, None], self.fused.sin[positions][None, None]) if self.use_fused
                  else rotary_tables(self.model, x, positions[None]))
        for li, layer in enumerate(inner.layers):
            attn = layer.self_attn
            if flat and self.use_fused:  # projection, rotation + KV write, attention, tail: few launches
                f = self.fused
                q = rope_and_write(f.fused_qkv(f.layers[li], x[0]), f.cos, f.sin, positions, *new_at,
                                   self.pool.k[li], self.pool.v[li], self.heads)
                x = self._tail(li, layer, x, self._padded_attention(li, q, layout, attn.scaling)[None])
                continue
            q, k, v = self._fused_qkv(li, x, tables) if self.use_fused else self._qkv(li, layer, x, tables)
            if flat:
                self.pool.write(li, new_at, k[0].transpose(0, 1), v[0].transpose(0, 1))
                x = self._tail(li, layer, x, self._padded_attention(li, q[0].transpose(0, 1), layout,
                                                                    attn.scaling)[None])
                continue
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
            x = self._tail(li, layer, x, o)
        x = inner.norm(x)[0]
        starts = [0, *itertools.accumulate(b - a for _, a, b in spans)]
        self.features = [x[o:o + b - a] for o, (_, a, b) in zip(starts, spans, strict=False)]
        wanted = []  # the rows whose logits are asked for: every span's last, or all of its rows
        for i, (s, _, b) in enumerate(spans):
            last = last_only[i] if isinstance(last_only, list) else last_only
            wanted.append(range(starts[i + 1] - 1, starts[i + 1]) if last else range(starts[i], starts[i + 1]))
            s.cached = b
        index = torch.tensor([r for rows in wanted for r in rows], device=self.device)
        return list(final_logits(self.model, x[index]).split([len(rows) for rows in wanted]))  # one head call
