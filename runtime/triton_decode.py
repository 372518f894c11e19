"""Fused Triton kernels for one decode step of `StaticDecoder`: five kernels per layer instead of ~12.

At batch 1 a 135M model's decode step is launch-bound, not bandwidth-bound (the weights stream in
~63 us on an H200; the Inductor-compiled step took ~1,000 us for ~350 kernels). So the work of a
layer is folded into five kernels:

1. RMSNorm (prologue) + fused q/k/v projection;
2. rotary on q and k + KV-cache write + one-query attention over the cache (online softmax, GQA:
   one program per row and KV head serves its whole query group; the new token comes from
   registers, so the kernel never reads what it just wrote);
3. o-projection + residual add (epilogue);
4. RMSNorm (prologue) + gate/up projection + SiLU(gate) * up (epilogue);
5. down projection + residual add (epilogue).

The projection kernel is a GEMV for batch 1 (CUDA cores, many small output tiles to fill the SMs)
and a `tl.dot` tile for larger batches. Every kernel also runs under `TRITON_INTERPRET=1` on the
CPU, which is how CI checks them against the PyTorch step.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

try:  # programmatic dependent launch (Hopper+): the next kernel starts while this one finishes
    from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
except ImportError:  # older Triton
    gdc_launch_dependents = gdc_wait = None

# tile sizes (bench/gpu_decode.py --sweep measures alternatives on the GPU):
# GEMV (batch 1): output rows per program and warps, for N <= 4096 and above (the whole K at once);
# GEMM (batch > 1): output columns per program, K step, warps; attention: cache columns per step, warps
# pdl: at batch 1, launch with programmatic dependent launch (each kernel loads its weights before
# waiting for the previous kernel's output), on Hopper+ GPUs only. Measured on the H200: batch 1
# 1,602 -> 1,933 tok/s with it; batch 32 (GEMM tiles, nothing to prefetch) 32.3k -> 27.4k, so not there.
# small: 2..GEMV_MAX_ROWS rows (a small batch, a speculative verify pass) go through the GEMV with the weight slab
# shared by the rows, reduced one row after another ("gemv": bitwise the batch-1 result) or all rows in one
# reduction ("gemv-rows", the default: TILES["gemv_rows"] maps the padded row count to tiles as "gemv" has them;
# `bench/verify_pass.py` chose them on the H200: verify pass over 2 / 4 / 5 rows 0.477 / 0.637 / 0.914 ms against
# 0.571 / 0.936 / 1.194 with "gemv", a decode step 0.450), or the tl.dot tile with "gemm_small" ("gemm"; "gemm+pdl" with PDL):
# bench/static_speculative.py --small measures them.
TILES = {"gemv": (8, 4, 64, 8), "gemv_rows": {2: (2, 1, 16, 4), 4: (2, 4, 16, 8), 8: (2, 4, 8, 8)}, "gemm": (16, 256, 4), "gemm_small": (16, 256, 4), "attention": (128, 4),
         "small": ("gemv-rows",),
         "pdl": (gdc_wait is not None and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (9, 0),)}
if os.environ.get("TRITON_INTERPRET") == "1":
    # Triton's interpreter (the CPU tests) runs a launch's programs one after another, each op a numpy call:
    # few wide programs are ~9x faster than the GPU's many narrow ones. Same kernels, other constexprs (the
    # GPU's own tiles are tested where they run: the CUDA tests of bench/gpu_stage.sh).
    TILES.update({"gemv": (64, 4, 64, 4), "gemv_rows": {rows: (64, 4, 64, 4) for rows in (2, 4, 8)},
                  "gemm": (64, 64, 4), "gemm_small": (64, 64, 4)})


ARGMAX_EMPTY = -(2**63) + 1  # below every packed (value, column)
GEMV_MAX_ROWS = 8  # up to this many rows (a small batch, a speculative verify pass) share one weight load


def _launch_options(warps: int, batch: int, pdl: bool | None = None) -> dict:
    pdl = TILES["pdl"][0] and (batch == 1 if pdl is None else pdl)
    return {"num_warps": warps, "PDL": pdl, **({"launch_pdl": True} if pdl else {})}


@triton.jit
def _pack_max(values, cols, ok):
    """(value, column) -> int64 ordered like the values, ties to the lower column (as torch.argmax)."""
    bits = values.to(tl.int32, bitcast=True)
    key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF).to(tl.int64)  # signed order of the floats
    return tl.where(ok, (key << 32) | (0xFFFFFFFF - cols.to(tl.int64)), -9223372036854775807)


@triton.jit
def _unpack_max(best):
    """The column packed by `_pack_max`."""
    return 0xFFFFFFFF - (best & 0xFFFFFFFF)


@triton.jit
def _finish_step_kernel(best_ptr, tokens_ptr, pos_ptr, col_ptr, B, BLOCK: tl.constexpr, PDL: tl.constexpr):
    """Unpack the argmax into the next input tokens, reset it, advance positions and the cache column."""
    if PDL:
        gdc_wait()
    rows = tl.arange(0, BLOCK)
    ok = rows < B
    best = tl.load(best_ptr + rows, mask=ok, other=0)
    tl.store(tokens_ptr + rows, _unpack_max(best), mask=ok)
    tl.store(best_ptr + rows, tl.full((BLOCK,), -9223372036854775807, tl.int64), mask=ok)
    tl.store(pos_ptr + rows, tl.load(pos_ptr + rows, mask=ok) + 1, mask=ok)
    tl.store(col_ptr, tl.load(col_ptr) + 1)


def finish_step(best: torch.Tensor, tokens: torch.Tensor, pos: torch.Tensor, col: torch.Tensor) -> None:
    """tokens (B, 1) <- argmax packed in best (B,) by `fused_linear(..., argmax_into=best)`; pos, col += 1."""
    batch = best.shape[0]
    _finish_step_kernel[(1,)](best, tokens, pos, col, batch, BLOCK=triton.next_power_of_2(batch),
                              **_launch_options(1, batch))


def unpack_argmax(best: torch.Tensor) -> torch.Tensor:
    """The column ids packed by `fused_linear(..., argmax_into=best)` (PyTorch ops: a graph's last few kernels)."""
    return 0xFFFFFFFF - (best & 0xFFFFFFFF)


@triton.jit
def _linear_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, res_ptr, M, N, K, eps,
                   HAS_NORM: tl.constexpr, HAS_RES: tl.constexpr, SWIGLU: tl.constexpr, ARGMAX: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
                   PDL: tl.constexpr):
    """out[M, N] = norm(x)[M, K] @ w[N, K]^T (+ res), or silu(. @ w[:N]^T) * (. @ w[N:]^T); batch > 1."""
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    if HAS_NORM:  # every program recomputes the row norms: K is small and x sits in L2
        squares = tl.zeros((BLOCK_M,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            x = tl.load(x_ptr + rows[:, None] * K + (k0 + ks)[None, :],
                        mask=row_ok[:, None] & ((k0 + ks) < K)[None, :], other=0.0).to(tl.float32)
            squares += tl.sum(x * x, 1)
        inv_rms = 1.0 / tl.sqrt(squares / K + eps)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    acc_up = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_ok = (k0 + ks) < K
        x = tl.load(x_ptr + rows[:, None] * K + (k0 + ks)[None, :], mask=row_ok[:, None] & k_ok[None, :],
                    other=0.0)
        if HAS_NORM:
            g = tl.load(norm_ptr + k0 + ks, mask=k_ok, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * inv_rms[:, None]).to(x.dtype).to(tl.float32) * g[None, :]
        x = x.to(w_ptr.dtype.element_ty)
        w_mask = col_ok[:, None] & k_ok[None, :]
        w = tl.load(w_ptr + cols[:, None] * K + (k0 + ks)[None, :], mask=w_mask, other=0.0)
        acc = tl.dot(x, tl.trans(w), acc, input_precision=PRECISION)
        if SWIGLU:
            w_up = tl.load(w_ptr + (N + cols)[:, None] * K + (k0 + ks)[None, :], mask=w_mask, other=0.0)
            acc_up = tl.dot(x, tl.trans(w_up), acc_up, input_precision=PRECISION)
    out_offsets = rows[:, None] * N + cols[None, :]
    out_mask = row_ok[:, None] & col_ok[None, :]
    if SWIGLU:  # round like the unfused path: gate and up in the weights' dtype, then SiLU(gate) * up
        gate = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
        up = acc_up.to(w_ptr.dtype.element_ty).to(tl.float32)
        acc = (gate / (1.0 + tl.exp(-gate))).to(w_ptr.dtype.element_ty).to(tl.float32) * up
    if HAS_RES:
        acc = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
        acc += tl.load(res_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32)
    if ARGMAX:  # out is the (M,) int64 running argmax, not logits
        packed = _pack_max(acc.to(w_ptr.dtype.element_ty).to(tl.float32), cols[None, :] + rows[:, None] * 0, out_mask)
        tl.atomic_max(out_ptr + rows, tl.max(packed, 1), mask=row_ok)
    else:
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, res_ptr, N, K, eps, HAS_NORM: tl.constexpr,
                 HAS_RES: tl.constexpr, SWIGLU: tl.constexpr, ARGMAX: tl.constexpr, BLOCK_N: tl.constexpr,
                 K_PAD: tl.constexpr, ROWS: tl.constexpr, PDL: tl.constexpr):
    """Up to a few rows: a (BLOCK_N, K) slab of w in one load, no loop, reused by each row of x.

    A decode GEMV of this size is bound by memory latency, not bandwidth: one round trip per
    program instead of a chain of K steps (and a separate pass for the norm). Each row's sum is
    the batch-1 code, so a row's result does not depend on how many rows come with it; but the
    rows' reductions run one after another (on the H200 about +1.3 us per kernel per row).
    """
    if PDL:
        gdc_launch_dependents()
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, K_PAD)
    k_ok, col_ok = ks < K, cols < N
    w_mask = col_ok[:, None] & k_ok[None, :]
    w = tl.load(w_ptr + cols[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
    if SWIGLU:
        w_up = tl.load(w_ptr + (N + cols)[:, None] * K + ks[None, :], mask=w_mask, other=0.0)
    if PDL:  # the weights are in flight; now wait for the previous kernel's output
        gdc_wait()
    if HAS_NORM:
        gain = tl.load(norm_ptr + ks, mask=k_ok, other=0.0).to(tl.float32)
    for r in tl.static_range(ROWS):
        x = tl.load(x_ptr + r * K + ks, mask=k_ok, other=0.0)
        if HAS_NORM:
            xf = x.to(tl.float32)
            inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / K + eps)  # (no bf16 arithmetic: the
            x = (xf * inv_rms).to(x.dtype).to(tl.float32) * gain  # interpreter cannot do it)
        x = x.to(w_ptr.dtype.element_ty).to(tl.float32)
        acc = tl.sum(w.to(tl.float32) * x[None, :], 1)
        if SWIGLU:  # round like the unfused path: gate and up in the weights' dtype, then SiLU(gate) * up
            gate = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
            up = tl.sum(w_up.to(tl.float32) * x[None, :], 1).to(w_ptr.dtype.element_ty).to(tl.float32)
            acc = (gate / (1.0 + tl.exp(-gate))).to(w_ptr.dtype.element_ty).to(tl.float32) * up
        if HAS_RES:
            acc = (acc.to(w_ptr.dtype.element_ty).to(tl.float32)
                   + tl.load(res_ptr + r * N + cols, mask=col_ok).to(tl.float32))
        if ARGMAX:  # out is the running argmax (one int64 per row), not logits
            tl.atomic_max(out_ptr + r,
                          tl.max(_pack_max(acc.to(w_ptr.dtype.element_ty).to(tl.float32), cols, col_ok), 0))
        else:
            tl.store(out_ptr + r * N + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)


@triton.jit
def _gemv_rows_kernel(x_ptr, w_ptr, out_ptr, norm_ptr, res_ptr, M, N, K, eps, HAS_NORM: tl.constexpr,
                      HAS_RES: tl.constexpr, SWIGLU: tl.constexpr, ARGMAX: tl.constexpr, BLOCK_N: tl.constexpr,
                      K_PAD: tl.constexpr, ROWS_PAD: tl.constexpr, PDL: tl.constexpr):
    """`_gemv_kernel` with the rows reduced together: one (ROWS_PAD, BLOCK_N, K) product, one reduction.

    The row-by-row GEMV pays each row's load and reductions in sequence; here the latency is paid once,
    so a speculative verify pass over k + 1 rows can cost about one decode step. Weights and rows are
    loaded straight into the product's 3-D shape (no layout conversion of the weight slab). A row's sum
    may round differently from the batch-1 GEMV (another reduction order).
    """
    if PDL:
        gdc_launch_dependents()
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, ROWS_PAD)
    k3 = tl.arange(0, K_PAD)[None, None, :]
    w_at = w_ptr + cols[None, :, None] * K + k3
    w_mask = (cols < N)[None, :, None] & (k3 < K)
    w = tl.load(w_at, mask=w_mask, other=0.0)  # (1, BLOCK_N, K_PAD)
    if SWIGLU:
        w_up = tl.load(w_at + N * K, mask=w_mask, other=0.0)
    if PDL:
        gdc_wait()
    x = tl.load(x_ptr + rows[:, None, None] * K + k3, mask=(rows < M)[:, None, None] & (k3 < K), other=0.0)
    if HAS_NORM:
        xf = x.to(tl.float32)
        inv_rms = 1.0 / tl.sqrt(tl.sum(xf * xf, 2, keep_dims=True) / K + eps)
        gain = tl.load(norm_ptr + k3, mask=k3 < K, other=0.0).to(tl.float32)
        x = (xf * inv_rms).to(x.dtype).to(tl.float32) * gain
    x = x.to(w_ptr.dtype.element_ty).to(tl.float32)  # (ROWS_PAD, 1, K_PAD)
    acc = tl.sum(w.to(tl.float32) * x, 2)  # (ROWS_PAD, BLOCK_N)
    out_offsets = rows[:, None] * N + cols[None, :]
    out_mask = (rows < M)[:, None] & (cols < N)[None, :]
    if SWIGLU:
        gate = acc.to(w_ptr.dtype.element_ty).to(tl.float32)
        up = tl.sum(w_up.to(tl.float32) * x, 2).to(w_ptr.dtype.element_ty).to(tl.float32)
        acc = (gate / (1.0 + tl.exp(-gate))).to(w_ptr.dtype.element_ty).to(tl.float32) * up
    if HAS_RES:
        acc = (acc.to(w_ptr.dtype.element_ty).to(tl.float32)
               + tl.load(res_ptr + out_offsets, mask=out_mask, other=0.0).to(tl.float32))
    if ARGMAX:
        packed = _pack_max(acc.to(w_ptr.dtype.element_ty).to(tl.float32), cols[None, :] + rows[:, None] * 0, out_mask)
        tl.atomic_max(out_ptr + rows, tl.max(packed, 1), mask=rows < M)
    else:
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


TORCH_GEMM_ROWS = 256  # above this many rows (prompt chunks) cuBLAS beats the small-M Triton tiles


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, k, x_stride, out_stride, eps, K_PAD: tl.constexpr):
    """Row r: RMSNorm rounded to x's dtype, times the norm weight, rounded to the output's (as the fused kernels)."""
    row = tl.program_id(0)
    cols = tl.arange(0, K_PAD)
    ok = cols < k
    x = tl.load(x_ptr + row * x_stride + cols, mask=ok, other=0.0).to(tl.float32)
    normed = (x * tl.rsqrt(tl.sum(x * x, 0) / k + eps)).to(x_ptr.dtype.element_ty).to(tl.float32)
    y = normed * tl.load(w_ptr + cols, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * out_stride + cols, y.to(out_ptr.dtype.element_ty), mask=ok)


def rms_norm_rows(x: torch.Tensor, norm: torch.Tensor, eps: float, dtype: torch.dtype) -> torch.Tensor:
    """x (M, K) -> RMSNorm(x) * norm in `dtype`, one kernel (torch's ops take seven)."""
    m, k = x.shape
    out = torch.empty(m, k, device=x.device, dtype=dtype)
    _rms_norm_kernel[(m,)](x, norm, out, k, x.stride(0), out.stride(0), eps, K_PAD=triton.next_power_of_2(k),
                           num_warps=4)
    return out


def linear_torch(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 1e-5,
                 residual: torch.Tensor | None = None, swiglu: bool = False) -> torch.Tensor:
    """`fused_linear` (without argmax) as cuBLAS's GEMM between few kernels, rounding where the kernel rounds:
    for many rows, where cuBLAS outruns the Triton tiles tuned for decode-sized batches. (A bf16 torch op
    computes in fp32 and rounds once, so the epilogues need no fp32 copies when every dtype is the weights'.)"""
    out_dtype = x.dtype
    if norm is not None:
        x = rms_norm_rows(x, norm, eps, weight.dtype)
    acc = torch.nn.functional.linear(x.to(weight.dtype), weight)  # rounded to the weights' dtype, as the kernel
    same = out_dtype == weight.dtype and (residual is None or residual.dtype == weight.dtype)
    if swiglu:
        gate, up = acc.chunk(2, dim=-1)
        if same:
            return torch.nn.functional.silu(gate) * up
        return (torch.nn.functional.silu(gate.float()).to(weight.dtype).float() * up.float()).to(out_dtype)
    if residual is not None:
        return acc + residual if same else (acc.float() + residual.float()).to(out_dtype)
    return acc.to(out_dtype)


def fused_linear(x: torch.Tensor, weight: torch.Tensor, norm: torch.Tensor | None = None, eps: float = 1e-5,
                 residual: torch.Tensor | None = None, swiglu: bool = False, argmax_into: torch.Tensor | None = None
                 ) -> torch.Tensor:
    """x (M, K) -> (M, N): optional RMSNorm of x before, residual add or SwiGLU after (weight (2N, K)).

    With `argmax_into` ((M,) int64 holding `ARGMAX_EMPTY`) the outputs are not written: each row's argmax is
    folded into it (read it with `finish_step`).
    """
    m, k = x.shape
    if m > TORCH_GEMM_ROWS and argmax_into is None:
        return linear_torch(x, weight, norm, eps, residual, swiglu)
    n = weight.shape[0] // 2 if swiglu else weight.shape[0]
    out = argmax_into if argmax_into is not None else torch.empty(m, n, device=x.device, dtype=x.dtype)
    flags = {"HAS_NORM": norm is not None, "HAS_RES": residual is not None, "SWIGLU": swiglu,
             "ARGMAX": argmax_into is not None}
    norm_arg, res_arg = (norm if norm is not None else x), (residual if residual is not None else x)
    small = TILES["small"][0]
    small_n, small_warps, large_n, large_warps = TILES["gemv"]
    block_n, warps = (small_n, small_warps) if n <= 4096 else (large_n, large_warps)
    if 1 < m <= GEMV_MAX_ROWS and small == "gemv-rows":
        rows_pad = triton.next_power_of_2(m)
        small_n, small_warps, large_n, large_warps = TILES["gemv_rows"][rows_pad]
        block_n, warps = (small_n, small_warps) if n <= 4096 else (large_n, large_warps)
        _gemv_rows_kernel[(triton.cdiv(n, block_n),)](x, weight, out, norm_arg, res_arg, m, n, k, eps, **flags,
                                                      BLOCK_N=block_n, K_PAD=triton.next_power_of_2(k),
                                                      ROWS_PAD=rows_pad, **_launch_options(warps, 1))
        return out
    if m == 1 or (m <= GEMV_MAX_ROWS and small == "gemv"):  # GEMV: small output slabs spread even N = 576
        _gemv_kernel[(triton.cdiv(n, block_n),)](x, weight, out, norm_arg, res_arg, n, k, eps, **flags, BLOCK_N=block_n,
                                                 K_PAD=triton.next_power_of_2(k), ROWS=m,
                                                 **_launch_options(warps, 1))
        return out
    block_n, block_k, warps = TILES["gemm_small" if m <= 16 else "gemm"]
    if x.dtype == torch.float32:  # 4-byte tiles: a shorter K step keeps the pipelined stages in shared memory
        block_k = min(block_k, 64)
    block_m = min(64, max(16, triton.next_power_of_2(m)))
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _linear_kernel[grid](x, weight, out, norm_arg, res_arg, m, n, k, eps, **flags, BLOCK_M=block_m, BLOCK_N=block_n,
                         BLOCK_K=block_k, PRECISION="ieee" if x.dtype == torch.float32 else None,
                         **_launch_options(warps, m, pdl=m <= 16 and small == "gemm+pdl"))
    return out


@triton.jit
def _rotary(x, x_partner, cos, sin, sign):
    """Rotary embedding in fp32: x * cos + rotate_half(x) * sin, rotate_half read as the partner lanes."""
    return x.to(tl.float32) * cos + sign * x_partner.to(tl.float32) * sin


@triton.jit
def _new_token(qkv_ptr, qkv_stride, cos_ptr, sin_ptr, b, h, pos, HEADS: tl.constexpr, KV_HEADS: tl.constexpr,
               GROUP: tl.constexpr, D: tl.constexpr):
    """Row b's new token for KV head h, from the fused q/k/v row: its query group (padded to 16 rows) and k
    rotated at `pos` (tables (positions, D)), and v; in the row's dtype."""
    d = tl.arange(0, D)
    partner = (d + D // 2) % D  # rotate_half: x[d + D/2] (negated) in the first half, x[d - D/2] after
    sign = tl.where(d < D // 2, -1.0, 1.0)
    cos = tl.load(cos_ptr + pos * D + d).to(tl.float32)
    sin = tl.load(sin_ptr + pos * D + d).to(tl.float32)
    g = tl.arange(0, 16)
    g_ok = g < GROUP
    row = qkv_ptr + b * qkv_stride
    q_at = row + (h * GROUP + g)[:, None] * D
    q = tl.load(q_at + d[None, :], mask=g_ok[:, None], other=0.0)
    q = _rotary(q, tl.load(q_at + partner[None, :], mask=g_ok[:, None], other=0.0), cos[None, :], sin[None, :],
                sign[None, :]).to(qkv_ptr.dtype.element_ty)
    k_at = row + HEADS * D + h * D
    k = _rotary(tl.load(k_at + d), tl.load(k_at + partner), cos, sin, sign).to(qkv_ptr.dtype.element_ty)
    v = tl.load(row + (HEADS + KV_HEADS) * D + h * D + d)
    return q, k, v


@triton.jit
def _start_softmax(q, k, v, scale, D: tl.constexpr):
    """Online-softmax state after the new token alone (from registers: never read what was just written)."""
    best = tl.sum(q.to(tl.float32) * k.to(tl.float32)[None, :], 1) * scale  # (16,)
    total = tl.full((16,), 1.0, tl.float32)
    acc = tl.zeros((16, D), tl.float32) + v.to(tl.float32)[None, :]
    return best, total, acc


@triton.jit
def _attend_tile(q, key_ptrs, value_ptrs, ok, allowed, best, total, acc, scale, PRECISION: tl.constexpr):
    """One online-softmax step over a tile of cache columns (loaded where `ok`, scored where `allowed`)."""
    keys = tl.load(key_ptrs, mask=ok[:, None], other=0.0)
    values = tl.load(value_ptrs, mask=ok[:, None], other=0.0)
    scores = tl.dot(q, tl.trans(keys), input_precision=PRECISION) * scale  # (query rows, BLOCK_L)
    scores = tl.where(allowed, scores, float("-inf"))
    new_best = tl.maximum(best, tl.max(scores, 1))
    alpha = tl.exp(best - new_best)
    p = tl.exp(scores - new_best[:, None])
    total = total * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(values.dtype), values, input_precision=PRECISION)
    return new_best, total, acc


@triton.jit
def _decode_attention_kernel(qkv_ptr, k_cache, v_cache, cos_ptr, sin_ptr, pos_ptr, col_ptr, valid_ptr, out_ptr,
                             qkv_stride, cache_b, cache_h, cache_l, valid_stride, out_stride, scale,
                             HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr,
                             D: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """Row b, KV head h: rotate q (its query group) and k, write k/v at column col, attend.

    The query group is padded to 16 rows so both products run on tensor cores (tl.dot), which
    also lets Triton pipeline the cache loads across loop steps.
    """
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    b, h = tl.program_id(0), tl.program_id(1)
    col = tl.load(col_ptr)
    q, k, v = _new_token(qkv_ptr, qkv_stride, cos_ptr, sin_ptr, b, h, tl.load(pos_ptr + b), HEADS, KV_HEADS, GROUP, D)
    d = tl.arange(0, D)
    g = tl.arange(0, 16)
    g_ok = g < GROUP
    slot = b * cache_b + h * cache_h + col * cache_l
    tl.store(k_cache + slot + d, k)
    tl.store(v_cache + slot + d, v)
    if h == 0:
        tl.store(valid_ptr + b * valid_stride + col, 1)
    best, total, acc = _start_softmax(q, k, v, scale, D)
    base = b * cache_b + h * cache_h
    for start in range(0, col, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        ok = (cols < col) & (tl.load(valid_ptr + b * valid_stride + cols, mask=cols < col, other=0) != 0)
        at = base + cols[:, None] * cache_l + d[None, :]
        best, total, acc = _attend_tile(q, k_cache + at, v_cache + at, ok, ok[None, :], best, total, acc, scale,
                                        PRECISION)
    out = acc / total[:, None]
    tl.store(out_ptr + b * out_stride + (h * GROUP + g)[:, None] * D + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=g_ok[:, None])


def decode_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, pos: torch.Tensor, col: torch.Tensor, valid: torch.Tensor,
                     heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv (B, (H + 2 KV) D) of the new token -> attention output (B, H D); updates caches and `valid`.

    Caches are (B, KV, L, D); `pos` (B,) rotary positions; `col` (1,) the cache column written now;
    `valid` (B, L) bool marks the columns each row may attend to (left padding is False).
    """
    batch = qkv.shape[0]
    group = _query_group(heads, kv_heads, head_dim)
    out = torch.empty(batch, heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    block_l, warps = TILES["attention"]
    _decode_attention_kernel[(batch, kv_heads)](
        qkv, k_cache, v_cache, cos, sin, pos, col, valid, out, qkv.stride(0), k_cache.stride(0), k_cache.stride(1),
        k_cache.stride(2), valid.stride(0), out.stride(0), head_dim ** -0.5, HEADS=heads, KV_HEADS=kv_heads,
        GROUP=group, D=head_dim, BLOCK_L=block_l, PRECISION="ieee" if qkv.dtype == torch.float32 else None,
        **_launch_options(warps, batch))
    return out


def _query_group(heads: int, kv_heads: int, head_dim: int) -> int:
    group = heads // kv_heads
    if group > 16 or head_dim < 16 or head_dim & (head_dim - 1):
        raise ValueError(f"fused decode attention needs <= 16 query heads per KV head and a power-of-two "
                         f"head_dim >= 16 (got {group}, {head_dim})")
    return group


@triton.jit
def _verify_attention_kernel(qkv_ptr, k_cache, v_cache, cos_ptr, sin_ptr, pos_ptr, col_ptr, valid_ptr, out_ptr,
                             qkv_stride, cache_h, cache_l, out_stride, scale, T, HEADS: tl.constexpr,
                             KV_HEADS: tl.constexpr, GROUP: tl.constexpr, D: tl.constexpr, T_PAD: tl.constexpr,
                             QROWS: tl.constexpr, BLOCK_L: tl.constexpr, PRECISION: tl.constexpr, PDL: tl.constexpr):
    """KV head h: T new tokens (columns col.., positions pos..) write their rotated k and v, then attend causally.

    Query row r is token r // GROUP, head h * GROUP + r % GROUP: the T query groups share one
    tensor-core tile (padded to QROWS), so k + 1 speculative positions cost one pass over the cache.
    """
    if PDL:
        gdc_launch_dependents()
        gdc_wait()
    h = tl.program_id(0)
    d = tl.arange(0, D)
    partner = (d + D // 2) % D
    sign = tl.where(d < D // 2, -1.0, 1.0)[None, :]
    pos, col = tl.load(pos_ptr), tl.load(col_ptr)
    t = tl.arange(0, T_PAD)
    t_ok = (t < T)[:, None]
    cos = tl.load(cos_ptr + (pos + t)[:, None] * D + d[None, :], mask=t_ok, other=0.0)
    sin = tl.load(sin_ptr + (pos + t)[:, None] * D + d[None, :], mask=t_ok, other=0.0)
    k_at = qkv_ptr + t[:, None] * qkv_stride + HEADS * D + h * D
    k = tl.load(k_at + d[None, :], mask=t_ok, other=0.0)
    k = _rotary(k, tl.load(k_at + partner[None, :], mask=t_ok, other=0.0), cos, sin, sign).to(k.dtype)
    v = tl.load(qkv_ptr + t[:, None] * qkv_stride + (HEADS + KV_HEADS) * D + h * D + d[None, :], mask=t_ok, other=0.0)
    slot = h * cache_h + (col + t)[:, None] * cache_l + d[None, :]
    tl.store(k_cache + slot, k, mask=t_ok)
    tl.store(v_cache + slot, v, mask=t_ok)
    if h == 0:
        tl.store(valid_ptr + col + t, tl.full((T_PAD,), 1, tl.int1), mask=t < T)
    tl.debug_barrier()  # the program reads back what it wrote
    r = tl.arange(0, QROWS)
    qt = r // GROUP
    q_ok = (qt < T)[:, None]
    q_at = qkv_ptr + qt[:, None] * qkv_stride + (h * GROUP + r % GROUP)[:, None] * D
    cos = tl.load(cos_ptr + (pos + qt)[:, None] * D + d[None, :], mask=q_ok, other=0.0)
    sin = tl.load(sin_ptr + (pos + qt)[:, None] * D + d[None, :], mask=q_ok, other=0.0)
    q = tl.load(q_at + d[None, :], mask=q_ok, other=0.0)
    q = _rotary(q, tl.load(q_at + partner[None, :], mask=q_ok, other=0.0), cos, sin, sign).to(q.dtype)
    best = tl.full((QROWS,), -1e30, tl.float32)  # finite: a row may see no column in a tile
    total = tl.zeros((QROWS,), tl.float32)
    acc = tl.zeros((QROWS, D), tl.float32)
    for start in range(0, col + T, BLOCK_L):
        cols = start + tl.arange(0, BLOCK_L)
        seen = cols < col + T
        # the new columns are valid by construction: their `valid` entries are program 0's to write, and another
        # program (KV head) may run before it does (read them, and a graph replay drops the new tokens at random)
        ok = seen & ((cols >= col) | (tl.load(valid_ptr + cols, mask=cols < col, other=0) != 0))
        at = h * cache_h + cols[:, None] * cache_l + d[None, :]
        allowed = ok[None, :] & (cols[None, :] <= (col + qt)[:, None])  # causal among the new tokens
        best, total, acc = _attend_tile(q, k_cache + at, v_cache + at, ok, allowed, best, total, acc, scale, PRECISION)
    out = acc / total[:, None]
    tl.store(out_ptr + qt[:, None] * out_stride + (h * GROUP + r % GROUP)[:, None] * D + d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=q_ok)


def verify_attention(qkv: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cos: torch.Tensor,
                     sin: torch.Tensor, pos: torch.Tensor, col: torch.Tensor, valid: torch.Tensor,
                     heads: int, kv_heads: int, head_dim: int) -> torch.Tensor:
    """qkv (T, (H + 2 KV) D) of T consecutive new tokens of one sequence -> (T, H D), causal among them.

    Caches (1, KV, L, D); `pos` (1,) the first token's rotary position, `col` (1,) its cache column;
    `valid` (1, L) as in `decode_attention`. Columns past the new tokens are ignored, so a rejected
    speculative tail needs no clean-up: moving `col` back is the rollback.
    """
    tokens = qkv.shape[0]
    group = _query_group(heads, kv_heads, head_dim)
    out = torch.empty(tokens, heads * head_dim, device=qkv.device, dtype=qkv.dtype)
    block_l, warps = TILES["attention"]
    _verify_attention_kernel[(kv_heads,)](
        qkv, k_cache, v_cache, cos, sin, pos, col, valid, out, qkv.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), head_dim ** -0.5, tokens, HEADS=heads, KV_HEADS=kv_heads, GROUP=group, D=head_dim,
        T_PAD=triton.next_power_of_2(tokens), QROWS=max(16, triton.next_power_of_2(tokens * group)),
        BLOCK_L=block_l, PRECISION="ieee" if qkv.dtype == torch.float32 else None, **_launch_options(warps, 1))
    return out
