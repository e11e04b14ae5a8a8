"""The decode path of bench_kernels (flat lookup + selection + work list, then the attention) a few times on one
corpus, for a hardware-counter profile of its kernels under Nsight Compute. Times nothing itself.

Usage (on the GPU machine, from the repository root)::

    ncu --clock-control none -k regex:"_attn_kernel|_stats_kernel|_scores_kernel" --launch-skip 6 \
        --launch-count 3 --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy \
        python benchmarks/ncu_decode.py [--n 524288] [--batch 1]

``--launch-skip 6`` passes the first two repeats (compilation, warm-up); the third repeat is profiled.
"""
from __future__ import annotations

import argparse

import torch

import bench_kernels as bk
from sqz_kernels import triton_ops as tri


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=524288, help="corpus tokens")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    corpus = bk.make_corpus(args.n)
    gen = torch.Generator(device="cuda").manual_seed(1)
    q = (torch.randn(args.batch, bk.H, 1, bk.D, generator=gen, device="cuda") * 1.5).to(bk.DTYPE)
    dk = torch.randn(args.batch, bk.KVH, bk.DYN, bk.D, generator=gen, device="cuda").to(bk.DTYPE)
    dv = torch.randn(args.batch, bk.KVH, bk.DYN, bk.D, generator=gen, device="cuda").to(bk.DTYPE)
    scale = bk.D ** -0.5
    cent, logn, offs = corpus["centroids_kv"], corpus["log_counts"], corpus["offsets"]
    # the benchmark's calibration: a global threshold keeping ~10% of the clustered keys
    thr = bk.global_threshold(tri.centroid_scores(q, cent, logn, scale), logn, bk.KEEP_FRAC)
    for _ in range(args.repeats):
        _, sel, wl = tri.centroid_selection(q, cent, logn, scale, offs, thr, args.n)
        tri.squeezed_attention(q, corpus["keys"], corpus["values"], offs, sel, dk, dv, scale, worklist=wl)
        torch.cuda.synchronize()


if __name__ == "__main__":
    main()
