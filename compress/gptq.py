"""GPTQ (Frantar et al. 2022) and round-to-nearest for one weight matrix, in the GPTQ v1 grid.

Scales are rounded to fp16 before use, so the checkpoint's fp16 scales reproduce our dequantized
weights exactly. Asymmetric zero points are kept >= 1 because the v1 layout stores zero - 1 in
`bits` bits (a zero of 0 would wrap around in every reader).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class QuantSpec:
    bits: int = 4
    group_size: int = 128  # -1: one group per output channel (per-channel)
    sym: bool = True
    desc_act: bool = False
    damp: float = 0.01

    @property
    def maxq(self) -> int:
        return (1 << self.bits) - 1


@dataclass
class QuantResult:
    q: torch.Tensor  # (out, in) integers in [0, maxq], original column order
    scales: torch.Tensor  # (groups, out)
    zeros: torch.Tensor  # (groups, out) integer zero points
    g_idx: torch.Tensor  # (in,)
    loss: float  # GPTQ objective (sum of (w - q)^2 / d^2 / 2); 0 for RTN

    def dequantized(self) -> torch.Tensor:
        g = self.g_idx.long()
        return (self.scales[g].t() * (self.q.float() - self.zeros[g].t().float())).float()


def find_params(w: torch.Tensor, spec: QuantSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row scale and zero point for the columns in `w` (rows, cols)."""
    xmin = torch.clamp(w.min(dim=1).values, max=0)
    xmax = torch.clamp(w.max(dim=1).values, min=0)
    if spec.sym:
        xmax = torch.maximum(xmin.abs(), xmax)
        xmin = -xmax
    empty = (xmin == 0) & (xmax == 0)
    xmin[empty], xmax[empty] = -1.0, 1.0
    scale = ((xmax - xmin) / spec.maxq).half().float()
    scale = torch.where(scale == 0, torch.full_like(scale, 2.0**-14), scale)
    if spec.sym:
        zero = torch.full_like(scale, (spec.maxq + 1) // 2)
    else:
        zero = torch.clamp(torch.round(-xmin / scale), 1, spec.maxq)
    return scale, zero


def _quant(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def _group_size(spec: QuantSpec, cols: int) -> int:
    return cols if spec.group_size == -1 else spec.group_size


def quantize_rtn(weight: torch.Tensor, spec: QuantSpec) -> QuantResult:
    """Round-to-nearest in the same grid: the baseline GPTQ must beat."""
    w = weight.detach().float()
    rows, cols = w.shape
    gs = _group_size(spec, cols)
    groups = math.ceil(cols / gs)
    scales, zeros = w.new_zeros(groups, rows), w.new_zeros(groups, rows)
    q = w.new_zeros(rows, cols)
    for g in range(groups):
        sl = slice(g * gs, min((g + 1) * gs, cols))
        scales[g], zeros[g] = find_params(w[:, sl], spec)
        q[:, sl] = _quant(w[:, sl], scales[g][:, None], zeros[g][:, None], spec.maxq)
    g_idx = torch.arange(cols, device=w.device) // gs
    return QuantResult(q.to(torch.int32), scales, zeros, g_idx.to(torch.int32), 0.0)


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of H^-1 after damping; more damping if H is numerically singular."""
    diag_mean = torch.mean(torch.diag(h))
    for attempt in range(6):  # at most two K x K matrices beside h at any time (memory: K is up to ~30k)
        damped = h.clone()
        damped.diagonal().add_(damp * (10**attempt) * diag_mean)
        try:
            factor = torch.linalg.cholesky(damped)
            del damped
            inverse = torch.cholesky_inverse(factor)
            del factor
            return torch.linalg.cholesky(inverse, upper=True)
        except torch.linalg.LinAlgError:
            continue
    raise torch.linalg.LinAlgError("Hessian is not positive definite even with 1e5x damping")


def prepare_weight_and_hessian(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 copies; inputs that never fire (zero Hessian diagonal) get a unit diagonal and zero weights."""
    w = weight.detach().float().clone()
    h = hessian.detach().float().clone()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1.0
    w[:, dead] = 0.0
    return w, h


def quantize_gptq(weight: torch.Tensor, hessian: torch.Tensor, spec: QuantSpec, block_size: int = 128) -> QuantResult:
    """GPTQ with lazy block updates; act-order (desc_act) permutes columns by decreasing H diagonal.

    Pass a Hessian nobody else holds (e.g. popped from the stats) and the caller's copy is freed early.
    """
    w, h = prepare_weight_and_hessian(weight, hessian)
    del hessian
    rows, cols = w.shape
    perm = torch.argsort(torch.diag(h), descending=True) if spec.desc_act else torch.arange(cols, device=w.device)
    w = w[:, perm]
    if spec.desc_act:
        h = h[perm]
        h = h[:, perm]
    hinv = inverse_hessian_factor(h, spec.damp)
    del h

    gs = _group_size(spec, cols)
    groups = math.ceil(cols / gs)
    if gs < cols:  # blocks hold whole groups, so a group's parameters see fully updated weights
        block_size = gs * max(1, block_size // gs)
    scales, zeros = w.new_zeros(groups, rows), w.new_zeros(groups, rows)
    q_perm = w.new_zeros(rows, cols)
    loss = w.new_zeros(rows)
    scale = zero = None
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % gs == 0:
                g = col // gs
                span = torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :gs]
                scale, zero = find_params(span, spec)
                scales[g], zeros[g] = scale, zero
            col_w = w1[:, i]
            d = hinv1[i, i]
            q = _quant(col_w, scale, zero, spec.maxq)
            dq = scale * (q - zero)
            q_perm[:, col] = q
            loss += (col_w - dq) ** 2 / d**2 / 2
            e = (col_w - dq) / d
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    invperm = torch.argsort(perm)
    g_idx = (torch.arange(cols, device=w.device) // gs)[invperm]
    return QuantResult(q_perm[:, invperm].to(torch.int32), scales, zeros, g_idx.to(torch.int32),
                       float(loss.sum()))
