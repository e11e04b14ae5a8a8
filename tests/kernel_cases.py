"""Kernel-vs-twin checks shared by the CPU interpreter tests and the GPU tests.

Each case builds a small random clustered corpus, runs a Triton launcher and its torch twin (and, for
attention, dense SDPA with a boolean mask) and returns ``None`` or a failure message with the max / mean
difference and where it is. Nothing here imports Triton at module import time: ``tests/test_kernels.py``
imports this file for the case names and runs the cases in a child process with ``TRITON_INTERPRET=1``.

Run by hand: ``TRITON_INTERPRET=1 python tests/kernel_cases.py [case ...]`` (prints one JSON line per case).
"""
from __future__ import annotations

import json
import math
import sys
import time

# Tolerances, one table: (atol, rtol) for attention outputs / lse, and atol for log-space scores.
# fp32: plain float32 arithmetic (the interpreter's dot is exact float32; on the GPU a float32 dot is
# tf32, hence the GPU row). fp16/bf16: the probabilities are cast to the KV dtype for the PV product.
# Scores on the GPU: a float32 dot there is tf32 (10-bit mantissa), so log-space scores of magnitude ~10
# carry ~1e-2 of error.
TOLERANCES = {
    "float32": {"out": (2e-4, 2e-4), "score": (2e-4, 0.0)},
    "float32-gpu": {"out": (5e-3, 5e-3), "score": (3e-2, 5e-3)},
    "float16": {"out": (3e-3, 3e-3), "score": (2e-3, 0.0)},
    "float16-gpu": {"out": (3e-3, 3e-3), "score": (3e-2, 5e-3)},
    "bfloat16": {"out": (2e-2, 2e-2), "score": (3e-2, 5e-3)},
    "bfloat16-gpu": {"out": (2e-2, 2e-2), "score": (3e-2, 5e-3)},
}

# name -> parameters; small shapes (the interpreter runs every program in Python)
CASES: dict[str, dict] = {}


def _case(name, **kw):
    CASES[name] = kw


for _dt in ("float32", "float16"):
    _case(f"lookup-decode-{_dt}", kind="lookup", b=2, kvh=2, g=4, t=1, d=64, c=37, dtype=_dt)
    _case(f"lookup-prefill-{_dt}", kind="lookup", b=1, kvh=2, g=3, t=23, d=64, c=45, dtype=_dt)
_case("lookup-d128-centroids16", kind="lookup", b=1, kvh=1, g=4, t=2, d=128, c=70, dtype="float16",
      cent_dtype="float16")
# fp8 (e4m3) centroids, widened to the queries' dtype in the kernel (both twins see the same stored values)
_case("lookup-decode-fp8", kind="lookup", b=2, kvh=2, g=4, t=1, d=64, c=37, dtype="float16", cent_dtype="float8_e4m3fn")
_case("lookup-prefill-fp8", kind="lookup", b=1, kvh=2, g=3, t=23, d=64, c=45, dtype="float32",
      cent_dtype="float8_e4m3fn")
_case("hier-decode-fp8", kind="hier", b=2, kvh=2, g=4, t=1, d=64, c=60, p=9, dtype="float16", cent_dtype="float8_e4m3fn")
_case("selection-decode-fp8", kind="selection", b=2, kvh=2, g=4, t=1, d=32, c=600, n=3001, tail=4, m=8,
      dtype="float16", cent_dtype="float8_e4m3fn")
# decode reads the centroid tiles by TMA where it can (lookup.STATS_TMA, the interpreter included); the per-thread
# loads that other devices take, on the same case
_case("lookup-decode-per-thread-loads", kind="lookup", b=2, kvh=2, g=4, t=1, d=64, c=37, dtype="float16",
      stats_tma=False)
# decode over more than 16K clusters: the stats pass with 3 stages and 2 programs per SM (lookup.flat_stats_launch),
# several centroid tiles per split, its log counts loaded one tile ahead (lookup.LOGN_AHEAD); then the same with
# them loaded in each tile's own iteration
_case("lookup-decode-many-clusters", kind="lookup", b=1, kvh=1, g=4, t=1, d=32, c=16500, dtype="float32")
_case("lookup-decode-many-clusters-logn-in-tile", kind="lookup", b=1, kvh=1, g=4, t=1, d=32, c=16500,
      dtype="float32", logn_ahead=False)
_case("hier-decode", kind="hier", b=2, kvh=2, g=4, t=1, d=64, c=60, p=9, dtype="float32")
_case("hier-prefill", kind="hier", b=1, kvh=2, g=3, t=21, d=64, c=60, p=9, dtype="float16")
# 600 level-1 clusters: 3 level-1 scores blocks of 256 in decode, each writing the partial of its pruned clusters
_case("hier-decode-blocks", kind="hier", b=1, kvh=2, g=4, t=1, d=32, c=1500, p=600, dtype="float16")
_case("selection-decode", kind="selection", b=2, kvh=2, g=4, t=1, d=64, c=150, n=1201, tail=5, m=20,
      dtype="float16")
# 600 clusters: 3 scores blocks of 256 per row, so the fused work-list expansion waits on earlier blocks
_case("selection-decode-blocks", kind="selection", b=1, kvh=2, g=4, t=1, d=32, c=600, n=3001, tail=4, m=8,
      dtype="float16")
# the same with the decode expansion by markers through global memory (lookup.EXPAND_GATHER off)
_case("selection-decode-blocks-markers", kind="selection", b=1, kvh=2, g=4, t=1, d=32, c=600, n=3001, tail=4, m=8,
      dtype="float16", expand_gather=False)
# flat prefill: 128-cluster scores blocks (recomputed logits), 3 per row; the work list in its own launch
_case("selection-prefill-flat", kind="selection", b=1, kvh=2, g=3, t=9, d=32, c=300, n=1501, tail=3, m=12,
      dtype="float32")
# pinned clusters (copy_window) ORed into the fused selection: decode (expansion in the scores pass) and prefill
_case("selection-decode-pins", kind="selection", b=2, kvh=2, g=4, t=1, d=32, c=600, n=3001, tail=4, m=8,
      dtype="float16", pins=0.05)
_case("selection-prefill-pins", kind="selection", b=1, kvh=2, g=3, t=9, d=32, c=300, n=1501, tail=3, m=12,
      dtype="float32", pins=0.05)
# one set of pins per batch row (a batch of answers, each with its own question's pins): decode, flat (the scores
# pass reads each row's set) and hierarchical (the selection's first launch does)
_case("selection-decode-row-pins", kind="selection", b=3, kvh=2, g=4, t=1, d=32, c=600, n=3001, tail=4, m=8,
      dtype="float16", pins=0.05, row_pins=True)
_case("selection-decode-hier-row-pins", kind="selection", b=2, kvh=2, g=4, t=1, d=32, c=700, n=4001, tail=4, m=8,
      dtype="float16", p=300, pins=0.05, row_pins=True)
# batch rows that are not live (ended answers a CUDA graph still feeds) score and select nothing, pins included:
# flat decode (the stats pass loads no tile for them), hierarchical decode, flat prefill
_case("selection-decode-dead-rows", kind="selection", b=3, kvh=2, g=4, t=1, d=32, c=600, n=3001, tail=4, m=8,
      dtype="float16", pins=0.05, row_pins=True, dead=[1])
_case("selection-decode-hier-dead-rows", kind="selection", b=3, kvh=2, g=4, t=1, d=32, c=700, n=4001, tail=4, m=8,
      dtype="float16", p=300, pins=0.05, dead=[0, 2])
_case("selection-prefill-dead-rows", kind="selection", b=2, kvh=2, g=3, t=9, d=32, c=300, n=1501, tail=3, m=12,
      dtype="float32", pins=0.05, dead=[0])
_case("selection-prefill-hier", kind="selection", b=1, kvh=2, g=3, t=9, d=64, c=60, n=411, tail=3, m=12,
      dtype="float32", p=9)
# decode, hierarchical: 2 level-1 scores blocks (pruned partials from each); with pins, some under pruned
# level-1 clusters (scores -inf), ORed in the selection's first launch
_case("selection-decode-hier", kind="selection", b=2, kvh=2, g=4, t=1, d=32, c=700, n=4001, tail=4, m=8,
      dtype="float16", p=300, pins=0.05)
# key_max_logprob (the engine's copy pins): 27 rows (prefill tiles, logits recomputed) and 8 rows (stored logits)
_case("keymax-prefill", kind="keymax", b=1, kvh=2, g=3, t=9, d=32, n=300, m=12, dtype="float16")
_case("keymax-decode", kind="keymax", b=2, kvh=2, g=4, t=2, d=64, n=500, m=5, dtype="float32")
_case("select-threshold", kind="select", b=2, kvh=3, c=41)
_case("select-budget", kind="select_budget", b=2, kvh=3, c=41)
_case("worklist", kind="worklist", b=3, kvh=2, c=29, n=301)
# more selected keys in one chunk than one block of output slots (1024): ranges cross slot blocks
_case("worklist-long", kind="worklist", b=1, kvh=2, c=29, n=3001)
_case("merge", kind="merge", b=2, h=6, t=5, d=64)
for _g in (1, 3, 4):
    _case(f"sparse-decode-gqa{_g}", kind="sparse", b=2, kvh=2, g=_g, t=1, d=64, c=23, n=403, tail=5,
          dtype="float16", splits=3)
_case("sparse-prefill-d128", kind="sparse", b=1, kvh=2, g=3, t=13, d=128, c=17, n=211, tail=7, dtype="float16")
_case("sparse-fp32-keepall", kind="sparse", b=1, kvh=2, g=4, t=3, d=64, c=19, n=257, tail=0, dtype="float32",
      keep="all")
_case("sparse-empty-selection", kind="sparse", b=2, kvh=1, g=4, t=1, d=64, c=11, n=97, tail=0, dtype="float16",
      keep="none", splits=2)
_case("sparse-one-key", kind="sparse", b=1, kvh=2, g=3, t=2, d=64, c=9, n=65, tail=0, dtype="float32",
      keep="one")
_case("causal-decode", kind="causal", b=2, kvh=2, g=4, t=1, m=77, d=64, dtype="float16")
_case("causal-prefill", kind="causal", b=1, kvh=2, g=3, t=29, m=41, d=128, dtype="float32")
# the dynamic keys as the first m slots of a larger buffer whose other slots hold large garbage, their count
# read on the device (dyn_len: the engine's CUDA-graph decode); must equal the run on the m keys alone
_case("causal-decode-dyn-len", kind="causal", b=2, kvh=2, g=4, t=1, m=77, d=64, dtype="float16", dyn_pad=51)
_case("causal-prefill-dyn-len", kind="causal", b=1, kvh=2, g=3, t=29, m=41, d=64, dtype="float32", dyn_pad=23)
_case("squeezed-decode-split-dyn-len", kind="squeezed", b=2, kvh=2, g=4, t=1, d=64, c=23, n=301, tail=6, m=35,
      dtype="float16", splits=3, dyn_pad=40)
_case("squeezed-prefill-dyn-len", kind="squeezed", b=1, kvh=2, g=3, t=19, d=64, c=21, n=251, tail=4, m=19,
      dtype="float32", dyn_pad=13)
# each batch row with its own count of valid dynamic keys (dyn_len of shape (batch,): a batch of answers whose
# questions differ in length); every row must equal the run on its own valid keys alone
_case("causal-decode-row-lens", kind="causal", b=3, kvh=2, g=4, t=1, m=77, d=64, dtype="float16", dyn_pad=19,
      row_lens=True)
_case("squeezed-decode-split-row-lens", kind="squeezed", b=3, kvh=2, g=4, t=1, d=64, c=23, n=301, tail=6, m=35,
      dtype="float16", splits=3, dyn_pad=21, row_lens=True)
_case("squeezed-decode-split", kind="squeezed", b=2, kvh=2, g=4, t=1, d=64, c=23, n=301, tail=6, m=35,
      dtype="float16", splits=3)
_case("squeezed-prefill", kind="squeezed", b=1, kvh=2, g=3, t=19, d=64, c=21, n=251, tail=4, m=19,
      dtype="float16")
_case("squeezed-keepall-dense", kind="squeezed", b=1, kvh=1, g=4, t=5, d=64, c=13, n=139, tail=3, m=9,
      dtype="float32", keep="all")
# prefill through the compacted copy + tensor descriptors (prefill_attention; the GPU default on Hopper),
# forced on here: odd lengths (partial last tiles), keep-all == dense, empty and one-key selections, batch 2
for _dt in ("float32", "float16"):
    _case(f"squeezed-prefill-compact-{_dt}", kind="squeezed", b=2, kvh=2, g=3, t=19, d=64, c=21, n=251, tail=4,
          m=23, dtype=_dt, compact=True)
_case("squeezed-compact-keepall-dense", kind="squeezed", b=1, kvh=1, g=4, t=5, d=64, c=13, n=139, tail=3, m=9,
      dtype="float32", keep="all", compact=True)
_case("sparse-compact-d128", kind="sparse", b=1, kvh=2, g=3, t=13, d=128, c=17, n=211, tail=7, dtype="float16",
      compact=True)
_case("sparse-compact-mha-d32", kind="sparse", b=1, kvh=3, g=1, t=37, d=32, c=15, n=180, tail=2, dtype="float16",
      compact=True)
_case("sparse-compact-empty", kind="sparse", b=2, kvh=1, g=4, t=3, d=64, c=11, n=97, tail=0, dtype="float16",
      keep="none", compact=True)
_case("sparse-compact-one-key", kind="sparse", b=1, kvh=2, g=3, t=2, d=64, c=9, n=65, tail=0, dtype="float32",
      keep="one", compact=True)
# K-means assignment (nearest_center): points and centres not multiples of the tiles, several centre tiles, a
# duplicated centre in the last tile (the first index must win the tie), a head_dim that is not a power of two,
# a single centre; float32 points, which the launcher hands to the twin (cuBLAS: Triton's float32 dots are slow)
for _dt in ("float32", "float16"):
    _case(f"nearest-{_dt}", kind="nearest", b=2, n=301, k=150, d=64, dtype=_dt)
_case("nearest-d80", kind="nearest", b=1, n=77, k=70, d=80, dtype="float16")
_case("nearest-d256", kind="nearest", b=1, n=150, k=70, d=256, dtype="float16")  # half the points per program
_case("nearest-one-centre", kind="nearest", b=3, n=40, k=1, d=32, dtype="float16")

# Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128), 5% clusters: GPU only.
GPU_CASES: dict[str, dict] = {
    "real-lookup-decode": dict(kind="lookup", b=2, kvh=8, g=4, t=1, d=128, c=1638),
    "real-lookup-prefill": dict(kind="lookup", b=1, kvh=8, g=4, t=256, d=128, c=1638),
    "real-hier-decode": dict(kind="hier", b=2, kvh=8, g=4, t=1, d=128, c=1638, p=328),
    "real-hier-prefill": dict(kind="hier", b=1, kvh=8, g=4, t=128, d=128, c=1638, p=328),
    "real-sparse-decode-b8": dict(kind="sparse", b=8, kvh=8, g=4, t=1, d=128, c=1638, n=32768, tail=100),
    "real-causal-prefill": dict(kind="causal", b=1, kvh=8, g=4, t=512, m=640, d=128),
    "real-selection-decode": dict(kind="selection", b=2, kvh=8, g=4, t=1, d=128, c=1638, n=32768, tail=100,
                                  m=300),
    "real-selection-decode-pins": dict(kind="selection", b=1, kvh=8, g=4, t=1, d=128, c=1638, n=32768,
                                       tail=100, m=300, pins=0.02),
    "real-selection-decode-hier-pins": dict(kind="selection", b=2, kvh=8, g=4, t=1, d=128, c=1638, n=32768,
                                            tail=100, m=300, p=328, pins=0.02),
    "real-selection-decode-row-pins": dict(kind="selection", b=4, kvh=8, g=4, t=1, d=128, c=1638, n=32768,
                                           tail=100, m=300, pins=0.02, row_pins=True),
    # 512K keys' worth of clusters at batch 1: the stats pass with 3 stages, the log counts one tile ahead
    "real-lookup-decode-26k": dict(kind="lookup", b=1, kvh=8, g=4, t=1, d=128, c=26214),
    "real-lookup-decode-per-thread-loads": dict(kind="lookup", b=2, kvh=8, g=4, t=1, d=128, c=1638, stats_tma=False),
    "real-lookup-decode-fp8": dict(kind="lookup", b=2, kvh=8, g=4, t=1, d=128, c=1638, cent_dtype="float8_e4m3fn"),
    "real-lookup-prefill-fp8": dict(kind="lookup", b=1, kvh=8, g=4, t=256, d=128, c=1638, cent_dtype="float8_e4m3fn"),
    "real-selection-decode-hier-fp8": dict(kind="selection", b=2, kvh=8, g=4, t=1, d=128, c=1638, n=32768,
                                           tail=100, m=300, p=328, cent_dtype="float8_e4m3fn"),
    "real-keymax": dict(kind="keymax", b=1, kvh=8, g=4, t=24, d=128, n=32768, m=40),
    "real-selection-prefill-hier": dict(kind="selection", b=1, kvh=8, g=4, t=64, d=128, c=1638, n=32768,
                                        tail=100, m=64, p=328),
    "real-squeezed-decode": dict(kind="squeezed", b=1, kvh=8, g=4, t=1, d=128, c=1638, n=32768, tail=100, m=300),
    "real-squeezed-decode-dyn-len": dict(kind="squeezed", b=1, kvh=8, g=4, t=1, d=128, c=1638, n=32768, tail=100,
                                         m=300, dyn_pad=724),
    # batch 8: 64 (row, KV head) programs, where decode takes 64-key tiles and twice the splits
    "real-squeezed-decode-b8": dict(kind="squeezed", b=8, kvh=8, g=4, t=1, d=128, c=1638, n=32768, tail=100,
                                    m=300),
    "real-squeezed-prefill": dict(kind="squeezed", b=1, kvh=8, g=4, t=256, d=128, c=1638, n=32768, tail=100,
                                  m=256),
    # the gathering kernel, which prefill takes where there is no TMA
    "real-squeezed-prefill-gather": dict(kind="squeezed", b=1, kvh=8, g=4, t=256, d=128, c=1638, n=32768,
                                         tail=100, m=256, compact=False),
    "real-sparse-prefill-compact-b2": dict(kind="sparse", b=2, kvh=8, g=4, t=200, d=128, c=1638, n=32768,
                                           tail=100),
    # one layer's K-means assignment of a 32K-token corpus (5% clusters)
    "real-nearest": dict(kind="nearest", b=8, n=32768, k=1638, d=128),
}


# --------------------------------------------------------------------------------------------------
def corpus(kvh, c, n, tail, d, dtype, device, gen, empty_every=5, cent_dtype=None):
    """A clustered corpus sorted by cluster: uneven sizes, some empty clusters, keys around centroids."""
    import torch

    n_clustered = n - tail
    offsets = torch.zeros(kvh, c + 1, dtype=torch.int64)
    for h in range(kvh):
        cuts = torch.sort(torch.randint(0, n_clustered + 1, (c - 1,), generator=gen)).values
        offsets[h, 1:c] = cuts
        offsets[h, c] = n_clustered
        # force a few empty clusters
        for e in range(1, c, empty_every):
            offsets[h, e] = offsets[h, e - 1] if e > 0 else 0
        offsets[h] = torch.cummax(offsets[h], 0).values
        offsets[h, c - 1] = n_clustered - 1  # the last cluster holds exactly one key
        offsets[h, :c - 1] = offsets[h, :c - 1].clamp_max(n_clustered - 1)
        offsets[h, c] = n_clustered
    sizes = offsets[:, 1:] - offsets[:, :-1]
    centers = torch.randn(kvh, c, d, generator=gen) * 1.5
    owner = torch.stack([torch.repeat_interleave(torch.arange(c), sizes[h]) for h in range(kvh)])  # kvh, n_cl
    keys = torch.randn(kvh, n, d, generator=gen)
    keys[:, :n_clustered] += torch.gather(centers, 1, owner.unsqueeze(-1).expand(-1, -1, d))
    values = torch.randn(kvh, n, d, generator=gen)
    keys = keys.to(getattr(torch, dtype))
    values = values.to(getattr(torch, dtype))
    sums = torch.zeros(kvh, c, d).scatter_add_(1, owner.unsqueeze(-1).expand(-1, -1, d), keys[:, :n_clustered].float())
    cent = sums / sizes.clamp_min(1).unsqueeze(-1)
    log_counts = torch.log(sizes.float())
    if cent_dtype:
        cent = cent.to(getattr(torch, cent_dtype))
    return (keys.to(device), values.to(device), offsets.to(device), cent.to(device), log_counts.to(device))


def _report(name, got, ref, atol, rtol):
    """None if close, else a message with the max / mean difference and where (NaN never passes)."""
    import torch

    got, ref = got.float().cpu(), ref.float().cpu()
    if got.shape != ref.shape:
        return f"{name}: shape {tuple(got.shape)} != {tuple(ref.shape)}"
    same_inf = (torch.isinf(got) & torch.isinf(ref) & (torch.sign(got) == torch.sign(ref)))
    if torch.isnan(got).any():
        return f"{name}: NaN at {torch.nonzero(torch.isnan(got))[:3].tolist()}"
    if (torch.isinf(got) != torch.isinf(ref)).any():
        where = torch.nonzero(torch.isinf(got) != torch.isinf(ref))[:3].tolist()
        return f"{name}: infinities differ at {where} (got {got[tuple(where[0])]:.4g}, ref {ref[tuple(where[0])]:.4g})"
    g, r = got.masked_fill(same_inf, 0), ref.masked_fill(same_inf, 0)
    diff = (g - r).abs()
    bad = diff > atol + rtol * r.abs()
    if bad.any():
        i = tuple(torch.nonzero(bad)[0].tolist())
        return (f"{name}: max diff {diff.max():.3g}, mean diff {diff.mean():.3g}, {int(bad.sum())} of "
                f"{bad.numel()} outside atol={atol} rtol={rtol}; first at {list(i)}: got {g[i]:.6g} ref {r[i]:.6g}")
    return None


def _padded_dynamic(dk, dv, pad, gen):
    """``dk``/``dv`` as the first slots of a buffer ``pad`` slots longer, the rest large garbage, and their count
    as a 0-d device tensor (what the engine's preallocated dynamic tokens hand the attention)."""
    import torch

    b, kvh, m, d = dk.shape

    def junk(x):
        return (30 * torch.randn(b, kvh, pad, d, generator=gen)).to(x.dtype).to(x.device)

    n_valid = torch.tensor(m, device=dk.device)
    return torch.cat([dk, junk(dk)], 2), torch.cat([dv, junk(dv)], 2), n_valid


def _row_padded_dynamic(dk, dv, pad, gen):
    """Like :func:`_padded_dynamic`, but row ``b`` keeps only its first ``m - 7 b`` keys (the rest of its buffer
    garbage too): ``(keys, values, counts)`` with ``counts`` ``(batch,)`` on the device."""
    import torch

    b, kvh, m, d = dk.shape
    counts = torch.tensor([m - 7 * i for i in range(b)], device=dk.device)
    slot = torch.arange(m + pad, device=dk.device)
    garbage = slot[None, None, :, None] >= counts[:, None, None, None]

    def fill(x):
        buf = torch.cat([x, torch.zeros(b, kvh, pad, d, dtype=x.dtype, device=x.device)], 2)
        junk = (30 * torch.randn(buf.shape, generator=gen)).to(x.dtype).to(x.device)
        return torch.where(garbage, junk, buf)

    return fill(dk), fill(dv), counts


def _rows_alone(name, got, want_row, counts, atol, rtol):
    """Each row of ``got`` against ``want_row(b, m_b)``, the same computation on that row's valid keys alone."""
    for i, m_i in enumerate(counts.tolist()):
        msg = _report(f"{name} row {i} ({m_i} keys)", got[i:i + 1], want_row(i, m_i), atol, rtol)
        if msg:
            return msg
    return None


def _queries(b, h, t, d, dtype, device, gen):
    import torch

    return torch.randn(b, h, t, d, generator=gen).to(getattr(torch, dtype)).to(device)


def _selection(kind, b, kvh, c, offsets, gen):
    import torch

    sizes = (offsets[:, 1:] - offsets[:, :-1]).cpu()
    if kind == "all":
        sel = torch.ones(b, kvh, c, dtype=torch.bool)
    elif kind == "none":
        sel = torch.zeros(b, kvh, c, dtype=torch.bool)
    elif kind == "one":  # the one-key cluster (see corpus())
        sel = torch.zeros(b, kvh, c, dtype=torch.bool)
        sel[:, :, c - 1] = True
        assert bool((sizes[:, c - 1] == 1).all())
    else:
        sel = torch.rand(b, kvh, c, generator=gen) < 0.35
    return sel.to(offsets.device)


def _mid_gap_threshold(scores, lo_q=0.80, hi_q=0.95):
    """A threshold in the widest gap between finite scores between two quantiles, so that rounding (tf32
    on the GPU) cannot move a cluster across it; about 10% of the clusters pass."""
    import torch

    finite = torch.sort(scores[torch.isfinite(scores)].float().cpu()).values
    lo_i = min(int(len(finite) * lo_q), len(finite) - 2)
    hi_i = max(min(int(len(finite) * hi_q), len(finite) - 1), lo_i + 1)
    gaps = finite[lo_i + 1:hi_i + 1] - finite[lo_i:hi_i]
    k = lo_i + int(torch.argmax(gaps))
    return float(finite[k] + finite[k + 1]) / 2


def _level1(cent, logn, n_l1, kvh, d, device, gen):
    """Level-1 clusters over the level-2 ones (sorted by parent), one of them empty."""
    import torch

    c = cent.shape[1]
    cuts = torch.sort(torch.randint(0, c + 1, (n_l1 - 1,), generator=gen)).values
    l1_off = torch.cat([torch.zeros(1, dtype=torch.long), cuts, torch.tensor([c])]).expand(kvh, -1).contiguous()
    l1_off[:, 2] = l1_off[:, 1]  # an empty level-1 cluster
    l1_off = torch.cummax(l1_off, 1).values.to(device)
    cnt = torch.exp(logn.float())  # level-1 centroid = count-weighted mean of its level-2 centroids
    sizes1 = (l1_off[:, 1:] - l1_off[:, :-1]).cpu()
    parent = torch.stack([torch.repeat_interleave(torch.arange(n_l1), sizes1[h]) for h in range(kvh)]).to(device)
    l1_cnt = torch.zeros(kvh, n_l1, device=device).scatter_add_(1, parent, cnt)
    l1_sum = torch.zeros(kvh, n_l1, d, device=device).scatter_add_(
        1, parent.unsqueeze(-1).expand(-1, -1, d), cent.float() * cnt.unsqueeze(-1))
    # stored like the level-2 centroids (fp8 ones widen in the kernel)
    return (l1_sum / l1_cnt.clamp_min(1e-30).unsqueeze(-1)).to(cent.dtype), torch.log(l1_cnt), l1_off


def _selection_case(name, p, device, dtype, gen, tol):
    """centroid_selection / hierarchical_centroid_selection (lookup + threshold + work list, fused) against
    the twins, then squeezed_attention given that work list against the torch path."""
    import torch

    from sqz_kernels import reference as ref
    from sqz_kernels import triton_ops as tri

    b, kvh, g, t, d, c, n, tail, m = (p[k] for k in ("b", "kvh", "g", "t", "d", "c", "n", "tail", "m"))
    keys, values, offs, cent, logn = corpus(kvh, c, n, tail, d, dtype, device, gen, cent_dtype=p.get("cent_dtype"))
    q = _queries(b, kvh * g, t, d, dtype, device, gen) * 0.5
    scale = d ** -0.5
    pin_shape = (b, kvh, c) if p.get("row_pins") else (kvh, c)
    pins = (torch.rand(pin_shape, generator=gen) < p["pins"]).to(device) if "pins" in p else None
    live = None
    if "dead" in p:  # batch rows that are not live (ended answers a CUDA graph still feeds): they select nothing
        live = torch.ones(b, dtype=torch.bool)
        live[list(p["dead"])] = False
        live = live.to(device)
    if "p" in p:
        l1_cent, l1_logn, l1_off = _level1(cent, logn, p["p"], kvh, d, device, gen)
        l1_thr = _mid_gap_threshold(ref.centroid_scores(q, l1_cent, l1_logn, scale), 0.3, 0.7)
        scores = ref.hierarchical_centroid_scores(q, l1_cent, l1_logn, l1_off, cent, logn, scale, l1_thr)
        thr = _mid_gap_threshold(scores, 0.5, 0.9)
        got = tri.hierarchical_centroid_selection(q, l1_cent, l1_logn, l1_off, cent, logn, scale, l1_thr, offs, thr, n,
                                                  pins=pins, live=live)
        want = ref.hierarchical_centroid_selection(q, l1_cent, l1_logn, l1_off, cent, logn, scale, l1_thr, offs, thr,
                                                   n, pins=pins, live=live)
    else:
        scores = ref.centroid_scores(q, cent, logn, scale)
        thr = _mid_gap_threshold(scores)
        got = tri.centroid_selection(q, cent, logn, scale, offs, thr, n, pins=pins, live=live)
        want = ref.centroid_selection(q, cent, logn, scale, offs, thr, n, pins=pins, live=live)
    if live is not None:
        msg = _dead_rows_read_nothing(name, got, want, live, (q, cent, logn, scale, offs, thr, n), pins)
        if msg:
            return msg
    if pins is not None:
        rows = ref.pin_rows(pins)
        if not bool((rows & (scores < thr)).any()):
            return f"{name}: no pin below the threshold, nothing to test"
        if pins.dim() == 3 and bool((rows[0] == rows[1:]).all()):
            return f"{name}: every row has the same pins, nothing per row to test"
        # one head's pins would broadcast over every head, one row's over every row
        wrong = pins[:1] if pins.dim() == 3 else pins[0]
        for fn in (tri.select_worklist, ref.select_worklist, tri.centroid_selection, ref.centroid_selection):
            args = (scores, logn, thr, offs, n) if fn.__name__ == "select_worklist" else (q, cent, logn, scale, offs,
                                                                                          thr, n)
            try:
                fn(*args, pins=wrong)
                return f"{name}: {fn.__module__}.{fn.__name__} took pins of shape {tuple(wrong.shape)}"
            except ValueError:
                pass
        read = rows & torch.isfinite(logn)[None]
        if live is not None:  # a row that is not live reads none of its pins
            read = read & live[:, None, None]
        if not bool((want[1] | ~read).all()):
            return f"{name}: the twin dropped a pinned cluster"
    (gs, gsel, (gidx, gcum)), (ws, wsel, (widx, wcum)) = got, want
    msg = _report(f"{name} scores", gs, ws, *tol["score"])
    if msg:
        return msg
    if not torch.equal(gsel.cpu(), wsel.cpu()):
        return f"{name}: {int((gsel.cpu() != wsel.cpu()).sum())} selected clusters differ"
    if int(wsel.sum()) == 0:
        return f"{name}: the test threshold selected nothing"
    if not torch.equal(gcum.cpu(), wcum.cpu()):
        return f"{name}: cum differs"
    for bi in range(b):
        for h in range(kvh):
            cnt = int(wcum[bi, h, -1])
            if not torch.equal(gidx[bi, h, :cnt].cpu(), widx[bi, h, :cnt].cpu()):
                return f"{name}: work list of row ({bi},{h}) differs"
    dk = torch.randn(b, kvh, m, d, generator=gen).to(getattr(torch, dtype)).to(device)
    dv = torch.randn(b, kvh, m, d, generator=gen).to(getattr(torch, dtype)).to(device)
    out = tri.squeezed_attention(q, keys, values, offs, gsel, dk, dv, scale, worklist=(gidx, gcum))
    ref_out = ref.squeezed_attention(q, keys, values, offs, wsel, dk, dv, scale, worklist=(widx, wcum))
    return _report(f"{name} attention", out, ref_out, *tol["out"])


def _dead_rows_read_nothing(name, got, want, live, flat_args, pins):
    """Rows that are not live: every score -inf, nothing selected (pins included), an empty work list, in both
    twins; the live rows select something. A ``live`` of the wrong length is refused by both."""
    from sqz_kernels import reference as ref
    from sqz_kernels import triton_ops as tri

    dead = ~live.cpu()
    for who, (scores, selected, (_, cum)) in (("triton", got), ("twin", want)):
        scores, selected, cum = scores.cpu(), selected.cpu(), cum.cpu()
        if not bool((scores[dead] == float("-inf")).all()):
            return f"{name}: {who} scored a row that is not live"
        if bool(selected[dead].any()) or bool(cum[dead][..., -1].any()):
            return f"{name}: {who} selected clusters in a row that is not live"
        if not bool(selected[~dead].any()):
            return f"{name}: {who} selected nothing in the live rows"
    if pins is not None and not bool(ref.pin_rows(pins).cpu().expand(len(live), -1, -1)[dead].any()):
        return f"{name}: the rows that are not live have no pins, so their pins are not tested"
    for fn in (tri.centroid_selection, ref.centroid_selection):
        try:
            fn(*flat_args, live=live[:-1])
            return f"{name}: {fn.__module__}.{fn.__name__} took live of shape {tuple(live[:-1].shape)}"
        except ValueError:
            pass
    return None


# case parameters that switch a kernel module's code path for the case: param -> (module, attribute)
_SWITCHES = {"stats_tma": ("lookup", "STATS_TMA"), "expand_gather": ("lookup", "EXPAND_GATHER"),
             "logn_ahead": ("lookup", "LOGN_AHEAD")}


# How far below the best centre a pick may be: the twin rounds each product to the points' dtype before comparing
# (unit vectors: products in [-1, 1]), the kernel compares float32 accumulations.
_NEAREST_GAP = {"float32": 1e-5, "float16": 2e-3, "bfloat16": 8e-3}


def _nearest_case(name, p, device, dtype, gen) -> str | None:
    import torch
    import torch.nn.functional as F

    from sqz_kernels import reference as ref
    from sqz_kernels import triton_ops as tri

    b, n, k, d = p["b"], p["n"], p["k"], p["d"]
    dt = getattr(torch, dtype)
    x = F.normalize(torch.randn(b, n, d, generator=gen), dim=-1).to(device=device, dtype=dt)
    c = F.normalize(torch.randn(b, k, d, generator=gen), dim=-1).to(device=device, dtype=dt)
    if k > 1:
        c[:, -1] = c[:, 0]  # an exact tie: centre 0 must win it everywhere
    exact = torch.bmm(x.double(), c.double().transpose(1, 2))  # of the stored (rounded) values
    best = exact.max(-1).values
    from sqz_kernels import nearest as nearest_module

    kernel, launches = nearest_module._nearest_kernel, []

    class _CountedLaunch:  # which points the kernel itself gets: 16-bit ones only
        def __getitem__(self, grid):
            launches.append(grid)
            return kernel[grid]

    nearest_module._nearest_kernel = _CountedLaunch()
    try:
        labels = {"triton": tri.nearest_center(x, c), "torch": ref.nearest_center(x, c)}
    finally:
        nearest_module._nearest_kernel = kernel
    if bool(launches) == (dtype == "float32"):
        return f"{name}: the kernel {'ran' if launches else 'did not run'} on {dtype} points"
    for twin, lab in labels.items():
        if lab.shape != (b, n) or lab.dtype != torch.int64 or int(lab.min()) < 0 or int(lab.max()) >= k:
            return f"{name}: {twin} labels {tuple(lab.shape)} {lab.dtype} out of shape or range"
        gap = float((best - exact.gather(-1, lab.unsqueeze(-1)).squeeze(-1)).max())
        if gap > _NEAREST_GAP[dtype]:
            return f"{name}: {twin} picks a centre {gap:.2e} below the best"
        if k > 1 and bool((lab == k - 1).any()):
            return f"{name}: {twin} took the later of two equal centres"
    if dtype == "float32" and not torch.equal(labels["triton"], labels["torch"]):
        return f"{name}: float32 points must take the twin's product, not the kernel"
    return None


def run_case(name: str, device: str = "cpu", dtype: str | None = None, seed: int = 0) -> str | None:
    """Run one case: None when it passes, else what failed. Switch parameters (``_SWITCHES``) hold for the case."""
    import importlib

    p = CASES[name] if name in CASES else GPU_CASES[name]
    saved = []
    try:
        for param, (module, attr) in _SWITCHES.items():
            if param in p:
                mod = importlib.import_module(f"sqz_kernels.{module}")
                saved.append((mod, attr, getattr(mod, attr)))
                setattr(mod, attr, p[param])
        return _run_case(name, device, dtype, seed)
    finally:
        for mod, attr, value in reversed(saved):
            setattr(mod, attr, value)


def _run_case(name: str, device: str, dtype: str | None, seed: int) -> str | None:
    import torch
    import torch.nn.functional as F

    from sqz_kernels import reference as ref
    from sqz_kernels import triton_ops as tri

    p = dict(CASES[name] if name in CASES else GPU_CASES[name])
    dtype = dtype or p.get("dtype", "float32")
    gpu = device != "cpu"
    tol = TOLERANCES[f"{dtype}-gpu" if gpu else dtype]
    atol, rtol = tol["out"]
    gen = torch.Generator().manual_seed(seed)
    kind = p["kind"]

    if kind == "nearest":
        return _nearest_case(name, p, device, dtype, gen)
    if kind in ("lookup", "hier"):
        b, kvh, g, t, d, c = p["b"], p["kvh"], p["g"], p["t"], p["d"], p["c"]
        n = c * 6
        _, _, _, cent, logn = corpus(kvh, c, n, 0, d, dtype, device, gen, cent_dtype=p.get("cent_dtype"))
        q = _queries(b, kvh * g, t, d, dtype, device, gen) * 0.5
        scale = d ** -0.5
        if kind == "lookup":
            got = tri.centroid_scores(q, cent, logn, scale)
            want = ref.centroid_scores(q, cent, logn, scale)
            return _report(name, got, want, *tol["score"])
        l1_cent, l1_logn, l1_off = _level1(cent, logn, p["p"], kvh, d, device, gen)
        flat_l1 = ref.centroid_scores(q, l1_cent, l1_logn, scale)
        mid = _mid_gap_threshold(flat_l1, 0.25, 0.75)
        top = float(flat_l1[torch.isfinite(flat_l1)].max())
        for thr in (float("-inf"), mid, top + 1.0):
            got = tri.hierarchical_centroid_scores(q, l1_cent, l1_logn, l1_off, cent, logn, scale, thr)
            want = ref.hierarchical_centroid_scores(q, l1_cent, l1_logn, l1_off, cent, logn, scale, thr)
            msg = _report(f"{name} thr={thr:.3g}", got, want, *tol["score"])
            if msg:
                return msg
            if thr == float("-inf"):  # every level-1 cluster kept: equal to the flat lookup
                msg = _report(f"{name} keep-all == flat", got, ref.centroid_scores(q, cent, logn, scale),
                              *tol["score"])
                if msg:
                    return msg
        return None

    if kind == "selection":
        return _selection_case(name, p, device, dtype, gen, tol)

    if kind == "keymax":
        b, kvh, g, t, d, n, m = (p[k] for k in ("b", "kvh", "g", "t", "d", "n", "m"))
        keys = torch.randn(kvh, n, d, generator=gen)
        q = torch.randn(b, kvh * g, t, d, generator=gen) * 0.5
        keys[0, 7] = q[0, 1, t - 1] * 4  # one query focuses on one key, as a copying head does
        dk = torch.randn(b, kvh, m, d, generator=gen)
        q, keys, dk = (x.to(getattr(torch, dtype)).to(device) for x in (q, keys, dk))
        scale = d ** -0.5
        got = tri.key_max_logprob(q, keys, dk, scale)
        # the twin's q.K runs in the keys' dtype (16-bit logits on a GPU); the kernel accumulates in float32:
        # compared with the twin on the same inputs in float32
        want = ref.key_max_logprob(q.float(), keys.float(), dk.float(), scale)
        if float(want[0, 7]) < math.log(0.3):
            return f"{name}: the planted key got {math.exp(float(want[0, 7])):.3f} of its query's attention"
        for fn in (tri.key_max_logprob, ref.key_max_logprob):  # fewer dynamic keys than query tokens
            try:
                fn(q, keys, dk[:, :, : t - 1], scale)
                return f"{name}: {fn.__module__}.key_max_logprob took {t - 1} dynamic keys for {t} query tokens"
            except ValueError:
                pass
        return _report(name, got, want, *tol["score"])

    if kind in ("select", "select_budget"):
        b, kvh, c = p["b"], p["kvh"], p["c"]
        scores = torch.randn(b, kvh, c, generator=gen)
        scores[0, 0, 3] = float("-inf")
        logn = torch.log(torch.randint(0, 6, (kvh, c), generator=gen).float())
        scores, logn = scores.to(device), logn.to(device)
        if kind == "select":
            for thr in (-0.3, 0.0, 5.0, float("-inf")):
                got = tri.select_clusters(scores, logn, log_threshold=thr)
                want = ref.select_clusters(scores, logn, log_threshold=thr)
                if not torch.equal(got.cpu(), want.cpu()):
                    return f"{name} thr={thr}: {int((got != want).sum())} clusters differ"
            return None
        for budget in (0, 1, 7, 10_000):
            got = tri.select_clusters(scores, logn, budget_keys=budget)
            want = ref.select_clusters(scores, logn, budget_keys=budget)
            if not torch.equal(got.cpu(), want.cpu()):
                return f"{name} budget={budget}: {int((got != want).sum())} clusters differ"
        return None

    if kind == "worklist":
        b, kvh, c, n = p["b"], p["kvh"], p["c"], p["n"]
        keys, _, offs, _, _ = corpus(kvh, c, n, 0, 16, "float32", device, gen)
        for keep in ("random", "all", "none", "one"):
            sel = _selection(keep, b, kvh, c, offs, gen)
            idx, cum = tri.build_worklist(sel, offs, n)
            mask = ref.cluster_key_mask(sel, offs, n).cpu()
            for bi in range(b):
                for h in range(kvh):
                    cnt = int(cum[bi, h, -1])
                    want = torch.nonzero(mask[bi, h]).flatten()
                    if not torch.equal(idx[bi, h, :cnt].cpu().long(), want):
                        return f"{name} keep={keep}: row ({bi},{h}) lists {idx[bi, h, :cnt].tolist()[:8]}... " \
                               f"want {want.tolist()[:8]}..."
        return None

    if kind == "merge":
        b, h, t, d = p["b"], p["h"], p["t"], p["d"]
        oa, ob = torch.randn(b, h, t, d, generator=gen), torch.randn(b, h, t, d, generator=gen)
        la, lb = torch.randn(b, h, t, generator=gen), torch.randn(b, h, t, generator=gen)
        la[0, 0, 0] = float("-inf")
        la[0, 1, 1] = lb[0, 1, 1] = float("-inf")
        oa[0, 1, 1] = ob[0, 1, 1] = 0
        args = [x.to(device) for x in (oa, la, ob, lb)]
        go, gl = tri.merge_attention(*args)
        wo, wl = ref.merge_attention(*args)
        return _report(name, go, wo, 1e-5, 1e-5) or _report(f"{name} lse", gl, wl, 1e-5, 1e-5)

    b, kvh, g, t, d = p["b"], p["kvh"], p["g"], p["t"], p["d"]
    h = kvh * g
    scale = d ** -0.5
    q = _queries(b, h, t, d, dtype, device, gen)
    cfg = tri.AttentionConfig(num_splits=p.get("splits"), compact=p.get("compact"))
    if kind == "causal":
        m = p["m"]
        dk = torch.randn(b, kvh, m, d, generator=gen).to(getattr(torch, dtype)).to(device)
        dv = torch.randn(b, kvh, m, d, generator=gen).to(getattr(torch, dtype)).to(device)
        if p.get("row_lens"):
            pk, pv, counts = _row_padded_dynamic(dk, dv, p["dyn_pad"], gen)
            for twin, mod in (("triton", tri), ("torch", ref)):
                po, _ = mod.causal_attention(q, pk, pv, scale, dyn_len=counts)
                msg = _rows_alone(f"{name} {twin}", po, lambda i, m_i: ref.causal_attention(
                    q[i:i + 1], dk[i:i + 1, :, :m_i], dv[i:i + 1, :, :m_i], scale)[0], counts, atol, rtol)
                if msg:
                    return msg
        go, gl = tri.causal_attention(q, dk, dv, scale)
        wo, wl = ref.causal_attention(q, dk, dv, scale)
        msg = _report(name, go, wo, atol, rtol) or _report(f"{name} lse", gl, wl, atol, rtol)
        if msg:
            return msg
        if p.get("dyn_pad"):
            pk, pv, n_valid = _padded_dynamic(dk, dv, p["dyn_pad"], gen)
            for twin, (po, pl) in (("triton", tri.causal_attention(q, pk, pv, scale, dyn_len=n_valid)),
                                   ("torch", ref.causal_attention(q, pk, pv, scale, dyn_len=n_valid))):
                msg = _report(f"{name} dyn_len {twin}", po, wo, atol, rtol) or _report(f"{name} dyn_len {twin} lse",
                                                                                    pl, wl, atol, rtol)
                if msg:
                    return msg
        # against SDPA with the causal mask (bottom-right aligned)
        pos = torch.arange(m - t, m, device=device)
        mask = torch.arange(m, device=device)[None, :] <= pos[:, None]
        sd = F.scaled_dot_product_attention(q.float(), dk.float().repeat_interleave(g, 1),
                                            dv.float().repeat_interleave(g, 1), attn_mask=mask, scale=scale)
        return _report(f"{name} vs SDPA", go, sd, atol, rtol)

    c, n, tail = p["c"], p["n"], p["tail"]
    keys, values, offs, _, _ = corpus(kvh, c, n, tail, d, dtype, device, gen)
    sel = _selection(p.get("keep", "random"), b, kvh, c, offs, gen)
    key_mask = ref.cluster_key_mask(sel, offs, n)  # B, KVH, N
    kf = keys.float().unsqueeze(0).expand(b, -1, -1, -1).repeat_interleave(g, 1)
    vf = values.float().unsqueeze(0).expand(b, -1, -1, -1).repeat_interleave(g, 1)
    if kind == "sparse":
        go, gl = tri.sparse_attention(q, keys, values, offs, sel, scale, config=cfg)
        wo, wl = ref.sparse_attention(q, keys, values, offs, sel, scale)
        msg = _report(name, go, wo, atol, rtol) or _report(f"{name} lse", gl, wl, atol, rtol)
        if msg:
            return msg
        if p.get("keep") == "none":
            if not (torch.isinf(gl).all() and (go == 0).all()):
                return f"{name}: an empty selection must give out = 0, lse = -inf"
            return None
        am = key_mask.repeat_interleave(g, 1)[:, :, None, :].expand(b, h, t, n)
        sd = F.scaled_dot_product_attention(q.float(), kf, vf, attn_mask=am, scale=scale)
        return _report(f"{name} vs SDPA+mask", go, sd, atol, rtol)

    # squeezed: corpus (sparse) + dynamic (causal), merged
    m = p["m"]
    dk = torch.randn(b, kvh, m, d, generator=gen).to(getattr(torch, dtype)).to(device)
    dv = torch.randn(b, kvh, m, d, generator=gen).to(getattr(torch, dtype)).to(device)
    got = tri.squeezed_attention(q, keys, values, offs, sel, dk, dv, scale, config=cfg)
    want = ref.squeezed_attention(q, keys, values, offs, sel, dk, dv, scale)
    if got.dtype != q.dtype:
        return f"{name}: output dtype {got.dtype} != {q.dtype}"
    msg = _report(name, got, want, atol, rtol)
    if msg:
        return msg
    if p.get("row_lens"):
        pk, pv, counts = _row_padded_dynamic(dk, dv, p["dyn_pad"], gen)
        for twin, mod in (("triton", tri), ("torch", ref)):
            out = mod.squeezed_attention(q, keys, values, offs, sel, pk, pv, scale, dyn_len=counts)
            msg = _rows_alone(f"{name} {twin}", out, lambda i, m_i: ref.squeezed_attention(
                q[i:i + 1], keys, values, offs, sel[i:i + 1], dk[i:i + 1, :, :m_i], dv[i:i + 1, :, :m_i], scale),
                counts, atol, rtol)
            if msg:
                return msg
    elif p.get("dyn_pad"):
        pk, pv, n_valid = _padded_dynamic(dk, dv, p["dyn_pad"], gen)
        for twin, out in (("triton", tri.squeezed_attention(q, keys, values, offs, sel, pk, pv, scale, config=cfg,
                                                            dyn_len=n_valid)),
                          ("torch", ref.squeezed_attention(q, keys, values, offs, sel, pk, pv, scale, dyn_len=n_valid))):
            msg = _report(f"{name} dyn_len {twin}", out, want, atol, rtol)
            if msg:
                return msg
    # dense SDPA over [corpus | dynamic] with the selection mask and the causal mask
    pos = torch.arange(m - t, m, device=device)
    causal = torch.arange(m, device=device)[None, :] <= pos[:, None]  # T, M
    full_mask = torch.cat([key_mask.repeat_interleave(g, 1)[:, :, None, :].expand(b, h, t, n),
                           causal.expand(b, h, t, m)], dim=-1)
    kk = torch.cat([kf, dk.float().repeat_interleave(g, 1)], dim=2)
    vv = torch.cat([vf, dv.float().repeat_interleave(g, 1)], dim=2)
    sd = F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=full_mask, scale=scale)
    msg = _report(f"{name} vs SDPA+mask", got, sd, atol, rtol)
    if msg or p.get("keep") != "all":
        return msg
    # keep-all: the plain dense causal attention over [corpus | dynamic], no selection mask
    dense_mask = torch.cat([torch.ones(b, h, t, n, dtype=torch.bool, device=device), causal.expand(b, h, t, m)], -1)
    plain = F.scaled_dot_product_attention(q.float(), kk, vv, attn_mask=dense_mask, scale=scale)
    return _report(f"{name} keep-all == dense", got, plain, atol, rtol)


def main(argv: list[str]) -> int:
    names = argv or list(CASES)
    failed = 0
    for name in names:
        t0 = time.perf_counter()
        try:
            msg = run_case(name)
        except Exception as exc:  # reported, not raised: the parent test prints it
            msg = f"{name}: {type(exc).__name__}: {exc}"
        failed += msg is not None
        print(json.dumps({"case": name, "error": msg, "seconds": round(time.perf_counter() - t0, 2)}), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
