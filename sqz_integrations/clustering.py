"""Batched spherical K-means: all KV heads of a layer at once, on CPU or CUDA, deterministic for a seed."""
from __future__ import annotations

import torch

# Assignment is done in slices of this many points so that the (points x clusters) similarity
# matrix stays small even for 512K-token corpora with thousands of clusters.
_ASSIGN_CHUNK = 16384


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True).clamp_min(1e-12)


def _assign(xn: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """Index of the most similar centre for every point: (B, N, D), (B, K, D) -> (B, N)."""
    labels = torch.empty(xn.shape[:2], dtype=torch.long, device=xn.device)
    for start in range(0, xn.shape[1], _ASSIGN_CHUNK):
        sim = torch.bmm(xn[:, start : start + _ASSIGN_CHUNK], centers.transpose(1, 2))
        labels[:, start : start + _ASSIGN_CHUNK] = sim.argmax(dim=-1)
    return labels


def _kmeans_pp_init(xn: torch.Tensor, k: int, weights: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """k-means++ seeding on the unit sphere (distance = 1 - cosine), batched over B."""
    b, n, _ = xn.shape
    rows = torch.arange(b, device=xn.device)
    # (B, 1, D) x (B, D, N): the same dot products as einsum("bnd,bd->bn"), bit for bit on CPU, but one
    # BLAS gemm with the points along the output instead of a matrix-vector product per row: 11x faster
    # per seeding step on CPU (3 x 4000 x 64: 0.057 against 0.64 ms), and seeding is k sequential steps
    xt = xn.transpose(1, 2).contiguous()

    def cosine(c: torch.Tensor) -> torch.Tensor:
        return torch.bmm(c.unsqueeze(1), xt).squeeze(1)

    first = torch.multinomial(weights, 1, generator=gen).squeeze(1)
    centers = [xn[rows, first]]
    closest = (1.0 - cosine(centers[0])).clamp_min(0.0)
    for _ in range(1, k):
        prob = closest.square() * weights
        # All points coincide with a centre already (duplicates): fall back to the weights.
        prob = torch.where(prob.sum(1, keepdim=True) > 0, prob, weights)
        idx = torch.multinomial(prob, 1, generator=gen).squeeze(1)
        c = xn[rows, idx]
        centers.append(c)
        closest = torch.minimum(closest, (1.0 - cosine(c)).clamp_min(0.0))
    return torch.stack(centers, dim=1)


def spherical_kmeans(
    x: torch.Tensor,
    k: int,
    iters: int = 20,
    seed: int = 0,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cluster the directions of ``x`` ``(batch, points, dim)`` into ``k`` groups per batch row.

    Points are L2-normalised (keys' norms vary a lot; their direction decides q.k rankings), seeded
    with k-means++ and refined by Lloyd steps on cosine similarity. ``weights`` ``(batch, points)``
    (e.g. cluster sizes when clustering centroids) weight both the seeding and the means; a point of
    weight 0 never seeds a cluster. Returns labels ``(batch, points)`` int64 in ``[0, k)``.
    Runs on ``x``'s device; the same seed gives the same labels.
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
    labels = _assign(xn, centers)
    for _ in range(iters):
        sums = torch.zeros(b, k, d, device=x.device).scatter_add_(
            1, labels.unsqueeze(-1).expand(b, n, d), xn * w.unsqueeze(-1)
        )
        mass = torch.zeros(b, k, device=x.device).scatter_add_(1, labels, w)
        # An emptied cluster keeps its previous centre rather than becoming NaN.
        centers = torch.where(mass.unsqueeze(-1) > 0, _normalise(sums), centers)
        new_labels = _assign(xn, centers)
        if torch.equal(new_labels, labels):
            break
        labels = new_labels
    return labels
