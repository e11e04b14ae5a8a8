"""K-means of a corpus build: time and quality of the Lloyd steps' assignments in float32 and bfloat16.

A corpus build clusters every layer's keys, all KV heads at once (``clustering.spherical_kmeans``, 5% clusters,
20 Lloyd steps). Each step's assignment is a (points x clusters) similarity product, O(0.05 N^2 d) per head: at
128K tokens it was most of a GPU build, and it grows with the square of the corpus. On CUDA the engine computes
those similarities in bfloat16 (tensor cores), in one Triton kernel that keeps the running argmax
(``sqz_kernels.nearest_center``); this script measures what the dtype buys and what it costs.

    python benchmarks/bench_clustering.py --timing [--tokens 131072 524288]   # GPU: seconds per layer
    python benchmarks/bench_clustering.py --quality                           # CPU: SmolLM2's real keys

``--timing``: random keys shaped like one Llama-3-8B layer (8 KV heads, head_dim 128, bf16), both dtypes, the
number of assignments run (the steps stop early once no label changes). ``--quality``: the keys of every layer of
SmolLM2-135M-Instruct over a 6K-token essay corpus (captured from a real ``add_corpus``), clustered with each
dtype; reports the K-means objective (mean cosine of a key to its cluster's mean direction) and the label
agreement, against the spread between two seeds in float32.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
RESULTS = HERE / "results"

from sqz_integrations import clustering  # noqa: E402


def objective(x: torch.Tensor, labels: torch.Tensor, k: int) -> float:
    """Mean cosine between each point's direction and its cluster's mean direction (float32)."""
    xn = x.float() / x.float().norm(dim=-1, keepdim=True).clamp_min(1e-12)
    sums = torch.zeros(x.shape[0], k, x.shape[2], device=x.device).scatter_add_(
        1, labels.unsqueeze(-1).expand_as(xn), xn)
    centers = sums / sums.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    return float((xn * centers.gather(1, labels.unsqueeze(-1).expand_as(xn))).sum(-1).mean())


class AssignCounter:
    """Counts the assignment passes of a K-means run (the first after seeding + one per Lloyd step run)."""

    def __init__(self):
        self.n = 0
        self._assign = clustering._assign

    def __enter__(self):
        def counted(*args):
            self.n += 1
            return self._assign(*args)

        clustering._assign = counted
        return self

    def __exit__(self, *exc):
        clustering._assign = self._assign


def timing(tokens: list[int], fraction: float, iters: int) -> list[dict]:
    rows = []
    for n in tokens:
        torch.manual_seed(0)
        x = torch.randn(8, n, 128, device="cuda", dtype=torch.bfloat16)
        k = max(1, round(fraction * n))
        for dtype in (torch.bfloat16, torch.float32):
            clustering.spherical_kmeans(x[:, : min(n, 8192)], max(1, k // 64), 2, 0, assign_dtype=dtype)  # warm
            torch.cuda.synchronize()
            with AssignCounter() as count:
                t0 = time.perf_counter()
                labels = clustering.spherical_kmeans(x, k, iters, 0, assign_dtype=dtype)
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t0
            rows.append(dict(tokens=n, clusters=k, assign_dtype=str(dtype).replace("torch.", ""), seconds=seconds,
                             assignments=count.n, objective=objective(x, labels, k)))
            print(json.dumps(rows[-1]), flush=True)
        del x
    return rows


def quality(iters: int) -> dict:
    import niah
    from sqz_integrations import SqueezeConfig, SqueezedEngine
    from sqz_integrations import corpus as corpus_module

    torch.set_num_threads(max(1, torch.get_num_threads()))
    captured = []
    original = corpus_module.spherical_kmeans

    def capture(x, k, iters=20, seed=0, weights=None, assign_dtype=None):
        if weights is None:  # level 2 (the keys), not level 1 (the centroids)
            captured.append((x.clone(), k, seed))
        return original(x, k, iters, seed, weights, assign_dtype)

    corpus_module.spherical_kmeans = capture
    try:
        engine = SqueezedEngine.from_pretrained(config=SqueezeConfig(sources=False, calibration_probe=None,
                                                                     retrieval_share=0))
        case = niah.make_cases(engine.tokenizer, {6144: 1})[0]
        engine.add_corpus("quality", [case.context], progress=False)
    finally:
        corpus_module.spherical_kmeans = original
    per_layer = []
    for layer, (x, k, seed) in enumerate(captured):
        a = original(x, k, iters, seed, assign_dtype=torch.float32)
        b = original(x, k, iters, seed, assign_dtype=torch.bfloat16)
        c = original(x, k, iters, seed + 100, assign_dtype=torch.float32)
        per_layer.append(dict(layer=layer, float32=objective(x, a, k), bfloat16=objective(x, b, k),
                              float32_other_seed=objective(x, c, k), label_agreement=float((a == b).float().mean())))
    mean = {key: sum(r[key] for r in per_layer) / len(per_layer)
            for key in ("float32", "bfloat16", "float32_other_seed", "label_agreement")}
    spread = dict(bf16_minus_fp32=[min(r["bfloat16"] - r["float32"] for r in per_layer),
                                   max(r["bfloat16"] - r["float32"] for r in per_layer)],
                  seed_minus_fp32=[min(r["float32_other_seed"] - r["float32"] for r in per_layer),
                                   max(r["float32_other_seed"] - r["float32"] for r in per_layer)])
    out = dict(points=list(captured[0][0].shape), clusters=captured[0][1], mean=mean, per_layer_range=spread,
               per_layer=per_layer)
    print(json.dumps({k: v for k, v in out.items() if k != "per_layer"}), flush=True)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--timing", action="store_true", help="GPU: seconds per layer, float32 against bfloat16")
    ap.add_argument("--quality", action="store_true", help="CPU: objective on SmolLM2's keys, float32 against bfloat16")
    ap.add_argument("--tokens", type=int, nargs="+", default=[131072, 524288])
    ap.add_argument("--fraction", type=float, default=0.05)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--out", type=Path, default=RESULTS)
    args = ap.parse_args()
    if not (args.timing or args.quality):
        ap.error("choose --timing (GPU) and/or --quality (CPU)")
    meta = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), torch=torch.__version__,
                python=platform.python_version(),
                device=torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu")
    result = dict(meta=meta)
    if args.timing:
        result["timing"] = timing(args.tokens, args.fraction, args.iters)
    if args.quality:
        result["quality"] = quality(args.iters)
    stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
    kind = "_".join(k for k in ("timing", "quality") if k in result)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"clustering_{kind}_{stamp}.json"
    path.write_text(json.dumps(result, indent=1))
    lines = [f"K-means assignments, {meta['date']}, {meta['device']}, torch {meta['torch']}."]
    for r in result.get("timing", []):
        lines.append(f"{r['tokens']} tokens, {r['clusters']} clusters x 8 heads, {r['assign_dtype']}: "
                     f"{r['seconds']:.2f} s, {r['assignments']} assignments, objective {r['objective']:.5f}")
    if "quality" in result:
        q = result["quality"]
        lines.append(f"SmolLM2 keys {q['points']}, {q['clusters']} clusters per head, mean objective float32 "
                     f"{q['mean']['float32']:.5f}, bfloat16 {q['mean']['bfloat16']:.5f}, float32 with another seed "
                     f"{q['mean']['float32_other_seed']:.5f}; label agreement {q['mean']['label_agreement']:.3f}; "
                     f"per-layer ranges {q['per_layer_range']}")
    print("\n".join(lines))
    path.with_suffix(".md").write_text("\n\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
