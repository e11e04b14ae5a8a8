"""K-means assignment (the twin of ``reference.nearest_center``): the dot product of every point with every
centre and the running argmax over centre tiles, in one pass, so that the (points x centres) matrix never
reaches memory. A corpus build runs it once per Lloyd step and layer; as a cuBLAS product plus a torch argmax it
was ~70% of the K-means of a 128K-token corpus on the H200 (benchmarks/results/engine_notes.md).

16-bit points only: float32 products would need IEEE dots, which Triton runs on the CUDA cores, not the tensor
cores. On the H200 that made a 128K-token corpus's float32 assignments take 39.4 s, against 0.98 s for cuBLAS's
float32 product and a torch argmax (benchmarks/results/clustering_timing_20261130-0833.log). So float32 points go
to the torch twin, which is that product."""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import reference
from .reference import _check_nearest


@triton.jit
def _nearest_kernel(X, C, OUT, n, k, dim, stride_xb, stride_xn, stride_cb, stride_ck, stride_ob,
                    D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    rmask = rows < n
    d = tl.arange(0, D)
    dmask = d < dim
    x = tl.load(X + b * stride_xb + rows[:, None].to(tl.int64) * stride_xn + d[None, :],
                mask=rmask[:, None] & dmask[None, :], other=0.0)
    best = tl.full([BLOCK_N], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_N], tl.int32)
    for k0 in range(0, k, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < k
        c = tl.load(C + b * stride_cb + cols[None, :].to(tl.int64) * stride_ck + d[:, None],
                    mask=cmask[None, :] & dmask[:, None], other=0.0)
        s = tl.dot(x, c)
        s = tl.where(cmask[None, :], s, float("-inf"))
        m = tl.max(s, 1)
        i = tl.argmax(s, 1, tie_break_left=True)
        better = m > best  # strictly: an earlier tile keeps a tie, so the first maximum wins overall
        best = tl.where(better, m, best)
        arg = tl.where(better, k0 + i, arg)
    tl.store(OUT + b * stride_ob + rows, arg.to(tl.int64), mask=rmask)


def nearest_center(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Same contract as :func:`sqz_kernels.reference.nearest_center`, except that each 16-bit product is compared
    as accumulated in float32, not rounded to ``points``' dtype first: on near-ties the two may pick different
    centres of (nearly) the same similarity. Points of any other dtype take the twin (see the module's note)."""
    _check_nearest(points, centers)
    if points.dtype not in (torch.float16, torch.bfloat16):
        return reference.nearest_center(points, centers)
    b, n, dim = points.shape
    k = centers.shape[1]
    x = points.contiguous()
    c = centers.to(points.dtype).contiguous()
    out = torch.empty(b, n, dtype=torch.long, device=points.device)
    if n == 0 or b == 0:
        return out
    d = triton.next_power_of_2(max(dim, 16))
    # not swept: one setting, timed in benchmarks/bench_clustering.py at head_dim 128; wider heads take half the
    # points per program so that the point tile stays at 32 KB (not run on a GPU beyond 128)
    block_n, block_k = (128 if d <= 128 else 64), 64
    grid = (triton.cdiv(n, block_n), b)
    _nearest_kernel[grid](x, c, out, n, k, dim, x.stride(0), x.stride(1), c.stride(0), c.stride(1), out.stride(0),
                          D=d, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, num_stages=3)
    return out
