"""Kernel benchmark (issue 3): the whole squeezed-attention path against dense SDPA and FlexAttention.

Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128, bf16); one layer; a fixed corpus
of N in {32K, 128K, 512K} tokens with 5% level-2 clusters (1% level-1), the last 100 tokens always
attended, ~10% of the clustered keys kept by a global threshold. Modes: decode (1 token, batch 1 and
batch 8 sharing one corpus, 1024 dynamic tokens) and prefill (1024 user-input tokens, batch 1).

Timed (median of ``triton.testing.do_bench``):
- ``ours``: lookup (flat or hierarchical) + selection + work list (fused: ``centroid_selection``) + sparse
  attention + causal dynamic part + merge, as one CUDA graph (the path has no host sync) and eagerly;
  ``ours_*_unfused``: the same through the separate calls ``centroid_scores`` + ``select_clusters`` +
  ``squeezed_attention`` (what the engine calls);
- its parts: lookup alone, lookup + selection + work list, selection + work list, attention alone;
- ``sdpa``: torch SDPA's default backend (cuDNN on the H200) with ``enable_gqa=True`` over corpus +
  dynamic keys (no mask: every query sees every key, as the dense reference numbers in environment.md);
- ``sdpa_fa2``: the same with the FlashAttention-2 backend (the paper's baseline);
- ``flex``: compiled FlexAttention over corpus + dynamic keys, given the same selection as a block mask
  (128-key blocks that hold any selected key) plus a mask_mod for the exact keys.
Also the achieved bandwidth (bytes that had to move / time) against a measured device copy, and the
recall of the flat selection by the hierarchical one.

Every call starts from a cold L2. do_bench empties it by writing zeros, which leaves it full of dirty lines that
the timed call must write back ("dirty", the main columns); ``ours`` and both SDPA backends are also timed after
emptying it by reads ("clean", as in a model, where the work before an attention layer mostly reads): the
``*_clean`` times and ``speedup_*_clean``.

The corpus is synthetic but really clustered (keys drawn around level-2 centres drawn around level-1
centres, uneven lognormal cluster sizes, some empty), built on the GPU in seconds.

Writes ``benchmarks/results/kernels_<date>.json`` and ``.md``; prints a short table last.
Usage: ``python benchmarks/bench_kernels.py [--sizes 32768 131072 524288] [--sweep] [--no-flex]``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
from triton.testing import do_bench

from sqz_kernels import triton_ops as tri
from sqz_kernels.lookup import LookupConfig
from sqz_kernels.sparse_attention import AttentionConfig

KVH, G, D = 8, 4, 128
H = KVH * G
WINDOW = 100
CLUSTER_FRAC, L1_FRAC, KEEP_FRAC = 0.05, 0.01, 0.10
DYN = 1024
DTYPE = torch.bfloat16
RESULTS = Path(__file__).parent / "results"
DEV = "cuda"  # "cpu" with --cpu-smoke (TRITON_INTERPRET=1, tiny sizes): a dry run of this script's code


# ------------------------------------------------------------------------------------------ corpus
def _offsets(kvh, n_parts, total, gen, sigma):
    """(kvh, n_parts + 1) int64 boundaries with lognormal-uneven sizes (some empty), summing to total."""
    w = torch.exp(torch.randn(kvh, n_parts, generator=gen, device=DEV) * sigma)
    cum = torch.round(torch.cumsum(w, 1) / w.sum(1, keepdim=True) * total).long()
    cum[:, -1] = total
    return torch.cat([torch.zeros(kvh, 1, dtype=torch.long, device=DEV), cum], 1)


def make_corpus(n: int, seed: int = 0) -> dict:
    gen = torch.Generator(device=DEV).manual_seed(seed)
    n_cl = n - WINDOW
    c, p = round(CLUSTER_FRAC * n), round(L1_FRAC * n)
    l1_offsets = _offsets(KVH, p, c, gen, 0.5)  # level-2 clusters per level-1 cluster
    offsets = _offsets(KVH, c, n_cl, gen, 0.8)  # keys per level-2 cluster
    l1_sizes, sizes = l1_offsets.diff(dim=1), offsets.diff(dim=1)
    keys = torch.empty(KVH, n, D, dtype=DTYPE, device=DEV)
    cent = torch.empty(KVH, c, D, dtype=torch.float32, device=DEV)
    l1_cent = torch.empty(KVH, p, D, dtype=torch.float32, device=DEV)
    for h in range(KVH):
        c1 = torch.randn(p, D, generator=gen, device=DEV)
        parent = torch.repeat_interleave(torch.arange(p, device=DEV), l1_sizes[h])
        c2 = c1[parent] + 0.7 * torch.randn(c, D, generator=gen, device=DEV)
        owner = torch.repeat_interleave(torch.arange(c, device=DEV), sizes[h])
        kh = torch.randn(n, D, generator=gen, device=DEV) * 0.6
        kh[:n_cl] += c2[owner]
        keys[h] = kh.to(DTYPE)
        # centroids: the mean of the raw (stored, bf16) keys of each cluster; empty -> 0, never NaN
        sums = torch.zeros(c, D, device=DEV).index_add_(0, owner, keys[h, :n_cl].float())
        cent[h] = sums / sizes[h].clamp_min(1).unsqueeze(1)
        w = sizes[h].float()
        s1 = torch.zeros(p, D, device=DEV).index_add_(0, parent, cent[h] * w[:, None])
        n1 = torch.zeros(p, device=DEV).index_add_(0, parent, w)
        l1_cent[h] = s1 / n1.clamp_min(1).unsqueeze(1)
    l1_counts = torch.zeros(KVH, p, device=DEV)
    for h in range(KVH):
        parent = torch.repeat_interleave(torch.arange(p, device=DEV), l1_sizes[h])
        l1_counts[h].index_add_(0, parent, sizes[h].float())
    values = torch.randn(KVH, n, D, generator=gen, device=DEV).to(DTYPE)
    return dict(
        n=n, keys=keys, values=values, offsets=offsets, centroids=cent, log_counts=torch.log(sizes.float()),
        # the lookup reads its centroids in the KV dtype: half the bytes of float32 (built once, with the corpus)
        centroids_kv=cent.to(DTYPE), l1_centroids=l1_cent, l1_centroids_kv=l1_cent.to(DTYPE),
        # fp8 (e4m3) centroids: a quarter of float32's bytes, widened to bf16 in the kernel
        centroids_fp8=cent.to(torch.float8_e4m3fn), l1_centroids_fp8=l1_cent.to(torch.float8_e4m3fn),
        l1_log_counts=torch.log(l1_counts), l1_offsets=l1_offsets, n_clustered=n_cl,
    )


def global_threshold(scores: torch.Tensor, log_counts: torch.Tensor, frac: float) -> float:
    """The score above which clusters hold ``frac`` of all clustered keys (over rows and heads)."""
    counts = torch.exp(log_counts).unsqueeze(0).expand_as(scores).reshape(-1)
    s = scores.reshape(-1)
    order = torch.argsort(s, descending=True)
    cum = torch.cumsum(counts[order], 0)
    k = int(torch.searchsorted(cum, frac * cum[-1]))
    return float(s[order[min(k, s.numel() - 1)]])


def kept_keys(selected: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Selected keys per (row, KV head), the always-attended tail excluded."""
    return (selected * offsets.diff(dim=1).unsqueeze(0)).sum(-1)


# ---------------------------------------------------------------------------------------- timing
# The L2 state each timed call starts from. do_bench empties the L2 before every call by *writing* 256 MB of
# zeros, so each call starts with the L2 (60 MB on the H200) full of dirty lines that it has to write back to
# DRAM as its own reads evict them: a fixed cost of up to ~60 MB of writes, charged to whatever is timed
# ("dirty": every table before 2026-11-29 19:16 UTC). In a model, the kernels before an attention layer mostly read
# (weights, the KV cache) and write little, so its L2 is cold but clean: "clean" empties the L2 by *reading*
# 256 MB instead. Both are cold; the difference is the write-back alone.
L2_STATES = ("dirty", "clean")
_FLUSH_BYTES = 256 << 20
_clean_flush: dict = {}


def _flush_l2_clean():
    """Evict the L2 with clean lines: a read-only reduction over 256 MB (writes one float)."""
    if not _clean_flush:
        _clean_flush["buf"] = torch.zeros(_FLUSH_BYTES // 4, dtype=torch.float32, device=DEV)
        _clean_flush["out"] = torch.empty((), dtype=torch.float32, device=DEV)
    torch.sum(_clean_flush["buf"], dim=0, out=_clean_flush["out"])


def _median_ms_clean(fn, warmup: float = 25, rep: float = 200) -> float:
    """do_bench's loop (estimate, warm-up and repetitions by milliseconds, events around each call, median),
    with the L2 emptied by reads instead of writes before each call."""
    _flush_l2_clean()
    fn()
    torch.cuda.synchronize()
    t0, t1 = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    t0.record()
    for _ in range(5):
        _flush_l2_clean()
        fn()
    t1.record()
    torch.cuda.synchronize()
    est = t0.elapsed_time(t1) / 5
    for _ in range(max(1, int(warmup / est))):
        _flush_l2_clean()
        fn()
    n = max(1, int(rep / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        _flush_l2_clean()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return times[len(times) // 2]


def bench(fn, graph: bool = False, l2: str = "dirty") -> float:
    """Median milliseconds; ``graph=True`` captures ``fn`` in a CUDA graph and times its replays; ``l2`` is the
    cache state each call starts from (``L2_STATES``, see above)."""
    if l2 not in L2_STATES:
        raise ValueError(f"l2 must be one of {L2_STATES}, not {l2!r}")
    if DEV == "cpu":  # smoke run: one call, wall clock
        t0 = time.perf_counter()
        fn()
        return (time.perf_counter() - t0) * 1e3
    if graph:
        fn()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn()
        fn = g.replay
    if l2 == "clean":
        return _median_ms_clean(fn)
    return do_bench(fn, warmup=25, rep=200, return_mode="median")


def bench_cold(times: dict, key: str, fn, graph: bool = False) -> None:
    """``times[key]`` from do_bench's dirty L2 and ``times[key + "_clean"]`` from a clean one (``L2_STATES``)."""
    for l2 in L2_STATES:
        times[key + ("_clean" if l2 == "clean" else "")] = bench(fn, graph=graph, l2=l2)


def _log_ab(log, title: str, ab: dict) -> dict:
    """One log line for an A/B or sweep record (times to 4 decimals, anything else as is); returns ``ab``."""
    log(f"  {title}: " + ", ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in ab.items()))
    return ab


def profile_kernels(fn, log, label: str, reps: int = 20) -> dict:
    """Mean device time per call of each kernel that ``fn`` launches (eager, torch.profiler / CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    out = {}
    for ev in prof.key_averages():
        if ev.self_device_time_total > 0:
            out[ev.key[:60]] = round(ev.self_device_time_total / reps, 2)
    log(f"  kernel profile {label} (us per call): {out}")
    return out


def copy_bandwidth() -> float:
    """Device-to-device copy, bytes read + written per second (TB/s)."""
    if DEV == "cpu":
        return float("nan")
    x = torch.empty(2 << 30, dtype=torch.uint8, device=DEV)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * (2 << 30) / (ms * 1e-3) / 1e12


# --------------------------------------------------------------------------------------- one case
def flex_block_mask(key_mask: torch.Tensor, n: int, t: int, m: int):
    """The selection as a FlexAttention BlockMask over [corpus | dynamic], 128-key blocks."""
    from torch.nn.attention.flex_attention import BlockMask

    bs = 128
    b = key_mask.shape[0]
    nb_c = n // bs
    blk = key_mask.view(b, KVH, nb_c, bs)
    any_c, all_c = blk.any(-1), blk.all(-1)  # B, KVH, NBc
    qb = triton.cdiv(t, bs)
    nb_d = triton.cdiv(m, bs)
    # dynamic blocks: causal (bottom-right aligned); query q sees dyn key j when j <= q + m - t
    q_first = torch.arange(qb, device=DEV) * bs
    q_last = torch.clamp(q_first + bs - 1, max=t - 1)
    j_first = torch.arange(nb_d, device=DEV) * bs
    j_last = torch.clamp(j_first + bs - 1, max=m - 1)
    d_any = j_first[None, :] <= (q_last[:, None] + m - t)
    d_all = (j_last[None, :] <= (q_first[:, None] + m - t)) & (j_last[None, :] - j_first[None, :] == bs - 1)
    part = torch.cat([(any_c & ~all_c)[:, :, None, :].expand(b, KVH, qb, nb_c),
                      (d_any & ~d_all)[None, None].expand(b, KVH, qb, nb_d)], -1)
    full = torch.cat([all_c[:, :, None, :].expand(b, KVH, qb, nb_c),
                      d_all[None, None].expand(b, KVH, qb, nb_d)], -1)

    def lists(mask):
        mask = mask.repeat_interleave(G, 1)  # to query heads
        num = mask.sum(-1).to(torch.int32)
        idx = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        return num, idx

    km = key_mask

    def mask_mod(bi, hi, q_idx, kv_idx):
        in_corpus = kv_idx < n
        kc = torch.clamp(kv_idx, max=n - 1)
        return torch.where(in_corpus, km[bi, hi // G, kc], (kv_idx - n) <= (q_idx + m - t))

    num, idx = lists(part)
    fnum, fidx = lists(full)
    return BlockMask.from_kv_blocks(num, idx, fnum, fidx, BLOCK_SIZE=bs, mask_mod=mask_mod, seq_lengths=(t, n + m))


def run_case(corpus: dict, mode: str, batch: int, args, flex_fn, log) -> dict:
    n = corpus["n"]
    t = 1 if mode == "decode" else 1024
    scale = D ** -0.5
    gen = torch.Generator(device=DEV).manual_seed(1)
    t = min(t, DYN)
    q = (torch.randn(batch, H, t, D, generator=gen, device=DEV) * 1.5).to(DTYPE)
    dk = torch.randn(batch, KVH, DYN, D, generator=gen, device=DEV).to(DTYPE)
    dv = torch.randn(batch, KVH, DYN, D, generator=gen, device=DEV).to(DTYPE)
    keys, values, offs = corpus["keys"], corpus["values"], corpus["offsets"]
    cent, logn = corpus["centroids_kv"], corpus["log_counts"]
    l1c, l1n, l1o = corpus["l1_centroids_kv"], corpus["l1_log_counts"], corpus["l1_offsets"]
    rec = dict(n=n, mode=mode, batch=batch, tokens=t)

    # calibration (outside the timings): a global threshold keeping ~10% of the clustered keys
    flat_scores = tri.centroid_scores(q, cent, logn, scale)
    thr = global_threshold(flat_scores, logn, KEEP_FRAC)
    l1_scores = tri.centroid_scores(q, l1c, l1n, scale)
    l1_thr = global_threshold(l1_scores, l1n, args.l1_keep)
    sel_flat = tri.select_clusters(flat_scores, logn, log_threshold=thr)
    hier_scores = tri.hierarchical_centroid_scores(q, l1c, l1n, l1o, cent, logn, scale, l1_thr)
    # the hierarchical scores estimate the pruned part of the denominator by level-1 centroids (smaller:
    # Jensen), so they run higher than the flat ones: its own global threshold keeps the same 10%
    thr_h = global_threshold(hier_scores, logn, KEEP_FRAC)
    sel_hier = tri.select_clusters(hier_scores, logn, log_threshold=thr_h)
    flat_keys = kept_keys(sel_flat, offs).float()
    both_keys = kept_keys(sel_flat & sel_hier, offs).float()
    rec["kept_frac"] = float(flat_keys.sum() / (batch * KVH * corpus["n_clustered"]))
    rec["kept_frac_hier"] = float(kept_keys(sel_hier, offs).float().sum() / (batch * KVH * corpus["n_clustered"]))
    rec["hier_recall"] = float(both_keys.sum() / flat_keys.sum().clamp_min(1))
    hier_keys = kept_keys(sel_hier, offs).float()
    rec["l1_expanded_frac"] = float((l1_scores >= l1_thr).float().mean())

    # fp8 centroids: the same calibration on their own scores; recall = share of the bf16 selection's keys kept
    cent8, l1c8 = corpus["centroids_fp8"], corpus["l1_centroids_fp8"]
    scores8 = tri.centroid_scores(q, cent8, logn, scale)
    thr8 = global_threshold(scores8, logn, KEEP_FRAC)
    sel8 = tri.select_clusters(scores8, logn, log_threshold=thr8)
    l1_thr8 = global_threshold(tri.centroid_scores(q, l1c8, l1n, scale), l1n, args.l1_keep)
    thr8_h = global_threshold(tri.hierarchical_centroid_scores(q, l1c8, l1n, l1o, cent8, logn, scale, l1_thr8),
                              logn, KEEP_FRAC)
    rec["kept_frac_fp8"] = float(kept_keys(sel8, offs).float().sum() / (batch * KVH * corpus["n_clustered"]))
    rec["fp8_recall"] = float(kept_keys(sel_flat & sel8, offs).float().sum() / flat_keys.sum().clamp_min(1))
    # what the selections are for: the attention mass of the clustered keys they keep (prefill: over every query
    # row, each against the one selection per head, as the sparse attention reads it)
    rec["mass_kept"] = {k: attention_mass(q, keys[:, :corpus["n_clustered"]], s_, offs, scale)
                        for k, s_ in (("flat", sel_flat), ("flat_fp8", sel8), ("hier", sel_hier))}

    # exactness on this case: ours vs the torch twin (sparse + causal + merge)
    from sqz_kernels import reference as ref
    if n <= 131072 and mode == "decode":
        _, sel_fused, wl_fused = tri.centroid_selection(q, cent, logn, scale, offs, thr, n)
        rec["fused_selection_equal"] = bool(torch.equal(sel_fused, sel_flat))
        got = tri.squeezed_attention(q, keys, values, offs, sel_fused, dk, dv, scale, worklist=wl_fused).float()
        want = ref.squeezed_attention(q, keys, values, offs, sel_flat, dk, dv, scale).float()
        rec["max_abs_err_vs_twin"] = float((got - want).abs().max())

    # what a lookup reads and its calibrated thresholds: (centroids, level-1 centroids, level-1 threshold,
    # flat threshold, hierarchical threshold), bf16 (the reference) or fp8 centroids
    bf16 = (cent, l1c, l1_thr, thr, thr_h)
    fp8 = (cent8, l1c8, l1_thr8, thr8, thr8_h)

    def selection(hier: bool, q_=None, config: LookupConfig | None = None, lookup=bf16, live=None):
        """lookup + threshold selection + work list, fused (centroid_selection: 3 launches, flat)"""
        q_ = q if q_ is None else q_
        c2, c1, t1, t_flat, t_hier = lookup
        if hier:
            return tri.hierarchical_centroid_selection(q_, c1, l1n, l1o, c2, logn, scale, t1, offs, t_hier, n,
                                                       config=config, live=live)
        return tri.centroid_selection(q_, c2, logn, scale, offs, t_flat, n, config=config, live=live)

    def ours(hier: bool, config: LookupConfig | None = None, lookup=bf16, live=None):
        def fn():
            _, sel, wl_ = selection(hier, config=config, lookup=lookup, live=live)
            return tri.squeezed_attention(q, keys, values, offs, sel, dk, dv, scale, worklist=wl_)
        return fn

    def ours_unfused(hier: bool):
        """the calls the engine makes today: scores, select_clusters, squeezed_attention (builds its list)"""
        def fn():
            if hier:
                s = tri.hierarchical_centroid_scores(q, l1c, l1n, l1o, cent, logn, scale, l1_thr)
            else:
                s = tri.centroid_scores(q, cent, logn, scale)
            sel = tri.select_clusters(s, logn, log_threshold=thr_h if hier else thr)
            return tri.squeezed_attention(q, keys, values, offs, sel, dk, dv, scale)
        return fn

    t_ = {}
    bench_cold(t_, "ours_flat", ours(False), graph=True)
    bench_cold(t_, "ours_hier", ours(True), graph=True)
    t_["ours_flat_fp8"] = bench(ours(False, lookup=fp8), graph=True)
    t_["ours_hier_fp8"] = bench(ours(True, lookup=fp8), graph=True)
    t_["ours_flat_unfused"] = bench(ours_unfused(False), graph=True)
    t_["ours_hier_unfused"] = bench(ours_unfused(True), graph=True)
    t_["ours_flat_eager"] = bench(ours(False))
    t_["lookup_flat"] = bench(lambda: tri.centroid_scores(q, cent, logn, scale), graph=True)
    t_["lookup_hier"] = bench(lambda: tri.hierarchical_centroid_scores(q, l1c, l1n, l1o, cent, logn, scale, l1_thr),
                              graph=True)
    t_["lookup_select_worklist_flat"] = bench(lambda: selection(False), graph=True)
    t_["lookup_select_worklist_hier"] = bench(lambda: selection(True), graph=True)
    t_["lookup_flat_fp8"] = bench(lambda: tri.centroid_scores(q, cent8, logn, scale), graph=True)
    t_["lookup_flat_fp32_centroids"] = bench(lambda: tri.centroid_scores(q, corpus["centroids"], logn, scale),
                                             graph=True)
    t_["select_worklist"] = bench(lambda: tri.build_worklist(tri.select_clusters(flat_scores, logn, log_threshold=thr),
                                                             offs, n), graph=True)
    wl = tri.build_worklist(sel_flat, offs, n)
    t_["attention"] = bench(lambda: tri.squeezed_attention(q, keys, values, offs, sel_flat, dk, dv, scale,
                                                           worklist=wl), graph=True)
    budget = int(KEEP_FRAC * corpus["n_clustered"])
    t_["select_budget_topk"] = bench(lambda: tri.select_clusters(flat_scores, logn, budget_keys=budget), graph=True)

    if args.sweep and batch == 1 and n == max(args.sizes):
        sweep = {}
        cfgs = ([AttentionConfig(block_n=bn, num_stages=st, num_warps=w) for bn, st, w in
                 [(32, 4, 4), (64, 2, 4), (64, 3, 4), (64, 4, 4), (128, 2, 4), (128, 3, 8), (64, 3, 8)]]
                if mode == "decode" else
                [AttentionConfig(block_m=bm, block_n=bn, num_stages=st, num_warps=w) for bm, bn, st, w in
                 [(128, 64, 3, 8), (128, 64, 2, 8), (128, 128, 2, 8), (64, 64, 3, 4), (128, 32, 3, 4),
                  (64, 128, 2, 4), (128, 64, 4, 8)]])
        if mode == "decode":
            cfgs += [AttentionConfig(num_splits=s) for s in (16, 32, 66, 132, 264)]
        else:
            cfgs += [AttentionConfig(num_splits=s) for s in (2, 4)]
        for cfg in cfgs:
            try:
                sweep[str(cfg)] = bench(lambda: tri.squeezed_attention(q, keys, values, offs, sel_flat, dk, dv, scale,
                                                                       worklist=wl, config=cfg), graph=True)
            except Exception as exc:  # a config the compiler refuses (shared memory) is recorded, not fatal
                sweep[str(cfg)] = f"{type(exc).__name__}: {str(exc)[:120]}"
            log(f"  sweep {mode} {cfg}: {sweep[str(cfg)]}")
        rec["sweep_attention"] = sweep
        # hierarchical: how many level-1 clusters to expand (time of the lookup, recall of the flat selection)
        l1_sweep = {}
        for keep in (0.15, 0.2, 0.3, 0.5):
            thr1 = global_threshold(l1_scores, l1n, keep)
            hs = tri.hierarchical_centroid_scores(q, l1c, l1n, l1o, cent, logn, scale, thr1)
            sh = tri.select_clusters(hs, logn, log_threshold=global_threshold(hs, logn, KEEP_FRAC))
            rc = float(kept_keys(sel_flat & sh, offs).float().sum() / flat_keys.sum().clamp_min(1))
            ms = bench(lambda: tri.hierarchical_centroid_scores(q, l1c, l1n, l1o, cent, logn, scale, thr1), graph=True)
            l1_sweep[str(keep)] = dict(recall=rc, lookup_ms=ms)
            log(f"  l1 keep {keep}: recall {rc:.3f}, lookup {ms:.4f} ms")
        rec["sweep_l1_keep"] = l1_sweep
        lk = {}
        lcfgs = ([LookupConfig(stats_block_c=bc, num_splits=sp) for bc, sp in
                  [(64, None), (256, None), (128, 16), (128, 32), (128, 132)]]
                 if mode == "decode" else
                 [LookupConfig(stats_block_m=bm, stats_block_c=bc, stats_warps=w) for bm, bc, w in
                  [(64, 64, 4), (128, 128, 8), (128, 64, 4)]] +
                 [LookupConfig(scores_block_c=bc, scores_block_m=bm, scores_warps=w) for bc, bm, w in
                  [(64, 64, 4), (128, 128, 8), (64, 128, 4), (128, 64, 4)]] +
                 [LookupConfig(num_stages=3)])
        for lc in lcfgs:
            try:
                lk[str(lc)] = bench(lambda: tri.centroid_scores(q, cent, logn, scale, config=lc), graph=True)
            except Exception as exc:
                lk[str(lc)] = f"{type(exc).__name__}: {str(exc)[:120]}"
            log(f"  lookup sweep {mode} {lc}: {lk[str(lc)]}")
        rec["sweep_lookup"] = lk

    if args.decode_sweep and mode == "decode" and n >= 131072:
        # decode attention tiles x splits per (row, KV head), as block_n / stages / warps / splits; the defaults:
        # 128 / 2 / 4 / 33 at batch 1, 64 / 2 / 4 / 10 at batch 8 (128 / 2 / 4 / 5 before 2026-11-29 20:48)
        ds = {}
        variants = (((128, 2, 4, 33), (128, 2, 4, 40), (128, 2, 4, 48), (128, 3, 4, 33), (128, 2, 8, 33),
                     (64, 2, 4, 66), (64, 3, 4, 66), (64, 3, 4, 48), (64, 4, 4, 66), (128, 2, 4, 24))
                    if batch == 1 else
                    ((128, 2, 4, 5), (128, 2, 4, 8), (128, 3, 4, 5), (64, 2, 4, 10), (64, 3, 4, 10), (128, 2, 4, 3)))
        for bn, st, w, sp in variants:
            cfg = AttentionConfig(block_n=bn, num_stages=st, num_warps=w, num_splits=sp)
            try:
                ds[f"{bn}/{st}/{w}/{sp}"] = bench(lambda: tri.squeezed_attention(
                    q, keys, values, offs, sel_flat, dk, dv, scale, worklist=wl, config=cfg), graph=True)
            except Exception as exc:
                ds[f"{bn}/{st}/{w}/{sp}"] = f"{type(exc).__name__}: {str(exc)[:100]}"
        rec["sweep_decode_attention"] = ds
        log(f"  decode attention sweep N={n} (block_n/stages/warps/splits): {ds}")

    if args.selection_sweep and mode == "decode" and n >= 131072:
        # the fused selection's block of clusters (= its work-list chunk): decode reads logits, not centroids
        sw = {}
        for bc, w in ((128, 4), (256, 4), (512, 8), (1024, 8)):
            lc = LookupConfig(scores_block_c=bc, scores_warps=w)
            sw[f"{bc}/{w}"] = bench(lambda: tri.centroid_selection(q, cent, logn, scale, offs, thr, n, config=lc),
                                    graph=True)
        for sp in (16, 24, 33, 48, 66):
            lc = LookupConfig(num_splits=sp)
            sw[f"splits {sp}"] = bench(lambda: tri.centroid_selection(q, cent, logn, scale, offs, thr, n, config=lc),
                                       graph=True)

            def whole():
                _, sel_, wl_ = tri.centroid_selection(q, cent, logn, scale, offs, thr, n, config=lc)
                return tri.squeezed_attention(q, keys, values, offs, sel_, dk, dv, scale, worklist=wl_)
            sw[f"whole path, splits {sp}"] = bench(whole, graph=True)
        rec["sweep_selection_block"] = sw
        log(f"  selection block sweep N={n} batch={batch}: {sw}")

    if args.splits_sweep and mode == "decode" and batch == 1 and n >= 131072:
        # the split count is a run-time argument (no recompilation): cheap to time here
        rec["sweep_splits"] = {s: bench(lambda: tri.squeezed_attention(
            q, keys, values, offs, sel_flat, dk, dv, scale, worklist=wl, config=AttentionConfig(num_splits=s)),
            graph=True) for s in (8, 16, 33, 66, 132)}
        log(f"  splits sweep N={n}: {rec['sweep_splits']}")

    if args.decode_ab and mode == "decode" and n >= 131072:
        # decode: the work-list expansion inside the lookup's scores pass (look-back over the blocks of a row)
        # against its own launch, A/B in one process, twice in alternation; plus equality of the two work lists
        from sqz_kernels import lookup as lookup_mod
        ab = {}
        saved = lookup_mod._FUSE_EXPAND
        try:
            lists = {}
            for fused in (False, True):
                lookup_mod._FUSE_EXPAND = fused
                lists[fused] = selection(False)[2]
            (i0, c0), (i1, c1) = lists[False], lists[True]
            same = torch.equal(c0, c1)
            if same:
                cnt = c0[..., -1].flatten().tolist()
                a0, a1 = i0.flatten(0, 1), i1.flatten(0, 1)
                same = all(torch.equal(a0[r, :k], a1[r, :k]) for r, k in enumerate(cnt))
            ab["fused_expand_equal"] = bool(same)
            for rep in range(2):
                for fused in (False, True):
                    lookup_mod._FUSE_EXPAND = fused
                    tag = f"{'fused expand' if fused else 'expand launch'} #{rep}"
                    ab[f"lookup+select+list {tag}"] = bench(lambda: selection(False), graph=True)
                    ab[f"whole path {tag}"] = bench(ours(False), graph=True)
        finally:
            lookup_mod._FUSE_EXPAND = saved
        rec["decode_ab"] = ab
        _log_ab(log, f"fused-expand A/B N={n} {mode} batch={batch}", ab)
    if args.pdl_ab and mode == "decode" and DEV == "cuda":
        # programmatic dependent launch in the decode chain off / on (sqz_kernels.hardware.PDL), A/B in one
        # process, twice in alternation; plus bit-equality of the outputs and work lists of the two
        from sqz_kernels import hardware as hw_mod
        ab = {"pdl_supported": hw_mod.use_pdl(q.device) if hw_mod.PDL else None}
        saved = hw_mod.PDL
        whole = ours(False)
        try:
            outs = {}
            for on in (False, True):
                hw_mod.PDL = on
                outs[on] = (whole(), selection(False)[2][1])
            ab["pdl_outputs_equal"] = bool(torch.equal(outs[False][0], outs[True][0])
                                           and torch.equal(outs[False][1], outs[True][1]))
            for rep in range(2):
                for on in (False, True):
                    hw_mod.PDL = on
                    tag = f"pdl {'on' if on else 'off'} #{rep}"
                    ab[f"whole path {tag}"] = bench(whole, graph=True)
                    ab[f"lookup+select+list {tag}"] = bench(lambda: selection(False), graph=True)
                    ab[f"attention {tag}"] = bench(lambda: tri.squeezed_attention(
                        q, keys, values, offs, sel_flat, dk, dv, scale, worklist=wl), graph=True)
        finally:
            hw_mod.PDL = saved
        rec["pdl_ab"] = ab
        _log_ab(log, f"PDL A/B N={n} {mode} batch={batch}", ab)
    if args.lookup_ab and mode == "decode" and (n >= 131072 or DEV == "cpu"):
        rec["lookup_ab"] = lookup_ab(ours, log, tag=f"N={n} batch={batch}")
    if args.dead_rows_ab and mode == "decode" and batch > 1:
        rec["dead_rows_ab"] = dead_rows_ab(ours, batch, log, tag=f"N={n} batch={batch}")
    if args.stats_tiles_ab and mode == "decode" and (n >= 131072 or DEV == "cpu"):
        rec["stats_tiles_ab"] = stats_tiles_ab(ours, log, tag=f"N={n} batch={batch}")
    if args.fp8_sweep and mode == "decode" and (n >= 131072 or DEV == "cpu"):
        rec["fp8_sweep"] = fp8_sweep(ours, bf16, fp8, log, tag=f"N={n} batch={batch}")
    if args.prefill_ab and mode == "prefill":
        rec["prefill_ab"] = prefill_ab(q, keys, values, offs, sel_flat, wl, dk, dv, scale, ours, selection, log,
                                       tag=f"N={n}")
    if args.expand_ab and mode == "decode" and (n >= 131072 or DEV == "cpu"):
        rec["expand_ab"] = expand_ab(ours, selection, log, tag=f"N={n} batch={batch}")
    if args.logn_ab and (n >= 131072 or DEV == "cpu"):
        rec["logn_ab"] = logn_ab(ours, selection, log, tag=f"N={n} {mode} batch={batch}")
    if args.tma_ab and (n >= 131072 or DEV == "cpu"):
        rec["stats_tma_ab"] = stats_tma_ab(ours, selection, log, tag=f"N={n} {mode} batch={batch}")
    if args.launch_ab and mode == "decode" and (n >= 131072 or DEV == "cpu"):
        rec["launch_ab"] = launch_ab(ours, log, tag=f"N={n} batch={batch}")
    if args.profile and mode == "decode" and DEV == "cuda":
        rec["kernel_profile_us"] = profile_kernels(ours(False), log, f"N={n} batch={batch}")

    # dense baselines over corpus + dynamic keys, a copy per row as a dense cache holds it
    kf = torch.cat([keys.unsqueeze(0).expand(batch, -1, -1, -1), dk], 2).contiguous()
    vf = torch.cat([values.unsqueeze(0).expand(batch, -1, -1, -1), dv], 2).contiguous()
    bench_cold(t_, "sdpa", lambda: F.scaled_dot_product_attention(q, kf, vf, scale=scale, enable_gqa=True))
    from torch.nn.attention import SDPBackend, sdpa_kernel
    try:
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            bench_cold(t_, "sdpa_fa2", lambda: F.scaled_dot_product_attention(q, kf, vf, scale=scale, enable_gqa=True))
    except Exception as exc:
        rec["sdpa_fa2_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        if batch == 1:  # the FA2 backend without GQA support: the KV heads repeated (not counted in the time)
            kr, vr = kf.repeat_interleave(G, 1), vf.repeat_interleave(G, 1)
            with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
                bench_cold(t_, "sdpa_fa2", lambda: F.scaled_dot_product_attention(q, kr, vr, scale=scale))
            kr = vr = None
    if flex_fn is not None and n in args.flex_sizes and batch in args.flex_batches:
        try:
            km = tri.cluster_key_mask(sel_flat, offs, n)
            bm = flex_block_mask(km, n, t, DYN)
            t_["flex"] = bench(lambda: flex_fn(q, kf, vf, block_mask=bm, scale=scale, enable_gqa=True))
        except Exception as exc:
            rec["flex_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
            log(traceback.format_exc()[-2000:])
    kf = vf = None  # the dense copies are freed before what follows

    # bytes that had to move: kept corpus keys + values per row (+ tail), dynamic KV, centroids
    kv_row_bytes = 2 * D * keys.element_size()
    kept = float(flat_keys.sum()) + batch * KVH * WINDOW
    cent_bytes = cent.numel() * cent.element_size() * (1 if mode == "decode" else 2)
    bytes_ours = kept * kv_row_bytes + batch * KVH * DYN * kv_row_bytes + cent_bytes
    bytes_dense = batch * KVH * (n + DYN) * kv_row_bytes
    bytes_hier = (float(hier_keys.sum()) + batch * KVH * WINDOW) * kv_row_bytes + batch * KVH * DYN * kv_row_bytes
    rec.update(times_ms=t_, bytes_ours=bytes_ours, bytes_dense=bytes_dense, bytes_hier_kv=bytes_hier,
               tbps_ours=bytes_ours / (t_["ours_flat"] * 1e-3) / 1e12,
               tbps_sdpa=bytes_dense / (t_["sdpa"] * 1e-3) / 1e12)
    rec["speedup_vs_sdpa"] = t_["sdpa"] / min(t_["ours_flat"], t_["ours_hier"])
    if "sdpa_fa2" in t_:
        rec["speedup_vs_fa2"] = t_["sdpa_fa2"] / min(t_["ours_flat"], t_["ours_hier"])
    if "flex" in t_:
        rec["speedup_vs_flex"] = t_["flex"] / min(t_["ours_flat"], t_["ours_hier"])
    rec["speedup_vs_sdpa_fp8"] = t_["sdpa"] / min(t_["ours_flat_fp8"], t_["ours_hier_fp8"])
    ours_clean = min(t_["ours_flat_clean"], t_["ours_hier_clean"])
    rec["speedup_vs_sdpa_clean"] = t_["sdpa_clean"] / ours_clean
    if "sdpa_fa2_clean" in t_:
        rec["speedup_vs_fa2_clean"] = t_["sdpa_fa2_clean"] / ours_clean
    return rec


def attention_mass(q: torch.Tensor, keys: torch.Tensor, selected: torch.Tensor, offsets: torch.Tensor,
                   scale: float) -> float:
    """Mean over batch rows, query heads and tokens of the softmax mass over the clustered ``keys``
    (kv_heads, N, D) that falls in the ``selected`` (batch, kv_heads, clusters) clusters."""
    b, h, t, d = q.shape
    kvh, n = keys.shape[:2]
    qg = q.float().view(b, kvh, h // kvh * t, d)
    total = 0.0
    for kh in range(kvh):  # one KV head at a time: (b, rows, N) float32 logits
        owner = torch.repeat_interleave(torch.arange(offsets.shape[1] - 1, device=keys.device), offsets[kh].diff())
        kept = selected[:, kh, owner[:n]]  # (b, N): the key's cluster is selected
        p = torch.softmax(qg[:, kh] @ keys[kh].float().T * scale, dim=-1)
        total += float((p * kept[:, None, :]).sum(-1).mean())
    return total / kvh


def launch_ab(ours, log, tag: str) -> dict:
    """Decode, A/B in one process (alternated twice): programmatic dependent launch as the code takes it
    (sqz_kernels.hardware), also for the attention past PDL_MAX_KEYS, and off everywhere; ``ours`` is
    run_case's whole-path factory (flat)."""
    from sqz_kernels import hardware as hw_mod
    from sqz_kernels import sparse_attention as sa_mod

    whole = ours(False)
    saved = (hw_mod.PDL, sa_mod.PDL_MAX_KEYS)
    variants = {"default": saved, "attention pdl at any size": (True, 1 << 30), "pdl off": (False, saved[1])}
    ab = {}
    try:
        for rep in range(2):
            for name, (on, max_keys) in variants.items():
                hw_mod.PDL, sa_mod.PDL_MAX_KEYS = on, max_keys
                ab[f"whole {name} #{rep}"] = bench(whole, graph=True)
    finally:
        hw_mod.PDL, sa_mod.PDL_MAX_KEYS = saved
    return _log_ab(log, f"launch A/B {tag}", ab)


def switch_ab(variants: dict, ours, selection, equal: tuple[str, ...] = ()) -> dict:
    """A/B in one process of code paths that module attributes switch: ``variants`` = name -> {(module,
    attribute): value}. Under each variant, the flat whole path (``ours(False)``) from a dirty and a clean L2 and
    the lookup + selection + work list (``selection(False)``), alternated twice. ``equal``: variant names whose
    selection and output must equal the first of them bit for bit (recorded as ``<name> equal``)."""
    def under(values, fn):
        saved = {key: getattr(*key) for key in values}
        try:
            for (mod, attr), value in values.items():
                setattr(mod, attr, value)
            return fn()
        finally:
            for (mod, attr), value in saved.items():
                setattr(mod, attr, value)

    ab = {}
    got = {name: under(variants[name], lambda: (selection(False)[1], ours(False)())) for name in equal}
    for name in equal[1:]:
        ab[f"{name} equal"] = bool(torch.equal(got[equal[0]][0], got[name][0])
                                   and torch.equal(got[equal[0]][1], got[name][1]))
    for rep in range(2):
        for name, values in variants.items():
            ab[f"whole {name} #{rep}"] = under(values, lambda: bench(ours(False), graph=True))
            ab[f"whole clean {name} #{rep}"] = under(values, lambda: bench(ours(False), graph=True, l2="clean"))
            ab[f"lookup+select+list {name} #{rep}"] = under(values, lambda: bench(lambda: selection(False),
                                                                                   graph=True))
    return ab


def attr_ab(ours, selection, log, title: str, module, attr: str, labels: tuple[str, str]) -> dict:
    """One boolean module attribute off / on (``labels``: the names of the two states) through
    :func:`switch_ab`, flat, with the selections and outputs compared bit for bit."""
    variants = {label: {(module, attr): on} for label, on in zip(labels, (False, True))}
    return _log_ab(log, title, switch_ab(variants, ours, selection, equal=tuple(variants)))


def stats_tma_ab(ours, selection, log, tag: str) -> dict:
    """The lookup's stats pass reading centroid tiles by TMA (``sqz_kernels.lookup.STATS_TMA``) off / on, flat."""
    from sqz_kernels import lookup as lookup_mod

    return attr_ab(ours, selection, log, f"stats TMA A/B {tag}", lookup_mod, "STATS_TMA", ("tma off", "tma on"))


def expand_ab(ours, selection, log, tag: str) -> dict:
    """Decode: the scores pass's work-list expansion by markers through global memory or by a binary search with
    tl.gather over the block's sizes in registers (``sqz_kernels.lookup.EXPAND_GATHER``), flat."""
    from sqz_kernels import lookup as lookup_mod

    return attr_ab(ours, selection, log, f"expansion A/B {tag}", lookup_mod, "EXPAND_GATHER",
                   ("expand markers", "expand gather"))


def logn_ab(ours, selection, log, tag: str) -> dict:
    """The stats pass's log counts loaded in each tile's iteration or one tile ahead
    (``sqz_kernels.lookup.LOGN_AHEAD``), flat."""
    from sqz_kernels import lookup as lookup_mod

    return attr_ab(ours, selection, log, f"log counts A/B {tag}", lookup_mod, "LOGN_AHEAD",
                   ("log counts in tile", "log counts ahead"))


def lookup_ab(ours, log, tag: str) -> dict:
    """Decode: lookup tiles of the fused selection (scores block / warps, stats stages / splits) on the whole
    path (``ours(False, config)``, flat), A/B in one process (alternated twice)."""
    variants = {
        "default": None,
        "scores 512 / 8 warps": LookupConfig(scores_block_c=512, scores_warps=8),
        "stats 3 stages / 33 splits": LookupConfig(num_stages=3, num_splits=33),
        "both": LookupConfig(scores_block_c=512, scores_warps=8, num_stages=3, num_splits=33),
        "both, 48 splits": LookupConfig(scores_block_c=512, scores_warps=8, num_stages=3, num_splits=48),
        "stats 4 stages / 33 splits": LookupConfig(num_stages=4, num_splits=33),
        "stats 2 stages / 66 splits": LookupConfig(num_stages=2, num_splits=66),
        "stats 3 stages / 66 splits": LookupConfig(num_stages=3, num_splits=66),
        "stats 256 centroids / 3 stages / 33 splits": LookupConfig(stats_block_c=256, num_stages=3, num_splits=33),
        "stats 64 centroids / 4 stages / 66 splits": LookupConfig(stats_block_c=64, num_stages=4, num_splits=66),
    }
    ab = {}
    for rep in range(2):
        for name, lc in variants.items():
            ab[f"whole {name} #{rep}"] = bench(ours(False, lc), graph=True)
    return _log_ab(log, f"lookup A/B {tag}", ab)


def stats_tiles_ab(ours, log, tag: str) -> dict:
    """Decode: the flat stats pass's centroid tiles x stages x splits on the whole path, A/B in one process
    (alternated twice). At 512K batch 1 the default (128 centroids, 3 stages, 33 splits) deals 205 tiles per
    KV head over 33 programs: 7 for some, 6 for most (a 13% longer critical path than the mean); smaller tiles
    with more stages keep the bytes in flight and even out the split (64: 13 against a mean of 12.4)."""
    variants = {"default": None}
    for bc, stages in ((64, 4), (64, 5), (64, 6), (32, 8), (32, 10)):
        variants[f"stats {bc} centroids / {stages} stages / 33 splits"] = LookupConfig(
            stats_block_c=bc, num_stages=stages, num_splits=33)
    variants["stats 128 centroids / 3 stages / 41 splits"] = LookupConfig(num_stages=3, num_splits=41)
    variants["stats 128 centroids / 3 stages / 33 splits / 8 warps"] = LookupConfig(num_stages=3, num_splits=33,
                                                                                      stats_warps=8)
    ab = {}
    for rep in range(2):
        for name, lc in variants.items():
            ab[f"whole {name} #{rep}"] = bench(ours(False, lc), graph=True)
    return _log_ab(log, f"stats tiles A/B {tag}", ab)


def dead_rows_ab(ours, batch: int, log, tag: str) -> dict:
    """Decode, a batch whose rows have partly ended (answers a CUDA graph still feeds): the whole path with no
    ``live`` flags (every row reads its selection, as before the flags), every row live, half the rows not live,
    and one live row; flat and hierarchical, A/B in one process (alternated twice)."""
    variants = {"no flags": None}
    for live_rows in (batch, batch // 2, 1):
        live = torch.zeros(batch, dtype=torch.bool, device=DEV)
        live[:live_rows] = True
        variants[f"{live_rows} of {batch} live"] = live
    ab = {}
    for rep in range(2):
        for hier in (False, True):
            for name, live in variants.items():
                ab[f"whole {'hier' if hier else 'flat'} {name} #{rep}"] = bench(ours(hier, live=live), graph=True)
    return _log_ab(log, f"dead rows A/B {tag}", ab)


def fp8_sweep(ours, bf16, fp8, log, tag: str) -> dict:
    """Decode, flat, whole path: fp8 centroids under stats tiles of 128 / 256 centroids x splits x stages,
    against bf16 with the defaults (each variant timed twice, alternating)."""
    variants = {"bf16 default": (bf16, None), "fp8 default": (fp8, None)}
    for bc in (128, 256):
        for splits in (16, 33, 66):
            for stages in (2, 3, 4):
                variants[f"fp8 c{bc} s{splits} st{stages}"] = (
                    fp8, LookupConfig(stats_block_c=bc, num_splits=splits, num_stages=stages))
    ab = {}
    for rep in range(2):
        for name, (lookup, lc) in variants.items():
            try:
                ab[f"{name} #{rep}"] = bench(ours(False, lc, lookup), graph=True)
            except Exception as e:  # a tile that does not fit (shared memory) is skipped, named
                ab[f"{name} #{rep}"] = f"error: {type(e).__name__}"
    return _log_ab(log, f"fp8 sweep {tag}", ab)


def prefill_ab(q, keys, values, offs, sel, wl, dk, dv, scale, ours, selection, log, tag: str) -> dict:
    """Prefill: the compacted attention (prefill_attention: copy the selected keys, read tiles by tensor
    descriptor) against the gathering kernel, A/B in one process (alternated twice), its tile sweep, the
    copy alone, and the difference of the two outputs."""
    from sqz_kernels.prefill_attention import compact_selected

    def attn(cfg):
        return lambda: tri.squeezed_attention(q, keys, values, offs, sel, dk, dv, scale, worklist=wl, config=cfg)

    gather, compact = AttentionConfig(compact=False), AttentionConfig(compact=True)
    ab = {"max_abs_diff_compact_vs_gather": float((attn(compact)().float() - attn(gather)().float()).abs().max())}
    for rep in range(2):
        for name, cfg in (("gather", gather), ("compact", compact)):
            ab[f"attention {name} #{rep}"] = bench(attn(cfg), graph=True)
    ab["compaction alone"] = bench(lambda: compact_selected(keys, values, offs, wl[0], wl[1], q.shape[0], 128),
                                   graph=True)
    for bm, bn, w, st in ((128, 128, 8, 2), (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 4), (64, 128, 4, 3),
                          (64, 64, 4, 3), (128, 32, 4, 4)):
        cfg = AttentionConfig(block_m=bm, block_n=bn, num_warps=w, num_stages=st, compact=True)
        key = f"compact {bm}x{bn}/{w}w/{st}s"
        try:
            ab[key] = bench(attn(cfg), graph=True)
        except Exception as exc:  # a config the compiler refuses (shared memory) is recorded, not fatal
            ab[key] = f"{type(exc).__name__}: {str(exc)[:120]}"
    ab["whole path flat (default)"] = bench(ours(False), graph=True)
    ab["whole path hier (default)"] = bench(ours(True), graph=True)
    # the lookup on a strided sample of the question's tokens: time only (these random queries say nothing
    # about the recall a real model's queries would have)
    for stride in (2, 4):
        qs = q[:, :, stride - 1::stride]
        ab[f"lookup+select+list flat, every {stride}th token"] = bench(lambda: selection(False, qs), graph=True)
        ab[f"lookup+select+list hier, every {stride}th token"] = bench(lambda: selection(True, qs), graph=True)
    return _log_ab(log, f"prefill A/B {tag}", ab)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", type=int, nargs="+", default=[32768, 131072, 524288])
    ap.add_argument("--sweep", action="store_true", help="also time attention tile configs at the largest N")
    ap.add_argument("--splits-sweep", action="store_true", help="time decode split counts at N >= 128K")
    ap.add_argument("--decode-sweep", action="store_true", help="time decode attention tiles x splits (N >= 128K)")
    ap.add_argument("--modes", nargs="+", default=["decode1", "decode8", "prefill"],
                    help="cases per N: decode1 (batch 1), decode8 (batch 8), prefill")
    ap.add_argument("--selection-sweep", action="store_true", help="time the fused selection's cluster block")
    ap.add_argument("--decode-ab", action="store_true",
                    help="decode: work-list expansion in the scores pass or its own launch, A/B in one process")
    ap.add_argument("--profile", action="store_true", help="decode: device time of each kernel of the path")
    ap.add_argument("--pdl-ab", action="store_true",
                    help="decode: programmatic dependent launch off / on, A/B in one process (alternated twice)")
    ap.add_argument("--launch-ab", action="store_true",
                    help="decode (N >= 128K): programmatic dependent launch as kept / attention too / off, A/B")
    ap.add_argument("--tma-ab", action="store_true", help="N >= 128K: the stats pass by TMA off / on, A/B (flat)")
    ap.add_argument("--expand-ab", action="store_true",
                    help="decode (N >= 128K): the scores pass's work-list expansion by markers / by tl.gather, A/B")
    ap.add_argument("--logn-ab", action="store_true",
                    help="N >= 128K: the stats pass's log counts one tile ahead / in the tile's iteration, A/B")
    ap.add_argument("--lookup-ab", action="store_true", help="decode (N >= 128K): lookup tiles on the whole path, A/B")
    ap.add_argument("--stats-tiles-ab", action="store_true",
                    help="decode (N >= 128K): stats-pass centroid tiles x stages x splits on the whole path, A/B")
    ap.add_argument("--dead-rows-ab", action="store_true",
                    help="decode batch > 1: the whole path with rows that are not live (ended answers), A/B")
    ap.add_argument("--fp8-sweep", action="store_true", help="decode (N >= 128K): fp8-centroid lookup tiles, flat")
    ap.add_argument("--prefill-ab", action="store_true",
                    help="prefill: compacted attention vs the gathering kernel (A/B), its tiles, sampled lookups")
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--flex-sizes", type=int, nargs="+", default=[131072, 524288],
                    help="FlexAttention compiles once per shape (tens of seconds): only these N")
    ap.add_argument("--flex-batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--l1-keep", type=float, default=0.3, help="fraction of keys under expanded level-1 clusters")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--log", type=Path, default=None)
    ap.add_argument("--cpu-smoke", action="store_true", help="dry run on the CPU interpreter at tiny sizes")
    args = ap.parse_args()
    global DEV, DYN, DTYPE
    if args.cpu_smoke:
        DEV, DYN, DTYPE = "cpu", 64, torch.float16
    logf = open(args.log, "a") if args.log else None

    def log(msg):
        print(msg, flush=True)
        if logf:
            logf.write(msg + "\n")
            logf.flush()

    name, sms = ((torch.cuda.get_device_properties(0).name, torch.cuda.get_device_properties(0).multi_processor_count)
                 if DEV == "cuda" else ("cpu-interpreter", 0))
    meta = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), gpu=name, sms=sms, torch=torch.__version__, triton=triton.__version__,
                cuda=torch.version.cuda, python=platform.python_version(),
                shapes=dict(heads=H, kv_heads=KVH, head_dim=D, dtype=str(DTYPE), window=WINDOW, dynamic=DYN,
                            clusters=CLUSTER_FRAC, l1_clusters=L1_FRAC, kept=KEEP_FRAC, l1_keep=args.l1_keep))
    meta["copy_tbps"] = copy_bandwidth()
    from sqz_kernels.hardware import use_pdl
    meta["pdl"] = bool(use_pdl(torch.device(DEV)))
    log(f"{meta}")
    flex_fn = None
    if not args.no_flex:
        from torch.nn.attention.flex_attention import flex_attention
        flex_fn = flex_attention if DEV == "cpu" else torch.compile(flex_attention, dynamic=False)
    records = []
    for n in args.sizes:
        t0 = time.time()
        corpus = make_corpus(n)
        log(f"corpus N={n} built in {time.time() - t0:.1f}s")
        cases = {"decode1": ("decode", 1), "decode8": ("decode", 8), "prefill": ("prefill", 1)}
        for mode, batch in (cases[m] for m in args.modes):
            t0 = time.time()
            try:
                rec = run_case(corpus, mode, batch, args, flex_fn, log)
            except Exception as exc:
                rec = dict(n=n, mode=mode, batch=batch, error=f"{type(exc).__name__}: {exc}")
                log(traceback.format_exc()[-3000:])
            rec["wall_s"] = round(time.time() - t0, 1)
            records.append(rec)
            log(json.dumps(rec))
        del corpus
        if DEV == "cuda":
            torch.cuda.empty_cache()

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    (args.out / f"kernels_{stamp}.json").write_text(json.dumps(dict(meta=meta, results=records), indent=1))
    md = markdown(meta, records)
    (args.out / f"kernels_{stamp}.md").write_text(md)
    print(md)


def markdown(meta, records) -> str:
    lines = [f"Kernel benchmark, {meta['date']}, {meta['gpu']} ({meta['sms']} SMs), torch {meta['torch']}, "
             f"triton {meta['triton']}, CUDA {meta['cuda']}. Llama-3-8B attention (32 q heads, 8 KV heads, d=128, "
             f"bf16), 5% clusters, ~10% of keys kept, 1024 dynamic tokens. Device copy {meta['copy_tbps']:.2f} TB/s "
             "(read + write). Times in ms, median; ours = lookup + selection + work list (fused) + attention + merge, "
             "one CUDA graph; unfused = the same through centroid_scores + select_clusters + squeezed_attention. "
             "Each call starts from a cold L2: emptied by writes (do_bench's flush, which leaves dirty lines to write "
             "back: the main columns) or by reads (clean L2, as in a model: the last columns).",
             "",
             "| N | mode | batch | ours flat | ours hier | unfused flat / hier | lookup flat / hier "
             "| lookup + sel. + list flat | attention | SDPA (cuDNN) | SDPA FA2 "
             "| Flex (same sel.) | speedup vs SDPA / FA2 / Flex | ours TB/s | kept | hier recall "
             "| fp8 centroids: ours flat / hier, lookup flat | speedup vs SDPA, fp8 | fp8 recall | mass kept flat / fp8 / hier "
             "| clean L2: ours flat / hier, SDPA, FA2 | clean L2: speedup vs SDPA / FA2 |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in records:
        if "error" in r:
            lines.append(f"| {r['n']} | {r['mode']} | {r['batch']} | error: {r['error'][:80]} |")
            continue
        t = r["times_ms"]

        def f(k):
            return f"{t[k]:.3f}" if k in t else "-"

        mass = (" / ".join(f"{r['mass_kept'][k]:.3f}" for k in ("flat", "flat_fp8", "hier")) if "mass_kept" in r
                else "-")
        sp = " / ".join(f"{r[k]:.2f}x" if k in r else "-" for k in ("speedup_vs_sdpa", "speedup_vs_fa2",
                                                                      "speedup_vs_flex"))
        lines.append(f"| {r['n'] // 1024}K | {r['mode']} | {r['batch']} | {f('ours_flat')} | {f('ours_hier')} | "
                     f"{f('ours_flat_unfused')} / {f('ours_hier_unfused')} | "
                     f"{f('lookup_flat')} / {f('lookup_hier')} | {f('lookup_select_worklist_flat')} | "
                     f"{f('attention')} | {f('sdpa')} | {f('sdpa_fa2')} | "
                     f"{f('flex')} | {sp} | {r['tbps_ours']:.2f} | {r['kept_frac']:.3f} | {r['hier_recall']:.3f} | "
                     f"{f('ours_flat_fp8')} / {f('ours_hier_fp8')}, {f('lookup_flat_fp8')} | "
                     f"{r['speedup_vs_sdpa_fp8']:.2f}x | {r['fp8_recall']:.3f} | {mass} | "
                     f"{f('ours_flat_clean')} / {f('ours_hier_clean')}, {f('sdpa_clean')}, {f('sdpa_fa2_clean')} | "
                     + " / ".join(f"{r[k]:.2f}x" if k in r else "-" for k in ("speedup_vs_sdpa_clean",
                                                                            "speedup_vs_fa2_clean")) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
