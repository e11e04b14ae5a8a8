"""A squeezed corpus: its read-only KV sorted by cluster, centroids, counts, calibration and stats.

Layout (per layer; see ``kernels/reference.py``): ``keys``/``values`` ``(kv_heads, n_tokens, head_dim)``
hold, per KV head, the clustered keys sorted by cluster (cluster ``c`` is the range
``cluster_offsets[h, c]:cluster_offsets[h, c+1]``) followed by the always-kept keys: the template
header before the corpus (attention sinks) and the last ``observation_window`` tokens.
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from .calibration import Calibration
from .clustering import spherical_kmeans
from .config import SqueezeConfig
from .prompting import CorpusDocument


@dataclass
class CorpusLayer:
    """One layer of a squeezed corpus. Never written after it is built."""

    keys: torch.Tensor  # (KVH, N, D) model dtype, clustered part sorted by cluster, then always-kept
    values: torch.Tensor  # (KVH, N, D)
    cluster_offsets: torch.Tensor  # (KVH, C + 1) int64; [:, -1] == number of clustered keys
    centroids: torch.Tensor  # (KVH, C, D) centroid_storage(config.centroid_dtype), mean of the raw keys of each cluster
    log_counts: torch.Tensor  # (KVH, C) float32, log N_c, -inf when empty
    key_doc: torch.Tensor  # (KVH, N) int64, the document of every stored key, -1 for template tokens
    key_pos: torch.Tensor  # (KVH, N) int32, the token position of every stored key
    l1_centroids: torch.Tensor | None = None  # (KVH, C1, D) centroid_storage(config.centroid_dtype)
    l1_log_counts: torch.Tensor | None = None  # (KVH, C1)
    l1_offsets: torch.Tensor | None = None  # (KVH, C1 + 1) int64 into the level-2 clusters

    @property
    def n_clustered(self) -> int:
        return self.keys.shape[1] - self.n_always

    n_always: int = 0

    def tensors(self) -> dict[str, torch.Tensor]:
        return {k: v for k, v in vars(self).items() if isinstance(v, torch.Tensor)}


@dataclass
class ReadCounter:
    """Running totals of what questions read from a corpus (thread-safe)."""

    n_layers: int
    kept: list[float] = field(default_factory=list)
    reads: list[int] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.kept = [0.0] * self.n_layers
        self.reads = [0] * self.n_layers

    def add(self, kept_per_layer: list[float], reads_per_layer: list[int]) -> None:
        with self.lock:
            for i, (k, r) in enumerate(zip(kept_per_layer, reads_per_layer)):
                self.kept[i] += k
                self.reads[i] += r


class SqueezedCorpus:
    """A corpus prefilled, clustered and calibrated once; every question reads it, none changes it."""

    def __init__(
        self,
        name: str,
        documents: list[CorpusDocument],
        token_ids: list[int],
        doc_spans: list[tuple[int, int]],
        header_text: str,
        layers: list[CorpusLayer],
        calibration: Calibration,
        config: SqueezeConfig,
        build_seconds: float,
    ):
        self.name = name
        self.documents = documents
        self.token_ids = token_ids
        self.doc_spans = doc_spans
        self.header_text = header_text
        self.layers = layers
        self.calibration = calibration
        self.config = config
        self.build_seconds = build_seconds
        self.reads = ReadCounter(len(layers))
        self.source_baseline: torch.Tensor | None = None  # per-document focused mass of the probe
        # (layers, kv_heads): focused attention the centroid selection dropped on the head probe
        self.head_misses: torch.Tensor | None = None

    def retrieval_heads(self, kv_budget: float, share: float) -> torch.Tensor | None:
        """The heads read in full at this budget: ``(layers, kv_heads)`` bool, or ``None``.

        As many of the heads that missed most on the head probe (``head_misses``, only those that
        missed something; never the dense layers) as ``share`` of the budget pays for in full.
        """
        if self.head_misses is None or share <= 0 or kv_budget >= 1.0:
            return None
        misses = self.head_misses.clone()
        misses[: self.config.dense_layers] = 0.0
        n = min(int(share * kv_budget * misses.numel()), int((misses > 0).sum()))
        if n <= 0:
            return None
        mask = torch.zeros(misses.numel(), dtype=torch.bool)
        mask[torch.topk(misses.flatten(), n).indices] = True
        return mask.view_as(misses)

    def source_prior(self) -> torch.Tensor:
        """What a generic question gives each document: the probe's share, floored at a tenth of
        the document's share of tokens (a document the probe ignored must not divide by zero)."""
        sizes = torch.tensor([float(b - a) for a, b in self.doc_spans], dtype=torch.float64)
        floor = 0.1 * sizes / sizes.sum()
        if self.source_baseline is None or float(self.source_baseline.sum()) <= 0:
            return sizes / sizes.sum()
        return torch.maximum(self.source_baseline / self.source_baseline.sum(), floor)

    @property
    def n_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def n_always(self) -> int:
        return self.layers[0].n_always

    @property
    def n_clusters(self) -> int:
        return self.layers[0].centroids.shape[1]

    @property
    def has_level1(self) -> bool:
        return self.layers[0].l1_centroids is not None

    def stats(self) -> dict:
        """Sizes, build time and the kept fraction measured over every question asked so far."""
        with self.reads.lock:
            kept, reads = list(self.reads.kept), list(self.reads.reads)
        per_layer = [k / r if r else None for k, r in zip(kept, reads)]
        measured = sum(kept) / sum(reads) if sum(reads) else None
        first = self.layers[0]
        return {
            "name": self.name,
            "documents": len(self.documents),
            "tokens": self.n_tokens,
            "clusters": self.n_clusters,
            "level1_clusters": None if first.l1_centroids is None else first.l1_centroids.shape[1],
            "always_kept_tokens": self.n_always,
            "layers": len(self.layers),
            "kv_heads": first.keys.shape[0],
            "kv_bytes": sum(l.keys.numel() * l.keys.element_size() * 2 for l in self.layers),
            "kv_budget": self.config.kv_budget,
            "kept_fraction": measured,
            "kept_fraction_per_layer": per_layer,
            "questions_read": reads[0],
            "calibration_kept_fraction": self.calibration.expected_kept_fraction(
                self.config.kv_budget, self.retrieval_heads(self.config.kv_budget, self.config.retrieval_share)
            ),
            "build_seconds": self.build_seconds,
        }

    def fingerprint(self) -> dict[str, torch.Tensor]:
        """Every tensor of the corpus by name (for checks that questions never change it)."""
        return {f"{i}.{k}": v for i, layer in enumerate(self.layers) for k, v in layer.tensors().items()}


def _sorted_layout(labels: torch.Tensor, parent: torch.Tensor, n_clusters: int):
    """Order level-2 clusters by level-1 parent, then keys by cluster.

    labels (KVH, Nc), parent (KVH, C) -> (cluster permutation new->old, key order, new labels).
    """
    kvh, c = parent.shape
    cluster_rank = parent * c + torch.arange(c, device=parent.device)
    perm = torch.argsort(cluster_rank, dim=1, stable=True)  # new index -> old cluster id
    inverse = torch.argsort(perm, dim=1)  # old cluster id -> new index
    new_labels = torch.gather(inverse, 1, labels)
    key_order = torch.argsort(new_labels, dim=1, stable=True)
    return perm, key_order, new_labels


def squeeze_layer(
    keys: torch.Tensor,
    values: torch.Tensor,
    clustered: torch.Tensor,
    always: torch.Tensor,
    token_doc: torch.Tensor,
    config: SqueezeConfig,
    seed: int,
) -> CorpusLayer:
    """Cluster one layer's corpus keys and lay them out sorted by cluster.

    keys/values (KVH, N, D) in token order; ``clustered``/``always``: token indices (1-D int64);
    ``token_doc``: the document of every token (-1 for template tokens).
    """
    kvh, _, d = keys.shape
    dev = keys.device
    k_c = keys[:, clustered].float()
    n_c = k_c.shape[1]
    n_clusters = max(1, min(n_c, round(config.cluster_fraction * n_c)))
    labels = spherical_kmeans(k_c, n_clusters, config.kmeans_iters, seed)
    counts = torch.zeros(kvh, n_clusters, device=dev).scatter_add_(1, labels, torch.ones_like(labels, dtype=torch.float))
    sums = torch.zeros(kvh, n_clusters, d, device=dev).scatter_add_(1, labels.unsqueeze(-1).expand(-1, -1, d), k_c)
    centroids = sums / counts.clamp_min(1.0).unsqueeze(-1)  # empty clusters: 0, never NaN

    if config.hierarchical:
        n_l1 = max(1, min(n_clusters, round(config.l1_cluster_fraction * n_c)))
        parent = spherical_kmeans(centroids, n_l1, config.kmeans_iters, seed + 1, weights=counts)
    else:
        n_l1, parent = 1, torch.zeros(kvh, n_clusters, dtype=torch.long, device=dev)

    perm, key_order, new_labels = _sorted_layout(labels, parent, n_clusters)
    counts = torch.gather(counts, 1, perm)
    centroids = torch.gather(centroids, 1, perm.unsqueeze(-1).expand(-1, -1, d))
    offsets = torch.zeros(kvh, n_clusters + 1, dtype=torch.long, device=dev)
    offsets[:, 1:] = torch.cumsum(counts, 1).long()

    src = torch.cat([clustered.unsqueeze(0).expand(kvh, -1).gather(1, key_order), always.unsqueeze(0).expand(kvh, -1)], 1)
    idx = src.unsqueeze(-1).expand(-1, -1, d)
    layer_keys = torch.gather(keys, 1, idx).contiguous()
    layer_values = torch.gather(values, 1, idx).contiguous()

    layer = CorpusLayer(
        keys=layer_keys,
        values=layer_values,
        cluster_offsets=offsets,
        centroids=centroids.contiguous(),
        log_counts=torch.log(counts),  # log 0 = -inf marks an empty cluster
        key_doc=token_doc.to(dev)[src],
        key_pos=src.to(torch.int32).contiguous(),
        n_always=int(always.numel()),
    )
    if config.hierarchical:
        parent_sorted = torch.gather(parent, 1, perm)
        l1_counts = torch.zeros(kvh, n_l1, device=dev).scatter_add_(1, parent_sorted, counts)
        l1_sums = torch.zeros(kvh, n_l1, d, device=dev).scatter_add_(
            1, parent_sorted.unsqueeze(-1).expand(-1, -1, d), centroids * counts.unsqueeze(-1)
        )
        l1_sizes = torch.zeros(kvh, n_l1, dtype=torch.long, device=dev).scatter_add_(
            1, parent_sorted, torch.ones_like(parent_sorted)
        )
        layer.l1_centroids = (l1_sums / l1_counts.clamp_min(1.0).unsqueeze(-1)).contiguous()
        layer.l1_log_counts = torch.log(l1_counts)
        layer.l1_offsets = torch.zeros(kvh, n_l1 + 1, dtype=torch.long, device=dev)
        layer.l1_offsets[:, 1:] = torch.cumsum(l1_sizes, 1)
    # stored (and so calibrated and read) in the configured dtype; both levels are computed in float32 first
    stored = centroid_storage(config.centroid_dtype, keys)
    layer.centroids = layer.centroids.to(stored)
    if layer.l1_centroids is not None:
        layer.l1_centroids = layer.l1_centroids.to(stored)
    return layer


def centroid_storage(centroid_dtype: str, keys: torch.Tensor) -> torch.dtype:
    """``SqueezeConfig.centroid_dtype`` for a layer's keys: ``"auto"`` is the KV dtype for 16-bit keys on CUDA
    (the Triton lookup's 16-bit dot, half the bytes of float32) and float32 otherwise (the torch lookup
    computes in float32 anyway)."""
    if centroid_dtype != "auto":
        return getattr(torch, centroid_dtype)
    return keys.dtype if keys.is_cuda and keys.dtype in (torch.bfloat16, torch.float16) else torch.float32


def split_tokens(n_tokens: int, n_header: int, window: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Token indices -> (clustered, always kept). Always kept: the header and the last ``window``
    tokens; the window shrinks on tiny corpora so that at least one token is clustered."""
    if n_tokens <= n_header:
        raise ValueError("the corpus has no text tokens")
    window = min(window, n_tokens - n_header - 1)
    clustered = torch.arange(n_header, n_tokens - window)
    always = torch.cat([torch.arange(0, n_header), torch.arange(n_tokens - window, n_tokens)])
    return clustered, always


def budget_keys(n_tokens: int, n_always: int, kv_budget: float) -> int:
    """Keys a fixed budget leaves for the clustered part of one KV head."""
    return max(0, math.floor(kv_budget * n_tokens) - n_always)
