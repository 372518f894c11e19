"""The Triton kernel of `runtime.paged_attention` (imported only where Triton is installed)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from runtime.triton_decode import (
    _attend_tile,
    _launch_options,
    _new_token,
    _start_softmax,
    _unpack_max,
    gdc_launch_dependents,
    gdc_wait,
)

QKV_TILE = 64  # positions per step of the attention loops (a multiple of the block size)


@triton.jit
def _paged_decode_kernel(q_ptr, k_pool, v_pool, tables_ptr, table_rows_ptr, lengths_ptr, out_ptr, q_stride_b,
                         q_stride_h, pool_block, pool_slot, pool_head, table_stride, out_stride_b, out_stride_h, scale,
                         window, GROUP: tl.constexpr, D: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr,
                         ROW_TABLES: tl.constexpr, PRECISION: tl.constexpr):
    """Query row b, KV head h: its query group against the blocks of its table (row b of the tables, or the
    row `table_rows[b]` names: the token rows of one prompt chunk share their sequence's), TILE positions
    per step (gathered from TILE // BLOCK blocks), online softmax."""
    b, h = tl.program_id(0), tl.program_id(1)
    d = tl.arange(0, D)
    g = tl.arange(0, 16)
    g_ok = g < GROUP
    q = tl.load(q_ptr + b * q_stride_b + (h * GROUP + g)[:, None] * q_stride_h + d[None, :], mask=g_ok[:, None],
                other=0.0)
    length = tl.load(lengths_ptr + b)
    table = tables_ptr + (tl.load(table_rows_ptr + b).to(tl.int64) if ROW_TABLES else b) * table_stride
    # start at the tile holding the oldest visible position, so no tile is wholly masked (no window: 2^30)
    first = tl.maximum(length - window, 0) // TILE * TILE
    best = tl.full((16,), float("-inf"), tl.float32)
    total = tl.zeros((16,), tl.float32)
    acc = tl.zeros((16, D), tl.float32)
    cols = tl.arange(0, TILE)
    for start in range(first, length, TILE):
        at_col = start + cols
        ok = (at_col < length) & (at_col > length - 1 - window)
        block = tl.load(table + at_col // BLOCK, mask=ok, other=0).to(tl.int64)
        at = block[:, None] * pool_block + (at_col % BLOCK)[:, None] * pool_slot + h * pool_head + d[None, :]
        best, total, acc = _attend_tile(q, k_pool + at, v_pool + at, ok, ok[None, :], best, total, acc, scale,
                                        PRECISION)
    out = acc / total[:, None]
    tl.store(out_ptr + b * out_stride_b + (h * GROUP + g)[:, None] * out_stride_h + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_ok[:, None])


def run(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, block_tables: torch.Tensor,
        lengths: torch.Tensor, scale: float, window: int | None, table_rows: torch.Tensor | None = None
        ) -> torch.Tensor:
    batch, heads, dim = q.shape
    kv_heads = k_pool.shape[2]
    q = q.to(k_pool.dtype)
    out = torch.empty_like(q)
    _paged_decode_kernel[(batch, kv_heads)](
        q, k_pool, v_pool, block_tables, lengths if table_rows is None else table_rows, lengths, out, q.stride(0),
        q.stride(1), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), block_tables.stride(0), out.stride(0),
        out.stride(1), scale, window or 2**30, GROUP=heads // kv_heads, D=dim, BLOCK=k_pool.shape[1],
        TILE=max(QKV_TILE, k_pool.shape[1]), ROW_TABLES=table_rows is not None,
        PRECISION="ieee" if q.dtype == torch.float32 else None, num_warps=4)
    return out


@triton.jit
def _paged_qkv_decode_kernel(qkv_ptr, cos_ptr, sin_ptr, k_pool, v_pool, tables_ptr, lengths_ptr, blocks_ptr,
                             offsets_ptr, out_ptr, qkv_stride, pool_block, pool_slot, pool_head, table_stride,
                             out_stride, scale, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                             D: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr, PRECISION: tl.constexpr,
                             PDL: tl.constexpr):
    """Sequence b, KV head h, from the fused q/k/v projection: rotate q (its group) and k at position
    length - 1, write k/v at (block, offset), attend over the earlier positions of its table and the new
    token (from registers: the kernel never reads what it just wrote). With PDL (batch 1 on Hopper, as the
    fused projections around it) the next kernel may start loading its weights while this one runs."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    b, h = tl.program_id(0), tl.program_id(1)
    pos = tl.load(lengths_ptr + b) - 1
    q, k, v = _new_token(qkv_ptr, qkv_stride, cos_ptr, sin_ptr, b, h, pos, HEADS, KV_HEADS, GROUP, D)
    q, k, v = q.to(k_pool.dtype.element_ty), k.to(k_pool.dtype.element_ty), v.to(v_pool.dtype.element_ty)
    d = tl.arange(0, D)
    g = tl.arange(0, 16)
    g_ok = g < GROUP
    slot = tl.load(blocks_ptr + b).to(tl.int64) * pool_block + tl.load(offsets_ptr + b) * pool_slot + h * pool_head
    tl.store(k_pool + slot + d, k)
    tl.store(v_pool + slot + d, v)
    best, total, acc = _start_softmax(q, k, v, scale, D)
    # TILE positions per step, gathered from TILE // BLOCK blocks of the table (fewer, longer steps than
    # one block at a time: a short sequence's program is latency-bound on its serial loop)
    cols = tl.arange(0, TILE)
    for start in range(0, pos, TILE):
        ok = start + cols < pos
        block = tl.load(tables_ptr + b * table_stride + (start + cols) // BLOCK, mask=ok, other=0).to(tl.int64)
        at = block[:, None] * pool_block + ((start + cols) % BLOCK)[:, None] * pool_slot + h * pool_head + d[None, :]
        best, total, acc = _attend_tile(q, k_pool + at, v_pool + at, ok, ok[None, :], best, total, acc, scale,
                                        PRECISION)
    out = acc / total[:, None]
    tl.store(out_ptr + b * out_stride + (h * GROUP + g)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None])




def run_qkv(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
            blocks: torch.Tensor, offsets: torch.Tensor, block_tables: torch.Tensor, lengths: torch.Tensor,
            heads: int, scale: float) -> torch.Tensor:
    batch = qkv.shape[0]
    kv_heads, dim = k_pool.shape[2], k_pool.shape[3]
    out = torch.empty(batch, heads * dim, device=qkv.device, dtype=qkv.dtype)
    _paged_qkv_decode_kernel[(batch, kv_heads)](
        qkv, cos, sin, k_pool, v_pool, block_tables, lengths, blocks, offsets, out, qkv.stride(0), k_pool.stride(0),
        k_pool.stride(1), k_pool.stride(2), block_tables.stride(0), out.stride(0), scale, HEADS=heads,
        KV_HEADS=kv_heads, GROUP=heads // kv_heads, D=dim, BLOCK=k_pool.shape[1], TILE=max(QKV_TILE, k_pool.shape[1]),
        PRECISION="ieee" if qkv.dtype == torch.float32 else None, **_launch_options(4, batch))
    return out


@triton.jit
def _rope_write_kernel(qkv_ptr, cos_ptr, sin_ptr, pos_ptr, blocks_ptr, offsets_ptr, k_pool, v_pool, q_out, qkv_stride,
                       pool_block, pool_slot, pool_head, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
                       GROUP: tl.constexpr, D: tl.constexpr):
    """Token t, KV head h of a prompt chunk: rotate its query group and k, write k and v into the pool."""
    t, h = tl.program_id(0), tl.program_id(1)
    q, k, v = _new_token(qkv_ptr, qkv_stride, cos_ptr, sin_ptr, t, h, tl.load(pos_ptr + t), HEADS, KV_HEADS, GROUP, D)
    d = tl.arange(0, D)
    g = tl.arange(0, 16)
    tl.store(q_out + t * HEADS * D + (h * GROUP + g)[:, None] * D + d[None, :], q, mask=(g < GROUP)[:, None])
    slot = tl.load(blocks_ptr + t).to(tl.int64) * pool_block + tl.load(offsets_ptr + t) * pool_slot + h * pool_head
    tl.store(k_pool + slot + d, k)
    tl.store(v_pool + slot + d, v)


def run_rope_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                   blocks: torch.Tensor, offsets: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor,
                   heads: int) -> torch.Tensor:
    tokens = qkv.shape[0]
    kv_heads, dim = k_pool.shape[2], k_pool.shape[3]
    q = torch.empty(tokens, heads, dim, device=qkv.device, dtype=qkv.dtype)
    _rope_write_kernel[(tokens, kv_heads)](qkv, cos, sin, positions, blocks, offsets, k_pool, v_pool, q, qkv.stride(0),
                                           k_pool.stride(0), k_pool.stride(1), k_pool.stride(2), HEADS=heads,
                                           KV_HEADS=kv_heads, GROUP=heads // kv_heads, D=dim, num_warps=1)
    return q


@triton.jit
def _advance_kernel(best_ptr, ids_ptr, pos_ptr, len_ptr, blocks_ptr, offsets_ptr, tables_ptr, table_stride, width,
                    rows, BLOCK: tl.constexpr, R: tl.constexpr):
    """A multi-step decode's metadata for its next step, in one launch: the argmax packed by the LM head becomes
    each row's input id, positions and lengths + 1, the new position's block from the row's table."""
    r = tl.arange(0, R)
    ok = r < rows
    best = tl.load(best_ptr + r, mask=ok, other=0)
    tl.store(ids_ptr + r, _unpack_max(best).to(tl.int32), mask=ok)
    pos = tl.load(pos_ptr + r, mask=ok, other=0) + 1
    tl.store(pos_ptr + r, pos, mask=ok)
    tl.store(len_ptr + r, tl.load(len_ptr + r, mask=ok, other=0) + 1, mask=ok)
    column = tl.minimum(pos // BLOCK, width - 1)  # (the last step's advance may point past the reserved blocks)
    tl.store(blocks_ptr + r, tl.load(tables_ptr + r * table_stride + column, mask=ok, other=0), mask=ok)
    tl.store(offsets_ptr + r, pos % BLOCK, mask=ok)


def run_advance(best: torch.Tensor, ids: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor,
                blocks: torch.Tensor, offsets: torch.Tensor, block_tables: torch.Tensor, block_size: int) -> None:
    rows = ids.shape[0]
    _advance_kernel[(1,)](best, ids, positions, lengths, blocks, offsets, block_tables, block_tables.stride(0),
                          block_tables.shape[1], rows, BLOCK=block_size, R=triton.next_power_of_2(rows), num_warps=1)
