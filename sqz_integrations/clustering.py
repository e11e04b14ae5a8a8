"""Batched spherical K-means: all KV heads of a layer at once, on CPU or CUDA, deterministic for a seed."""
from __future__ import annotations

import torch

from sqz_kernels import get_backend


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _assign(xn: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the most similar centre for every point: (B, N, D), (B, K, D) -> (B, N); the similarities in
    ``xn``'s dtype (see ``assign_dtype`` of :func:`spherical_kmeans`). On CUDA the fused Triton kernel (the
    similarity matrix never reaches memory), elsewhere its torch twin."""
    return get_backend("auto", xn.device.type).nearest_center(xn, centers)


# Seeding takes k sequential steps. Up to this many clusters every step draws one centre (exact k-means++);
# above it, each step draws a batch of centres from the same D^2 distribution and the run takes at most
# _SEEDING_STEPS steps: on a GPU each step is a few launches whatever its size, and a 128K-token corpus has
# 6.5K clusters per head (8 layers of a random Llama-3-8B-shaped model on the H200: 14 of the build's 38 s
# were 52K seeding steps). The corpora of the CPU benchmarks stay under the threshold (6K tokens: 307).
_EXACT_SEEDING_MAX_K = 1024
_SEEDING_STEPS = 256


def _kmeans_pp_init(xn: torch.Tensor, k: int, weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the unit sphere (distance = 1 - cosine), batched over B; for more than
    ``_EXACT_SEEDING_MAX_K`` clusters, several centres per step (drawn with replacement from one D^2
    distribution: a repeated centre leaves a cluster empty, which the Lloyd steps keep, never NaN)."""
    b, n, _ = xn.shape
    rows = torch.arange(b, device=xn.device)
    # (B, m, D) x (B, D, N): for one centre the same dot products as einsum("bnd,bd->bn"), bit for bit on CPU,
    # but one BLAS gemm with the points along the output instead of a matrix-vector product per row: 11x
    # faster per seeding step on CPU (3 x 4000 x 64: 0.057 against 0.64 ms)
    xt = xn.transpose(1, 2).contiguous()

    def distance(c: torch.Tensor) -> torch.Tensor:  # (B, m, D) -> (B, N): to the nearest of the m centres
        return (1.0 - torch.bmm(c, xt).amax(dim=1)).clamp_min(0.0)

    first = torch.multinomial(weights, 1, generator=gen)
    centers = [xn[rows[:, None], first]]
    closest = distance(centers[0])
    per_step = 1 if k <= _EXACT_SEEDING_MAX_K else -(-(k - 1) // _SEEDING_STEPS)
    chosen = 1
    while chosen < k:
        m = min(per_step, k - chosen)
        prob = closest.square() * weights
        # All points coincide with a centre already (duplicates): fall back to the weights.
        prob = torch.where(prob.sum(1, keepdim=True) > 0, prob, weights)
        idx = torch.multinomial(prob, m, replacement=per_step > 1, generator=gen)
        c = xn[rows[:, None], idx]
        centers.append(c)
        closest = torch.minimum(closest, distance(c))
        chosen += m
    return torch.cat(centers, dim=1)


def spherical_kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 20,
    seed: int = 0,
    weights: torch.Tensor | None = None,
    assign_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Cluster the directions of ``x`` ``(batch, points, dim)`` into ``k`` groups per batch row.

    Points are L2-normalised (keys' norms vary a lot; their direction decides q.k rankings), seeded
    with k-means++ and refined by Lloyd steps on cosine similarity. ``weights`` ``(batch, points)``
    (e.g. cluster sizes when clustering centroids) weight both the seeding and the means; a point of
    weight 0 never seeds a cluster. Returns labels ``(batch, points)`` int64 in ``[0, k)``.
    Runs on ``x``'s device; the same seed gives the same labels.

    ``assign_dtype``: the dtype of the points-by-centres similarities of the Lloyd steps' assignments (the
    seeding and the means stay float32). Default: bfloat16 on CUDA, where the assignments were most of a corpus
    build and float32 has no tensor cores; float32 elsewhere.
    """
    if x.ndim != 3:
        raise ValueError(f"expected (batch, points, dim), got shape {tuple(x.shape)}")
    b, n, d = x.shape
    if not 1 <= k <= n:
        raise ValueError(f"need 1 <= k <= points, got k={k}, points={n}")
    xn = _normalise(x.float())
    w = torch.ones(b, n, device=x.device) if weights is None else weights.float().to(x.device)
    if (w.sum(1) <= 0).any():
        raise ValueError("every batch row needs a positive total weight")
    gen = torch.Generator(device=x.device).manual_seed(seed)
    centers = _kmeans_pp_init(xn, k, w, gen)
    if assign_dtype is None:
        assign_dtype = torch.bfloat16 if x.device.type == "cuda" else torch.float32
    xa = xn.to(assign_dtype)
    labels = _assign(xa, centers)
    for _ in range(iters):
        sums = torch.zeros(b, k, d, device=x.device).scatter_add_(
            1, labels.unsqueeze(-1).expand(b, n, d), xn * w.unsqueeze(-1)
        )
        mass = torch.zeros(b, k, device=x.device).scatter_add_(1, labels, w)
        # An emptied cluster keeps its previous centre rather than becoming NaN.
        centers = torch.where(mass.unsqueeze(-1) > 0, _normalise(sums), centers)
        new_labels = _assign(xa, centers)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels
