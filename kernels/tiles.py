"""Tile-level pieces shared by the attention kernels (:mod:`.sparse_attention`, :mod:`.prefill_attention`)."""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _work_keys(idx_base, j, hi, n_sel, n_clu):
    """Corpus key index of work slots ``j``: the listed selected keys, then the always-attended tail."""
    in_list = j < n_sel
    kid = tl.load(idx_base + j, mask=(j < hi) & in_list, other=0)
    return tl.where(in_list, kid, n_clu + (j - n_sel)).to(tl.int64)


@triton.jit
def _online_tile(q, k, v, valid, m_i, l_i, acc, qk_scale):
    """One key tile of the online softmax (log2 space): ``valid`` (BLOCK_M, BLOCK_N) masks the logits."""
    s = tl.dot(q, tl.trans(k)) * qk_scale
    s = tl.where(valid, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
    return m_new, l_i, acc


@triton.jit
def _row_tile(pid_m, row, KVH, G, T, ROWS, BLOCK_M: tl.constexpr):
    """Query rows ``r = g * T + t`` of tile ``pid_m`` of (batch row, KV head) ``row``: the GQA group's query
    heads and tokens as one matrix. Returns ``(b, kvh, rmask, t, h)``."""
    b = row // KVH
    kvh = row % KVH
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < ROWS
    g = rows // T
    t = rows % T
    return b, kvh, rmask, t, kvh * G + g


@triton.jit
def _causal_tiles(qd, DK, DV, b, kvh, stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                  m_dyn, T, t, rmask, first, step, m_i, l_i, acc, qk_scale,
                  HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr):
    """The dynamic keys (the question and the generated tokens: dense, causal) from key ``first`` on, every
    ``step`` keys, into the running softmax: query token ``t`` is at position ``m_dyn - T + t``."""
    d = tl.arange(0, HEAD_DIM)
    pos = m_dyn - T + t
    t_max = tl.max(tl.where(rmask, t, 0), 0)
    hi_d = m_dyn - T + t_max + 1  # causal: no later key is seen by this row tile
    dk_base = DK + b.to(tl.int64) * stride_dkb + kvh.to(tl.int64) * stride_dkh
    dv_base = DV + b.to(tl.int64) * stride_dvb + kvh.to(tl.int64) * stride_dvh
    for start in range(first, hi_d, step):
        n = start + tl.arange(0, BLOCK_N)
        nm = n < m_dyn
        k = tl.load(dk_base + n[:, None].to(tl.int64) * stride_dkn + d[None, :], mask=nm[:, None], other=0.0)
        v = tl.load(dv_base + n[:, None].to(tl.int64) * stride_dvn + d[None, :], mask=nm[:, None], other=0.0)
        m_i, l_i, acc = _online_tile(qd, k, v, nm[None, :] & (n[None, :] <= pos[:, None]), m_i, l_i, acc, qk_scale)
    return m_i, l_i, acc
