"""A paged KV cache: fixed-size blocks in one pool, per-sequence block tables, prefix sharing.

Full blocks are content-addressed by a hash of all tokens up to and including them, so a new
sequence whose prompt starts with the same full blocks reuses them (reference-counted). Blocks no
sequence holds stay cached until the pool needs them back (least recently released first).
"""

from __future__ import annotations

from collections import OrderedDict, deque
from dataclasses import dataclass, field

import torch


class OutOfBlocks(RuntimeError):
    """The pool has no free or evictable block left."""


@dataclass
class Sequence:
    """One sequence's tokens and where their keys/values live."""

    tokens: list[int]
    block_table: list[int] = field(default_factory=list)
    cached: int = 0  # leading tokens whose K/V are already in the cache
    prefix_hits: int = 0  # blocks reused from the prefix cache at admission


class BlockPool:
    def __init__(self, num_blocks: int, block_size: int, layers: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        shape = (layers, num_blocks, block_size, kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.refcount = [0] * num_blocks
        self.free: deque[int] = deque(range(num_blocks))
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()
        self.prefix_hits = 0

    @property
    def used(self) -> int:
        return sum(1 for r in self.refcount if r > 0)

    def allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        elif self.evictable:
            block, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
        else:
            raise OutOfBlocks(f"all {self.num_blocks} KV blocks are in use")
        self.refcount[block] = 1
        return block

    def release(self, block: int) -> None:
        self.refcount[block] -= 1
        if self.refcount[block] == 0:
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                self.free.append(block)

    def _take_cached(self, block: int) -> None:
        if self.refcount[block] == 0:
            self.evictable.pop(block, None)
        self.refcount[block] += 1

    @staticmethod
    def chain_hash(previous: int, tokens: list[int]) -> int:
        return hash((previous, tuple(tokens)))

    def admit(self, seq: Sequence, reuse_prefix: bool = True) -> None:
        """Attach cached full blocks matching the sequence's prompt prefix (not its last token); with
        `reuse_prefix=False` every prompt token is computed (prompt logprobs need all their logits)."""
        if not reuse_prefix:
            return
        h, bs = 0, self.block_size
        for start in range(0, len(seq.tokens) - 1 - (len(seq.tokens) - 1) % bs, bs):
            h = self.chain_hash(h, seq.tokens[start:start + bs])
            block = self.by_hash.get(h)
            if block is None:
                break
            self._take_cached(block)
            seq.block_table.append(block)
            seq.cached += bs
            seq.prefix_hits += 1
            self.prefix_hits += 1

    def reserve(self, seq: Sequence, length: int) -> None:
        """Make room in the block table for `length` tokens."""
        while len(seq.block_table) * self.block_size < length:
            seq.block_table.append(self.allocate())

    def register_full_blocks(self, seq: Sequence) -> None:
        """Publish the sequence's completely written blocks to the prefix cache."""
        h, bs = 0, self.block_size
        for i in range(seq.cached // bs):
            h = self.chain_hash(h, seq.tokens[i * bs:(i + 1) * bs])
            block = seq.block_table[i]
            if block not in self.hash_of and h not in self.by_hash:
                self.by_hash[h], self.hash_of[block] = block, h

    def truncate(self, seq: Sequence, length: int) -> None:
        """Roll a sequence back to its first `length` tokens (rejected draft tokens)."""
        del seq.tokens[length:]
        seq.cached = min(seq.cached, length)
        keep = -(-length // self.block_size)
        for block in seq.block_table[keep:]:
            self.release(block)
        del seq.block_table[keep:]

    def move(self, seq: Sequence, source: int, target: int) -> None:
        """Copy position `source`'s K/V to position `target` in every layer (an accepted tree branch's node
        into the slot its position names)."""
        bs, table = self.block_size, seq.block_table
        src, dst = (table[source // bs], source % bs), (table[target // bs], target % bs)
        self.k[:, dst[0], dst[1]] = self.k[:, src[0], src[1]]
        self.v[:, dst[0], dst[1]] = self.v[:, src[0], src[1]]

    def free_sequence(self, seq: Sequence) -> None:
        for block in seq.block_table:
            self.release(block)
        seq.block_table.clear()
        seq.cached = 0

    def slots(self, seq: Sequence, start: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(block, offset) of positions start..end-1: compute once per forward, use in every layer."""
        pos = torch.arange(start, end)
        table = torch.tensor(seq.block_table)
        return (table[pos // self.block_size].to(self.k.device), (pos % self.block_size).to(self.k.device))

    def write(self, layer: int, slots: tuple[torch.Tensor, torch.Tensor], k: torch.Tensor, v: torch.Tensor) -> None:
        """Store K/V (tokens, kv_heads, head_dim) at `slots` (from `slots()`)."""
        blocks, offsets = slots
        self.k[layer, blocks, offsets] = k
        self.v[layer, blocks, offsets] = v

    def read(self, layer: int, slots: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """K/V at `slots` (all positions of a sequence so far): (tokens, kv_heads, head_dim) each."""
        blocks, offsets = slots
        return self.k[layer, blocks, offsets], self.v[layer, blocks, offsets]
