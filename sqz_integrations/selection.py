"""Online reading of a squeezed corpus: centroid scores -> selected clusters -> sparse attention.

A :class:`ReadPlan` is fixed for one call (budget, mode, thresholds, backend); a :class:`CorpusRead`
carries it through the model's forward passes and gathers what was read (kept keys per layer,
attention mass per document for the sources).
"""
from __future__ import annotations

from dataclasses import dataclass
from types import ModuleType

import torch

from .config import check_budget
from .corpus import SqueezedCorpus, budget_keys


@dataclass(frozen=True)
class ReadPlan:
    """Everything about how one call reads a corpus, decided once before its first token."""

    kv_budget: float
    selection: str
    hierarchical: bool
    # (decode, prefill): a single generated token and a multi-token read have their own thresholds
    log_threshold: tuple[float, float] | None
    l1_log_threshold: tuple[float, float] | None
    budget_keys: int | None
    backend: ModuleType

    @property
    def keep_all(self) -> bool:
        return self.kv_budget >= 1.0

    @classmethod
    def make(
        cls,
        corpus: SqueezedCorpus,
        backend: ModuleType,
        kv_budget: float | None = None,
        hierarchical: bool | None = None,
        selection: str | None = None,
    ) -> "ReadPlan":
        cfg = corpus.config
        kv_budget = cfg.kv_budget if kv_budget is None else check_budget(kv_budget)
        hierarchical = cfg.hierarchical if hierarchical is None else bool(hierarchical)
        selection = cfg.selection if selection is None else selection
        if selection not in ("threshold", "fixed"):
            raise ValueError(f"selection must be 'threshold' or 'fixed', got {selection!r}")
        if hierarchical and not corpus.has_level1:
            raise ValueError(
                f"corpus {corpus.name!r} was built without level-1 centroids; rebuild it with "
                "SqueezeConfig(hierarchical=True) to use the hierarchical lookup"
            )
        cal = corpus.calibration
        return cls(
            kv_budget=kv_budget,
            selection=selection,
            hierarchical=hierarchical,
            log_threshold=(
                (cal.log_threshold(kv_budget), cal.log_threshold(kv_budget, prefill=True))
                if selection == "threshold" else None
            ),
            # The level-1 threshold is always calibrated: in fixed mode it prunes the lookup the same way.
            l1_log_threshold=(
                (cal.l1_log_threshold(kv_budget, cfg.l1_recall), cal.l1_log_threshold(kv_budget, cfg.l1_recall, prefill=True))
                if hierarchical else None
            ),
            budget_keys=(
                budget_keys(corpus.n_tokens, corpus.n_always, cal.sparse_layer_budget(kv_budget))
                if selection == "fixed" else None
            ),
            backend=backend,
        )


class CorpusRead:
    """Passed to the model's forward as ``squeeze=...``: reads the corpus in every attention layer."""

    def __init__(self, corpus: SqueezedCorpus, plan: ReadPlan, track_sources: bool = True):
        self.corpus = corpus
        self.plan = plan
        self.track_sources = track_sources
        n_layers = len(corpus.layers)
        dev = corpus.layers[0].keys.device
        self.kept = torch.zeros(n_layers, dtype=torch.float64, device=dev)
        self.steps = [0] * n_layers
        self.centroids_scored = torch.zeros((), dtype=torch.float64, device=dev)
        self.doc_mass = torch.zeros(len(corpus.documents), dtype=torch.float64, device=dev)

    def lookup(self, layer_idx: int, q: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Scores and selection ``(batch, kv_heads, clusters)`` for one layer's queries."""
        layer, plan, be = self.corpus.layers[layer_idx], self.plan, self.plan.backend
        kind = int(q.shape[2] > 1)  # 0: one token (decode), 1: several (a question's prefill)
        if plan.hierarchical:
            scores = be.hierarchical_centroid_scores(
                q, layer.l1_centroids, layer.l1_log_counts, layer.l1_offsets,
                layer.centroids, layer.log_counts, scale, plan.l1_log_threshold[kind],
            )
        else:
            scores = be.centroid_scores(q, layer.centroids, layer.log_counts, scale)
        if plan.keep_all or layer_idx < self.corpus.config.dense_layers:
            selected = torch.isfinite(layer.log_counts).unsqueeze(0).expand_as(scores)
        elif plan.selection == "threshold":
            selected = be.select_clusters(scores, layer.log_counts, log_threshold=plan.log_threshold[kind])
        else:
            selected = be.select_clusters(scores, layer.log_counts, budget_keys=plan.budget_keys)
        return scores, selected

    def attend(self, layer_idx: int, q: torch.Tensor, dyn_k: torch.Tensor, dyn_v: torch.Tensor, scale: float):
        """Attention output ``(batch, tokens, heads, head_dim)`` as transformers expects it."""
        layer = self.corpus.layers[layer_idx]
        scores, selected = self.lookup(layer_idx, q, scale)
        out = self.plan.backend.squeezed_attention(
            q, layer.keys, layer.values, layer.cluster_offsets, selected, dyn_k, dyn_v, scale
        )
        self._record(layer_idx, layer, scores, selected)
        return out.transpose(1, 2).contiguous()

    def _record(self, layer_idx, layer, scores, selected) -> None:
        counts = torch.exp(layer.log_counts)  # KVH, C
        kept = (selected * counts).sum(-1) + layer.n_always  # B, KVH
        self.kept[layer_idx] += (kept / layer.keys.shape[1]).mean()
        self.steps[layer_idx] += 1
        if self.plan.hierarchical:
            self.centroids_scored += torch.isfinite(scores).sum() / scores.shape[0] + layer.l1_centroids.shape[0] * layer.l1_centroids.shape[1]
        else:
            self.centroids_scored += scores.shape[1] * scores.shape[2]
        if self.track_sources:
            # Estimated attention mass per cluster: N_c * S_c (the centroid's estimate of the mass
            # its keys receive), over the clusters actually read, shared out by document.
            mass = torch.exp(scores + layer.log_counts).nan_to_num(0.0) * selected
            self.doc_mass += torch.einsum("bkc,kcd->d", mass, layer.cluster_doc_share).double()

    def kept_per_layer(self) -> list[float]:
        kept = self.kept.tolist()
        return [k / s if s else 0.0 for k, s in zip(kept, self.steps)]

    def kept_fraction(self) -> float:
        total = sum(self.steps)
        return float(self.kept.sum()) / total if total else 0.0

    def commit(self) -> None:
        """Add this call's reads to the corpus's running statistics."""
        self.corpus.reads.add(self.kept.tolist(), list(self.steps))


class QueryRecorder(CorpusRead):
    """A read that also keeps every layer's queries (for calibrating on a probe question)."""

    def __init__(self, corpus: SqueezedCorpus, plan: ReadPlan, track_sources: bool = False):
        super().__init__(corpus, plan, track_sources)
        self.queries: list[list[torch.Tensor]] = [[] for _ in corpus.layers]

    def attend(self, layer_idx, q, dyn_k, dyn_v, scale):
        self.queries[layer_idx].append(q[0].float())  # heads, tokens, head_dim
        return super().attend(layer_idx, q, dyn_k, dyn_v, scale)

    def prefill_queries(self) -> list[torch.Tensor]:
        """Per layer ``(1, heads, tokens, head_dim)``: the question's tokens, read together."""
        return [steps[0].unsqueeze(0) for steps in self.queries]

    def decode_queries(self) -> list[torch.Tensor]:
        """Per layer ``(steps, heads, head_dim)``: one query per generated token."""
        return [torch.cat([q.transpose(0, 1) for q in steps[1:]] or [steps[0][:, -1:].transpose(0, 1)]) for steps in self.queries]
