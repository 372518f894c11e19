"""Unstructured and N:M sparsity: magnitude, Wanda (|W|·‖X‖) and SparseGPT (with weight update).

Masks are computed per Linear. `pattern=(n, m)` keeps the n largest of every m consecutive weights
along the input dimension (2:4 is what sparse tensor cores run); otherwise `sparsity` is the
fraction removed: over the whole tensor for magnitude (like `l1_unstructured`), per output row for
Wanda and SparseGPT (as in their papers).
"""

from __future__ import annotations

import torch


def _nm_mask(score: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep the n highest-scoring of every m consecutive columns."""
    rows, cols = score.shape
    if cols % m:
        raise ValueError(f"{cols} input columns is not a multiple of m={m}")
    groups = score.reshape(rows, cols // m, m)
    keep = torch.zeros_like(groups, dtype=torch.bool)
    keep.scatter_(2, groups.topk(n, dim=2).indices, True)
    return keep.reshape(rows, cols)


def _row_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    k = int(score.shape[1] * sparsity)
    keep = torch.ones_like(score, dtype=torch.bool)
    if k:
        keep.scatter_(1, score.topk(k, dim=1, largest=False).indices, False)
    return keep


def magnitude_mask(weight: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None) -> torch.Tensor:
    score = weight.detach().abs().float()
    if pattern:
        return _nm_mask(score, *pattern)
    k = int(score.numel() * sparsity)
    keep = torch.ones(score.numel(), dtype=torch.bool, device=score.device)
    if k:
        keep[score.flatten().topk(k, largest=False).indices] = False
    return keep.view_as(score)


def wanda_mask(weight: torch.Tensor, input_sq_sum: torch.Tensor, sparsity: float,
               pattern: tuple[int, int] | None = None) -> torch.Tensor:
    """Wanda (Sun et al. 2023): score |W_ij| * ||X_j||_2, compared within each output row."""
    score = weight.detach().abs().float() * input_sq_sum.float().sqrt()[None, :]
    return _nm_mask(score, *pattern) if pattern else _row_mask(score, sparsity)


def sparsegpt(weight: torch.Tensor, hessian: torch.Tensor, sparsity: float, pattern: tuple[int, int] | None = None,
              damp: float = 0.01, block_size: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
    """SparseGPT (Frantar & Alistarh 2023): prune with OBS scores w^2 / [H^-1]_jj^2 and update the rest."""
    from compress.gptq import inverse_hessian_factor, prepare_weight_and_hessian

    w, h = prepare_weight_and_hessian(weight, hessian)
    rows, cols = w.shape
    hinv = inverse_hessian_factor(h, damp)
    keep = torch.ones_like(w, dtype=torch.bool)
    for i1 in range(0, cols, block_size):
        i2 = min(i1 + block_size, cols)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        if pattern is None:
            score = w1**2 / torch.diag(hinv1)[None, :] ** 2
            keep1 = _row_mask(score, sparsity)
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)
        for i in range(i2 - i1):
            if pattern is not None and i % pattern[1] == 0:
                span = w1[:, i:i + pattern[1]] ** 2 / torch.diag(hinv1)[i:i + pattern[1]][None, :] ** 2
                keep1[:, i:i + pattern[1]] = _nm_mask(span, *pattern)
            col = w1[:, i]
            d = hinv1[i, i]
            q = torch.where(keep1[:, i], col, torch.zeros_like(col))
            e = (col - q) / d
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            w1[:, i] = q
            err1[:, i] = e
        w[:, i1:i2] = w1
        keep[:, i1:i2] = keep1
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return w * keep, keep
