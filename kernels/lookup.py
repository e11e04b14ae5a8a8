"""Centroid lookup: flat and hierarchical, the Triton twins of ``reference.centroid_scores`` and
``reference.hierarchical_centroid_scores``.

Rows: for one (batch row, KV head) the ``G * T`` queries of the group's query heads and tokens are one
matrix of rows ``r = g * T + t`` (GQA: every centroid load serves the whole group).

Two passes, everything in log2 space (``exp2`` with ``scale * log2(e)`` folded into the logits):

- **stats** (:func:`_stats_kernel`): per row, an online max / sum over centroid tiles of
  ``w_c = l_c + log2 N_c``: the row's log-denominator ``lse = log2 sum_c N_c 2^(l_c)``. Split over
  the centroids when there are few rows (decode), each split writing a partial ``(max, sum)``; the
  partials are combined where they are read. In decode it also stores the raw logits (``G * T`` floats
  per centroid, a small fraction of the centroid bytes) so that the second pass need not re-read the
  centroids.
- **scores** (:func:`_scores_kernel`): per centroid, ``log2 sum_rows 2^(l_rc - lse_r)`` as an online
  column max / sum over row tiles (no underflow for tiny weights), minus ``log(G * T)``: the log of the
  mean of ``S_c`` over the rows. In prefill it recomputes the logits from the centroid tile (one
  centroid tile stays in registers while the row tiles stream from L2).

Hierarchical: level 1 goes through the fused selection below with the level-1 offsets as its ranges, so
its work list is the compact list of the level-2 centroids under the kept level-1 clusters (level-2
centroids are sorted by parent), and only those are ever loaded. The denominator adds the pruned level-1
clusters by their centroids, as extra partials next to the level-2 ones: in decode the level-1 scores pass
writes them from its stored logits; in prefill a stats pass over level 1 with the kept clusters excluded.

Selection, fused (:func:`centroid_selection`): the scores pass also applies the threshold, writes the
selection and the selected key count of its block of clusters, and the work list's expansion
(:func:`.worklist.expand_worklist`) takes those blocks as its chunks: 3 launches for lookup + selection
+ work list instead of 5 (decode batch 1 on the H200: 128K 0.060 -> 0.050 ms for the whole path, 32K
0.046 -> 0.029; benchmarks/results/kernels_notes.md). In decode the scores pass also expands the work list
(each block of a row waits for the selected key counts of the blocks before it): 2 launches.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .hardware import PDL_MAX_ROWS, TensorDescriptor, num_sms, pdl_launch, tma_tiles, use_pdl
from .reference import CENTROID_DTYPES, check_dynamic_keys, check_live, dynamic_lse
from .tiles import LOG2E, _row_tile
from .worklist import (
    _SLOTS,
    _expand_gather,
    _expand_markers,
    check_pins,
    expand_worklist,
    live_flags,
    select_worklist,
)

LN2 = 0.6931471805599453

# Rows up to this count (decode: G * T <= 16) keep their logits for the scores pass instead of
# recomputing them: 4 rows x 4 B per centroid against 256 B of bf16 centroid (d=128) re-read. Chosen by
# that byte count, not timed against the recompute. The decode stats tile of 128 centroids was timed:
# 0.037 ms per 512K lookup, against 0.038 for 64 and 0.040 for 256.
_STORE_LOGITS_MAX_ROWS = 16

# Decode: centroid_selection expands the work list inside the scores pass (a look-back over the blocks of a
# row, see _scores_kernel) instead of in a launch of its own. A/B in one process on the H200 (whole decode
# path, ms, separate launch -> fused): 128K batch 1 0.0491 / 0.0488 -> 0.0473 / 0.0476, batch 8 0.1612 /
# 0.1606 -> 0.1592 / 0.1588; 512K batch 1 0.1041 / 0.1046 -> 0.1029 / 0.1031, batch 8 0.5411 / 0.5414 ->
# 0.5374 / 0.5369. Prefill keeps the separate launch: fused, its flat path measured 128K 1.2393 / 1.2325 ->
# 1.2346 / 1.2346 and 512K 4.5203 / 4.5123 -> 4.5544 / 4.5442 (slower). SQZ_SEPARATE_EXPAND=1 selects the
# separate launch in decode too (for A/B timings; the benchmark's --decode-ab flips this attribute).
_FUSE_EXPAND = os.environ.get("SQZ_SEPARATE_EXPAND") != "1"

# The decode scores pass expands its block's work list by a binary search over the block's sizes held in
# registers (worklist._expand_gather: tl.gather, no global round trip) instead of markers written to and read
# back from global memory (worklist._expand_markers). A/B in one process on the H200 (whole path, ms, markers ->
# gather, two alternations; kernels_notes.md run 33): decode batch 1 128K 0.0432 / 0.0430 -> 0.0420 / 0.0421, 512K
# 0.0987 / 0.0988 -> 0.0985 / 0.0986; batch 8 128K 0.1419 / 0.1423 -> 0.1419 / 0.1419, 512K 0.4669 / 0.4665 ->
# 0.4660 / 0.4660; the same work lists. Prefill keeps the markers in its own launch (not measured with the
# gather). SQZ_EXPAND_GATHER=0 (or this attribute) selects the markers in decode too.
EXPAND_GATHER = os.environ.get("SQZ_EXPAND_GATHER") != "0"

# Decode: the stats pass over a flat centroid set reads each tile with one TMA bulk copy (a tensor descriptor)
# instead of per-thread loads, where the device has TMA (and under the interpreter, which runs descriptors too).
# A/B in one process on the H200, whole path (ms, per-thread loads -> TMA; kernels_notes.md, run 29): decode
# 128K batch 1 0.0452 -> 0.0437, batch 8 0.1585 -> 0.1547; 512K batch 1 0.0993 -> 0.0996 (no change), batch 8
# 0.5439 -> 0.5184; the same selections and outputs, bit for bit. Prefill keeps the per-thread loads: 128K
# 0.932 -> 0.935, 512K 3.25 -> 3.28 with TMA. SQZ_STATS_TMA=0 (or this attribute) turns it off.
STATS_TMA = os.environ.get("SQZ_STATS_TMA") != "0"

# The stats pass over a flat centroid set with 3 or more pipeline stages (decode over > 16K clusters with few rows,
# see _Rows.flat_stats_launch: each program streams ~6 tiles) loads each tile's log counts one tile ahead (a
# loop-carried register prefetch) instead of in the tile's own iteration, where each tile waited for them after
# its dot: a quarter of that pass's warp samples at 512K batch 1 (Nsight Compute, kernels_notes.md run 35). A/B
# in one process on the H200, whole path, ms, two alternations, in the tile -> ahead: 512K batch 1 0.0977 /
# 0.0975 -> 0.0968 / 0.0968 (clean L2 0.0913 / 0.0914 -> 0.0905 / 0.0904), batch 8 0.4634 / 0.4635 -> 0.4621 /
# 0.4624; but 128K batch 1 (2 stages, 1-2 tiles per program) 0.0421 / 0.0422 -> 0.0436 / 0.0435, hence the
# stage bound. SQZ_LOGN_AHEAD=0 (or this attribute) turns it off.
LOGN_AHEAD = os.environ.get("SQZ_LOGN_AHEAD") != "0"
_LOGN_AHEAD_MIN_STAGES = 3

@triton.jit
def _widen(cent, Q):
    """fp8 centroids -> the queries' dtype; other dtypes as stored (the queries then take theirs).

    Of the centroid dtypes (``reference.CENTROID_DTYPES``), fp8 (e4m3) halves the bytes of the decode lookup, which
    reads every centroid once per token. Widening is exact (every e4m3 value is a bf16 / fp16 / fp32 value), so the
    dot is the queries' own 16-bit (or tf32) dot and the queries are not rounded."""
    if cent.dtype.is_fp8():
        cent = cent.to(Q.dtype.element_ty)
    return cent


@triton.jit
def _stats_kernel(
    Q, CENT, CDESC, LOGN, EXCL, LIST, LCUM, M_OUT, L_OUT, LOGITS, FLAGS, LIVE,
    stride_qb, stride_qh, stride_qt,
    stride_ch, stride_cc,
    stride_nh,
    n_cent,  # centroids in the set (row stride of EXCL, LIST and LOGITS)
    n_list_ranges,  # row stride of LCUM (list mode)
    KVH, G, T, ROWS,
    split_base, n_split_total, n_splits,
    logit_scale, n_flags,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr,
    USE_LIST: tl.constexpr, USE_EXCL: tl.constexpr, STORE_LOGITS: tl.constexpr, ZERO_FLAGS: tl.constexpr,
    PDL: tl.constexpr, TMA: tl.constexpr, LOGN_AHEAD: tl.constexpr, HAS_LIVE: tl.constexpr,
):
    if PDL:  # the scores pass (launched with PDL) may be scheduled now; it waits for this grid to finish
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    if ZERO_FLAGS:
        # the fused selection's look-back flags (one per scores block of this row, see _scores_kernel):
        # zeroed here, one launch before the scores pass reads them, so no memset launch is needed
        fl = tl.arange(0, 128)
        for f0 in range(0, tl.where((pid_m == 0) & (pid_s == 0), n_flags, 0), 128):
            tl.store(FLAGS + row * n_flags + f0 + fl, tl.zeros([128], tl.int32), mask=f0 + fl < n_flags)
    b, kvh, rmask, t, h = _row_tile(pid_m, row, KVH, G, T, ROWS, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q_ptr = Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh \
        + t[:, None].to(tl.int64) * stride_qt + d[None, :]
    q = tl.load(q_ptr, mask=rmask[:, None], other=0.0)

    # this split's share of the centroids (list mode: of the row's listed centroids)
    if USE_LIST:
        n = tl.load(LCUM + row.to(tl.int64) * n_list_ranges + n_list_ranges - 1)
    else:
        n = n_cent
    if HAS_LIVE:  # a batch row that is not live scores no centroid: no tile loaded, partial (-inf, 0)
        n = tl.where(tl.load(LIVE + b) != 0, n, 0)
    tiles = tl.cdiv(n, BLOCK_C)
    per = tl.cdiv(tiles, n_splits)
    lo = pid_s * per * BLOCK_C
    hi = tl.minimum(lo + per * BLOCK_C, n)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    cent_base = CENT + kvh.to(tl.int64) * stride_ch
    logn_base = LOGN + kvh * stride_nh
    if LOGN_AHEAD:  # the first tile's log counts; each iteration then loads the next tile's (see below)
        j0 = lo + tl.arange(0, BLOCK_C)
        lw_next = tl.load(logn_base + j0, mask=j0 < hi, other=float("-inf"))
    for start in range(lo, hi, BLOCK_C):
        j = start + tl.arange(0, BLOCK_C)
        jm = j < hi
        if USE_LIST:
            c = tl.load(LIST + row.to(tl.int64) * n_cent + j, mask=jm, other=0)
        else:
            c = j
        if LOGN_AHEAD:  # this tile's log counts came with the previous iteration (LOGN_AHEAD above)
            lw_raw = lw_next
            jn = j + BLOCK_C
            lw_next = tl.load(logn_base + jn, mask=jn < hi, other=float("-inf"))
        else:
            lw_raw = tl.load(logn_base + c, mask=jm, other=float("-inf"))
        if TMA:
            # one bulk copy of the tile from the (KVH * C, d) view; rows past this head's centroids are the next
            # head's (or zeros past the end) and are masked out of w below
            cent = _widen(CDESC.load([kvh * n_cent + start, 0]), Q)
        else:
            cent = _widen(tl.load(cent_base + c[:, None].to(tl.int64) * stride_cc + d[None, :],
                                  mask=jm[:, None], other=0.0), Q)
        s = tl.dot(q.to(cent.dtype), tl.trans(cent)) * logit_scale  # (BLOCK_M, BLOCK_C), log2 units
        lw = lw_raw * 1.4426950408889634
        if USE_EXCL:
            ex = tl.load(EXCL + row.to(tl.int64) * n_cent + c, mask=jm, other=1)
            lw = tl.where(ex != 0, float("-inf"), lw)
        w = s + lw[None, :]
        w = tl.where(jm[None, :], w, float("-inf"))
        # online max / sum (FlashAttention's running statistics, without the value product)
        m_new = tl.maximum(m_i, tl.max(w, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(w - m_safe[:, None]), 1)
        m_i = m_new
        if STORE_LOGITS:
            lg_ptr = LOGITS + row.to(tl.int64) * ROWS * n_cent + rows[:, None] * n_cent + c[None, :]
            tl.store(lg_ptr, s, mask=rmask[:, None] & jm[None, :])
    out = (row.to(tl.int64) * n_split_total + split_base + pid_s) * ROWS + rows
    tl.store(M_OUT + out, m_i, mask=rmask)
    tl.store(L_OUT + out, l_i, mask=rmask)


@triton.jit
def _scores_kernel(
    Q, CENT, LOGN, LIST, LCUM, M_IN, L_IN, LOGITS, OUT, SEL, SUMS, C_OFFS, IDX, CUM, PINS, PM_OUT, PL_OUT, LIVE,
    stride_qb, stride_qh, stride_qt,
    stride_ch, stride_cc,
    stride_nh,
    n_cent, n_list_ranges,
    KVH, G, T, ROWS,
    n_split_total, n_split_out,
    logit_scale, log_rows,
    stride_coff, log_threshold, idx_cap, stride_pin,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, SPLITS_P2: tl.constexpr,
    USE_LIST: tl.constexpr, FROM_LOGITS: tl.constexpr, SELECT: tl.constexpr, HAS_PINS: tl.constexpr,
    EXPAND: tl.constexpr, PRUNED: tl.constexpr, BLOCKS_P2: tl.constexpr, SLOTS: tl.constexpr,
    PDL: tl.constexpr, REDUCE_MAX: tl.constexpr, GATHER_STEPS: tl.constexpr, HAS_LIVE: tl.constexpr,
):
    if PDL:  # launched with PDL after the stats pass: let the attention launch, wait below
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    pid_c = tl.program_id(1)
    b = row // KVH
    kvh = row % KVH
    if USE_LIST:
        n = tl.load(LCUM + row.to(tl.int64) * n_list_ranges + n_list_ranges - 1)
    else:
        n = n_cent
    j = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    jm = j < n
    if USE_LIST:
        c = tl.load(LIST + row.to(tl.int64) * n_cent + j, mask=jm, other=0)
    else:
        c = j
    d = tl.arange(0, HEAD_DIM)
    lw = tl.load(LOGN + kvh * stride_nh + c, mask=jm, other=float("-inf"))
    if SELECT:  # the cluster sizes, loaded with the log counts (after the stores they were one more round trip)
        c_end = tl.load(C_OFFS + kvh * stride_coff + c + 1, mask=jm, other=0)
        c_size = (c_end - tl.load(C_OFFS + kvh * stride_coff + c, mask=jm, other=0)).to(tl.int32)
    if not FROM_LOGITS:
        cent = _widen(tl.load(CENT + kvh.to(tl.int64) * stride_ch + c[:, None].to(tl.int64) * stride_cc + d[None, :],
                              mask=jm[:, None], other=0.0), Q)
    if PDL:
        # everything above reads only the corpus tensors, which were final before the stats pass started
        # (a plain launch); the partials, logits and look-back flags below are the stats pass's output
        tl.extra.cuda.gdc_wait()

    col_max = tl.full([BLOCK_C], float("-inf"), tl.float32)
    col_sum = tl.zeros([BLOCK_C], tl.float32)
    part = row.to(tl.int64) * n_split_total * ROWS
    sp = tl.arange(0, SPLITS_P2)
    # a list-mode program past the row's listed centroids has nothing to score: no row loop at all; nor has a batch
    # row that is not live (its stats pass loaded nothing, stored no logits): every score -inf, nothing kept
    alive = pid_c * BLOCK_C < n
    if HAS_LIVE:
        alive = alive & (tl.load(LIVE + b) != 0)
    rows_hi = tl.where(alive, ROWS, 0)
    for m0 in range(0, rows_hi, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        rmask = rows < ROWS
        if FROM_LOGITS:  # issued before the partials below, not after their reduction
            lg_ptr = LOGITS + row.to(tl.int64) * ROWS * n_cent + rows[None, :] * n_cent + c[:, None]
            s = tl.load(lg_ptr, mask=rmask[None, :] & jm[:, None], other=float("-inf"))  # (BLOCK_C, BLOCK_M)
        # the row's log2-denominator from the stats partials, all splits in one 2-D load (a loop over
        # 66 splits, one dependent load each, cost ~30 us per decode lookup on the H200)
        pm = (sp[:, None] < n_split_total) & rmask[None, :]
        ms = tl.load(M_IN + part + sp[:, None] * ROWS + rows[None, :], mask=pm, other=float("-inf"))
        ls = tl.load(L_IN + part + sp[:, None] * ROWS + rows[None, :], mask=pm, other=0.0)
        mm = tl.max(ms, 0)
        msafe = tl.where(mm == float("-inf"), 0.0, mm)
        ll = tl.sum(ls * tl.exp2(ms - msafe[None, :]), 0)
        lse = mm + tl.log2(ll)
        if not FROM_LOGITS:
            q_ptr = Q + b.to(tl.int64) * stride_qb + (kvh * G + rows // T)[:, None].to(tl.int64) * stride_qh \
                + (rows % T)[:, None].to(tl.int64) * stride_qt + d[None, :]
            q = tl.load(q_ptr, mask=rmask[:, None], other=0.0)
            s = tl.dot(cent, tl.trans(q.to(cent.dtype))) * logit_scale  # (BLOCK_C, BLOCK_M)
        x = s - lse[None, :]
        x = tl.where(rmask[None, :] & (lse[None, :] > float("-inf")), x, float("-inf"))
        new_max = tl.maximum(col_max, tl.max(x, 1))
        safe = tl.where(new_max == float("-inf"), 0.0, new_max)
        col_sum = col_sum * tl.exp2(col_max - safe) + tl.sum(tl.exp2(x - safe[:, None]), 1)
        col_max = new_max
    if REDUCE_MAX:  # the largest log share any row gives the centroid (key_max_logprob), not the mean
        score = col_max * 0.6931471805599453
    else:
        score = (col_max + tl.log2(col_sum)) * 0.6931471805599453 - log_rows
    score = tl.where(lw == float("-inf"), float("-inf"), score)
    tl.store(OUT + row.to(tl.int64) * n_cent + c, score, mask=jm)
    if SELECT:
        # threshold selection + this block's selected key count (the work list's chunk sum), fused:
        # the same test as selection._threshold_kernel on the same float32 score
        inf = float("inf")
        keep = (score > -inf) & (score < inf) & (lw > -inf) & (lw < inf) & (score >= log_threshold)
        if HAS_PINS:  # clusters this row reads whatever their score (copy_window); stride_pin 0: one set for every
            # batch row
            pin = tl.load(PINS + b * stride_pin + kvh * n_cent + c, mask=jm, other=0)
            keep = keep | ((pin != 0) & (lw > -inf) & (lw < inf))
        if HAS_LIVE:  # pins included
            keep = keep & alive
        tl.store(SEL + row.to(tl.int64) * n_cent + c, keep.to(tl.int8), mask=jm)
        size = tl.where(keep & jm, c_size, 0)
        total = tl.sum(size, 0)
        flags = SUMS + row * tl.num_programs(1)
        if EXPAND:
            # The work list's expansion, fused (no expand launch): this block needs the selected key count
            # of the blocks before it in its row. Each block publishes its count + 1 (0 = not yet: the stats
            # pass zeroed the flags), then reads all earlier flags of its row in one vector load until none
            # is 0 (the counts do not depend on each other, so no chained wait).
            # Cannot hang: a block waits only on blocks of the same row with a lower pid_c, i.e. a lower
            # linear block index in either rasterization of the 2-D grid; blocks are dispatched in linear
            # order (the assumption CUB's single-pass decoupled look-back scan makes with blockIdx-ordered
            # tiles), so every block waited on has started, and a started block publishes before it waits.
            # The flag store is a relaxed GPU-scope atomic and the reads are volatile (strong): nothing else
            # crosses blocks (each block expands only its own clusters from its registers).
            tl.atomic_xchg(flags + pid_c, total + 1, sem="relaxed", scope="gpu")
            blk = tl.arange(0, BLOCKS_P2)
            earlier = blk < pid_c
            prev = tl.load(flags + blk, mask=earlier, other=1, volatile=True)
            while tl.min(prev, 0) == 0:
                prev = tl.load(flags + blk, mask=earlier, other=1, volatile=True)
            base = tl.sum(prev - 1, 0)
            local = tl.cumsum(size, 0)
            cum_row = CUM + row.to(tl.int64) * n_cent
            tl.store(cum_row + c, base + local, mask=jm)
            if GATHER_STEPS:
                _expand_gather(IDX + row.to(tl.int64) * idx_cap + base, local, c_end.to(tl.int32), total,
                               GATHER_STEPS, SLOTS)
            else:
                _expand_markers(IDX + row.to(tl.int64) * idx_cap + base, cum_row, C_OFFS + kvh * stride_coff,
                                c, jm, size, local, total, base, pid_c * BLOCK_C, SLOTS)
        else:
            tl.store(flags + pid_c, total)
        if PRUNED:
            # Level 1 of the hierarchical lookup (decode: one tile holds every row, the logits are stored): the
            # denominator's part over this block's pruned clusters, per row, as one more (max, sum) partial next
            # to the level-2 stats pass's, so level 1 is not read a second time for it. From the stored logits
            # (the same floats the stats pass summed), weighted by the counts like in _stats_kernel.
            prow = tl.arange(0, BLOCK_M)
            prm = prow < ROWS
            lg = tl.load(LOGITS + row.to(tl.int64) * ROWS * n_cent + prow[None, :] * n_cent + c[:, None],
                         mask=prm[None, :] & jm[:, None], other=float("-inf"))  # (BLOCK_C, BLOCK_M)
            pw = lg + (lw * 1.4426950408889634)[:, None]
            pw = tl.where((jm & (keep == 0) & alive)[:, None] & prm[None, :], pw, float("-inf"))  # no logits if dead
            pmax = tl.max(pw, 0)
            psafe = tl.where(pmax == float("-inf"), 0.0, pmax)
            psum = tl.sum(tl.exp2(pw - psafe[None, :]), 0)
            pout = (row.to(tl.int64) * n_split_out + pid_c) * ROWS + prow
            tl.store(PM_OUT + pout, pmax, mask=prm)
            tl.store(PL_OUT + pout, psum, mask=prm)


@dataclass(frozen=True)
class LookupConfig:
    """Tiles of the two lookup passes; ``None`` fields take the launchers' defaults."""

    stats_block_m: int | None = None
    stats_block_c: int | None = None
    stats_warps: int | None = None
    scores_block_c: int | None = None
    scores_block_m: int | None = None
    scores_warps: int | None = None
    num_stages: int | None = None
    num_splits: int | None = None


class _Rows:
    """The query matrix of one lookup: ``(batch, heads, tokens, head_dim)`` grouped by KV head."""

    def __init__(self, q: torch.Tensor, kv_heads: int, cfg: LookupConfig | None = None):
        cfg = cfg or LookupConfig()
        self.cfg = cfg
        b, h, t, d = q.shape
        if h % kv_heads:
            raise ValueError(f"{h} query heads cannot be grouped over {kv_heads} KV heads")
        if d not in (16, 32, 64, 128, 256):
            raise ValueError(f"head_dim {d} is not supported by the Triton lookup")
        self.q = q if q.stride(-1) == 1 else q.contiguous()
        self.b, self.kvh, self.g, self.t, self.d = b, kv_heads, h // kv_heads, t, d
        self.rows = self.g * t
        self.decode = self.rows <= _STORE_LOGITS_MAX_ROWS
        # decode: a 16-row tile is the smallest tl.dot. prefill: 128 rows x 64 centroids, 4 warps.
        # Measured on the H200 (512K keys, 26K centroids, 4096 rows, both passes): stats with 128 x 64 /
        # 4 warps 1.55 ms, 128 x 64 / 8 warps 1.67, 64 x 64 / 4 warps 2.31, 128 x 128 / 8 warps 2.27;
        # scores (with 8-warp stats) with 128 centroids x 64 rows / 4 warps 1.63, / 8 warps 1.67,
        # 128 x 128 / 8 warps 1.67, 64 x 64 / 4 warps 1.87; 3 pipeline stages instead of 2: 1.80.
        self.block_m = cfg.stats_block_m or (16 if self.decode else (128 if q.is_cuda else 32))
        self.block_c = cfg.stats_block_c or (128 if self.decode else 64)
        self.warps = cfg.stats_warps or 4
        self.stages = cfg.num_stages or 2
        self.m_tiles = triton.cdiv(self.rows, self.block_m)

    def strides(self):
        return self.q.stride(0), self.q.stride(1), self.q.stride(2)

    def splits(self, n_cent: int) -> int:
        """Split the centroids so that the grid holds about 4 programs per SM (decode: few rows).

        Measured at 512K keys (H200): decode batch 1 (8 programs before splitting), 16 / 32 / 66 / 132
        splits: 0.044 / 0.036 / 0.037 / 0.042 ms for the whole lookup; prefill (256 row tiles), 3 splits
        1.55-1.67 ms, 2 splits 2.32 ms.
        """
        if self.cfg.num_splits:
            return self.cfg.num_splits
        programs = self.b * self.kvh * self.m_tiles
        want = triton.cdiv(4 * num_sms(self.q.device), programs)
        return max(1, min(want, triton.cdiv(max(n_cent, 1), self.block_c)))

    def flat_stats_launch(self, n_cent: int) -> tuple[int, int]:
        """``(splits, stages)`` of the flat lookup's stats pass. Decode with at most 8 rows over more than
        16K clusters: 2 programs per SM with 3 stages (each program streams ~6 centroid tiles). Whole decode
        path at 512K batch 1 on the H200 (ms, alternated twice): 0.0995 / 0.0993 against 0.1005 / 0.1007 for
        4 programs per SM with 2 stages; at batch 8 it was slower (0.547 against 0.537), at 128K batch 1
        (6.5K clusters) 0.0446 against 0.0451, too close to keep a rule for (kernels_notes.md, run 25)."""
        if (self.decode and self.b * self.kvh * self.m_tiles <= 8 and n_cent > 16384
                and self.cfg.num_splits is None and self.cfg.num_stages is None):
            return max(1, min(triton.cdiv(2 * num_sms(self.q.device), self.b * self.kvh), n_cent // self.block_c)), 3
        return self.splits(n_cent), self.stages


def _check_centroids(centroids: torch.Tensor, log_counts: torch.Tensor, kv_heads: int, head_dim: int):
    if centroids.dim() != 3 or centroids.shape[0] != kv_heads or centroids.shape[2] != head_dim:
        raise ValueError(f"centroids {tuple(centroids.shape)} do not match (kv_heads={kv_heads}, C, {head_dim})")
    if log_counts.shape != centroids.shape[:2]:
        raise ValueError(f"log_counts {tuple(log_counts.shape)} do not match centroids {tuple(centroids.shape)}")
    if centroids.dtype not in CENTROID_DTYPES:
        raise ValueError(f"centroids are {centroids.dtype}; the lookup reads {', '.join(map(str, CENTROID_DTYPES))}")


def _stats_tma(rq: _Rows, cent: torch.Tensor, lst) -> bool:
    """Whether the stats pass reads whole centroid tiles by TMA (``STATS_TMA``: decode, a contiguous flat set,
    where :func:`.hardware.tma_tiles` allows it), from a 16-byte aligned start, which TMA requires (a contiguous
    slice of a larger tensor may start anywhere)."""
    return (STATS_TMA and rq.decode and lst is None and cent.is_contiguous() and cent.data_ptr() % 16 == 0
            and tma_tiles(cent.device, rq.d, interpreter=True))


def _stats(rq: _Rows, cent, logn, m_buf, l_buf, split_base, n_split_total, n_splits, logits,
           scale, excl=None, lst=None, lcum=None, flags=None, pdl=False, stages=None, live=None):
    n_cent = cent.shape[1]
    dummy = m_buf
    grid = (rq.b * rq.kvh, rq.m_tiles, n_splits)
    tma = _stats_tma(rq, cent, lst)
    stages = stages or rq.stages
    cdesc = TensorDescriptor.from_tensor(cent.view(-1, rq.d), [rq.block_c, rq.d]) if tma else dummy
    _stats_kernel[grid](
        rq.q, cent, cdesc, logn,
        excl if excl is not None else dummy,
        lst if lst is not None else dummy,
        lcum if lcum is not None else dummy,
        m_buf, l_buf, logits if logits is not None else dummy, flags if flags is not None else dummy,
        live if live is not None else dummy,
        *rq.strides(), cent.stride(0), cent.stride(1), logn.stride(0),
        n_cent, lcum.shape[-1] if lcum is not None else 1,
        rq.kvh, rq.g, rq.t, rq.rows,
        split_base, n_split_total, n_splits,
        scale * LOG2E, flags.shape[-1] if flags is not None else 0,
        HEAD_DIM=rq.d, BLOCK_M=rq.block_m, BLOCK_C=rq.block_c,
        USE_LIST=lst is not None, USE_EXCL=excl is not None, STORE_LOGITS=logits is not None,
        ZERO_FLAGS=flags is not None, PDL=pdl, TMA=tma,
        LOGN_AHEAD=LOGN_AHEAD and lst is None and stages >= _LOGN_AHEAD_MIN_STAGES, HAS_LIVE=live is not None,
        num_warps=rq.warps, num_stages=stages,
    )


def _scores_block_c(rq: _Rows) -> int:
    """Centroids per scores program (in centroid_selection also the work list's chunk). Decode reads stored
    logits: 256 there, measured on the H200 with the fused selection (lookup + selection + work list, ms;
    blocks of 128 / 256 / 512 (8 warps) / 1024 (8 warps)): 128K batch 1 0.0213 / 0.0200 / 0.0211 / 0.0223,
    batch 8 0.052 / 0.046 / 0.048 / 0.053; 512K batch 1 0.0456 / 0.0411 / 0.0400 / 0.0443, batch 8 0.183 /
    0.157 / 0.157 / 0.155. Prefill recomputes the logits from the centroid tile: 128 (see _scores)."""
    return rq.cfg.scores_block_c or (256 if rq.decode else 128)


def _scores(rq: _Rows, cent, logn, m_buf, l_buf, n_split_total, logits, out, scale, lst=None, lcum=None,
            select=None, pdl=False, pruned=None, reduce_max=False, live=None):
    """``select = (sel int8 (B, KVH, C), sums int32 (B * KVH, cdiv(C, block_c)), cluster offsets,
    log_threshold, worklist, pins)``: also the threshold selection and its per-block selected key counts; with
    ``worklist = (idx, cum)`` (not None) also the work list, ``sums`` then being the look-back flags that
    the stats pass zeroed; with ``pins = (int8 (KVH, C) or (B, KVH, C), contiguous; its batch-row stride, 0 for
    one set for every row)`` (not None) the pinned clusters too.
    ``pruned = (m_out, l_out)`` (with ``select``, from stored logits, rows in one tile): also each block's
    (max, sum) partial of the unselected clusters, at split ``block`` of ``m_out``/``l_out``
    ``(B * KVH, splits, rows)`` (level 1 of the hierarchical lookup). ``reduce_max``: each centroid's largest
    log share over the rows instead of the log of the mean. ``live`` (int8 ``(B,)``, as the stats pass had it): a
    row that is not live scores ``-inf`` and keeps nothing."""
    n_cent = cent.shape[1]
    from_logits = logits is not None
    block_c = _scores_block_c(rq)
    # from stored logits there is no dot, so no 16-row minimum: a tile of the real rows (decode: 4) keeps the
    # partial statistics and logits tiles at a quarter of the registers (79 instead of 134 per thread). With
    # the logits and cluster sizes loaded up front, the decode scores pass on the H200 (kernel time, us) went
    # 512K batch 1 9.3 -> 7.9, batch 8 29.2 -> 18.5, 128K batch 8 8.8 -> 5.8 (128K batch 1 3.7, unchanged;
    # benchmarks/results/kernels_notes.md, 2026-11-29)
    block_m = rq.cfg.scores_block_m or (min(16, triton.next_power_of_2(rq.rows)) if from_logits
                                        else (64 if cent.is_cuda else 32))
    # 8 warps for the recomputing scores pass: with 4 it measured 1.63 ms alone but 1.70 together with the
    # 4-warp stats pass, against 1.55 for 4-warp stats + 8-warp scores (prefill, 512K)
    warps = rq.cfg.scores_warps or (4 if from_logits else 8)
    grid = (rq.b * rq.kvh, triton.cdiv(n_cent, block_c))
    dummy = m_buf
    sel, sums, c_offs, thr, wl, pins = select if select is not None else (dummy, dummy, dummy, 0.0, None, None)
    pins, stride_pin = pins if pins is not None else (None, 0)
    idx, cum = wl if wl is not None else (dummy, dummy)
    if pruned is not None and (select is None or not from_logits or block_m < rq.rows):
        raise ValueError("pruned partials need the selection, stored logits and every row in one tile")
    pm_out, pl_out = pruned if pruned is not None else (dummy, dummy)
    _scores_kernel[grid](
        rq.q, cent, logn,
        lst if lst is not None else dummy,
        lcum if lcum is not None else dummy,
        m_buf, l_buf, logits if from_logits else dummy, out, sel, sums, c_offs, idx, cum,
        pins if pins is not None else dummy, pm_out, pl_out, live if live is not None else dummy,
        *rq.strides(), cent.stride(0), cent.stride(1), logn.stride(0),
        n_cent, lcum.shape[-1] if lcum is not None else 1,
        rq.kvh, rq.g, rq.t, rq.rows,
        n_split_total, pm_out.shape[1] if pruned is not None else 0,
        scale * LOG2E, math.log(rq.rows),
        c_offs.stride(0) if select is not None else 0, float(thr), idx.shape[-1] if wl is not None else 0, stride_pin,
        HEAD_DIM=rq.d, BLOCK_M=block_m, BLOCK_C=block_c, SPLITS_P2=triton.next_power_of_2(n_split_total),
        USE_LIST=lst is not None, FROM_LOGITS=from_logits, SELECT=select is not None, HAS_PINS=pins is not None,
        EXPAND=wl is not None, PRUNED=pruned is not None, BLOCKS_P2=triton.next_power_of_2(grid[1]), SLOTS=_SLOTS,
        PDL=pdl, REDUCE_MAX=reduce_max,
        GATHER_STEPS=(block_c - 1).bit_length() if wl is not None and EXPAND_GATHER else 0, HAS_LIVE=live is not None,
        num_warps=warps, num_stages=rq.stages, **pdl_launch(pdl),
    )


def _prep(cent: torch.Tensor, logn: torch.Tensor):
    cent = cent if cent.stride(-1) == 1 else cent.contiguous()
    return cent, logn.to(torch.float32).contiguous()


def centroid_scores(
    q: torch.Tensor, centroids: torch.Tensor, log_counts: torch.Tensor, scale: float,
    *, config: LookupConfig | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`sqz_kernels.reference.centroid_scores`: ``(batch, kv_heads, clusters)`` float32.

    ``centroids`` may be float32 (tf32 dot on the GPU), the KV dtype (bf16/fp16: half the bytes, a plain
    16-bit tensor-core dot) or float8_e4m3fn (a quarter of the bytes, widened to the queries' dtype for the
    dot); the lookup reads them once in decode, twice in prefill.
    """
    kvh = centroids.shape[0]
    rq = _Rows(q, kvh, config)
    _check_centroids(centroids, log_counts, kvh, rq.d)
    cent, logn = _prep(centroids, log_counts)
    out = torch.empty(rq.b, kvh, cent.shape[1], dtype=torch.float32, device=q.device)
    if cent.shape[1]:
        _flat_lookup(rq, cent, logn, scale, out)
    return out


def _flat_lookup(rq: _Rows, cent, logn, scale, out, select=None, pruned=None, live=None):
    n_cent = cent.shape[1]
    ns, stages = rq.flat_stats_launch(n_cent)
    m_buf = torch.empty(rq.b * rq.kvh, ns, rq.rows, dtype=torch.float32, device=rq.q.device)
    l_buf = torch.empty_like(m_buf)
    logits = (torch.empty(rq.b * rq.kvh, rq.rows, n_cent, dtype=torch.float32, device=rq.q.device)
              if rq.decode else None)
    flags = select[1] if select is not None and select[4] is not None else None
    # decode with few rows: the scores pass is launched with PDL (nothing is launched between the two passes),
    # at any cluster count (measurements in hardware.py)
    pdl = rq.decode and rq.b * rq.kvh <= PDL_MAX_ROWS and use_pdl(rq.q.device)
    _stats(rq, cent, logn, m_buf, l_buf, 0, ns, ns, logits, scale, flags=flags, pdl=pdl, stages=stages, live=live)
    _scores(rq, cent, logn, m_buf, l_buf, ns, logits, out, scale, select=select, pdl=pdl, pruned=pruned, live=live)


def centroid_selection(
    q: torch.Tensor, centroids: torch.Tensor, log_counts: torch.Tensor, scale: float,
    cluster_offsets: torch.Tensor, log_threshold: float, n_keys: int,
    *, pins: torch.Tensor | None = None, live: torch.Tensor | None = None, config: LookupConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Triton twin of :func:`sqz_kernels.reference.centroid_selection`: the flat lookup, the threshold
    selection (OR ``pins``, one set for every batch row or one per row; nothing in a row that is not ``live``, which
    loads no centroid either) and the work list in three launches
    (stats, scores + selection + per-block key counts, work-list expansion) where ``centroid_scores`` +
    ``select_clusters`` + ``build_worklist`` take five; in decode two (the scores pass also expands the work list,
    see ``_FUSE_EXPAND``).

    Returns ``(scores (B, KVH, C) float32, selected (B, KVH, C) bool, worklist = (idx, cum))``; pass the
    work list to ``squeezed_attention(..., worklist=worklist)``.
    """
    kvh = centroids.shape[0]
    rq = _Rows(q, kvh, config)
    _check_centroids(centroids, log_counts, kvh, rq.d)
    n_cent = centroids.shape[1]
    if cluster_offsets.shape != (kvh, n_cent + 1) or n_cent == 0:
        raise ValueError(f"cluster_offsets {tuple(cluster_offsets.shape)} must be (kv_heads, clusters + 1), "
                         f"clusters >= 1")
    cent, logn = _prep(centroids, log_counts)
    return _selection(rq, cent, logn, scale, cluster_offsets.contiguous(), log_threshold, n_keys,
                      check_pins(pins, rq.b, kvh, n_cent), _live(live, rq))


def _live(live: torch.Tensor | None, rq: _Rows) -> torch.Tensor | None:
    """Checked ``live`` as the kernels read it (None stays None)."""
    check_live(live, rq.b, rq.q.device)
    return None if live is None else live_flags(live)


def _selection(rq: _Rows, cent, logn, scale, offs, log_threshold, n_keys, pins=None, live=None, pruned=None):
    """centroid_selection on checked, prepared inputs (``live``: int8 flags); ``pruned``: see :func:`_scores` (decode
    only)."""
    n_cent, dev = cent.shape[1], rq.q.device
    scores = torch.empty(rq.b, rq.kvh, n_cent, dtype=torch.float32, device=dev)
    selected = torch.empty(rq.b, rq.kvh, n_cent, dtype=torch.bool, device=dev)
    block_c = _scores_block_c(rq)
    sums = torch.empty(rq.b * rq.kvh, triton.cdiv(n_cent, block_c), dtype=torch.int32, device=dev)
    sel = selected.view(torch.int8)
    if _FUSE_EXPAND and rq.decode:
        cum = torch.empty(rq.b, rq.kvh, n_cent, dtype=torch.int32, device=dev)
        idx = torch.empty(rq.b, rq.kvh, max(n_keys, 1), dtype=torch.int32, device=dev)
        _flat_lookup(rq, cent, logn, scale, scores, select=(sel, sums, offs, log_threshold, (idx, cum), pins),
                     pruned=pruned, live=live)
        return scores, selected, (idx, cum)
    _flat_lookup(rq, cent, logn, scale, scores, select=(sel, sums, offs, log_threshold, None, pins), pruned=pruned,
                 live=live)
    return scores, selected, expand_worklist(sel, offs, sums, block_c, n_keys)


def hierarchical_centroid_scores(
    q: torch.Tensor,
    l1_centroids: torch.Tensor,
    l1_log_counts: torch.Tensor,
    l1_offsets: torch.Tensor,
    centroids: torch.Tensor,
    log_counts: torch.Tensor,
    scale: float,
    l1_log_threshold: float,
    *,
    config: LookupConfig | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`sqz_kernels.reference.hierarchical_centroid_scores`.

    Only the level-2 centroids under kept level-1 clusters are loaded (through a compact index list);
    no host sync anywhere.
    """
    return _hierarchical_scores(_Rows(q, centroids.shape[0], config), l1_centroids, l1_log_counts, l1_offsets,
                                centroids, log_counts, scale, l1_log_threshold)


def _hierarchical_scores(rq: _Rows, l1_centroids, l1_log_counts, l1_offsets, centroids, log_counts, scale,
                         l1_log_threshold, live=None) -> torch.Tensor:
    """hierarchical_centroid_scores of ``rq``'s queries; ``live`` (int8 flags): a row that is not live keeps no
    level-1 cluster, so it lists and scores no level-2 centroid (``-inf``)."""
    q, kvh = rq.q, centroids.shape[0]
    _check_centroids(centroids, log_counts, kvh, rq.d)
    _check_centroids(l1_centroids, l1_log_counts, kvh, rq.d)
    n_l1, n_l2 = l1_centroids.shape[1], centroids.shape[1]
    if l1_offsets.shape != (kvh, n_l1 + 1):
        raise ValueError(f"l1_offsets {tuple(l1_offsets.shape)} must be (kv_heads, l1_clusters + 1)")
    out = torch.full((rq.b, kvh, n_l2), float("-inf"), dtype=torch.float32, device=q.device)
    if n_l2 == 0 or n_l1 == 0:
        return out
    l1_cent, l1_logn = _prep(l1_centroids, l1_log_counts)
    cent, logn = _prep(centroids, log_counts)

    # Level 1: the fused selection with the level-1 offsets as its "clusters": its work list is the list of
    # level-2 centroids under the kept level-1 clusters (idx = level-2 ids, cum = their running count).
    # Denominator partials: the pruned level-1 clusters (splits [0, ns1)), then the listed level-2 ones
    # ([ns1, ns1 + ns2)). In decode the level-1 scores pass writes the pruned partials from its stored logits
    # (one per block of level-1 clusters); in prefill a stats pass over level 1 with the kept ones excluded.
    ns2 = rq.splits(n_l2)
    ns1 = triton.cdiv(n_l1, _scores_block_c(rq)) if rq.decode else rq.splits(n_l1)
    m_buf = torch.empty(rq.b * kvh, ns1 + ns2, rq.rows, dtype=torch.float32, device=q.device)
    l_buf = torch.empty_like(m_buf)
    _, l1_keep, (lst, lcum) = _selection(rq, l1_cent, l1_logn, scale, l1_offsets.contiguous(), l1_log_threshold,
                                         n_l2, live=live, pruned=(m_buf, l_buf) if rq.decode else None)
    if not rq.decode:
        _stats(rq, l1_cent, l1_logn, m_buf, l_buf, 0, ns1 + ns2, ns1, None, scale, excl=l1_keep.view(torch.int8),
               live=live)
    logits = (torch.empty(rq.b * kvh, rq.rows, n_l2, dtype=torch.float32, device=q.device)
              if rq.decode else None)
    _stats(rq, cent, logn, m_buf, l_buf, ns1, ns1 + ns2, ns2, logits, scale, lst=lst, lcum=lcum)
    _scores(rq, cent, logn, m_buf, l_buf, ns1 + ns2, logits, out, scale, lst=lst, lcum=lcum)
    return out


def hierarchical_centroid_selection(
    q: torch.Tensor,
    l1_centroids: torch.Tensor,
    l1_log_counts: torch.Tensor,
    l1_offsets: torch.Tensor,
    centroids: torch.Tensor,
    log_counts: torch.Tensor,
    scale: float,
    l1_log_threshold: float,
    cluster_offsets: torch.Tensor,
    log_threshold: float,
    n_keys: int,
    *,
    pins: torch.Tensor | None = None,
    live: torch.Tensor | None = None,
    config: LookupConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """Triton twin of :func:`sqz_kernels.reference.hierarchical_centroid_selection`: the hierarchical
    lookup, then the threshold selection (OR ``pins``; nothing in a row that is not ``live``, which loads no
    level-2 centroid either) folded into the work list's first launch."""
    rq = _Rows(q, centroids.shape[0], config)
    scores = _hierarchical_scores(rq, l1_centroids, l1_log_counts, l1_offsets, centroids, log_counts, scale,
                                  l1_log_threshold, _live(live, rq))
    selected, worklist = select_worklist(scores, log_counts, log_threshold, cluster_offsets, n_keys, pins=pins,
                                         live=live)
    return scores, selected, worklist


def key_max_logprob(
    q: torch.Tensor, keys: torch.Tensor, dyn_keys: torch.Tensor, scale: float, *, config: LookupConfig | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`sqz_kernels.reference.key_max_logprob`: ``(kv_heads, n_keys)`` float32, per corpus
    key the largest log attention probability a query of ``q`` gives it.

    The flat lookup's two passes with the keys as centroids of one key each (log counts 0): the stats pass
    gives every row's log-denominator over the corpus keys, the row's causal dynamic keys join it as one more
    partial (computed in torch: the question's own tokens, few), and the scores pass keeps each key's largest
    log share over the rows. Two reads of the keys and no ``(rows, keys)`` logits in memory (at most 16 rows
    store theirs, as the decode lookup does), where the torch twin's sliced q.K materialises them.
    """
    check_dynamic_keys(q, keys, dyn_keys)
    kvh, n, d = keys.shape
    rq = _Rows(q, kvh, config)
    dev = q.device
    if n == 0:
        return torch.empty(kvh, 0, dtype=torch.float32, device=dev)
    logn = torch.zeros(kvh, n, dtype=torch.float32, device=dev)  # every "centroid" is one key
    keys = keys if keys.stride(-1) == 1 else keys.contiguous()
    ns = rq.splits(n)
    m_buf = torch.empty(rq.b * kvh, ns + 1, rq.rows, dtype=torch.float32, device=dev)
    l_buf = torch.empty_like(m_buf)
    # the dynamic keys' part of each row's denominator: one more partial (max = its log-sum-exp, sum = 1)
    m_buf[:, ns] = dynamic_lse(q, dyn_keys, scale).view(rq.b * kvh, rq.rows) * LOG2E
    l_buf[:, ns] = 1.0
    logits = torch.empty(rq.b * kvh, rq.rows, n, dtype=torch.float32, device=dev) if rq.decode else None
    _stats(rq, keys, logn, m_buf, l_buf, 0, ns + 1, ns, logits, scale)
    out = torch.empty(rq.b, kvh, n, dtype=torch.float32, device=dev)
    _scores(rq, keys, logn, m_buf, l_buf, ns + 1, logits, out, scale, reduce_max=True)
    return out.amax(dim=0)
