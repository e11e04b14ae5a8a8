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
    """Cluster scores of calibration reads, weighted by cluster size: per-key scores, sorted.

    ``heads`` names the (layer, KV head) of every score as ``layer * kv_heads + head``; a threshold
    can leave some heads out (those read in full), and is then set on the others alone.
    """

    def __init__(self, scores: torch.Tensor, weights: torch.Tensor, heads: torch.Tensor, parent_scores: torch.Tensor | None):
        # Sorted where the scores were computed and kept on the host: on the H200 sorting ~2e7 scores on the CPU
        # was seconds of a 128K-token build, and held on the GPU the sorted arrays would take ~0.4 GB per
        # distribution for the corpus's lifetime.
        valid = torch.isfinite(scores) & (weights > 0)
        order = torch.argsort(scores[valid], descending=True)
        self.scores = scores[valid][order].cpu()
        self.weights = weights[valid][order].double().cpu()
        self.heads = heads[valid][order].cpu()
        self.parent = parent_scores[valid][order].cpu() if parent_scores is not None else None

    @classmethod
    def from_sorted(cls, scores: torch.Tensor, weights: torch.Tensor, heads: torch.Tensor,
                    parent: torch.Tensor | None) -> "ScoreDistribution":
        """A distribution from the arrays of an earlier one (a saved corpus): already valid and sorted."""
        n = scores.shape[0]
        if any(t is not None and (t.ndim != 1 or t.shape[0] != n) for t in (weights, heads, parent)):
            raise ValueError("a score distribution needs 1-D scores, weights, heads (and parents) of one length")
        dist = cls.__new__(cls)
        dist.scores, dist.weights, dist.heads, dist.parent = scores, weights.double(), heads, parent
        return dist

    def _view(self, excluded: torch.Tensor | None):
        """(scores, weights, parents) without the ``excluded`` heads (a bool mask over head ids)."""
        if excluded is None or not bool(excluded.any()):
            return self.scores, self.weights, self.parent
        keep = ~excluded.flatten()[self.heads]
        return self.scores[keep], self.weights[keep], None if self.parent is None else self.parent[keep]

    @staticmethod
    def _cut(weights: torch.Tensor, fraction: float) -> int:
        """How many sorted scores lie above the threshold that keeps ``fraction`` of the keys."""
        cum = torch.cumsum(weights, 0)
        if not len(cum):
            return 0
        return int(torch.searchsorted(cum, torch.tensor([fraction * float(cum[-1])], dtype=torch.float64)))

    def log_threshold(self, fraction: float, excluded: torch.Tensor | None = None) -> float:
        scores, weights, _ = self._view(excluded)
        cut = self._cut(weights, fraction)
        if cut >= len(scores):
            return float("-inf")
        if cut == 0:
            return float("inf")
        # halfway between the last kept and the first dropped score: robust to rounding
        return float(scores[cut - 1] + scores[cut]) / 2

    def l1_log_threshold(self, fraction: float, recall: float, excluded: torch.Tensor | None = None) -> float:
        if self.parent is None:
            raise ValueError("this corpus was built without level-1 centroids (hierarchical=False)")
        _, weights, parent = self._view(excluded)
        cut = self._cut(weights, fraction)
        if cut == 0:
            return float("inf")
        parent = parent[:cut]
        order = torch.argsort(parent, descending=True)
        cum = torch.cumsum(weights[:cut][order], 0)
        idx = int(torch.searchsorted(cum, torch.tensor([recall * float(cum[-1])], dtype=torch.float64)))
        return math.nextafter(float(parent[order][min(idx, cut - 1)]), -math.inf)

    def kept(self, fraction: float, excluded: torch.Tensor | None = None) -> float:
        _, weights, _ = self._view(excluded)
        cut = self._cut(weights, fraction)
        return float(weights[:cut].sum()) / float(weights.sum()) if cut else 0.0


def _scored(queries: list[torch.Tensor], layers, scale: float, share: float, first_layer: int):
    """``queries``: per layer ``(reads, heads, tokens, head_dim)``; every read scores every cluster.

    Returns flat (scores, weights, head ids, level-1 parent scores or None); the weights (cluster
    sizes) are normalised so that this set of reads carries ``share`` of the total weight."""
    scores, weights, heads, parents = [], [], [], []
    for i, (q, layer) in enumerate(zip(queries, layers)):
        s = reference.centroid_scores(q, layer.centroids, layer.log_counts, scale)  # reads, KVH, C
        kvh = s.shape[1]
        scores.append(s.flatten())  # on the corpus's device until sorted (ScoreDistribution)
        weights.append(torch.exp(layer.log_counts).expand_as(s).flatten() / q.shape[0])
        head = torch.arange((first_layer + i) * kvh, (first_layer + i + 1) * kvh, dtype=torch.int32, device=s.device)
        heads.append(head[None, :, None].expand_as(s).flatten())
        if layer.l1_centroids is not None:
            s1 = reference.centroid_scores(q, layer.l1_centroids, layer.l1_log_counts, scale)
            parent = reference.parent_index(layer.l1_offsets).unsqueeze(0).expand_as(s)
            parents.append(torch.gather(s1, 2, parent).flatten())
    return torch.cat(scores), torch.cat(weights) * share, torch.cat(heads), torch.cat(parents) if parents else None


def _distribution(sets: list[tuple[list[torch.Tensor], float]], layers, scale: float, first_layer: int) -> ScoreDistribution:
    parts = [_scored(q, layers, scale, share, first_layer) for q, share in sets]
    parents = [p for *_, p in parts]
    return ScoreDistribution(
        torch.cat([p[0] for p in parts]),
        torch.cat([p[1] for p in parts]),
        torch.cat([p[2] for p in parts]),
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
        self.kv_heads = layers[0].keys.shape[0]
        self.n_always = layers[0].n_always
        self.n_clustered = layers[0].n_clustered
        self.scale = scale
        self._lock = threading.RLock()
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
        # Scored and sorted on first use: a build makes a Calibration before its probe question only to read
        # that question over the whole corpus, which needs no threshold (on the H200 at 128K tokens the
        # distributions' scoring and sorting took ~3 s per Calibration)
        self._sets = {"decode": decode_sets, "prefill": prefill_sets}
        self._layers = layers
        self._distributions: dict[str, ScoreDistribution] = {}

    # what, besides its two distributions, a saved calibration holds (storage.py)
    SCALARS = ("n_layers", "dense_layers", "n_tokens", "kv_heads", "n_always", "n_clustered", "scale", "n_queries")

    def scalars(self) -> dict:
        return {key: getattr(self, key) for key in self.SCALARS}

    @classmethod
    def from_state(cls, scalars: dict, distributions: dict[str, ScoreDistribution], layers) -> "Calibration":
        """A calibration rebuilt from its :meth:`scalars` and its two distributions (a saved corpus; ``layers``: the
        corpus's layers). No query is kept or scored again."""
        cal = cls.__new__(cls)
        for key in cls.SCALARS:
            setattr(cal, key, scalars[key])
        cal._lock = threading.RLock()
        cal._cache = {}
        cal._sets = {}
        cal._layers = layers[cal.dense_layers :]
        cal._distributions = {kind: distributions[kind] for kind in ("decode", "prefill")}
        return cal

    def _distribution_of(self, kind: str) -> ScoreDistribution:
        with self._lock:
            if kind not in self._distributions:
                self._distributions[kind] = _distribution(self._sets.pop(kind), self._layers, self.scale,
                                                          self.dense_layers)
            return self._distributions[kind]

    @property
    def decode(self) -> ScoreDistribution:
        """The score distribution of single-token reads (each window query alone)."""
        return self._distribution_of("decode")

    @property
    def prefill(self) -> ScoreDistribution:
        """The score distribution of multi-token reads (groups of window queries averaged)."""
        return self._distribution_of("prefill")

    def clustered_fraction(self, kv_budget: float, dense_heads: torch.Tensor | None = None) -> float:
        """Fraction of the clustered keys a budget leaves once the always-kept keys are paid for."""
        if self.n_clustered == 0:
            return 0.0
        per_head = self.sparse_head_budget(kv_budget, dense_heads)
        return min(1.0, max(0.0, (per_head * self.n_tokens - self.n_always) / self.n_clustered))

    def sparse_head_budget(self, kv_budget: float, dense_heads: torch.Tensor | None = None) -> float:
        """The budget of each sparsely read (layer, KV head) once the dense layers and the
        ``dense_heads`` (a bool mask ``(layers, kv_heads)``, outside the dense layers) have read everything."""
        n_dense = int(dense_heads.sum()) if dense_heads is not None else 0
        sparse = (self.n_layers - self.dense_layers) * self.kv_heads - n_dense
        if sparse <= 0:
            return 0.0
        return max(0.0, (kv_budget * self.n_layers * self.kv_heads - self.dense_layers * self.kv_heads - n_dense) / sparse)

    def _cached(self, key: tuple, compute) -> float:
        with self._lock:
            if key not in self._cache:
                self._cache[key] = compute()
            return self._cache[key]

    @staticmethod
    def _key(dense_heads: torch.Tensor | None) -> tuple:
        return () if dense_heads is None else tuple(dense_heads.flatten().nonzero().flatten().tolist())

    def log_threshold(self, kv_budget: float, prefill: bool = False, dense_heads: torch.Tensor | None = None) -> float:
        """Log-score threshold at which the calibration reads keep the budget's share of keys (over
        the heads not in ``dense_heads``, which are paid from the budget first)."""
        dist = self.prefill if prefill else self.decode
        f = self.clustered_fraction(kv_budget, dense_heads)
        return self._cached(
            ("flat", kv_budget, prefill, self._key(dense_heads)), lambda: dist.log_threshold(f, dense_heads)
        )

    def l1_log_threshold(
        self, kv_budget: float, recall: float, prefill: bool = False, dense_heads: torch.Tensor | None = None
    ) -> float:
        """Level-1 threshold keeping the parents of ``recall`` of the keys the flat threshold keeps."""
        dist = self.prefill if prefill else self.decode
        f = self.clustered_fraction(kv_budget, dense_heads)
        return self._cached(
            ("l1", kv_budget, recall, prefill, self._key(dense_heads)),
            lambda: dist.l1_log_threshold(f, recall, dense_heads),
        )

    def expected_kept_fraction(self, kv_budget: float, dense_heads: torch.Tensor | None = None) -> float:
        """The kept fraction the decode threshold gives on the calibration queries themselves
        (the dense layers and ``dense_heads`` read everything)."""
        kept = self.decode.kept(self.clustered_fraction(kv_budget, dense_heads), dense_heads)
        sparse = (kept * self.n_clustered + self.n_always) / self.n_tokens
        n_dense = int(dense_heads.sum()) if dense_heads is not None else 0
        heads = (self.n_layers - self.dense_layers) * self.kv_heads
        per_head = (sparse * (heads - n_dense) + n_dense) / heads
        return (per_head * (self.n_layers - self.dense_layers) + self.dense_layers) / self.n_layers
