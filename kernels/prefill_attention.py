"""Prefill form of the sparse attention: the selected corpus keys copied once into contiguous rows, then
read as whole tiles through tensor descriptors (TMA on Hopper).

Why: in prefill every (row, KV head)'s selected keys are read by ``G * T / BLOCK_M`` programs (32 at 1024
tokens and 4 query heads per KV head), and the gathering kernel (:mod:`.sparse_attention`) computes each
tile's 128 key addresses from the work list and loads them row by row. Copying the selected keys once
(:func:`_compact_kernel`, one read + one write of the kept K/V: ~0.1 ms at 10% of 512K keys on the H200)
turns the attention into a dense FlashAttention over ``n_sel + tail`` contiguous rows, whose tiles are
single bulk copies.

Two launches:

1. :func:`_compact_kernel`: row ``(b, kvh)`` of the output holds the listed corpus keys (the work list's
   ``idx``), then the always-attended tail, then zeros up to the next multiple of the attention tile (so a
   partial last tile reads finite values, never another row's or uninitialised memory).
2. :func:`_prefill_kernel`: one program = one tile of ``BLOCK_M`` query rows ``r = g * T + t`` of one
   (batch row, KV head); full key tiles with no masking, then the partial tile, then the dynamic keys
   (the question: dense, causal), one online softmax in log2 space; the output is final (no split-K).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .hardware import TensorDescriptor, tma_tiles  # without descriptors the gathering kernel serves prefill
from .tiles import LOG2E, _causal_tiles, _online_tile, _row_tile, _work_keys

# rows copied per compaction program; a multiple of every attention tile (BLOCK_N <= 128)
_COPY_ROWS = 128

_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}


def compact_available(device: torch.device, dtype: torch.dtype, head_dim: int) -> bool:
    """True where prefill takes this path by default: CUDA with TMA (compute capability >= 9), a Triton with
    tensor descriptors, and the measured case (16-bit K/V, head_dim <= 128: see :func:`prefill_tiles`).
    Elsewhere the gathering kernel is the default (tests force this path on the CPU interpreter)."""
    return dtype in (torch.bfloat16, torch.float16) and tma_tiles(device, head_dim)


def prefill_tiles(dtype: torch.dtype, head_dim: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """``(block_m, block_n, warps, stages)``. 16-bit K/V with head_dim <= 128 on the H200 (bf16, d=128,
    attention alone at 512K, ms): 128 x 128 / 8 warps / 3 stages 1.70, 128 x 64 / 8 / 3 1.86-1.89, 64 x 64 /
    4 / 3 2.00, 128 x 128 / 8 / 2 2.07-2.10, 128 x 64 / 4 / 3 2.05-2.08, 64 x 128 / 4 / 3 2.08-2.10; 4 stages
    of 128 x 128 need 296 KB of shared memory. Larger rows (float32, head_dim 256; not measured) take tiles
    whose K/V stages fit in shared memory: 64 x 64 (32 keys past 256 bytes per row), 2 stages."""
    if not on_gpu:
        return 32, 32, 4, 1
    row_bytes = head_dim * torch.finfo(dtype).bits // 8
    if row_bytes <= 256:
        return (128, 128, 8, 3) if torch.finfo(dtype).bits == 16 else (64, 64, 4, 2)
    return 64, 32, 4, 2


@triton.jit
def _compact_kernel(
    K, V, IDX, CUM, OFFS, CK, CV,
    stride_kh, stride_kn, stride_vh, stride_vn,
    n_keys, n_clusters, stride_off, idx_cap, cap, KVH,
    HEAD_DIM: tl.constexpr, BLOCK: tl.constexpr, PAD: tl.constexpr,
):
    pid = tl.program_id(0)
    row = tl.program_id(1)
    kvh = row % KVH
    n_sel = tl.load(CUM + row.to(tl.int64) * n_clusters + n_clusters - 1)
    n_clu = tl.load(OFFS + kvh * stride_off + n_clusters).to(tl.int32)
    total = n_sel + n_keys - n_clu
    padded = tl.cdiv(total, PAD) * PAD
    start = pid * BLOCK
    if start < padded:  # the grid is sized for a full selection; most programs have nothing to copy
        j = start + tl.arange(0, BLOCK)
        valid = j < total
        d = tl.arange(0, HEAD_DIM)
        kid = _work_keys(IDX + row.to(tl.int64) * idx_cap, j, total, n_sel, n_clu)
        k = tl.load(K + kvh.to(tl.int64) * stride_kh + kid[:, None] * stride_kn + d[None, :],
                    mask=valid[:, None], other=0.0)
        v = tl.load(V + kvh.to(tl.int64) * stride_vh + kid[:, None] * stride_vn + d[None, :],
                    mask=valid[:, None], other=0.0)
        out = (row.to(tl.int64) * cap + j)[:, None] * HEAD_DIM + d[None, :]
        keep = (j < padded)[:, None]
        tl.store(CK + out, k, mask=keep)
        tl.store(CV + out, v, mask=keep)


@triton.jit
def _prefill_kernel(
    Q, CK_DESC, CV_DESC, CUM, OFFS, DK, DV, O, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_ob, stride_oh, stride_ot,
    n_keys, n_clusters, stride_off, cap, m_dyn,
    KVH, G, T, ROWS,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, KV_DTYPE: tl.constexpr,
    HAS_DYN: tl.constexpr, WRITE_LSE: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest: the programs of one KV head run together and share its tiles in L2
    row = tl.program_id(1)
    b, kvh, rmask, t, h = _row_tile(pid_m, row, KVH, G, T, ROWS, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q = tl.load(Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh
                + t[:, None].to(tl.int64) * stride_qt + d[None, :], mask=rmask[:, None], other=0.0)
    n_sel = tl.load(CUM + row.to(tl.int64) * n_clusters + n_clusters - 1)
    n_clu = tl.load(OFFS + kvh * stride_off + n_clusters).to(tl.int32)
    total = n_sel + n_keys - n_clu
    base = (row * cap).to(tl.int32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    qc = q.to(KV_DTYPE)
    # full tiles: no mask, and the running max is finite after the first tile (finite logits), so the
    # -inf guards of _online_tile are not needed
    n_full = (total // BLOCK_N) * BLOCK_N
    for start in range(0, n_full, BLOCK_N):
        k = CK_DESC.load([base + start, 0])
        v = CV_DESC.load([base + start, 0])
        qk = tl.dot(qc, tl.trans(k))
        m_new = tl.maximum(m_i, tl.max(qk, 1) * qk_scale)
        p = tl.exp2(qk * qk_scale - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc)
        m_i = m_new
    if n_full < total:  # the partial tile: rows past `total` are the compaction's zeros, masked out here
        k = CK_DESC.load([base + n_full, 0])
        v = CV_DESC.load([base + n_full, 0])
        n = n_full + tl.arange(0, BLOCK_N)
        m_i, l_i, acc = _online_tile(qc, k, v, (n < total)[None, :], m_i, l_i, acc, qk_scale)

    if HAS_DYN:  # the question's own keys: dense and causal (a small share of the work: pointer loads)
        m_i, l_i, acc = _causal_tiles(q.to(DK.dtype.element_ty), DK, DV, b, kvh, stride_dkb, stride_dkh, stride_dkn,
                                      stride_dvb, stride_dvh, stride_dvn, m_dyn, T, t, rmask, 0, BLOCK_N,
                                      m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_N)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    tl.store(O + b.to(tl.int64) * stride_ob + h[:, None].to(tl.int64) * stride_oh
             + t[:, None].to(tl.int64) * stride_ot + d[None, :], out.to(O.dtype.element_ty), mask=rmask[:, None])
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
        tl.store(LSE + (b.to(tl.int64) * KVH * G + h) * T + t, lse, mask=rmask)


def compact_selected(keys, values, offsets, idx, cum, batch: int, pad: int):
    """The selected corpus keys and values of every (batch row, KV head), contiguous:
    ``(batch * kv_heads * cap, head_dim)`` each, row ``(b, kvh)`` starting at ``(b * kv_heads + kvh) * cap``.

    ``cap`` covers a full selection (no host sync to learn the real count): the buffers are as large as
    the corpus layer itself per batch row, and only the selected part (plus one tile of zeros) is written.
    """
    kvh, n_keys, d = keys.shape
    n_clusters = cum.shape[-1]
    cap = triton.cdiv(n_keys, _COPY_ROWS) * _COPY_ROWS
    ck = torch.empty(batch * kvh * cap, d, dtype=keys.dtype, device=keys.device)
    cv = torch.empty(batch * kvh * cap, d, dtype=values.dtype, device=values.device)
    _compact_kernel[(cap // _COPY_ROWS, batch * kvh)](
        keys, values, idx, cum, offsets, ck, cv,
        keys.stride(0), keys.stride(1), values.stride(0), values.stride(1),
        n_keys, n_clusters, offsets.stride(0), idx.shape[-1], cap, kvh,
        HEAD_DIM=d, BLOCK=_COPY_ROWS, PAD=pad, num_warps=4,
    )
    return ck, cv, cap


def prefill_attention(q, corpus, dyn, scale, out_dtype, write_lse, block_m, block_n, warps, stages):
    """Launcher (called by ``sparse_attention._attention``): ``corpus = (keys, values, offsets, idx, cum)``,
    ``dyn = (keys, values)`` or None. Returns ``out`` or ``(out, lse)`` as the gathering kernel does."""
    keys, values, offsets, idx, cum = corpus
    b, h, t, d = q.shape
    kvh = keys.shape[0]
    g = h // kvh
    rows = g * t
    if _COPY_ROWS % block_n:  # the zero padding to the tile edge must stay inside the row's capacity
        raise ValueError(f"block_n {block_n} must divide {_COPY_ROWS} for the compacted prefill attention")
    ck, cv, cap = compact_selected(keys, values, offsets, idx, cum, b, block_n)
    ck_desc = TensorDescriptor.from_tensor(ck, [block_n, d])
    cv_desc = TensorDescriptor.from_tensor(cv, [block_n, d])
    out = torch.empty(b, h, t, d, dtype=out_dtype, device=q.device)
    lse = torch.empty(b, h, t, dtype=torch.float32, device=q.device) if write_lse else out
    if dyn is not None:
        dk, dv = dyn
        d_strides = (dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2))
        m_dyn = dk.shape[2]
    else:
        dk = dv = q
        d_strides = (0,) * 6
        m_dyn = 0
    grid = (triton.cdiv(rows, block_m), b * kvh)
    _prefill_kernel[grid](
        q, ck_desc, cv_desc, cum, offsets, dk, dv, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        *d_strides,
        out.stride(0), out.stride(1), out.stride(2),
        keys.shape[1], cum.shape[-1], offsets.stride(0), cap, m_dyn,
        kvh, g, t, rows,
        scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n, KV_DTYPE=_TL_DTYPES[keys.dtype],
        HAS_DYN=dyn is not None, WRITE_LSE=write_lse, num_warps=warps, num_stages=stages,
    )
    return (out, lse) if write_lse else out
