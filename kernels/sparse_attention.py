"""Sparse FlashAttention over the selected corpus keys, fused with dense causal attention over the
dynamic tokens; the Triton twins of ``reference.sparse_attention``, ``causal_attention`` and
``squeezed_attention``.

One program = one (batch row, KV head), one tile of query rows ``r = g * T + t`` (all query heads of the
GQA group in one tile, so each key load serves the whole group), one split of the keys:

- corpus keys come from the work list (:mod:`.worklist`): slot ``j < n_sel`` reads ``idx[j]`` (the
  selected clusters' contiguous ranges, in order); slots after it are the always-attended tail
  ``offsets[:, -1]:``. The corpus tensors have no batch dimension: B questions share one copy.
- dynamic keys (the question and the generated tokens) are dense and causal.
- online softmax in log2 space (``exp2``, scale folded into ``qk_scale``).

Decode has few rows, so the keys are split across programs (flash-decoding) and the partial results
are merged exactly by their log-sum-exp in :func:`_combine_kernel`; the dynamic key tiles are dealt
round-robin over the same splits. Prefill has enough row tiles to fill the GPU and writes its output
directly; on Hopper with 16-bit K/V it goes to :mod:`.prefill_attention` instead (the selected keys copied
to contiguous rows and read by TMA: 512K prefill attention 2.99 -> 1.70 ms on the H200).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .hardware import PDL_MAX_KEYS, PDL_MAX_ROWS, num_sms, pdl_launch, use_pdl
from .prefill_attention import compact_available, prefill_attention, prefill_tiles
from .tiles import LOG2E, _causal_tiles, _online_tile, _row_tile, _work_keys
from .worklist import build_worklist


@dataclass(frozen=True)
class AttentionConfig:
    """Tile shape and pipelining of :func:`_attn_kernel`; ``None`` fields take the launcher's defaults."""

    block_m: int | None = None
    block_n: int | None = None
    num_warps: int | None = None
    num_stages: int | None = None
    num_splits: int | None = None  # corpus key splits per (row, KV head, row tile)
    # prefill: copy the selected keys into contiguous rows first and read them by tensor descriptor
    # (:mod:`.prefill_attention`); None = in prefill where that is measured (Hopper+, 16-bit K/V, head_dim <= 128)
    compact: bool | None = None


@triton.jit
def _attn_kernel(
    Q, K, V, IDX, CUM, OFFS, DK, DV, DLEN, O_PART, L_PART, O, LSE,
    stride_qb, stride_qh, stride_qt,
    stride_kh, stride_kn, stride_vh, stride_vn,
    stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
    stride_ob, stride_oh, stride_ot,
    n_keys, n_clusters, stride_off, idx_cap, m_dyn, stride_dlen,
    KVH, G, T, ROWS, n_split_c, n_split_total,
    qk_scale,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    HAS_SPARSE: tl.constexpr, HAS_DYN: tl.constexpr, HAS_DLEN: tl.constexpr, FINAL: tl.constexpr,
    WRITE_LSE: tl.constexpr, PDL: tl.constexpr, PDL_TRIGGER: tl.constexpr,
):
    if PDL_TRIGGER:  # the combine is launched with PDL: let it launch now (it waits for this grid's end)
        tl.extra.cuda.gdc_launch_dependents()
    row = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_s = tl.program_id(2)
    b, kvh, rmask, t, h = _row_tile(pid_m, row, KVH, G, T, ROWS, BLOCK_M)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    d = tl.arange(0, HEAD_DIM)
    q_ptr = Q + b.to(tl.int64) * stride_qb + h[:, None].to(tl.int64) * stride_qh \
        + t[:, None].to(tl.int64) * stride_qt + d[None, :]
    if PDL:
        # every load waits for the kernel before (the work list's, or whatever the caller launched last):
        # only the launch and the index arithmetic above overlap its tail
        tl.extra.cuda.gdc_wait()
    q = tl.load(q_ptr, mask=rmask[:, None], other=0.0)
    if HAS_DLEN:  # the dynamic keys are the first DLEN slots of a preallocated buffer (CUDA-graph decode), one
        # count for every batch row (stride 0) or each row its own (a batch of answers)
        m_dyn = tl.load(DLEN + b * stride_dlen).to(tl.int32)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], tl.float32)
    if HAS_SPARSE:
        # issued first and waited for only after the dynamic tiles below: the splits that hold a dynamic tile
        # (they need no work list) hide this load (decode at 128K, with K and V loaded before each tile's first
        # dot: attention 0.035 -> 0.033 ms)
        n_sel = tl.load(CUM + row.to(tl.int64) * n_clusters + n_clusters - 1)
        n_clu = tl.load(OFFS + kvh * stride_off + n_clusters).to(tl.int32)

    if HAS_DYN:
        # the dynamic key tiles are dealt round-robin over the splits, starting with the last split (the
        # shortest corpus share): one extra program that read all 1024 dynamic keys alone was the critical
        # path of decode at 128K (its 8 tiles against ~3 corpus tiles per split)
        m_i, l_i, acc = _causal_tiles(q.to(DK.dtype.element_ty), DK, DV, b, kvh, stride_dkb, stride_dkh, stride_dkn,
                                      stride_dvb, stride_dvh, stride_dvn, m_dyn, T, t, rmask,
                                      (n_split_total - 1 - pid_s) * BLOCK_N, n_split_total * BLOCK_N,
                                      m_i, l_i, acc, qk_scale, HEAD_DIM, BLOCK_N)

    if HAS_SPARSE:
        q = q.to(K.dtype.element_ty)
        total = n_sel + n_keys - n_clu
        # split s reads the work list's key tiles s, s + S, s + 2S, ... rather than one contiguous run of them:
        # the same work per split (within one tile), and faster on the H200 (whole decode path, A/B in one
        # process, ms, contiguous -> strided): batch 8 512K 0.5108 / 0.5113 -> 0.4836 / 0.4834, 128K 0.1537 /
        # 0.1537 -> 0.1462 / 0.1460; batch 1 512K 0.0998 / 0.0997 -> 0.0990 / 0.0992, 128K 0.0436 / 0.0438 ->
        # 0.0430 / 0.0431 (kernels_notes.md, 2026-11-29 20:34)
        n_tiles = tl.cdiv(total, BLOCK_N)
        k_base = K + kvh.to(tl.int64) * stride_kh
        v_base = V + kvh.to(tl.int64) * stride_vh
        idx_base = IDX + row.to(tl.int64) * idx_cap
        for i in range(0, tl.cdiv(tl.maximum(n_tiles - pid_s, 0), n_split_c)):
            j = (pid_s + i * n_split_c) * BLOCK_N + tl.arange(0, BLOCK_N)
            jm = j < total
            kid = _work_keys(idx_base, j, total, n_sel, n_clu)
            k = tl.load(k_base + kid[:, None] * stride_kn + d[None, :], mask=jm[:, None], other=0.0)
            v = tl.load(v_base + kid[:, None] * stride_vn + d[None, :], mask=jm[:, None], other=0.0)
            m_i, l_i, acc = _online_tile(q, k, v, jm[None, :], m_i, l_i, acc, qk_scale)

    empty = l_i == 0.0
    out = acc / tl.where(empty, 1.0, l_i)[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(tl.where(empty, 1.0, l_i))) * 0.6931471805599453)
    if FINAL:
        o_ptr = O + b.to(tl.int64) * stride_ob + h[:, None].to(tl.int64) * stride_oh \
            + t[:, None].to(tl.int64) * stride_ot + d[None, :]
        tl.store(o_ptr, out.to(O.dtype.element_ty), mask=rmask[:, None])
        if WRITE_LSE:
            tl.store(LSE + (b.to(tl.int64) * KVH * G + h) * T + t, lse, mask=rmask)
    else:
        base = (row.to(tl.int64) * n_split_total + pid_s) * ROWS + rows
        tl.store(O_PART + base[:, None] * HEAD_DIM + d[None, :], out, mask=rmask[:, None])
        tl.store(L_PART + base, lse, mask=rmask)


@triton.jit
def _combine_kernel(
    O_PART, L_PART, O, LSE,
    stride_ob, stride_oh, stride_ot,
    KVH, G, T, ROWS, n_split_total,
    HEAD_DIM: tl.constexpr, SPLIT_CHUNK: tl.constexpr, WRITE_LSE: tl.constexpr, PDL: tl.constexpr,
):
    """Exact merge of the splits of one query row by their log-sum-exp (flash-decoding's reduce).

    The splits are read SPLIT_CHUNK at a time as one 2-D tile: a loop of one split per step (one small
    dependent load each) made this merge cost tens of microseconds at 67 splits on the H200. Up to 64 splits
    in one tile: at 33 splits one step instead of two, 3.9 -> 2.3 us of kernel time (decode batch 1).
    """
    row = tl.program_id(0)
    r = tl.program_id(1)
    d = tl.arange(0, HEAD_DIM)
    sc = tl.arange(0, SPLIT_CHUNK)
    if PDL:  # launched with PDL after the attention: its partials are read below
        tl.extra.cuda.gdc_wait()
    m = tl.full([1], float("-inf"), tl.float32)
    w_sum = tl.zeros([1], tl.float32)
    acc = tl.zeros([HEAD_DIM], tl.float32)
    for s0 in range(0, n_split_total, SPLIT_CHUNK):
        s_i = s0 + sc
        sm = s_i < n_split_total
        base = (row.to(tl.int64) * n_split_total + s_i) * ROWS + r
        ls = tl.load(L_PART + base, mask=sm, other=float("-inf"))
        o = tl.load(O_PART + base[:, None] * HEAD_DIM + d[None, :], mask=sm[:, None], other=0.0)
        mn = tl.maximum(m, tl.max(ls, 0))
        msafe = tl.where(mn == float("-inf"), 0.0, mn)
        alpha = tl.exp(m - msafe)
        w = tl.exp(ls - msafe)  # (SPLIT_CHUNK,)
        acc = acc * alpha + tl.sum(w[:, None] * o, 0)
        w_sum = w_sum * alpha + tl.sum(w, 0)
        m = mn
    empty = w_sum == 0.0
    out = acc / tl.where(empty, 1.0, w_sum)
    b = row // KVH
    kvh = row % KVH
    g = r // T
    t = r % T
    h = kvh * G + g
    o_ptr = O + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh + t.to(tl.int64) * stride_ot + d
    tl.store(o_ptr, out.to(O.dtype.element_ty))
    if WRITE_LSE:
        lse = tl.where(empty, float("-inf"), m + tl.log(tl.where(empty, 1.0, w_sum)))
        tl.store(LSE + (b.to(tl.int64) * KVH * G + h) * T + t + tl.arange(0, 1), lse)


def _check_q(q: torch.Tensor, kv_heads: int, head_dim: int) -> torch.Tensor:
    if q.dim() != 4:
        raise ValueError(f"q must be (batch, heads, tokens, head_dim), got {tuple(q.shape)}")
    if q.shape[1] % kv_heads:
        raise ValueError(f"{q.shape[1]} query heads cannot be grouped over {kv_heads} KV heads")
    if q.shape[3] != head_dim or head_dim not in (16, 32, 64, 128, 256):
        raise ValueError(f"head_dim {q.shape[3]} (keys: {head_dim}) is not supported")
    return q if q.stride(-1) == 1 else q.contiguous()


def _last_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _check_dyn_len(dyn_len: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor | None:
    """One count for every row (one element) or one per row (``(batch,)``), integers on ``q``'s device."""
    if dyn_len is not None and (
        not (dyn_len.numel() == 1 or tuple(dyn_len.shape) == (q.shape[0],))
        or dyn_len.dtype.is_floating_point or dyn_len.dtype == torch.bool or dyn_len.device != q.device
    ):
        raise ValueError(f"dyn_len must be an integer tensor on {q.device} with one element or one per batch row "
                         f"({q.shape[0]}), got {dyn_len.dtype} {tuple(dyn_len.shape)} on {dyn_len.device}")
    return dyn_len


def _attention(q, scale, out_dtype, write_lse, cfg: AttentionConfig | None,
               corpus=None, dyn=None, dyn_len=None):
    """Shared launcher. ``corpus = (keys, values, offsets, idx, cum)``, ``dyn = (keys, values)``, ``dyn_len``
    the device-side count of valid dynamic keys (the compacting prefill kernel does not take one)."""
    cfg = cfg or AttentionConfig()
    b, h, t, d = q.shape
    kvh = corpus[0].shape[0] if corpus is not None else dyn[0].shape[1]
    g = h // kvh
    rows = g * t
    dev = q.device
    on_gpu = q.is_cuda
    # Tiles, measured on the H200 (bf16, d=128, 8 KV heads x 4, 10% of 512K keys kept; 2026-11-28,
    # CUDA-graph replays, median):
    # decode (<= 16 rows), batch 1 (33 splits): 16 x 128 tiles, 2 stages: 0.074 ms; 16 x 64 with 2 / 3 / 4
    # stages 0.083 / 0.079 / 0.078, 16 x 32 with 4 stages 0.098, 8 warps 0.079-0.091. Batch 8 then took
    # 0.434 ms with 16 x 64 / 3 stages and 0.535 with 16 x 128 / 2 stages. Re-measured on 2026-11-29, with
    # the dynamic tiles first and K and V loaded before the tile's first dot, 16 x 128 / 2 stages is the
    # fastest decode tile at both batch sizes (ms, attention alone, 128K / 512K): batch 8 0.122 / 0.398 against 0.134 / 0.433 for
    # 16 x 64 / 3 stages; batch 1 0.031 / 0.072 against 0.031-0.035 / 0.075-0.085 for 64-key tiles with 2 or
    # 3 stages and 33-48 splits (kernels_notes.md). Triton's pipeliner (2 stages) keeps one K/V tile in
    # flight and loads the work-list indices of the next tile synchronously; 3 stages load them ahead but
    # take 139 KB of shared memory with 128-key tiles (one program per SM).
    # prefill (this gathering kernel): 64 x 64 tiles, 4 warps, 3 stages: 2.91 ms (128 x 32 / 4 warps the same,
    # 2.90), against 3.18 for the tutorial's 128 x 64 with 8 warps, 3.19 for 128 x 128 / 8 warps, 4.48 for
    # 64 x 128.
    decode = rows <= 16
    if corpus is not None and dyn_len is None and (cfg.compact if cfg.compact is not None
                                                   else not decode and compact_available(dev, corpus[0].dtype, d)):
        bm, bn, w, st = prefill_tiles(corpus[0].dtype, d, on_gpu)
        return prefill_attention(q, corpus, dyn, scale, out_dtype, write_lse, cfg.block_m or bm,
                                 cfg.block_n or bn, cfg.num_warps or w, cfg.num_stages or st)
    sms = num_sms(dev)
    block_m = cfg.block_m or (16 if decode else (64 if on_gpu else 32))
    m_tiles = triton.cdiv(rows, block_m)
    programs = b * kvh * m_tiles
    # Decode with many (row, KV head) programs (batch 8 x 8 KV heads = 64 on 132 SMs) takes 64-key tiles and twice
    # the splits: more, smaller programs in flight. Attention alone, strided splits, ms (128K / 512K, batch 8;
    # kernels_notes.md 2026-11-29 20:44): 64 keys / 2 stages / 10 splits 0.1101 / 0.3557 against 0.1136 / 0.3691
    # for 128 keys / 5 splits (8 splits 0.1295 / 0.4392; 3 stages slower). Batch 1 (8 programs) keeps 128-key
    # tiles: the best 64-key variant of the attention-alone sweep (3 stages, 48 splits: 0.0700 against 0.0705 at
    # 512K) was much slower on the whole path as a rule (64 keys, 3 stages, ~3 programs per SM = 50 splits: 512K
    # 0.0976 -> 0.1185 ms, 128K 0.0422 -> 0.0482; kernels_notes.md run 39).
    # Where the programs fill the GPU without splits the tiles stay as they were (not measured).
    wide = decode and on_gpu and corpus is not None and sms <= 4 * programs < 4 * sms
    block_n = cfg.block_n or ((64 if wide else 128 if decode else 64) if on_gpu else 32)
    warps = cfg.num_warps or 4
    stages = cfg.num_stages or (2 if decode else 3)
    if corpus is None:
        n_split_c = 1
    elif cfg.num_splits is not None:
        n_split_c = cfg.num_splits
    else:
        # flash-decoding: about 2 programs per SM, each with at least ~8 key tiles of the corpus.
        # Measured at 512K, batch 1 (8 programs before splitting), 16 x 64 tiles: 16 / 32 / 66 / 132 / 264
        # splits took 0.112 / 0.080 / 0.090 / 0.092 / 0.107 ms; with 16 x 128 tiles, 8 / 16 / 33 / 66 splits
        # took 0.138 / 0.090 / 0.074 / 0.079 ms at 512K and 0.050 / 0.037 / 0.039 / 0.048 ms at 128K (then the
        # 1024 dynamic keys were one extra split of their own, the longest one at 128K). With the dynamic
        # tiles dealt over the splits (2026-11-29): 8 / 16 / 33 / 66 / 132 splits 0.055 / 0.039 / 0.034 /
        # 0.039 / 0.044 ms at 128K and 0.153 / 0.096 / 0.074 / 0.088 / 0.089 at 512K; 64-key tiles with 66
        # splits 0.035 / 0.076, 3 stages (128 or 64 keys) slower everywhere (kernels_sweep_20261129-0151).
        n_keys = corpus[0].shape[1]
        n_split_c = max(1, min((2 if wide else 1) * triton.cdiv(2 * sms, programs), triton.cdiv(n_keys, 8 * block_n)))
        if programs >= sms:
            n_split_c = 1
    n_split_total = n_split_c  # the dynamic keys are shared out over the same splits
    final = n_split_total == 1
    # decode (split keys) with few rows: the combine is launched with programmatic dependent launch at any
    # corpus size, the attention only up to PDL_MAX_KEYS (beyond, its early programs slowed the lookup's
    # scores pass still running; measurements in hardware.py)
    pdl_combine = decode and not final and b * kvh <= PDL_MAX_ROWS and corpus is not None and use_pdl(dev)
    pdl = pdl_combine and corpus[0].shape[1] <= PDL_MAX_KEYS

    out = torch.empty(b, h, t, d, dtype=out_dtype, device=dev)
    lse = torch.empty(b, h, t, dtype=torch.float32, device=dev) if write_lse else out
    if final:
        o_part = l_part = out
    else:
        o_part = torch.empty(b * kvh, n_split_total, rows, d, dtype=torch.float32, device=dev)
        l_part = torch.empty(b * kvh, n_split_total, rows, dtype=torch.float32, device=dev)

    if corpus is not None:
        keys, values, offsets, idx, cum = corpus
        k_args = (keys, values, idx, cum, offsets)
        k_strides = (keys.stride(0), keys.stride(1), values.stride(0), values.stride(1))
        n_keys, n_clusters, stride_off, idx_cap = keys.shape[1], cum.shape[-1], offsets.stride(0), idx.shape[-1]
    else:
        k_args = (q, q, q, q, q)
        k_strides = (0, 0, 0, 0)
        n_keys, n_clusters, stride_off, idx_cap = 0, 1, 0, 0
    if dyn is not None:
        dk, dv = dyn
        d_args = (dk, dv)
        d_strides = (dk.stride(0), dk.stride(1), dk.stride(2), dv.stride(0), dv.stride(1), dv.stride(2))
        m_dyn = dk.shape[2]
    else:
        d_args = (q, q)
        d_strides = (0,) * 6
        m_dyn = 0
    kk, vv, ii, cc, oo = k_args
    grid = (b * kvh, m_tiles, n_split_total)
    _attn_kernel[grid](
        q, kk, vv, ii, cc, oo, *d_args, q if dyn_len is None else dyn_len, o_part, l_part, out, lse,
        q.stride(0), q.stride(1), q.stride(2),
        *k_strides, *d_strides,
        out.stride(0), out.stride(1), out.stride(2),
        n_keys, n_clusters, stride_off, idx_cap, m_dyn,
        0 if dyn_len is None or dyn_len.numel() == 1 else dyn_len.stride(0),
        kvh, g, t, rows, n_split_c, n_split_total,
        scale * LOG2E,
        HEAD_DIM=d, BLOCK_M=block_m, BLOCK_N=block_n,
        HAS_SPARSE=corpus is not None, HAS_DYN=dyn is not None, HAS_DLEN=dyn_len is not None, FINAL=final,
        WRITE_LSE=write_lse, PDL=pdl,
        PDL_TRIGGER=pdl_combine, num_warps=warps, num_stages=stages, **pdl_launch(pdl),
    )
    if not final:
        _combine_kernel[(b * kvh, rows)](
            o_part, l_part, out, lse,
            out.stride(0), out.stride(1), out.stride(2),
            kvh, g, t, rows, n_split_total,
            HEAD_DIM=d, SPLIT_CHUNK=min(64, triton.next_power_of_2(n_split_total)), WRITE_LSE=write_lse,
            PDL=pdl_combine, num_warps=4, **pdl_launch(pdl_combine),
        )
    return (out, lse) if write_lse else out


def _corpus(q, keys, values, cluster_offsets, selected, worklist):
    if keys.dim() != 3 or values.shape != keys.shape:
        raise ValueError(f"keys/values must be (kv_heads, n_keys, head_dim), got {tuple(keys.shape)} / "
                         f"{tuple(values.shape)}")
    kvh, n_keys, d = keys.shape
    q = _check_q(q, kvh, d)
    b = q.shape[0]
    c = cluster_offsets.shape[1] - 1
    if cluster_offsets.shape[0] != kvh or c < 1:
        raise ValueError(f"cluster_offsets {tuple(cluster_offsets.shape)} must be (kv_heads, clusters + 1)")
    if selected.shape != (b, kvh, c):
        raise ValueError(f"selected {tuple(selected.shape)} must be (batch, kv_heads, clusters) = {(b, kvh, c)}")
    if worklist is None:
        worklist = build_worklist(selected, cluster_offsets, n_keys)
    idx, cum = worklist
    return q, (_last_contiguous(keys), _last_contiguous(values), cluster_offsets.contiguous(), idx, cum)


def sparse_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cluster_offsets: torch.Tensor,
    selected: torch.Tensor,
    scale: float,
    *,
    worklist: tuple[torch.Tensor, torch.Tensor] | None = None,
    config: AttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`sqz_kernels.reference.sparse_attention`: ``(out float32, lse)``.

    ``worklist``: ``build_worklist(selected, cluster_offsets, n_keys)``, when the caller already has it.
    """
    q, corpus = _corpus(q, keys, values, cluster_offsets, selected, worklist)
    return _attention(q, scale, torch.float32, True, config, corpus=corpus)


def causal_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
    *, dyn_len: torch.Tensor | None = None, config: AttentionConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton twin of :func:`sqz_kernels.reference.causal_attention`: ``(out float32, lse)``."""
    if keys.dim() != 4 or values.shape != keys.shape or keys.shape[0] != q.shape[0]:
        raise ValueError(f"dynamic keys/values must be (batch, kv_heads, m, head_dim), got {tuple(keys.shape)}")
    if keys.shape[2] < q.shape[2]:
        raise ValueError(f"{keys.shape[2]} dynamic keys cannot hold {q.shape[2]} query tokens")
    q = _check_q(q, keys.shape[1], keys.shape[3])
    return _attention(q, scale, torch.float32, True, config, dyn=(_last_contiguous(keys), _last_contiguous(values)),
                      dyn_len=_check_dyn_len(dyn_len, q))


def squeezed_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cluster_offsets: torch.Tensor,
    selected: torch.Tensor,
    dyn_keys: torch.Tensor,
    dyn_values: torch.Tensor,
    scale: float,
    *,
    worklist: tuple[torch.Tensor, torch.Tensor] | None = None,
    dyn_len: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
) -> torch.Tensor:
    """Triton twin of :func:`sqz_kernels.reference.squeezed_attention`, in one attention launch (plus
    the split merge in decode): ``(batch, heads, tokens, head_dim)`` in ``q``'s dtype."""
    q, corpus = _corpus(q, keys, values, cluster_offsets, selected, worklist)
    if dyn_keys.dim() != 4 or dyn_values.shape != dyn_keys.shape or dyn_keys.shape[:2] != (q.shape[0], keys.shape[0]):
        raise ValueError(f"dyn_keys/dyn_values must be (batch, kv_heads, m, head_dim), got {tuple(dyn_keys.shape)}")
    if dyn_keys.shape[2] < q.shape[2]:
        raise ValueError(f"{dyn_keys.shape[2]} dynamic keys cannot hold {q.shape[2]} query tokens")
    return _attention(q, scale, q.dtype, False, config, corpus=corpus,
                      dyn=(_last_contiguous(dyn_keys), _last_contiguous(dyn_values)), dyn_len=_check_dyn_len(dyn_len, q))
