"""Batched decode attention over the paged KV pool: one query per sequence, all sequences in one call.

The paged engine's decode step used to attend sequence by sequence (a Python loop of gathers and
SDPA calls per layer). Here every decoding sequence attends in one kernel: a Triton program per
(sequence, KV head) walks that sequence's block table with an online softmax, its whole query
group (GQA) padded to 16 rows so the products run on tensor cores. Variable lengths, shared prefix
blocks and sliding windows are just what the block table and the mask say. Without CUDA (or for
soft-capped logits, or shapes the kernel does not take) the same call gathers the blocks and runs
one masked attention for the batch (`paged_decode_attention_torch`), which is also the reference
the kernel is tested against (in Triton's interpreter on the CPU).
"""

from __future__ import annotations

import torch

from core.family import attend


def paged_decode_attention_torch(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                                 block_tables: torch.Tensor, lengths: torch.Tensor, scale: float,
                                 window: int | None = None, softcap: float | None = None) -> torch.Tensor:
    """q (B, H, D); pools (blocks, block_size, KV, D); block_tables (B, max_blocks); lengths (B,) -> (B, H, D).

    Sequence b's query sits at position lengths[b] - 1 and sees positions < lengths[b] (and within
    `window` of itself)."""
    batch, blocks = block_tables.shape
    size = k_pool.shape[1]
    keys = k_pool[block_tables].reshape(batch, blocks * size, *k_pool.shape[2:]).transpose(1, 2)  # (B, KV, L, D)
    values = v_pool[block_tables].reshape(batch, blocks * size, *v_pool.shape[2:]).transpose(1, 2)
    cols = torch.arange(blocks * size, device=q.device)[None, :]
    mask = cols < lengths[:, None]
    if window is not None:
        mask &= cols > lengths[:, None] - 1 - window
    out = attend(q[:, :, None].to(keys.dtype), keys, values, mask[:, None, None, :], scale, softcap)
    return out[:, :, 0].to(q.dtype)


def kernel_applies(q: torch.Tensor, k_pool: torch.Tensor, softcap: float | None, interpreter: bool = False) -> bool:
    """CUDA tensors (or, with `interpreter`, Triton's CPU interpreter: tests), shapes the kernel takes."""
    heads, dim = q.shape[1], q.shape[2]
    group = heads // k_pool.shape[2]
    return (_triton is not None and softcap is None and group <= 16 and dim >= 16 and dim & (dim - 1) == 0
            and k_pool.shape[1] >= 16 and k_pool.shape[1] & (k_pool.shape[1] - 1) == 0
            and (q.is_cuda or (interpreter and _interpreting())))


def paged_decode_attention(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
                           lengths: torch.Tensor, scale: float, window: int | None = None,
                           softcap: float | None = None, interpreter: bool = False,
                           table_rows: torch.Tensor | None = None) -> torch.Tensor:
    """The Triton kernel where it applies (CUDA; the interpreter when tests ask), else the gathered reference.
    `table_rows` (B,): the row of `block_tables` each query reads (default: its own; several query rows of one
    prompt chunk share their sequence's)."""
    if not kernel_applies(q, k_pool, softcap, interpreter):
        tables = block_tables if table_rows is None else block_tables[table_rows.long()]
        return paged_decode_attention_torch(q, k_pool, v_pool, tables, lengths, scale, window, softcap)
    return _triton.run(q, k_pool, v_pool, block_tables, lengths, scale, window, table_rows)


def paged_qkv_decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor,
                               v_pool: torch.Tensor, blocks: torch.Tensor, offsets: torch.Tensor,
                               block_tables: torch.Tensor, lengths: torch.Tensor, heads: int, scale: float
                               ) -> torch.Tensor:
    """The fused decode step's attention (Triton only): qkv (B, (H + 2 KV) D) straight from the fused
    projection, rotated at position lengths - 1 with tables (positions, D), its k/v written at (blocks,
    offsets), attended over its block table -> (B, H D). Plain Llama layers: full rotary, no window."""
    return _triton.run_qkv(qkv, cos, sin, k_pool, v_pool, blocks, offsets, block_tables, lengths, heads, scale)


def rope_and_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   blocks: torch.Tensor, offsets: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   heads: int) -> torch.Tensor:
    """Prompt chunks' tokens (Triton only): qkv (tokens, (H + 2 KV) D) from the fused projection, q and k
    rotated at `positions` (tables (positions, D)), k and v written at (blocks, offsets) -> q (tokens, H, D).
    One kernel where the torch ops take a dozen launches per layer. Plain Llama layers: full rotary."""
    return _triton.run_rope_write(qkv, cos, sin, positions, blocks, offsets, k_pool, v_pool, heads)


def advance_decode(best: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                   blocks: torch.Tensor, offsets: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> None:
    """A multi-step decode's next metadata in one kernel (Triton only): ids <- the argmax packed in `best` by
    `fused_linear(..., argmax_into=best)`, positions and lengths + 1, (blocks, offsets) of the new position."""
    _triton.run_advance(best, ids, positions, lengths, blocks, offsets, block_tables, block_size)


def _interpreting() -> bool:
    import os

    return os.environ.get("TRITON_INTERPRET") == "1"


try:
    from runtime import paged_attention_triton as _triton
except ImportError:  # no Triton: the gathered path serves
    _triton = None
