"""An EAGLE head's layers over many sequences at once: one dense KV slot per sequence, one pass per draft token.

The server drafts for every decoding sequence before each step. Run per sequence through the HF modules,
a head costs one Python-heavy module call per sequence and draft token (on the H200 that, not the GPU,
made speculative serving slower than plain serving). Here the head's rows of all sequences go through
its layers together, padded to the longest: project, rotate, write K/V into each sequence's slot at its
positions, attend over the slot under a causal mask, the layer's tail. Slots are dense (a head has one
layer and few KV heads: 64 sequences of 2,048 positions are ~100 MB in bf16); they grow on demand.
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


class HeadCache:
    """K/V of an EAGLE head's layers per slot: (layers, slots + 1, kv heads, positions, head dim); the last
    slot is scratch, where padding rows write."""

    def __init__(self, head, slots: int = 1, positions: int = 256):
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

    @property
    def scratch(self) -> int:
        return self.k.shape[1] - 1

    def take(self) -> int:
        if not self.free:  # twice the slots (the scratch slot moves to the end)
            slots = self.scratch
            self.k, self.v = (torch.cat([t[:, :slots], torch.zeros_like(t[:, :slots]), t[:, slots:]], dim=1)
                              for t in (self.k, self.v))
            self.free = list(range(2 * slots - 1, slots - 1, -1))
        return self.free.pop()

    def give_back(self, slot: int) -> None:
        self.free.append(slot)

    def _fit(self, positions: int) -> None:
        if positions > self.k.shape[3]:
            grow = max(positions, 2 * self.k.shape[3]) - self.k.shape[3]
            self.k, self.v = (torch.cat([t, t.new_zeros((*t.shape[:3], grow, t.shape[4]))], dim=3)
                              for t in (self.k, self.v))

    @torch.no_grad()
    def _rows(self, slots: list[int], features: list[torch.Tensor], ids: list[torch.Tensor], starts: list[int]
             ) -> torch.Tensor:
        """Sequence i's entries at positions starts[i]..: its true or drafted `features[i]` (T_i, hidden) and
        `ids[i]` (T_i,), the tokens that follow them. Writes their K/V into slot i; returns each sequence's
        last entry's final-norm state (len(slots), hidden)."""
        counts = [f.shape[0] for f in features]
        width, n = max(counts), len(slots)
        self._fit(max(s + c for s, c in zip(starts, counts, strict=True)))
        device = self.k.device
        pad = [width - c for c in counts]
        x_feat = torch.stack([torch.nn.functional.pad(f, (0, 0, 0, p)) for f, p in zip(features, pad, strict=True)])
        x_ids = torch.stack([torch.nn.functional.pad(t, (0, p)) for t, p in zip(ids, pad, strict=True)])
        offsets = torch.arange(width, device=device)
        valid = offsets[None] < torch.tensor(counts, device=device)[:, None]  # (n, width)
        pos = torch.tensor(starts, device=device)[:, None] + offsets[None]
        pos = torch.where(valid, pos, 0)  # padding rows: position 0 of the scratch slot
        slot = torch.where(valid, torch.tensor(slots, device=device)[:, None], self.scratch)
        head = self.head
        x = head.fc(torch.cat([head.model.embed_tokens(x_ids), x_feat.to(head.fc.weight.dtype)], dim=-1))
        tables = rotary_tables(head, x, pos)
        length = int(pos.max()) + 1
        keys = torch.arange(length, device=device)
        rows = torch.tensor(slots, device=device)
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
        last = torch.tensor(counts, device=device) - 1
        return head.model.norm(x[torch.arange(n, device=device), last])

    def rows(self, *args, **kwargs) -> torch.Tensor:  # cuDNN's attention plans each new shape: not that one
        with sdpa_without_cudnn():
            return self._rows(*args, **kwargs)

    def logits(self, states: torch.Tensor) -> torch.Tensor:
        """Draft logits (rows, draft vocabulary) of final-norm states."""
        return self.head.lm_head(states)

    def greedy(self, states: torch.Tensor) -> torch.Tensor:
        """Each row's draft token (in the target's vocabulary)."""
        best = self.logits(states).argmax(-1)
        return best if self.head.vocab_ids is None else self.head.vocab_ids[best]


def propose_greedy(drafts: list, rooms: list[int]) -> list[list[int]]:
    """Greedy proposals of several `EagleDraft`s sharing one `HeadCache`: up to rooms[i] tokens each, in
    max(rooms) passes of the head over all of them and one copy to the host."""
    cache = drafts[0].cache
    slots, features, ids, starts = [], [], [], []
    for draft in drafts:
        n = len(draft.tokens)
        slots.append(draft.slot)
        features.append(draft.features[draft.entries:n - 1])
        ids.append(torch.tensor(draft.tokens[draft.entries + 1:n], device=cache.k.device))
        starts.append(draft.entries)
        draft.entries = n - 1
    states = cache.rows(slots, features, ids, starts)
    drafted = [cache.greedy(states)]
    for j in range(1, max(rooms)):
        states = cache.rows(slots, list(states[:, None]), list(drafted[-1][:, None]),
                            [len(d.tokens) - 1 + j for d in drafts])
        drafted.append(cache.greedy(states))
    tokens = torch.stack(drafted, dim=1).tolist()
    proposals = [row[:room] for row, room in zip(tokens, rooms, strict=True)]
    for draft, row in zip(drafts, proposals, strict=True):
        draft.proposed = row
    return proposals
