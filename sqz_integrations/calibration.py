"""One global threshold per corpus and budget, calibrated in log space on the observation window.

Every observation-window query scores every cluster of every layer and KV head the way a decode
step does (the lookup of ``sqz_kernels.reference.centroid_scores``, one token at a time). Weighting
each score by its cluster's size gives the distribution of per-key scores; the threshold for a
budget is the score above which that fraction of keys lies. Because the threshold is shared by all
layers and heads, heads whose attention is spread out keep more keys and peaked heads fewer.
All in log space: exp() of raw logits overflows on models with large activations.
"""
from __future__ import annotations

import math
import threading

import torch

from sqz_kernels import reference

# Upper bound on stored calibration scores (queries x layers x heads x clusters): beyond it fewer
# window queries are used. 2e7 float32 pairs is ~160 MB.
_MAX_SCORES = 20_000_000


# Weight of the probe question's reads against the observation window's. Measured (SmolLM2, three
# ~2K-token essay corpora x three questions, mean kept / budget at 0.5, 0.25, 0.125): window only
# 1.10-1.29; equal weight 1.19 / 1.25 / 1.19; 3:1 1.07 / 1.11 / 1.09; probe only 0.97 / 1.01 / 1.01.
# 9:1 keeps the window's reads in the mix while following the questions.
PROBE_SHARE = 9.0

# Window queries averaged together to stand for a multi-token read (a question's prefill).
PREFILL_GROUP = 16


class ScoreDistribution:
    """Cluster scores of calibration reads, weighted by cluster size: per-key scores, sorted."""

    def __init__(self, scores: torch.Tensor, weights: torch.Tensor, parent_scores: torch.Tensor | None):
        valid = torch.isfinite(scores) & (weights > 0)
        order = torch.argsort(scores[valid], descending=True)
        self.scores = scores[valid][order]
        self.weights = weights[valid][order]
        self.cum_weight = torch.cumsum(self.weights.double(), 0)
        self.parent = parent_scores[valid][order] if parent_scores is not None else None

    def cut(self, fraction: float) -> int:
        """How many sorted scores lie above the threshold that keeps ``fraction`` of the keys."""
        target = fraction * float(self.cum_weight[-1])
        return int(torch.searchsorted(self.cum_weight, torch.tensor([target], dtype=torch.float64)))

    def log_threshold(self, fraction: float) -> float:
        cut = self.cut(fraction)
        if cut >= len(self.scores):
            return float("-inf")
        if cut == 0:
            return float("inf")
        # halfway between the last kept and the first dropped score: robust to rounding
        return float(self.scores[cut - 1] + self.scores[cut]) / 2

    def l1_log_threshold(self, fraction: float, recall: float) -> float:
        if self.parent is None:
            raise ValueError("this corpus was built without level-1 centroids (hierarchical=False)")
        cut = self.cut(fraction)
        if cut == 0:
            return float("inf")
        parent = self.parent[:cut]
        order = torch.argsort(parent, descending=True)
        cum = torch.cumsum(self.weights[:cut].double()[order], 0)
        idx = int(torch.searchsorted(cum, torch.tensor([recall * float(cum[-1])], dtype=torch.float64)))
        return math.nextafter(float(parent[order][min(idx, cut - 1)]), -math.inf)

    def kept(self, fraction: float) -> float:
        cut = self.cut(fraction)
        return float(self.cum_weight[cut - 1]) / float(self.cum_weight[-1]) if cut else 0.0


def _scored(queries: list[torch.Tensor], layers, scale: float, share: float):
    """``queries``: per layer ``(reads, heads, tokens, head_dim)``; every read scores every cluster.

    Returns flat (scores, weights, level-1 parent scores or None); the weights (cluster sizes) are
    normalised so that this set of reads carries ``share`` of the total weight."""
    scores, weights, parents = [], [], []
    for q, layer in zip(queries, layers):
        s = reference.centroid_scores(q, layer.centroids, layer.log_counts, scale)  # reads, KVH, C
        scores.append(s.flatten().cpu())
        weights.append(torch.exp(layer.log_counts).expand_as(s).flatten().cpu() / q.shape[0])
        if layer.l1_centroids is not None:
            s1 = reference.centroid_scores(q, layer.l1_centroids, layer.l1_log_counts, scale)
            parent = reference.parent_index(layer.l1_offsets).unsqueeze(0).expand_as(s)
            parents.append(torch.gather(s1, 2, parent).flatten().cpu())
    return torch.cat(scores), torch.cat(weights) * share, torch.cat(parents) if parents else None


def _distribution(sets: list[tuple[list[torch.Tensor], float]], layers, scale: float) -> ScoreDistribution:
    parts = [_scored(q, layers, scale, share) for q, share in sets]
    parents = [p for _, _, p in parts]
    return ScoreDistribution(
        torch.cat([s for s, _, _ in parts]),
        torch.cat([w for _, w, _ in parts]),
        torch.cat(parents) if all(p is not None for p in parents) else None,
    )


class Calibration:
    """Per-key score distributions of a corpus; give the log thresholds for any KV budget.

    Two distributions, one per kind of read: ``decode`` (each window query alone, as a generated
    token reads) and ``prefill`` (groups of consecutive window queries averaged, as a question's
    tokens read together: averaged scores are flatter, so they need their own threshold).
    """

    def __init__(
        self,
        window_queries: list[torch.Tensor],
        layers,
        scale: float,
        n_tokens: int,
        probe_decode: list[torch.Tensor] | None = None,
        probe_prefill: list[torch.Tensor] | None = None,
        dense_layers: int = 0,
    ):
        """``window_queries``: per layer ``(W, heads, head_dim)``; ``layers``: the CorpusLayers.

        ``probe_decode`` (per layer ``(P, heads, head_dim)``) and ``probe_prefill`` (per layer
        ``(1, heads, tokens, head_dim)``): queries of a probe question answered over the corpus. Text
        tokens and question/answer tokens read differently (answer tokens spread their attention
        more), so when a probe is given it carries most of the calibration weight (``PROBE_SHARE``).
        """
        # The first ``dense_layers`` layers read everything: they are left out of the score
        # distribution and their keys are paid from the budget before the threshold is set.
        self.n_layers = len(layers)
        self.dense_layers = min(dense_layers, len(layers) - 1)
        layers = layers[self.dense_layers :]
        window_queries = window_queries[self.dense_layers :]
        probe_decode = probe_decode[self.dense_layers :] if probe_decode is not None else None
        probe_prefill = probe_prefill[self.dense_layers :] if probe_prefill is not None else None
        self.n_tokens = n_tokens
        self.n_always = layers[0].n_always
        self.n_clustered = layers[0].n_clustered
        self.scale = scale
        self._lock = threading.Lock()
        self._cache: dict[tuple, float] = {}
        per_query = max(1, sum(l.log_counts.numel() for l in layers))
        self.n_queries = max(1, min(window_queries[0].shape[0], _MAX_SCORES // per_query))
        recent = [q[-self.n_queries :] for q in window_queries]
        group = min(PREFILL_GROUP, self.n_queries)
        n_groups = self.n_queries // group
        grouped = [q[-n_groups * group :].view(n_groups, group, *q.shape[1:]).transpose(1, 2) for q in recent]
        decode_sets = [([q.unsqueeze(2) for q in recent], 1.0)]
        prefill_sets = [(grouped, 1.0)]
        if probe_decode is not None:
            decode_sets.append(([q.unsqueeze(2) for q in probe_decode], PROBE_SHARE))
        if probe_prefill is not None:
            prefill_sets.append((probe_prefill, PROBE_SHARE))
        self.decode = _distribution(decode_sets, layers, scale)
        self.prefill = _distribution(prefill_sets, layers, scale)

    def clustered_fraction(self, kv_budget: float) -> float:
        """Fraction of the clustered keys a budget leaves once the always-kept keys are paid for."""
        if self.n_clustered == 0:
            return 0.0
        per_layer = self.sparse_layer_budget(kv_budget)
        return min(1.0, max(0.0, (per_layer * self.n_tokens - self.n_always) / self.n_clustered))

    def sparse_layer_budget(self, kv_budget: float) -> float:
        """The budget of each sparse layer once the dense layers have read everything."""
        sparse = self.n_layers - self.dense_layers
        return max(0.0, (kv_budget * self.n_layers - self.dense_layers) / sparse)

    def _cached(self, key: tuple, compute) -> float:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = compute()
            return self._cache[key]

    def log_threshold(self, kv_budget: float, prefill: bool = False) -> float:
        """Log-score threshold at which the calibration reads keep the budget's share of keys."""
        dist = self.prefill if prefill else self.decode
        f = self.clustered_fraction(kv_budget)
        return self._cached(("flat", kv_budget, prefill), lambda: dist.log_threshold(f))

    def l1_log_threshold(self, kv_budget: float, recall: float, prefill: bool = False) -> float:
        """Level-1 threshold keeping the parents of ``recall`` of the keys the flat threshold keeps."""
        dist = self.prefill if prefill else self.decode
        f = self.clustered_fraction(kv_budget)
        return self._cached(("l1", kv_budget, recall, prefill), lambda: dist.l1_log_threshold(f, recall))

    def expected_kept_fraction(self, kv_budget: float) -> float:
        """The kept fraction the decode threshold gives on the calibration queries themselves."""
        kept = self.decode.kept(self.clustered_fraction(kv_budget))
        sparse = (kept * self.n_clustered + self.n_always) / self.n_tokens
        return (sparse * (self.n_layers - self.dense_layers) + self.dense_layers) / self.n_layers
