"""An EAGLE head's layers over many sequences at once: one dense KV slot per sequence, one pass per draft token.

The server drafts for every decoding sequence before each step. Run per sequence through the HF modules,
a head costs one Python-heavy module call per sequence and draft token (and SDPA's cuDNN backend, which
plans every new shape, cost 34 ms a call on the H200). Here the head's rows of all sequences go through
its layers together, padded to the longest: project, rotate, write K/V into each sequence's slot at its
positions, attend over the slot under a causal mask, the layer's tail. Slots are dense (a head has one
layer and few KV heads: 64 sequences of 2,048 positions are ~100 MB in bf16); slots and positions grow
by doubling on demand.
"""

from __future__ import annotations

import torch

from core.family import (
    attend,
    attn_softcap,
    family_of,
    head_dim,
    kv_heads,
    layer_rotary,
    layer_tail,
    project_qkv,
    rotary_tables,
    rotate,
    sdpa_without_cudnn,
    sliding_window,
)

GRAPH_ROWS = (1, 2, 4, 8, 16, 32, 64, 128)  # sequences per captured pass (padded up to the next)


class HeadCache:
    """K/V of an EAGLE head's layers per slot: (layers, slots + 1, kv heads, positions, head dim); the last
    slot is scratch, where padding rows write. With `graph_width` > 0 (CUDA), passes of up to that many
    entries per sequence replay a CUDA graph per (sequence bucket, width): a pass is ~60 small kernels, and
    launching them costs more than running them."""

    def __init__(self, head, slots: int = 1, positions: int = 256, graph_width: int = 0):
        cfg = head.config
        param = next(head.parameters())
        self.head, self.family = head, family_of(cfg)
        self.heads, self.kv, self.dim = cfg.num_attention_heads, kv_heads(cfg), head_dim(cfg)
        self.windows = [sliding_window(cfg, i) for i in range(cfg.num_hidden_layers)]
        self.softcap = attn_softcap(cfg)
        shape = (cfg.num_hidden_layers, slots + 1, self.kv, positions, self.dim)
        self.k = torch.zeros(shape, device=param.device, dtype=param.dtype)
        self.v = torch.zeros_like(self.k)
        self.free = list(range(slots - 1, -1, -1))
        self.graph_width = graph_width if param.device.type == "cuda" else 0
        self.graphs: dict[tuple[int, int], tuple] = {}

    @property
    def scratch(self) -> int:
        return self.k.shape[1] - 1

    def take(self) -> int:
        if not self.free:  # twice the slots (the scratch slot moves to the end)
            slots = self.scratch
            self.k, self.v = (torch.cat([t[:, :slots], torch.zeros_like(t[:, :slots]), t[:, slots:]], dim=1)
                              for t in (self.k, self.v))
            self.free = list(range(2 * slots - 1, slots - 1, -1))
            self.graphs.clear()  # they read the old tensors
        return self.free.pop()

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    def _fit(self, positions: int) -> None:
        if positions > self.k.shape[3]:
            grow = max(positions, 2 * self.k.shape[3]) - self.k.shape[3]
            self.k, self.v = (torch.cat([t, t.new_zeros((*t.shape[:3], grow, t.shape[4]))], dim=3)
                              for t in (self.k, self.v))
            self.graphs.clear()

    def _core(self, feat: torch.Tensor, ids: torch.Tensor, meta: torch.Tensor, length: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
        """The pass over a (rows, width) grid: `meta` holds each cell's position and slot, then each row's
        slot and last valid cell. Final-norm states of each row's last cell and their greedy draft tokens."""
        n, width = ids.shape
        pos, slot = meta[:2 * n * width].view(2, n, width)
        rows, last = meta[2 * n * width:].view(2, n)
        head = self.head
        x = head.fc(torch.cat([head.model.embed_tokens(ids), feat.to(head.fc.weight.dtype)], dim=-1))
        tables = rotary_tables(head, x, pos)
        keys = torch.arange(length, device=ids.device)
        for li, layer in enumerate(head.model.layers):
            cos, sin = (t[:, None] for t in layer_rotary(head, tables, li))
            q, k, v = (t.transpose(1, 2) for t in project_qkv(self.family, layer.self_attn, layer.input_layernorm(x),
                                                             self.heads, self.kv, self.dim))
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
            self.k[li, slot, :, pos] = k.transpose(1, 2)
            self.v[li, slot, :, pos] = v.transpose(1, 2)
            mask = keys[None, None] <= pos[:, :, None]  # (n, width, keys): causal
            if self.windows[li] is not None:
                mask &= keys[None, None] > pos[:, :, None] - self.windows[li]
            o = attend(q, self.k[li, rows, :, :length], self.v[li, rows, :, :length], mask[:, None],
                       layer.self_attn.scaling, self.softcap)
            x = layer_tail(self.family, layer, x, o.transpose(1, 2).reshape(n, width, -1))
        states = head.model.norm(x[torch.arange(n, device=ids.device), last])
        return states, self.greedy(states)

    def _graph(self, n: int, width: int) -> tuple:
        """Static inputs, graph and outputs of a pass over n rows of `width` cells, attending over every
        position of the slots (one shape whatever the lengths); captured with every row on scratch."""
        from runtime.static_decode import capture_graph

        key = (n, width)
        if key not in self.graphs:
            hidden = self.head.config.hidden_size
            feat = self.k.new_zeros((n * width, hidden))
            ids = torch.zeros(n * width, dtype=torch.long, device=self.k.device)
            meta = torch.zeros(2 * n * width + 2 * n, dtype=torch.long, device=self.k.device)
            meta[n * width:2 * n * width] = self.scratch
            meta[2 * n * width:2 * n * width + n] = self.scratch
            out: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

            def step() -> None:
                out["pass"] = self._core(feat.view(n, width, hidden), ids.view(n, width), meta, self.k.shape[3])

            graph = capture_graph(step, [])
            self.graphs[key] = (feat, ids, meta, graph, out["pass"])
        return self.graphs[key]

    @torch.no_grad()
    def rows(self, slots: list[int], features: list[torch.Tensor], ids: list[list[int]] | torch.Tensor,
             starts: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Sequence i's entries at positions starts[i]..: its true or drafted `features[i]` (T_i, hidden) and
        the tokens that follow them (`ids`: a list per sequence, or all of them in one tensor on the device).
        Writes their K/V into slot i; returns each sequence's last entry's final-norm state (len(slots),
        hidden) and greedy draft token (len(slots),)."""
        counts = [f.shape[0] for f in features]
        n, width = len(slots), max(counts)
        self._fit(max(s + c for s, c in zip(starts, counts, strict=True)))
        graphed = 0 < width <= self.graph_width and n <= GRAPH_ROWS[-1]
        if graphed:
            width = 1 if width == 1 else self.graph_width
        total = next(b for b in GRAPH_ROWS if b >= n) if graphed else n
        scratch = self.scratch
        cells = [(i, j) for i, c in enumerate(counts) for j in range(c)]
        pos, slot, grid_ids = [0] * (total * width), [scratch] * (total * width), [0] * (total * width)
        for i, j in cells:
            pos[i * width + j], slot[i * width + j] = starts[i] + j, slots[i]
            if not isinstance(ids, torch.Tensor):
                grid_ids[i * width + j] = ids[i][j]
        m = 2 * total * width + 2 * total
        host = torch.tensor(pos + slot + slots + [scratch] * (total - n) + [c - 1 for c in counts] + [0] * (total - n)
                            + [i * width + j for i, j in cells] + grid_ids)
        on_device = host.to(self.k.device, non_blocking=True)
        meta, index = on_device[:m], on_device[m:m + len(cells)]
        flat_feat = torch.cat(features)
        flat_ids = ids if isinstance(ids, torch.Tensor) else on_device[m + len(cells):]
        indexed = isinstance(ids, torch.Tensor)  # else the grid's ids came whole from the host
        with sdpa_without_cudnn():  # cuDNN's attention plans each new shape
            if graphed:
                feat, grid_ids, static_meta, graph, (states, tokens) = self._graph(total, width)
                feat.index_copy_(0, index, flat_feat.to(feat.dtype))
                if indexed:
                    grid_ids.index_copy_(0, index, flat_ids)
                else:
                    grid_ids.copy_(flat_ids)
                static_meta.copy_(meta)
                graph.replay()
                return states[:n].clone(), tokens[:n].clone()  # the next replay overwrites them
            feat = flat_feat.new_zeros((total * width, flat_feat.shape[1])).index_copy_(0, index, flat_feat)
            if indexed:
                flat_ids = flat_ids.new_zeros(total * width).index_copy_(0, index, flat_ids)
            length = max(s + c for s, c in zip(starts, counts, strict=True))
            return self._core(feat.view(total, width, -1), flat_ids.view(total, width), meta, length)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Draft logits (rows, draft vocabulary) of final-norm states."""
        return self.head.lm_head(states)

    def greedy(self, states: torch.Tensor) -> torch.Tensor:
        """Each row's draft token (in the target's vocabulary)."""
        best = self.logits(states).argmax(-1)
        return best if self.head.vocab_ids is None else self.head.vocab_ids[best]


def propose_greedy(drafts: list, rooms: list[int], min_confidence: float = 0.0) -> list[list[int]]:
    """Greedy proposals of several `EagleDraft`s sharing one `HeadCache`: up to rooms[i] tokens each, in
    max(rooms) passes of the head over all of them and one copy to the host. With `min_confidence` > 0 a
    draft stops before its first token whose probability under the head is below it (EAGLE-2's observation:
    the head's confidence tracks the target's acceptance), so unlikely tokens cost no verify rows."""
    chain, confidence = _chain(drafts, max(rooms), confidence=min_confidence > 0)
    proposals = [row[:room] for row, room in zip(chain.tolist(), rooms, strict=True)]
    if confidence is not None:
        sure = (confidence >= min_confidence).tolist()
        proposals = [row[:next((j for j, ok in enumerate(oks) if not ok), len(row))]
                     for row, oks in zip(proposals, sure, strict=True)]
    for draft, row in zip(drafts, proposals, strict=True):
        draft.proposed = row
    return proposals


def propose_tree(draft, depth: int, width: int) -> tuple[list[int], list[int]]:
    """A greedy draft tree for one `EagleDraft`: the head's greedy chain of `depth` tokens, and beside each
    chain token the head's next width - 1 likeliest tokens as leaves (where the chain is rejected, the
    target's token is often among them). Nodes (the chain first) and each node's parent (-1: the last
    accepted token); `propose` order, so that `accept` keeps an accepted branch set by the caller."""
    chain, top = _chain([draft], depth, width)
    tokens, parents = chain[0].tolist(), list(range(-1, depth - 1))
    for d, candidates in enumerate(top[0].tolist()):
        leaves = [t for t in candidates if t != tokens[d]][:width - 1]
        tokens += leaves
        parents += [d - 1] * len(leaves)
    draft.proposed = tokens
    return tokens, parents


@torch.no_grad()
def _chain(drafts: list, depth: int, width: int = 1, confidence: bool = False
           ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Each draft's greedy chain of `depth` tokens (drafts, depth) and, with width > 1, the head's `width`
    likeliest tokens at each step (drafts, depth, width), or with `confidence` the head's probability of each
    chain token (drafts, depth); one pass of the head over all drafts per step."""
    cache = drafts[0].cache
    slots, features, ids, starts = [], [], [], []
    for draft in drafts:
        n = len(draft.tokens)
        slots.append(draft.slot)
        features.append(draft.features[draft.entries:n - 1])
        ids.append(draft.tokens[draft.entries + 1:n])
        starts.append(draft.entries)
        draft.entries = n - 1
    states, best = _catch_up(cache, slots, features, ids, starts, max(depth + 1, cache.graph_width))
    drafted, extra = [best], []
    for j in range(depth):
        if width > 1:
            top = cache.logits(states).topk(width, dim=-1).indices
            extra.append(top if cache.head.vocab_ids is None else cache.head.vocab_ids[top])
        elif confidence:
            extra.append(cache.logits(states).float().softmax(-1).amax(-1))
        if j + 1 < depth:
            states, best = cache.rows(slots, list(states[:, None]), drafted[-1],
                                      [len(d.tokens) - 1 + j + 1 for d in drafts])
            drafted.append(best)
    return torch.stack(drafted, dim=1), (torch.stack(extra, dim=1) if extra else None)


def _catch_up(cache: HeadCache, slots: list[int], features: list[torch.Tensor], ids: list[list[int]],
              starts: list[int], short: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The catch-up pass: sequences with at most `short` new entries together (padded to that width, a
    graph's), the longer ones (prompts just prefilled) in a pass of their own, so a long prompt does not
    pad every sequence's rows to its length."""
    short_ones = [i for i, f in enumerate(features) if f.shape[0] <= short]
    long_ones = [i for i, f in enumerate(features) if f.shape[0] > short]
    groups = [group for group in (short_ones, long_ones) if group]
    if len(groups) == 1:
        return cache.rows(slots, features, ids, starts)
    parts = [cache.rows(*([values[i] for i in group] for values in (slots, features, ids, starts)))
             for group in groups]
    order = torch.tensor([i for group in groups for i in group], device=cache.k.device).argsort()
    return torch.cat([p[0] for p in parts])[order], torch.cat([p[1] for p in parts])[order]
