"""Pure-torch twins of the Triton kernels: the CPU path, the test oracle and the benchmark baseline.

Layout convention, used by every function here and by the Triton launchers with the same names:

- queries ``q``: ``(batch, heads, tokens, head_dim)``; ``heads = kv_heads * group``. The query heads
  ``h = kvh * group + g`` share KV head ``kvh`` (grouped-query attention, as transformers repeats them).
- one squeezed corpus layer, shared by every row of the batch (it has no batch dimension):
  ``keys`` / ``values``: ``(kv_heads, n_keys, head_dim)``. Per KV head, keys ``[0, n_clustered)`` are
  sorted by cluster, so cluster ``c`` of head ``kvh`` is the contiguous range
  ``cluster_offsets[kvh, c] : cluster_offsets[kvh, c + 1]``; keys ``[n_clustered, n_keys)`` (the
  attention sinks and the observation window) are attended by every query, always.
  RoPE is already inside the keys, so their order does not change attention.
- ``centroids``: ``(kv_heads, clusters, head_dim)`` float32, the mean of the raw keys of each cluster;
  ``log_counts``: ``(kv_heads, clusters)`` float32, ``log(N_c)``, ``-inf`` for an empty cluster.
- dynamic keys/values (the user's question and the generated tokens): ``(batch, kv_heads, tokens, head_dim)``.

Scores, log-sum-exps and partial outputs are float32 whatever the input dtype.
"""
from __future__ import annotations

import math

import torch

NEG_INF = float("-inf")

# The centroid dtypes the lookup takes (both twins; the engine's SqueezeConfig.centroid_dtype names these): float32,
# the KV's 16-bit dtypes, and float8 e4m3 (a quarter of float32's bytes).
CENTROID_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float8_e4m3fn)


def _group_queries(q: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """(B, H, T, D) -> (B, KVH, G, T, D) float32, the query heads of one KV head together."""
    b, h, t, d = q.shape
    if h % kv_heads:
        raise ValueError(f"{h} query heads cannot be grouped over {kv_heads} KV heads")
    return q.float().view(b, kv_heads, h // kv_heads, t, d)


def _log_mean_over_queries(log_s: torch.Tensor) -> torch.Tensor:
    """(B, KVH, G, T, C) -> (B, KVH, C): log of the mean of S over the group's heads and the tokens."""
    b, kvh, g, t, c = log_s.shape
    flat = log_s.permute(0, 1, 4, 2, 3).reshape(b, kvh, c, g * t)
    return torch.logsumexp(flat, dim=-1) - math.log(g * t)


def centroid_scores(
    q: torch.Tensor, centroids: torch.Tensor, log_counts: torch.Tensor, scale: float
) -> torch.Tensor:
    """Flat centroid lookup.

    For every query and cluster c, ``S_c = exp(q.C_c * scale) / sum_j N_j exp(q.C_j * scale)`` is the
    softmax weight one key of cluster c would get. Returns ``log(mean S_c)`` over the group's query heads
    and the query tokens, shape ``(batch, kv_heads, clusters)`` float32; ``-inf`` for empty clusters.
    Everything stays in log space, so keys of any magnitude give finite scores.
    """
    qg = _group_queries(q, centroids.shape[0])
    b, kvh, g, t, d = qg.shape
    logits = torch.matmul(qg.reshape(b, kvh, g * t, d), centroids.float().transpose(-1, -2))
    logits = logits.view(b, kvh, g, t, -1) * scale
    weighted = logits + log_counts[None, :, None, None, :]
    log_s = logits - torch.logsumexp(weighted, dim=-1, keepdim=True)
    log_s = log_s.masked_fill(torch.isinf(log_counts)[None, :, None, None, :], NEG_INF)
    return _log_mean_over_queries(log_s)


# The twin computes similarities in slices of this many points: the (points x centres) matrix of a 512K-token corpus
# with 5% clusters would not fit otherwise.
_NEAREST_CHUNK = 16384


def nearest_center(points: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """K-means assignment: for every point of ``points`` ``(batch, n, d)`` the index of the centre of ``centers``
    ``(batch, k, d)`` with the largest dot product, ``(batch, n)`` int64 (the first one on a tie). The products
    are computed in ``points``' dtype (the centres are cast to it), each rounded to it before the comparison."""
    _check_nearest(points, centers)
    labels = torch.empty(points.shape[:2], dtype=torch.long, device=points.device)
    centers_t = centers.to(points.dtype).transpose(1, 2)
    for start in range(0, points.shape[1], _NEAREST_CHUNK):
        sim = torch.bmm(points[:, start : start + _NEAREST_CHUNK], centers_t)
        labels[:, start : start + _NEAREST_CHUNK] = sim.argmax(dim=-1)
    return labels


def _check_nearest(points: torch.Tensor, centers: torch.Tensor) -> None:
    if points.ndim != 3 or centers.ndim != 3 or points.shape[0] != centers.shape[0] or points.shape[2] != centers.shape[2]:
        raise ValueError(f"expected points (batch, n, d) and centers (batch, k, d), got {tuple(points.shape)} and "
                         f"{tuple(centers.shape)}")
    if centers.shape[1] == 0:
        raise ValueError("nearest_center needs at least one centre")


def parent_index(l1_offsets: torch.Tensor) -> torch.Tensor:
    """``(kv_heads, l1_clusters + 1)`` offsets -> ``(kv_heads, clusters)`` int64: the level-1 parent of every
    level-2 cluster (level-2 clusters are sorted by parent)."""
    return cluster_of_key(l1_offsets)


def hierarchical_centroid_scores(
    q: torch.Tensor,
    l1_centroids: torch.Tensor,
    l1_log_counts: torch.Tensor,
    l1_offsets: torch.Tensor,
    centroids: torch.Tensor,
    log_counts: torch.Tensor,
    scale: float,
    l1_log_threshold: float,
) -> torch.Tensor:
    """Two-level lookup that never scores the level-2 centroids of pruned level-1 clusters.

    ``l1_centroids``: ``(kv_heads, l1_clusters, head_dim)``; ``l1_log_counts``: log of the number of keys
    under each level-1 cluster; ``l1_offsets``: ``(kv_heads, l1_clusters + 1)`` int64, the level-2 clusters
    are sorted by parent so level-1 cluster ``p`` owns level-2 clusters ``l1_offsets[kvh, p] : l1_offsets[kvh, p+1]``.

    Level 1 is scored like :func:`centroid_scores`; the level-1 clusters whose score passes
    ``l1_log_threshold`` are expanded. Each expanded level-2 cluster gets
    ``S_c = exp(l_c) / (sum over scored level-2 j of N_j exp(l_j) + sum over pruned level-1 p of N_p exp(l_p))``:
    the denominator is exact over what was scored and estimated by the level-1 centroids elsewhere.
    Returns ``(batch, kv_heads, clusters)`` float32 log scores, ``-inf`` for clusters never scored.
    """
    kvh = l1_centroids.shape[0]
    n_l2 = centroids.shape[1]
    qg = _group_queries(q, kvh)  # B, KVH, G, T, D
    b, _, g, t, _ = qg.shape
    l1_logits = torch.einsum("bkgtd,kpd->bkgtp", qg, l1_centroids.float()) * scale
    l1_weighted = l1_logits + l1_log_counts[None, :, None, None, :]
    l1_log_s = l1_logits - torch.logsumexp(l1_weighted, dim=-1, keepdim=True)
    l1_log_s = l1_log_s.masked_fill(torch.isinf(l1_log_counts)[None, :, None, None, :], NEG_INF)
    l1_keep = _log_mean_over_queries(l1_log_s) >= l1_log_threshold  # B, KVH, P

    parent = parent_index(l1_offsets)  # KVH, C
    expand = torch.gather(l1_keep, 2, parent.unsqueeze(0).expand(b, kvh, n_l2))  # B, KVH, C
    expand &= ~torch.isinf(log_counts)[None]

    # Score only the expanded level-2 centroids: gather them, one dot product each.
    bi, ki, ci = expand.nonzero(as_tuple=True)
    logits = torch.full((b, kvh, g, t, n_l2), NEG_INF, device=q.device, dtype=torch.float32)
    if ci.numel():
        cent = centroids.float()[ki, ci]  # M, D
        dots = torch.einsum("mgtd,md->mgt", qg[bi, ki], cent) * scale
        logits[bi, ki, :, :, ci] = dots
    # denominator: scored level-2 clusters exactly + pruned level-1 clusters by their centroid
    den_l2 = torch.logsumexp(logits + log_counts[None, :, None, None, :], dim=-1)
    pruned = ~l1_keep
    den_l1 = torch.logsumexp(
        l1_weighted.masked_fill(~pruned[:, :, None, None, :], NEG_INF), dim=-1
    )
    den = torch.logaddexp(den_l2, den_l1)
    log_s = logits - den.unsqueeze(-1)
    out = _log_mean_over_queries(log_s)
    return out.masked_fill(~expand, NEG_INF)


def select_clusters(
    log_scores: torch.Tensor,
    log_counts: torch.Tensor,
    log_threshold: float | None = None,
    budget_keys: int | None = None,
) -> torch.Tensor:
    """Scores -> which clusters to load, ``(batch, kv_heads, clusters)`` bool.

    Threshold mode (``log_threshold``): every cluster whose score passes the calibrated global threshold.
    Fixed-budget mode (``budget_keys``): per (row, KV head), the best clusters in score order while
    their keys fit in ``budget_keys`` (the first cluster that does not fit is dropped, smaller later
    ones may still fit is not attempted: the cut is a prefix of the ranking).
    Exactly one of the two must be given. Empty and never-scored clusters are never selected.
    """
    if (log_threshold is None) == (budget_keys is None):
        raise ValueError("give exactly one of log_threshold and budget_keys")
    valid = ~torch.isinf(log_scores) & ~torch.isinf(log_counts)[None]
    if log_threshold is not None:
        return valid & (log_scores >= log_threshold)
    order = torch.sort(log_scores.masked_fill(~valid, NEG_INF), dim=-1, descending=True).indices
    counts = torch.exp(log_counts).expand_as(log_scores)
    sorted_counts = torch.gather(counts, 2, order) * torch.gather(valid, 2, order)
    fits = torch.cumsum(sorted_counts, dim=-1) <= budget_keys + 0.5
    selected = torch.zeros_like(valid)
    selected.scatter_(2, order, fits)
    return selected & valid


def build_worklist(
    selected: torch.Tensor, offsets: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected ranges -> ``(idx, cum)``: ``idx (batch, kv_heads, capacity)`` int32 whose first
    ``cum[..., -1]`` entries are the indices of the selected ranges, in order (range ``c`` of KV head ``h``
    is ``offsets[h, c] : offsets[h, c + 1]``); ``cum (batch, kv_heads, n)`` int32, the inclusive prefix of
    the selected range sizes. Entries of ``idx`` after ``cum[..., -1]`` are unspecified (here: 0)."""
    b, kvh, n = selected.shape
    sizes = (offsets[:, 1:] - offsets[:, :-1]).long()
    cum = torch.cumsum(selected.long() * sizes.unsqueeze(0), dim=-1).to(torch.int32)
    end = int(offsets[:, -1].max()) if n else 0
    idx = torch.zeros(b, kvh, max(capacity, 1), dtype=torch.int32, device=selected.device)
    if end:
        sel_keys = cluster_key_mask(selected, offsets, end)  # always-kept keys after offsets[h, -1] are True
        pos = torch.arange(end, device=selected.device)
        sel_keys &= pos < offsets[:, -1:].unsqueeze(0)
        order = torch.argsort((~sel_keys).to(torch.int8), dim=-1, stable=True)  # selected keys first, in order
        idx[..., :end] = order.to(torch.int32)
    return idx, cum


def check_pins(pins: torch.Tensor | None, batch: int, kv_heads: int, n_ranges: int) -> None:
    """``pins`` must be ``None`` or a bool tensor, ``(kv_heads, clusters)`` (one set for every batch row) or
    ``(batch, kv_heads, clusters)`` (one set per row). A ``(clusters,)`` one, or one set per row of another batch, is
    not taken: it would broadcast."""
    if pins is not None and (pins.shape not in ((kv_heads, n_ranges), (batch, kv_heads, n_ranges))
                             or pins.dtype != torch.bool):
        raise ValueError(f"pins must be a bool (kv_heads, clusters) = {(kv_heads, n_ranges)} or (batch, kv_heads, "
                         f"clusters) = {(batch, kv_heads, n_ranges)} tensor, got {pins.dtype} {tuple(pins.shape)}")


def check_live(live: torch.Tensor | None, batch: int, device: torch.device) -> None:
    """``live`` must be ``None`` or a bool ``(batch,)`` tensor on the queries' device."""
    if live is not None and (live.shape != (batch,) or live.dtype != torch.bool or live.device != device):
        raise ValueError(f"live must be a bool (batch,) = ({batch},) tensor on {device}, got {live.dtype} "
                         f"{tuple(live.shape)} on {live.device}")


def pin_rows(pins: torch.Tensor) -> torch.Tensor:
    """Checked ``pins`` as ``(rows, kv_heads, clusters)``: one set for every row is one row that broadcasts."""
    return pins[None] if pins.dim() == 2 else pins


def select_worklist(
    log_scores: torch.Tensor, log_counts: torch.Tensor, log_threshold: float, offsets: torch.Tensor, capacity: int,
    *, pins: torch.Tensor | None = None, live: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``select_clusters(..., log_threshold=...)`` (OR the non-empty ``pins``, bool ``(kv_heads, clusters)`` for every
    row or ``(batch, kv_heads, clusters)`` per row) and :func:`build_worklist` of it: ``(selected, (idx, cum))``.
    ``live`` (bool ``(batch,)``): a row that is not live selects nothing, pins included (an ended answer of a batch
    that a CUDA graph still feeds: its work list is empty, so its attention reads no corpus key)."""
    check_pins(pins, *log_scores.shape)
    check_live(live, log_scores.shape[0], log_scores.device)
    selected = select_clusters(log_scores, log_counts, log_threshold=log_threshold)
    if pins is not None:
        selected = selected | (pin_rows(pins) & ~torch.isinf(log_counts)[None])
    if live is not None:
        selected = selected & live[:, None, None]
    return selected, build_worklist(selected, offsets, capacity)


def _dead_rows_score_nothing(scores: torch.Tensor, live: torch.Tensor | None) -> torch.Tensor:
    """The selections' scores with every score of a row that is not live ``-inf`` (it scores no centroid)."""
    return scores if live is None else scores.masked_fill(~live[:, None, None], float("-inf"))


def centroid_selection(
    q: torch.Tensor, centroids: torch.Tensor, log_counts: torch.Tensor, scale: float,
    cluster_offsets: torch.Tensor, log_threshold: float, n_keys: int,
    *, pins: torch.Tensor | None = None, live: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """The flat lookup, its threshold selection and the work list in one call:
    ``(centroid_scores(...), select_clusters(..., log_threshold=...), build_worklist(selected, cluster_offsets,
    n_keys))``. ``pins`` (bool ``(kv_heads, clusters)``, or ``(batch, kv_heads, clusters)`` one set per row):
    clusters selected whatever their score (non-empty ones). ``live`` (bool ``(batch,)``): a row that is not live
    scores nothing (``-inf``) and selects nothing, pins included. The work list goes to
    ``squeezed_attention(..., worklist=...)``."""
    check_live(live, q.shape[0], q.device)
    scores = _dead_rows_score_nothing(centroid_scores(q, centroids, log_counts, scale), live)
    return (scores, *select_worklist(scores, log_counts, log_threshold, cluster_offsets, n_keys, pins=pins,
                                     live=live))


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
) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """:func:`centroid_selection` with the hierarchical lookup (``pins``, ``live``: the same; a pinned cluster under a
    pruned level-1 cluster is read too, its score stays ``-inf``)."""
    check_live(live, q.shape[0], q.device)
    scores = _dead_rows_score_nothing(hierarchical_centroid_scores(q, l1_centroids, l1_log_counts, l1_offsets,
                                                                   centroids, log_counts, scale, l1_log_threshold),
                                      live)
    return (scores, *select_worklist(scores, log_counts, log_threshold, cluster_offsets, n_keys, pins=pins,
                                     live=live))


# Largest logits slice (float32 elements) log_attention materialises at once: 2**26 is 256 MB.
MAX_LOGITS = 2**26


def log_attention(q: torch.Tensor, keys: torch.Tensor, dyn_k: torch.Tensor, scale: float,
                  keep: torch.Tensor | None = None, dyn_len: torch.Tensor | None = None):
    """Exact attention of ``q`` ``(B, H, T, D)`` on a corpus layer's ``keys`` ``(KVH, N, D)``: yields
    ``(t0, t1, logp)`` over slices of the query tokens, ``logp`` ``(B, KVH, G, t1 - t0, N)`` float32 the log
    probability of each corpus key (softmax over the corpus keys, only those in ``keep`` ``(B, KVH, N)`` if
    given, and the causal dynamic keys ``dyn_k``; ``dyn_len``: see :func:`causal_attention`).

    q.K runs in the keys' own dtype and the logits are cast after (no float32 copy of the keys), and a
    slice holds at most ``MAX_LOGITS`` logits (a 512K-token corpus would otherwise need gigabytes)."""
    check_dynamic_keys(q, keys, dyn_k)
    b, h, t, d = q.shape
    kvh, n, _ = keys.shape
    g, m = h // kvh, dyn_k.shape[2]
    qg = q.reshape(b, kvh, g, t, d).to(keys.dtype)
    keys_t = keys.transpose(-1, -2)[None]  # 1, KVH, D, N
    dropped = None if keep is None else ~keep[:, :, None, None, :]
    step = max(1, MAX_LOGITS // (b * h * (n + m)))
    for t0 in range(0, t, step):
        t1 = min(t, t0 + step)
        qs = qg[:, :, :, t0:t1]
        # the group's heads and tokens as the rows of one product per KV head: broadcasting the keys over the
        # group instead made torch copy them per head (4x slower on the CPU: SmolLM2, 6K keys, 18 tokens)
        s = torch.matmul(qs.reshape(b, kvh, g * (t1 - t0), d), keys_t).float().view(b, kvh, g, t1 - t0, n) * scale
        if dropped is not None:
            s = s.masked_fill(dropped, float("-inf"))
        sd = _dynamic_logits(qs, dyn_k, scale, t0, t, dyn_len)
        yield t0, t1, s - torch.logaddexp(torch.logsumexp(s, -1), torch.logsumexp(sd, -1)).unsqueeze(-1)


def check_dynamic_keys(q: torch.Tensor, keys: torch.Tensor, dyn_keys: torch.Tensor) -> None:
    """``dyn_keys`` must be ``(batch, kv_heads, m, head_dim)`` for ``q`` and the corpus ``keys``, ``m`` at least
    the query's tokens (the last ``T`` dynamic keys are the query tokens themselves)."""
    b, h, t, d = q.shape
    kvh = keys.shape[0]
    if keys.dim() != 3 or keys.shape[2] != d or h % kvh:
        raise ValueError(f"keys {tuple(keys.shape)} do not match q {tuple(q.shape)} (kv_heads, n, head_dim)")
    if dyn_keys.dim() != 4 or dyn_keys.shape[:2] != (b, kvh) or dyn_keys.shape[3] != d:
        raise ValueError(f"dyn_keys {tuple(dyn_keys.shape)} must be (batch, kv_heads, m, head_dim) = ({b}, {kvh}, m, {d})")
    if dyn_keys.shape[2] < t:
        raise ValueError(f"{dyn_keys.shape[2]} dynamic keys cannot hold {t} query tokens")


def _dynamic_logits(qs: torch.Tensor, dyn_k: torch.Tensor, scale: float, t0: int, t: int,
                    dyn_len: torch.Tensor | None = None) -> torch.Tensor:
    """Logits ``(B, KVH, G, T', M)`` float32 of the grouped query tokens ``qs`` = tokens ``t0 : t0 + T'`` of ``t``
    on the dynamic keys, causal (-inf on the keys after each token, and so on any slot past ``dyn_len``)."""
    m = dyn_k.shape[2]
    sd = torch.matmul(qs, dyn_k.to(qs.dtype).transpose(-1, -2).unsqueeze(2)).float() * scale
    return sd.masked_fill(~_causal_mask(m, t, t0, qs.shape[3], dyn_len, qs.device), float("-inf"))


def _causal_mask(m: int, t: int, t0: int, t1: int, dyn_len: torch.Tensor | None, device) -> torch.Tensor:
    """Which of ``m`` dynamic slots query tokens ``t0 : t0 + t1`` (of ``t``, the last ones of the valid slots)
    see: ``(T', M)`` bool, or ``(B, 1, 1, T', M)`` for a per-row ``dyn_len`` ``(B,)``."""
    valid = m if dyn_len is None else dyn_len
    if isinstance(valid, torch.Tensor) and valid.dim() == 1:
        valid = valid.view(-1, 1, 1, 1)
    pos = torch.arange(t0, t0 + t1, device=device) + (valid - t)  # (T',) or (B, 1, 1, T')
    return torch.arange(m, device=device) <= pos.unsqueeze(-1)


def dynamic_lse(q: torch.Tensor, dyn_keys: torch.Tensor, scale: float) -> torch.Tensor:
    """``(B, KVH, G, T)`` float32: each query's log-sum-exp over the dynamic keys it sees (causal)."""
    b, h, t, d = q.shape
    kvh = dyn_keys.shape[1]
    qg = q.reshape(b, kvh, h // kvh, t, d).to(dyn_keys.dtype)
    return torch.logsumexp(_dynamic_logits(qg, dyn_keys, scale, 0, t), dim=-1)


def key_max_logprob(q: torch.Tensor, keys: torch.Tensor, dyn_keys: torch.Tensor, scale: float) -> torch.Tensor:
    """Per KV head and corpus key, the largest log attention probability any query gives it: the max over the
    batch rows, the group's query heads and the tokens of :func:`log_attention`. ``(kv_heads, n_keys)`` float32.
    The engine's copy pins (``SqueezeConfig.copy_window``) are the keys where it reaches ``log(copy_focus)``."""
    kvh, n, _ = keys.shape
    best = torch.full((kvh, n), NEG_INF, device=q.device)
    for *_, logp in log_attention(q, keys, dyn_keys, scale):
        best = torch.maximum(best, logp.amax(dim=(0, 2, 3)))
    return best


def cluster_of_key(cluster_offsets: torch.Tensor, n_clustered: int | None = None) -> torch.Tensor:
    """``(kv_heads, n_clustered)`` int64: the cluster of every clustered key (stored sorted by cluster).
    ``n_clustered`` (``cluster_offsets[:, -1]``) given by a caller who knows it spares a device read."""
    kvh, c = cluster_offsets.shape[0], cluster_offsets.shape[1] - 1
    sizes = (cluster_offsets[:, 1:] - cluster_offsets[:, :-1]).long()  # KVH, C
    if n_clustered is None:
        n_clustered = int(cluster_offsets[0, -1])
    return torch.repeat_interleave(
        torch.arange(c, device=cluster_offsets.device).expand(kvh, c).reshape(-1), sizes.reshape(-1),
        output_size=kvh * n_clustered,
    ).view(kvh, n_clustered)


def cluster_key_mask(selected: torch.Tensor, cluster_offsets: torch.Tensor, n_keys: int,
                     *, key_clusters: torch.Tensor | None = None) -> torch.Tensor:
    """Selected clusters -> ``(batch, kv_heads, n_keys)`` bool over the corpus keys, always-kept keys True.
    ``key_clusters``: :func:`cluster_of_key`, when the caller keeps it (it depends on the layer only)."""
    b, kvh, c = selected.shape
    if key_clusters is None:
        key_clusters = cluster_of_key(cluster_offsets)
    n_clustered = key_clusters.shape[1]
    mask = torch.ones(b, kvh, n_keys, dtype=torch.bool, device=selected.device)
    mask[:, :, :n_clustered] = torch.gather(selected, 2, key_clusters.unsqueeze(0).expand(b, kvh, n_clustered))
    return mask


def _masked_attention(qg: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float):
    """qg (B,KVH,G,T,D) f32, k/v (B|1,KVH,M,D), mask broadcastable to (B,KVH,G,T,M) or ``None`` (every key)
    -> out, lse.

    Plain batched matmuls over (B, KVH, G*T, M): the group's query heads share each key (GQA)."""
    b, kvh, g, t, d = qg.shape
    s = torch.matmul(qg.reshape(b, kvh, g * t, d), k.float().transpose(-1, -2)) * scale
    s = s.view(b, kvh, g, t, -1)
    if mask is not None:
        s = s.masked_fill(~mask, NEG_INF)
    lse = torch.logsumexp(s, dim=-1)  # -inf where no key
    p = torch.exp(s - lse.masked_fill(torch.isinf(lse), 0.0).unsqueeze(-1))
    out = torch.matmul(p.view(b, kvh, g * t, -1), v.float()).view(b, kvh, g, t, d)
    return out, lse


def sparse_attention(
    q: torch.Tensor,
    keys: torch.Tensor,
    values: torch.Tensor,
    cluster_offsets: torch.Tensor,
    selected: torch.Tensor,
    scale: float,
    *,
    worklist: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention of ``q`` over the keys of the selected clusters plus the always-kept keys.

    ``cluster_offsets``: ``(kv_heads, clusters + 1)``; keys at and after ``cluster_offsets[:, -1]`` are
    always attended. ``selected``: ``(batch, kv_heads, clusters)`` bool, one selection for all tokens of
    a row. ``worklist`` (the Triton path's precomputed :func:`build_worklist`) is accepted and ignored. Returns ``out (batch, heads, tokens, head_dim)`` float32 (normalised within this part) and
    ``lse (batch, heads, tokens)`` float32; a query with no key at all gets ``out = 0``, ``lse = -inf``.
    """
    b, h, t, d = q.shape
    kvh, n, _ = keys.shape
    qg = _group_queries(q, kvh)
    mask = cluster_key_mask(selected, cluster_offsets, n)
    kept = mask.sum(-1)  # B, KVH
    if bool((kept == n).all()):  # every key: no mask at all (the same floats, fewer passes)
        out, lse = _masked_attention(qg, keys.unsqueeze(0), values.unsqueeze(0), None, scale)
    elif n < _GATHER_MIN_KEYS or int(kept.max()) > _GATHER_MAX_SHARE * n:
        out, lse = _masked_attention(qg, keys.unsqueeze(0), values.unsqueeze(0), mask[:, :, None, None, :], scale)
    else:
        out, lse = _gathered_attention(qg, keys, values, mask, scale)
    return out.reshape(b, h, t, d), lse.reshape(b, h, t)


# sparse_attention gathers the kept keys (per batch row and KV head) when a layer has at least _GATHER_MIN_KEYS keys
# and no row keeps more than _GATHER_MAX_SHARE of them; otherwise one masked pass over all keys costs less than the
# gathers. Measured on the CPU (one thread, SmolLM2's 3 KV heads of 64 dims, one decode query, random clusters of
# 20 keys, ms per call, median of 30; /tmp one-off, 2026-11-29):
#   keys kept     2K: gathered / masked   4K           8K           32K
#   0.30          0.89 / 0.65             1.08 / 1.16  1.48 / 2.49   4.34 / 12.96
#   0.45          1.10 / 0.90             1.11 / 1.13  1.89 / 2.30   6.21 / 11.06
#   0.60          0.99 / 0.63             1.24 / 1.12  2.67 / 2.28  13.36 / 11.57
_GATHER_MIN_KEYS = 4096
_GATHER_MAX_SHARE = 0.5


def _gathered_attention(qg: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, scale: float):
    """:func:`_masked_attention` over only the kept keys: qg (B,KVH,G,T,D) f32, keys/values (KVH,N,D), mask
    (B,KVH,N) bool -> out (B,KVH,G,T,D), lse (B,KVH,G,T). Reads the kept keys, not the whole corpus, as the
    kernel does: what makes the CPU path faster than full attention on a sparse selection."""
    b, kvh, g, t, d = qg.shape
    out = qg.new_zeros(b, kvh, g, t, d)
    lse = qg.new_full((b, kvh, g, t), NEG_INF)
    for bi in range(b):
        for hi in range(kvh):
            idx = mask[bi, hi].nonzero().squeeze(1)
            if idx.numel() == 0:
                continue
            o, l = _masked_attention(qg[bi:bi + 1, hi:hi + 1], keys[hi].index_select(0, idx)[None, None],
                                     values[hi].index_select(0, idx)[None, None], None, scale)
            out[bi, hi], lse[bi, hi] = o[0, 0], l[0, 0]
    return out, lse


def causal_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, scale: float,
    *, dyn_len: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense causal attention over the dynamic tokens, with its log-sum-exp.

    ``keys`` / ``values``: ``(batch, kv_heads, m, head_dim)``, ``m >= tokens``; the ``tokens`` queries are
    the last ``tokens`` positions of those ``m`` (query ``i`` sees keys ``0 .. m - tokens + i``).
    ``dyn_len``: a 0-d integer tensor, the number of valid keys when ``keys`` is a larger preallocated buffer
    (a CUDA-graph decode step reads its length on the device); the queries are then the last ``tokens`` of
    those, and the slots after them are never read. A ``(batch,)`` one gives each row its own count (a batch of
    answers whose questions differ in length). Returns ``out (batch, heads, tokens, head_dim)`` and
    ``lse (batch, heads, tokens)``, float32.
    """
    b, h, t, d = q.shape
    qg = _group_queries(q, keys.shape[1])
    out, lse = _masked_attention(qg, keys, values, _causal_mask(keys.shape[2], t, 0, t, dyn_len, q.device), scale)
    return out.reshape(b, h, t, d), lse.reshape(b, h, t)


def merge_attention(
    out_a: torch.Tensor, lse_a: torch.Tensor, out_b: torch.Tensor, lse_b: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact merge of two attention results over disjoint key sets (FlashAttention's block merge).

    ``out_*``: ``(batch, heads, tokens, head_dim)``, ``lse_*``: ``(batch, heads, tokens)``. A part with
    ``lse = -inf`` (no keys) contributes nothing.
    """
    lse = torch.logaddexp(lse_a, lse_b)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    w_a = torch.exp(lse_a - safe).unsqueeze(-1)
    w_b = torch.exp(lse_b - safe).unsqueeze(-1)
    return out_a * w_a + out_b * w_b, lse


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
) -> torch.Tensor:
    """The whole online attention: sparse corpus part merged with the dense causal dynamic part.

    Returns ``(batch, heads, tokens, head_dim)`` in ``q``'s dtype. ``worklist`` is accepted and ignored
    (see :func:`sparse_attention`); ``dyn_len``: see :func:`causal_attention`.
    """
    o_s, l_s = sparse_attention(q, keys, values, cluster_offsets, selected, scale)
    o_d, l_d = causal_attention(q, dyn_keys, dyn_values, scale, dyn_len=dyn_len)
    out, _ = merge_attention(o_s, l_s, o_d, l_d)
    return out.to(q.dtype)
