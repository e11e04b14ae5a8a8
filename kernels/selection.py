"""Scores -> selected clusters: threshold mode is one elementwise Triton kernel; fixed budget is a
sort + prefix sum (torch: no host sync, so it can be captured in a CUDA graph too)."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference

_BLOCK = 1024  # elementwise; the whole threshold selection is a few microseconds (not tuned)


@triton.jit
def _threshold_kernel(SCORES, LOG_COUNTS, OUT, per_batch, batch, log_threshold, BLOCK: tl.constexpr):
    """OUT[b, h, c] = isfinite(score) & isfinite(log_count[h, c]) & score >= threshold, flattened."""
    pid = tl.program_id(0)
    offs = pid * BLOCK + tl.arange(0, BLOCK)
    mask = offs < batch * per_batch
    s = tl.load(SCORES + offs, mask=mask, other=float("-inf"))
    # log_counts has no batch dimension: (kv_heads, clusters) repeats every kv_heads * clusters
    lc = tl.load(LOG_COUNTS + offs % per_batch, mask=mask, other=float("-inf"))
    inf = float("inf")
    keep = (s > -inf) & (s < inf) & (lc > -inf) & (lc < inf) & (s >= log_threshold)
    tl.store(OUT + offs, keep.to(tl.int8), mask=mask)


def select_clusters(
    log_scores: torch.Tensor,
    log_counts: torch.Tensor,
    log_threshold: float | None = None,
    budget_keys: int | None = None,
) -> torch.Tensor:
    """Same contract as :func:`sqz_kernels.reference.select_clusters`: ``(batch, kv_heads, clusters)`` bool."""
    if (log_threshold is None) == (budget_keys is None):
        raise ValueError("give exactly one of log_threshold and budget_keys")
    if budget_keys is not None:
        # A top-k cut is a sort of (batch, kv_heads, clusters): torch's segmented sort is already one
        # kernel per step and needs no sync; the reference is the implementation.
        return reference.select_clusters(log_scores, log_counts, budget_keys=budget_keys)
    b, kvh, c = log_scores.shape
    scores = log_scores.to(torch.float32).contiguous()
    counts = log_counts.to(torch.float32).contiguous()
    out = torch.empty(b, kvh, c, dtype=torch.bool, device=log_scores.device)
    total = b * kvh * c
    if total == 0:
        return out
    grid = (triton.cdiv(total, _BLOCK),)
    _threshold_kernel[grid](scores, counts, out.view(torch.int8), kvh * c, b, float(log_threshold), BLOCK=_BLOCK)
    return out
