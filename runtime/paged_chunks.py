"""The paged decoder's steps with prompt chunks (`PagedDecoder` inherits them; split out for length).

Two ways: where the fused layer kernels compute the model (CUDA), every new token is one row of the
decode kernels (`_token_rows`: its position, its sequence's block table), replayed from a CUDA graph
per token-count bucket; elsewhere the chunks run as one flat batch through the projections and MLPs
and attend as one padded batch (`flat_prefill`, CUDA) or per sequence (`_general`).
"""

from __future__ import annotations

import itertools

import numpy as np
import torch

from core.family import attend, attention_mask, final_logits, rotary_tables, sdpa_without_cudnn
from runtime.paged_attention import paged_decode_attention, rope_and_write
from runtime.static_decode import capture_graph

ROW_BUCKETS = (4, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)  # token rows of a step with prompt chunks, under graphs
PADDED_LIMIT = 1 << 26  # spans x longest chunk x longest sequence up to which chunks attend in one call


class ChunkSteps:
    """`PagedDecoder`'s prompt-chunk passes (they read its pool, fused weights, graphs and settings)."""

    ROW_META = ("ids", "positions", "blocks", "offsets", "lengths", "table_rows")  # then one table per sequence

    def _token_rows(self, spans: list, last_only: bool | list[bool]) -> list[torch.Tensor]:
        """A step with prompt chunks through the fused kernels, every new token one row of the decode step's
        metadata (its position, its sequence's block table): per layer the fused projection, one kernel that
        rotates and writes every row's K/V, then the paged decode kernel over all rows (row p sees positions
        <= p, so causality needs no mask). Five launches per layer whatever the chunks, replayed from a CUDA
        graph per token-count bucket (`ROW_BUCKETS`); the LM head runs on the wanted rows only."""
        from runtime.triton_decode import fused_linear, rms_norm_rows

        n, width = sum(b - a for _, a, b in spans), max(len(s.block_table) for s, _, _ in spans)
        rows = next((r for r in ROW_BUCKETS if r >= n), None)
        graphed = self.use_graphs and rows is not None and width <= self.max_table
        if graphed:
            graph, meta, hidden = self._row_graph(rows)
            span_rows = (meta.numel() - len(self.ROW_META) * rows) // self.max_table  # as captured
            graphed = len(spans) < span_rows
        if graphed:
            meta.copy_(self._row_inputs(spans, rows, self.max_table, span_rows), non_blocking=True)
            graph.replay()
        else:
            meta = self._row_inputs(spans, n, width, len(spans) + 1).to(self.device)
            hidden = self._rows_step(**self._row_args(meta, n, width))
        f = self.fused
        if self.keep_features:  # an EAGLE head reads every new row's final-norm state (before the next replay)
            self.features = list(rms_norm_rows(hidden[:n], f.norm, f.eps, f.lm_head.dtype)
                                 .split([b - a for _, a, b in spans]))
        index, counts = self._wanted_rows(spans, last_only)
        return list(fused_linear(hidden.index_select(0, index), f.lm_head, norm=f.norm, eps=f.eps).split(counts))

    def _wanted_rows(self, spans: list, last_only: bool | list[bool]) -> tuple[torch.Tensor, list[int]]:
        """The rows whose logits a step returns, in its flat token order (every span's last, or all of its
        rows: `last_only`, per span or for all) and how many per span; the spans' tokens are cached now."""
        picked, counts, start = [], [], 0
        for i, (s, a, b) in enumerate(spans):
            last = last_only[i] if isinstance(last_only, list) else last_only
            picked.extend(range(start + b - a - 1 if last else start, start + b - a))
            counts.append(1 if last else b - a)
            start += b - a
            s.cached = b
        return torch.tensor(picked, device=self.device), counts

    def _span_rows(self, rows: int) -> int:
        """Block-table rows of a token-rows graph captured now for `rows` rows: its sequences' (up to
        `max_spans`; a step of more runs eagerly), then the padding rows' one."""
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

    def _general(self, spans: list, last_only: bool | list[bool], tree: list[int] | None = None
                 ) -> list[torch.Tensor]:
        with sdpa_without_cudnn(self.cudnn_attention):
            return self._chunks(spans, last_only, tree)

    @torch.inference_mode()
    def forward_tree(self, seq, parents: list[int]) -> torch.Tensor:
        """Verify a draft tree: the sequence's uncached tokens are its nodes, parents[i] the node before node i
        (-1: the cached prefix). Each node sits at the position after its parent's and attends to the prefix
        and its own ancestors (a tree mask); logits of every node (nodes, vocab). Its K/V land in the slots
        in node order: the caller moves an accepted branch's into place."""
        start, end = seq.cached, len(seq.tokens)
        if len(parents) != end - start or any(not -1 <= p < i for i, p in enumerate(parents)):
            raise ValueError(f"a tree of {end - start} nodes needs that many parents, each an earlier node or -1")
        self.pool.reserve(seq, end)
        return self._general([(seq, start, end)], False, parents)[0]

    def _tree_layout(self, start: int, parents: list[int]) -> tuple[torch.Tensor, dict]:
        """A tree pass's positions (start + depth) and attention masks: the cached prefix, then ancestors."""
        n = len(parents)
        seen = torch.zeros((n, start + n), dtype=torch.bool)
        seen[:, :start] = True
        depth = [0] * n
        for i, p in enumerate(parents):
            if p >= 0:
                seen[i] = seen[p]
                depth[i] = depth[p] + 1
            seen[i, start + i] = True
        positions = torch.tensor([start + d for d in depth])
        key_pos = torch.cat([torch.arange(start), positions])
        masks = {w: seen if w is None else seen & (key_pos[None] > positions[:, None] - w) for w in set(self.windows)}
        return positions.to(self.device), {w: [m.to(self.device)] for w, m in masks.items()}

    def _chunks(self, spans: list, last_only: bool | list[bool], tree: list[int] | None = None
                ) -> list[torch.Tensor]:
        inner = self.model.model
        ids = torch.tensor([t for s, a, b in spans for t in s.tokens[a:b]], device=self.device)
        positions = torch.cat([torch.arange(a, b) for _, a, b in spans]).to(self.device)
        n = ids.numel()
        new_slots = [self.pool.slots(s, a, b) for s, a, b in spans]
        padded = len(spans) * max(b - a for _, a, b in spans) * max(b for _, _, b in spans)
        flat = self.flat_prefill and len(spans) > 1 and padded <= PADDED_LIMIT and tree is None
        if flat:  # every span in one attention call: a padded batch of the chunks over their sequences' keys
            layout = self._padded_layout(spans)
            new_at = tuple(torch.cat([slot[j] for slot in new_slots]) for j in (0, 1))
        else:
            all_slots = [self.pool.slots(s, 0, b) for s, _, b in spans]
            if tree is not None:
                positions, masks = self._tree_layout(spans[0][1], tree)
            else:
                masks = {w: [attention_mask(torch.arange(a, b, device=self.device),
                                            torch.arange(b, device=self.device), w) for _, a, b in spans]
                         for w in set(self.windows)}
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
        index, counts = self._wanted_rows(spans, last_only)
        return list(final_logits(self.model, x[index]).split(counts))  # one head call
