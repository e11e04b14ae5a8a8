"""Online reading of a squeezed corpus: centroid scores -> selected clusters -> sparse attention.

A :class:`ReadPlan` is fixed for one call (budget, mode, thresholds, backend); a :class:`CorpusRead`
carries it through the model's forward passes and gathers what was read (kept keys per layer,
attention mass per document for the sources).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from types import ModuleType

import torch

from sqz_kernels import reference
from sqz_kernels.reference import log_attention, pin_rows

from .config import check_budget
from .corpus import SqueezedCorpus, budget_keys


# Sources are measured on reads of at most this many tokens (decode steps and short questions):
# the extra q.K pass costs heads x tokens x corpus floats.
_MEASURE_MAX_TOKENS = 64
# A key counts for the sources when one head gives it at least this share of its attention.
_FOCUS = 0.05
def focused_attention(q: torch.Tensor, keys: torch.Tensor, dyn_k: torch.Tensor, scale: float,
                      keep: torch.Tensor | None = None, dyn_len: torch.Tensor | None = None):
    """:func:`log_attention` as probabilities, where a query head focuses: yields ``(t0, t1, p)``, ``p``
    zero below ``_FOCUS``."""
    for t0, t1, logp in log_attention(q, keys, dyn_k, scale, keep, dyn_len):
        p = torch.exp(logp)
        yield t0, t1, p * (p >= _FOCUS)


def copy_pins(layer, q: torch.Tensor, dyn_k: torch.Tensor, scale: float, focus: float, window: int,
              cap_keys: int | None = None, backend=reference) -> torch.Tensor:
    """``(KVH, C)`` bool: the clusters holding each corpus key that a query head of ``q`` gives at least
    ``focus`` of its attention, and the ``window`` keys after it in token order (``SqueezeConfig.copy_window``).
    Keys outside the clusters (the always-read header and window) need no pin. ``cap_keys``: per KV head,
    at most this many keys pinned, the clusters ranked by the attention share of the key that pinned them
    (a model whose heads all focus sharply would otherwise pin the whole corpus).

    Dense over the corpus keys (no ``nonzero``, so no host sync on a GPU); the q.K pass is the backend's
    ``key_max_logprob`` (the Triton one reads the keys twice instead of materialising every logit)."""
    kvh = layer.keys.shape[0]
    n_clusters = layer.cluster_offsets.shape[1] - 1
    n_clustered = layer.n_clustered  # known on the host
    neg = float("-inf")
    # per corpus key (stored order), the largest log share a query head of q gives it, where it is focused
    best = backend.key_max_logprob(q, layer.keys, dyn_k, scale)
    best = best.masked_fill(best < math.log(focus), neg)
    # in token order (every corpus token is stored once: key_pos is a permutation), each key takes the
    # largest share of the focused keys up to ``window`` tokens before it
    pos = layer.key_pos.long()
    by_pos = torch.full_like(best, neg).scatter_(1, pos, best)
    if window:
        by_pos = torch.nn.functional.max_pool1d(
            torch.nn.functional.pad(by_pos, (window, 0), value=neg).unsqueeze(1), window + 1, stride=1
        ).squeeze(1)
    share = by_pos.gather(1, pos[:, :n_clustered])  # the clustered stored keys, sorted by cluster
    cluster_of = torch.searchsorted(layer.cluster_offsets[:, 1:].contiguous(),
                                    torch.arange(n_clustered, device=q.device).expand(kvh, -1).contiguous(), right=True)
    # per cluster, the log of the largest share that pins it (-inf: not pinned)
    pin_share = torch.full((kvh, n_clusters), neg, device=q.device).scatter_reduce_(1, cluster_of, share, "amax")
    pinned = torch.isfinite(pin_share)
    if cap_keys is None:
        return pinned
    log_sizes = (layer.cluster_offsets[:, 1:] - layer.cluster_offsets[:, :-1]).float().log()
    return reference.select_clusters(pin_share[None], log_sizes, budget_keys=cap_keys)[0] & pinned


def kept_sums(keys_per_head: list[float], steps: list[int], layers) -> list[float]:
    """Per layer, the kept fraction summed over steps: the clustered keys read per (row, KV head) over the steps,
    plus the always-read keys at every step, over the layer's keys."""
    return [(k + s * layer.n_always) / layer.keys.shape[1] for k, s, layer in zip(keys_per_head, steps, layers)]


@dataclass(frozen=True)
class ReadPlan:
    """Everything about how one call reads a corpus, decided once before its first token.

    Pairs are ``(decode, prefill)``: a single generated token and a multi-token read (the question's
    tokens, read together) have their own thresholds and budgets.
    """

    kv_budget: float
    question_budget: float
    selection: str
    hierarchical: bool
    log_threshold: tuple[float, float] | None
    l1_log_threshold: tuple[float, float] | None
    budget_keys: tuple[int, int] | None
    backend: ModuleType
    # per kind, the (layer, KV head) pairs read in full (``(layers, kv_heads)`` bool) or None
    dense_heads: tuple[torch.Tensor | None, torch.Tensor | None] = (None, None)
    # per kind, the layers that have any such head (known on the host: no device sync per layer)
    dense_head_layers: tuple[frozenset, frozenset] = (frozenset(), frozenset())

    def reads_all(self, kind: int) -> bool:
        """Whether reads of this kind (0: decode, 1: multi-token) take the whole corpus."""
        return (self.kv_budget, self.question_budget)[kind] >= 1.0

    @property
    def fused(self) -> bool:
        """The backend's lookup also builds the work list (Triton). The torch twin's work list would
        be built only to be ignored by its attention, so the CPU path keeps the separate calls."""
        return self.backend is not reference

    @staticmethod
    def options(corpus: SqueezedCorpus, kv_budget=None, hierarchical=None, selection=None, question_budget=None):
        """A call's read options, checked, the corpus's configuration filling in those left None: -> (kv_budget,
        question_budget, hierarchical, selection). Cheap (no threshold): a lazy stream checks them at its call."""
        cfg = corpus.config
        kv_budget = cfg.kv_budget if kv_budget is None else check_budget(kv_budget)
        if question_budget is None:
            question_budget = kv_budget if cfg.question_budget is None else cfg.question_budget
        question_budget = check_budget(question_budget, "question_budget")
        hierarchical = cfg.hierarchical if hierarchical is None else bool(hierarchical)
        selection = cfg.selection if selection is None else selection
        if selection not in ("threshold", "fixed"):
            raise ValueError(f"selection must be 'threshold' or 'fixed', got {selection!r}")
        if hierarchical and not corpus.has_level1:
            raise ValueError(
                f"corpus {corpus.name!r} was built without level-1 centroids; rebuild it with "
                "SqueezeConfig(hierarchical=True) to use the hierarchical lookup"
            )
        return kv_budget, question_budget, hierarchical, selection

    @classmethod
    def make(
        cls,
        corpus: SqueezedCorpus,
        backend: ModuleType,
        kv_budget: float | None = None,
        hierarchical: bool | None = None,
        selection: str | None = None,
        question_budget: float | None = None,
    ) -> "ReadPlan":
        kv_budget, question_budget, hierarchical, selection = cls.options(
            corpus, kv_budget, hierarchical, selection, question_budget)
        cfg = corpus.config
        cal = corpus.calibration
        budgets = (kv_budget, question_budget)
        dense = tuple(corpus.retrieval_heads(b, cfg.retrieval_share) for b in budgets)
        return cls(
            kv_budget=kv_budget,
            question_budget=question_budget,
            selection=selection,
            hierarchical=hierarchical,
            # a read of the whole corpus (budget 1.0) looks nothing up: no threshold, no calibration needed
            log_threshold=(
                tuple(cal.log_threshold(b, bool(k), dense[k]) if b < 1.0 else float("-inf")
                      for k, b in enumerate(budgets))
                if selection == "threshold" else None
            ),
            # The level-1 threshold is always calibrated: in fixed mode it prunes the lookup the same way.
            l1_log_threshold=(
                tuple(cal.l1_log_threshold(b, cfg.l1_recall, bool(k), dense[k]) if b < 1.0 else float("-inf")
                      for k, b in enumerate(budgets))
                if hierarchical else None
            ),
            budget_keys=(
                tuple(budget_keys(corpus.n_tokens, corpus.n_always, cal.sparse_head_budget(b, dense[k]))
                      for k, b in enumerate(budgets))
                if selection == "fixed" else None
            ),
            backend=backend,
            dense_heads=tuple(None if d is None else d.to(corpus.layers[0].keys.device) for d in dense),
            dense_head_layers=tuple(
                frozenset() if d is None else frozenset(d.any(1).nonzero().flatten().tolist()) for d in dense
            ),
        )


class CorpusRead:
    """Passed to the model's forward as ``squeeze=...``: reads the corpus in every attention layer."""

    def __init__(self, corpus: SqueezedCorpus, plan: ReadPlan, track_sources: bool = True):
        self.corpus = corpus
        self.plan = plan
        self.track_sources = track_sources
        n_layers = len(corpus.layers)
        dev = corpus.layers[0].keys.device
        # Accounting in as few launches as possible: a decode step of a small model is bound by the host's
        # kernel launches. Per layer, the selected keys summed over steps and (batch row, KV head) rows;
        # divided by the rows per step and completed with the always-read keys when read out.
        self.selected_keys = torch.zeros(n_layers, dtype=torch.float64, device=dev)
        self._rows = [1] * n_layers
        self._counts: dict[int, torch.Tensor] = {}  # layer -> (KVH, C) float64 cluster sizes (0 when empty)
        self.steps = [0] * n_layers
        self._scored_host = 0.0  # centroids scored, known on the host (flat lookup)
        self._scored_dev = torch.zeros((), dtype=torch.float64, device=dev)  # and counted on the device (hierarchical)
        self.doc_mass = torch.zeros(len(corpus.documents), dtype=torch.float64, device=dev)
        self._all: dict[tuple[int, int], tuple] = {}  # (layer, batch) -> a read of every cluster (see _read_all)
        self.pins: dict[int, torch.Tensor] = {}  # layer -> (KVH, C) clusters every decode step reads (copy_window)
        # the answer's dynamic tokens when they live in preallocated buffers (CUDA-graph decode) instead of the
        # model's cache: attend() stores each forward's keys/values there (decode_graph.DynamicTokens)
        self.dyn = None
        self._cluster_of_key: dict[int, torch.Tensor] = {}  # layer -> (KVH, clustered keys), for the sources

    def lookup(self, layer_idx: int, q: torch.Tensor, scale: float):
        """Scores and selection ``(batch, kv_heads, clusters)`` for one layer's queries, and the work
        list of the selection when the backend builds one in the same launches (else ``None``). A read of
        every cluster (``kv_budget=1.0``, the dense layers) scores nothing: its scores are ``None``."""
        layer, plan, be = self.corpus.layers[layer_idx], self.plan, self.plan.backend
        kind = int(q.shape[2] > 1)  # 0: one token (decode), 1: several (a question's prefill)
        dense = plan.reads_all(kind) or layer_idx < self.corpus.config.dense_layers
        dense_heads = None
        if not dense and layer_idx in plan.dense_head_layers[kind]:
            dense_heads = plan.dense_heads[kind][layer_idx]
        if dense:  # no lookup at all: every cluster, and one work list for the whole call
            return (None, *self._read_all(layer_idx, q.shape[0]))
        pins = self._step_pins(layer_idx) if kind == 0 else None
        live = self._step_live() if kind == 0 else None
        if plan.fused and dense_heads is None and plan.selection == "threshold":
            # Triton: lookup + threshold (+ the pins) + work list in one entry point (2-3 launches instead of 5).
            n_keys = layer.keys.shape[1]
            if plan.hierarchical:
                return be.hierarchical_centroid_selection(
                    q, layer.l1_centroids, layer.l1_log_counts, layer.l1_offsets, layer.centroids,
                    layer.log_counts, scale, plan.l1_log_threshold[kind], layer.cluster_offsets,
                    plan.log_threshold[kind], n_keys, pins=pins, live=live,
                )
            return be.centroid_selection(
                q, layer.centroids, layer.log_counts, scale, layer.cluster_offsets, plan.log_threshold[kind], n_keys,
                pins=pins, live=live,
            )
        if plan.hierarchical:
            scores = be.hierarchical_centroid_scores(
                q, layer.l1_centroids, layer.l1_log_counts, layer.l1_offsets,
                layer.centroids, layer.log_counts, scale, plan.l1_log_threshold[kind],
            )
        else:
            scores = be.centroid_scores(q, layer.centroids, layer.log_counts, scale)
        if plan.selection == "threshold":
            selected = be.select_clusters(scores, layer.log_counts, log_threshold=plan.log_threshold[kind])
        else:
            # fixed mode holds its budget: pinned clusters rank first and are read inside it
            ranked = scores if pins is None else scores.masked_fill(pin_rows(pins), torch.finfo(scores.dtype).max)
            selected = be.select_clusters(ranked, layer.log_counts, budget_keys=plan.budget_keys[kind])
        if dense_heads is not None:
            # retrieval heads read every cluster (the Triton work list is then built by the attention)
            selected = selected | (dense_heads[None, :, None] & torch.isfinite(layer.log_counts)[None])
        if pins is not None and plan.selection == "threshold":
            selected = selected | pin_rows(pins)
        if live is not None:
            selected = selected & live[:, None, None]
        return scores, selected, None

    def _step_live(self) -> torch.Tensor | None:
        """Which rows of a single-token read read the corpus (bool ``(batch,)`` on the device), None: every row. A
        batch's graph step feeds its ended rows too (:class:`~sqz_integrations.batch.BatchRead`): they read nothing."""
        return None

    def _step_pins(self, layer_idx: int) -> torch.Tensor | None:
        """The clusters a single-token read of this layer must read whatever their scores: ``(KVH, C)`` for every
        batch row, or ``(batch, KVH, C)`` one set per row (:class:`~sqz_integrations.batch.BatchRead`)."""
        return self.pins.get(layer_idx)

    def _pin_question(self, layer_idx: int, layer, q: torch.Tensor, dyn_k: torch.Tensor, scale: float) -> None:
        """A multi-token read (the question) pins, for the decode steps after it, the clusters of the keys it
        focused on and of the keys that follow them; the bound is not a budget, it keeps the pins from turning a
        sparse read into a full one (SqueezeConfig.copy_cap)."""
        cfg = self.corpus.config
        cap = max(1, math.floor(cfg.copy_cap * self.plan.kv_budget * self.corpus.n_tokens))
        self._store_pins(layer_idx, copy_pins(layer, q, dyn_k, scale, cfg.copy_focus, cfg.copy_window, cap,
                                              self.plan.backend))

    def _store_pins(self, layer_idx: int, pins: torch.Tensor) -> None:
        """Keep a question read's pins ``(KVH, C)`` for the decode steps after it."""
        if layer_idx in self.pins:  # in place: a pooled decode graph reads this tensor (reset())
            self.pins[layer_idx].copy_(pins)
        else:
            self.pins[layer_idx] = pins

    def _read_all(self, layer_idx: int, batch: int):
        """``(selected, work list)`` of a read of every cluster, built once per call and layer (the work list
        only where the backend takes one)."""
        key = (layer_idx, batch)
        if key not in self._all:
            layer = self.corpus.layers[layer_idx]
            selected = torch.isfinite(layer.log_counts).unsqueeze(0).expand(batch, -1, -1)
            worklist = None
            if self.plan.fused:
                worklist = self.plan.backend.build_worklist(selected, layer.cluster_offsets, layer.keys.shape[1])
            self._all[key] = (selected, worklist)
        return self._all[key]

    def attend(self, layer_idx: int, q: torch.Tensor, dyn_k: torch.Tensor, dyn_v: torch.Tensor, scale: float):
        """Attention output ``(batch, tokens, heads, head_dim)`` as transformers expects it."""
        layer = self.corpus.layers[layer_idx]
        cfg = self.corpus.config
        dyn_len = None
        if self.dyn is not None:
            dyn_k, dyn_v, dyn_len = self.dyn.append(layer_idx, dyn_k, dyn_v)
        if cfg.copy_window and q.shape[2] > 1 and layer_idx >= cfg.dense_layers and not self.plan.reads_all(0):
            self._pin_question(layer_idx, layer, q, dyn_k, scale)
        scores, selected, worklist = self.lookup(layer_idx, q, scale)
        out = self.plan.backend.squeezed_attention(
            q, layer.keys, layer.values, layer.cluster_offsets, selected, dyn_k, dyn_v, scale, worklist=worklist,
            dyn_len=dyn_len,
        )
        self._record(layer_idx, layer, scores, selected)
        if self._measures(q.shape[2]):
            self._measure_sources(layer_idx, layer, q, dyn_k, selected, scale, dyn_len)
        return out.transpose(1, 2).contiguous()

    def reset(self) -> None:
        """Ready for another answer with the same plan. In place: a pooled CUDA graph of a decode step holds this
        read's tensors (the counters, the pins, the dynamic-token buffers) by address (decode_graph.GraphPool)."""
        n_layers = len(self.corpus.layers)
        self.selected_keys.zero_()
        self._scored_dev.zero_()
        self.doc_mass.zero_()
        self._rows = [1] * n_layers
        self.steps = [0] * n_layers
        self._scored_host = 0.0
        for pins in self.pins.values():  # the next question pins again; until then (and if it is one token) none
            pins.zero_()
        if self.dyn is not None:
            self.dyn.reset()

    def host_counters(self) -> tuple[list[int], float]:
        """The counters kept in Python (a CUDA-graph replay skips them; see decode_graph.GraphedStep)."""
        return list(self.steps), self._scored_host

    def set_host_counters(self, counters: tuple[list[int], float]) -> None:
        self.steps, self._scored_host = list(counters[0]), counters[1]

    def add_host_counters(self, delta: tuple[list[int], float]) -> None:
        self.steps = [s + d for s, d in zip(self.steps, delta[0])]
        self._scored_host += delta[1]

    def _measures(self, tokens: int) -> bool:
        """Whether a read of this many tokens measures the sources."""
        return self.track_sources and tokens <= _MEASURE_MAX_TOKENS

    def _measure_sources(self, layer_idx, layer, q, dyn_k, selected, scale, dyn_len=None) -> None:
        """Add, per document, the attention its keys received where a head focused on them.

        Recomputed in torch from the selection: one more q.K pass over the corpus, which the
        fused kernels do not expose. Only keys given at least ``_FOCUS`` of a head's attention
        count: the total mass (and its centroid estimate N_c * S_c) is dominated by broad heads and
        ranked documents by position, whatever the question (measured on 4 essays with a planted
        fact: the same document first for every question).
        """
        of_key = self._cluster_of_key.get(layer_idx)
        if of_key is None:
            of_key = self._cluster_of_key[layer_idx] = reference.cluster_of_key(layer.cluster_offsets, layer.n_clustered)
        keep = reference.cluster_key_mask(selected, layer.cluster_offsets, layer.keys.shape[1], key_clusters=of_key)
        mass = sum(p.sum(dim=(2, 3))
                   for *_, p in focused_attention(q, layer.keys, dyn_k, scale, keep, dyn_len))  # B, KVH, N
        # no boolean indexing (a host sync, which a CUDA graph cannot hold): keys outside the documents add 0 to
        # document 0
        self._add_mass(layer, (mass * (layer.key_doc >= 0)).double())

    def _add_mass(self, layer, mass: torch.Tensor) -> None:
        """Add ``mass`` ``(batch, KVH, N)``, the focused attention per corpus key, to the documents' totals."""
        self.doc_mass.index_add_(0, layer.key_doc.clamp_min(0).flatten(), mass.sum(0).flatten())

    def _cluster_sizes(self, layer_idx, layer) -> torch.Tensor:
        """``(KVH, C)`` float64 cluster sizes, exact (``exp(log_counts)`` is off by float32 rounding)."""
        counts = self._counts.get(layer_idx)
        if counts is None:
            counts = self._counts[layer_idx] = (layer.cluster_offsets[:, 1:] - layer.cluster_offsets[:, :-1]).double()
        return counts

    def _record(self, layer_idx, layer, scores, selected) -> None:
        counts = self._cluster_sizes(layer_idx, layer)
        self.selected_keys[layer_idx:layer_idx + 1].add_(torch.sum(selected * counts, dtype=torch.float64))
        self._rows[layer_idx] = selected.shape[0] * selected.shape[1]
        self.steps[layer_idx] += 1
        if scores is None:  # a read of everything scores no centroid
            return
        if self.plan.hierarchical:
            self._scored_dev += torch.isfinite(scores).sum() / scores.shape[0]
            self._scored_host += layer.l1_centroids.shape[0] * layer.l1_centroids.shape[1]
        else:
            self._scored_host += scores.shape[1] * scores.shape[2]

    def _kept_sums(self) -> list[float]:
        """Per layer, the kept fraction summed over steps (one device read)."""
        per_head = [k / r for k, r in zip(self.selected_keys.tolist(), self._rows)]
        return kept_sums(per_head, self.steps, self.corpus.layers)

    def kept_per_layer(self) -> list[float]:
        return [k / s if s else 0.0 for k, s in zip(self._kept_sums(), self.steps)]

    def kept_fraction(self) -> float:
        total = sum(self.steps)
        return sum(self._kept_sums()) / total if total else 0.0

    @property
    def centroids_scored(self) -> float:
        """Centroids scored, over the KV heads of a batch row, summed over layers and steps."""
        return self._scored_host + float(self._scored_dev)

    def commit(self) -> None:
        """Add this call's reads to the corpus's running statistics."""
        self.corpus.reads.add(self._kept_sums(), list(self.steps))


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
