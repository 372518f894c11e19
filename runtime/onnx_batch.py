"""The scheduler's runner over an ONNX export: batched decode steps on per-sequence cache slots.

Each running sequence owns one slot (a row) of per-layer KV buffers shaped (slots, kv_heads,
context, head_dim). A step binds, as past and present of the graph (shared-buffer
GroupQueryAttention), the contiguous range of slots that holds the decoding sequences, with
one new token per row and an attention mask whose row b covers that sequence's own length:
GroupQueryAttention reads each row's length from the mask, writes the new key/value there and
attends to that row's cache only. Prompt chunks run one sequence at a time over a one-slot view.
Rows inside the range that are not decoding (free slots, prompts between chunks) get a dummy
token written at their first unwritten position, which their next chunk overwrites.

Exports from the torch.onnx fallback (`kv_cache: concat`) return new tensors every step; those
run one sequence at a time on their own caches.

The runner doubles as the scheduler's pool (`SlotPool`): a "block" is a whole slot, so admission
by blocks is admission by slots; there is no prefix sharing across sequences here.
"""

from __future__ import annotations

import numpy as np
import torch

from runtime.kv_cache import OutOfBlocks, Sequence
from runtime.onnx_backend import OnnxConcatCache, OnnxDecoder


class SlotPool:
    """One slot per sequence, lowest free first (keeps the decode range short)."""

    def __init__(self, slots: int, context: int):
        self.num_blocks, self.block_size = slots, context  # a slot holds a whole sequence
        self.owner: list[Sequence | None] = [None] * slots
        self.prefix_hits = 0

    @property
    def used(self) -> int:
        return sum(o is not None for o in self.owner)

    def admit(self, seq: Sequence, reuse_prefix: bool = True) -> None:
        free = next((i for i, o in enumerate(self.owner) if o is None), None)
        if free is None:
            raise OutOfBlocks(f"all {self.num_blocks} ONNX cache slots are in use")
        self.owner[free] = seq
        seq.block_table[:] = [free]
        seq.cached = 0

    def reserve(self, seq: Sequence, length: int) -> None:
        if length > self.block_size:
            raise OutOfBlocks(f"sequence of {length} tokens exceeds the ONNX cache ({self.block_size})")

    def register_full_blocks(self, seq: Sequence) -> None:
        """No prefix cache across slots."""

    def truncate(self, seq: Sequence, length: int) -> None:
        del seq.tokens[length:]
        seq.cached = min(seq.cached, length)

    def free_sequence(self, seq: Sequence) -> None:
        if seq.block_table:
            self.owner[seq.block_table[0]] = None
        seq.block_table.clear()
        seq.cached = 0


class OnnxBatchRunner:
    """`forward(seqs, last_only, ends)` as `PagedDecoder` has it, over an `OnnxDecoder`."""

    def __init__(self, decoder: OnnxDecoder, slots: int, context: int | None = None):
        self.decoder = decoder
        context = min(context or decoder.context_length, decoder.context_length)
        self.pool = SlotPool(slots, context)
        self.shared = decoder.kv_layout == "shared"
        shape = (slots, decoder.kv_heads, context, decoder.head_dim)
        self.kv = ([(np.zeros(shape, decoder.kv_dtype), np.zeros(shape, decoder.kv_dtype))
                    for _ in range(decoder.layers)] if self.shared else [])
        self.concat: dict[int, OnnxConcatCache] = {}  # per slot

    @property
    def runner(self) -> OnnxBatchRunner:
        """The scheduler takes an engine with `.pool` and `.runner`: this object is both."""
        return self

    @torch.inference_mode()
    def forward(self, seqs: list[Sequence], last_only: bool | list[bool] = True, ends: list[int] | None = None
                ) -> list[torch.Tensor]:
        lasts = last_only if isinstance(last_only, list) else [last_only] * len(seqs)
        ends = ends if ends is not None else [len(s.tokens) for s in seqs]
        results: list[torch.Tensor | None] = [None] * len(seqs)
        decode = [i for i, s in enumerate(seqs) if self.shared and s.cached > 0 and ends[i] - s.cached == 1]
        if decode:
            rows = self._decode([seqs[i] for i in decode])
            for j, i in enumerate(decode):
                results[i] = torch.from_numpy(rows[j])
        for i, seq in enumerate(seqs):
            if results[i] is None:
                results[i] = torch.from_numpy(self._chunk(seq, ends[i], lasts[i]))
        for seq, end in zip(seqs, ends, strict=True):
            seq.cached = end
        return results

    def _bind_slots(self, binding, lo: int, hi: int) -> None:
        dec = self.decoder
        for (past_k, past_v), (pres_k, pres_v), (k, v) in zip(dec.past_names, dec.present_names, self.kv,
                                                              strict=True):
            for past, present, buf in ((past_k, pres_k, k), (past_v, pres_v, v)):
                view = buf[lo:hi]
                binding.bind_input(past, "cpu", 0, buf.dtype, list(view.shape), view.ctypes.data)
                binding.bind_output(present, "cpu", 0, buf.dtype, list(view.shape), view.ctypes.data)

    def _run(self, lo: int, hi: int, ids: np.ndarray, lengths: list[int], last_only: bool) -> np.ndarray:
        """One graph run over slots lo..hi-1; row b attends to its first lengths[b] positions."""
        binding = self.decoder.session.io_binding()
        self._bind_slots(binding, lo, hi)
        mask = (np.arange(max(lengths))[None, :] < np.asarray(lengths)[:, None]).astype(np.int64)
        out = self.decoder.bind_inputs(binding, ids, mask, last_only)
        self.decoder.session.run_with_iobinding(binding)
        return out

    def _decode(self, seqs: list[Sequence]) -> list[np.ndarray]:
        slot_of = {s.block_table[0]: s for s in seqs}
        lo, hi = min(slot_of), max(slot_of) + 1
        ids = np.zeros((hi - lo, 1), dtype=np.int64)
        lengths = []
        for slot in range(lo, hi):
            seq = slot_of.get(slot) or self.pool.owner[slot]
            cached = seq.cached if seq is not None else 0
            if slot in slot_of:
                ids[slot - lo, 0] = seq.tokens[cached]
            lengths.append(cached + 1)
        out = self._run(lo, hi, ids, lengths, last_only=True)
        return [out[s.block_table[0] - lo] for s in seqs]

    def _chunk(self, seq: Sequence, end: int, last_only: bool) -> np.ndarray:
        ids = np.asarray([seq.tokens[seq.cached:end]], dtype=np.int64)
        slot = seq.block_table[0]
        if self.shared:
            return self._run(slot, slot + 1, ids, [end], last_only)[0]
        cache = self.concat.get(slot)  # a new sequence in a slot starts from cached == 0: a fresh cache
        if cache is None or seq.cached == 0 or cache.filled != seq.cached:
            cache = self.concat[slot] = self.decoder.new_cache(1, self.pool.block_size)
            ids = np.asarray([seq.tokens[:end]], dtype=np.int64)  # (rolled back: concat caches cannot truncate)
        rows = cache.run(ids, cache.filled, last_only)[0]
        return rows if last_only else rows[-(end - seq.cached):]
