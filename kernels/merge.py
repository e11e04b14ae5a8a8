"""Exact merge of two attention results over disjoint key sets: the Triton twin of
``reference.merge_attention`` (FlashAttention's block merge by log-sum-exp), one pass over both."""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _merge_kernel(OA, LA, OB, LB, O, L, n_rows, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < n_rows
    d = tl.arange(0, HEAD_DIM)
    la = tl.load(LA + rows, mask=rmask, other=float("-inf"))
    lb = tl.load(LB + rows, mask=rmask, other=float("-inf"))
    m = tl.maximum(la, lb)
    msafe = tl.where(m == float("-inf"), 0.0, m)
    wa = tl.exp(la - msafe)
    wb = tl.exp(lb - msafe)
    tot = wa + wb
    empty = tot == 0.0
    lse = tl.where(empty, float("-inf"), msafe + tl.log(tl.where(empty, 1.0, tot)))
    # weights relative to the merged lse (as the reference: exp(lse_x - lse))
    wa = tl.where(empty, 0.0, wa / tl.where(empty, 1.0, tot))
    wb = tl.where(empty, 0.0, wb / tl.where(empty, 1.0, tot))
    ptr = rows[:, None].to(tl.int64) * HEAD_DIM + d[None, :]
    oa = tl.load(OA + ptr, mask=rmask[:, None], other=0.0).to(tl.float32)
    ob = tl.load(OB + ptr, mask=rmask[:, None], other=0.0).to(tl.float32)
    tl.store(O + ptr, oa * wa[:, None] + ob * wb[:, None], mask=rmask[:, None])
    tl.store(L + rows, lse, mask=rmask)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`sqz_kernels.reference.merge_attention`: ``(out float32, lse float32)``."""
    if out_a.shape != out_b.shape or lse_a.shape != lse_b.shape or out_a.shape[:-1] != lse_a.shape:
        raise ValueError(f"shapes do not match: {tuple(out_a.shape)} {tuple(lse_a.shape)} "
                         f"{tuple(out_b.shape)} {tuple(lse_b.shape)}")
    d = out_a.shape[-1]
    if d & (d - 1):
        raise ValueError(f"head_dim {d} must be a power of two")
    oa, ob = out_a.contiguous(), out_b.contiguous()
    la, lb = lse_a.float().contiguous(), lse_b.float().contiguous()
    out = torch.empty(out_a.shape, dtype=torch.float32, device=out_a.device)
    lse = torch.empty(lse_a.shape, dtype=torch.float32, device=out_a.device)
    n_rows = la.numel()
    if n_rows:
        block_r = 16  # not tuned: squeezed_attention merges inside its own kernel; this is the API twin
        _merge_kernel[(triton.cdiv(n_rows, block_r),)](oa, la, ob, lb, out, lse, n_rows,
                                                     HEAD_DIM=d, BLOCK_R=block_r, num_warps=4)
    return out, lse
