"""One frozen configuration, validated once and handed down to every part of the engine."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from sqz_kernels import BACKENDS, reference

SELECTIONS = ("threshold", "fixed")
# the names of the kernels' own lists (sqz_kernels and its torch reference import no Triton)
CENTROID_DTYPES = ("auto", *(str(dt).removeprefix("torch.") for dt in reference.CENTROID_DTYPES))


def check_budget(kv_budget: float, name: str = "kv_budget") -> float:
    """A KV budget is the fraction of corpus keys a query attends to: in (0, 1]."""
    if isinstance(kv_budget, bool) or not isinstance(kv_budget, (int, float)):
        raise TypeError(f"{name} must be a number in (0, 1], got {kv_budget!r}")
    if not 0.0 < float(kv_budget) <= 1.0:
        raise ValueError(f"{name} must be in (0, 1], got {kv_budget}")
    return float(kv_budget)


@dataclass(frozen=True)
class SqueezeConfig:
    """How a corpus is squeezed and read.

    kv_budget: fraction of the corpus's keys a query attends to (the sinks and the observation window
        included, the centroid reads not); ``1.0`` is exact full-KV reuse. Can be overridden per call.
    question_budget: the budget of multi-token reads (the question's or chat turn's tokens, read
        together before the first generated token); ``None`` takes ``kv_budget`` (the paper's
        reading). The default ``1.0`` reads the whole corpus KV once per question (exact question
        states, no corpus recompute: the KV is held in full anyway) and then decodes at ``kv_budget``:
        the question's tokens are where retrieval heads match the needle key by key, which a
        centroid can miss. Its cost is one dense read of the corpus per question, not per token.
        Measured (SmolLM2 NIAH, 14 cases at 1K-2K that full KV answers, retrieval_share 0.25, found
        at 0.25 / 0.125 / 0.0625): question at the budget 9 / 8 / 7, read in full 13 / 13 / 11.
    selection: ``"threshold"`` keeps the clusters whose score passes one global threshold calibrated
        on the corpus to hit ``kv_budget`` on average (heads that need more keys get more);
        ``"fixed"`` keeps, for every KV head, the best clusters up to exactly the budget.
    cluster_fraction: level-2 clusters per clustered key (the paper: ~5%).
    hierarchical: build level-1 centroids too and use the two-level lookup by default.
    l1_cluster_fraction: level-1 clusters per clustered key (the paper: ~1%).
    l1_recall: fraction of the kept keys (on the calibration queries) that the level-1 threshold
        must preserve; lower prunes more level-2 centroids.
    observation_window: the last tokens of the corpus whose queries calibrate the threshold.
    local_window: the last tokens of the corpus that are always attended (not clustered); ``None``
        takes ``observation_window`` (the paper's choice). 16 by default: the corpus's last tokens
        are not especially relevant to a question, and on short corpora a 100-token window eats the
        budget (measured, SmolLM2 NIAH at 1K tokens, budget 0.125: 3 of 4 needles found that full
        KV found with 16 always-kept tokens, 0 of 4 with 100).
    retrieval_share: share of the budget spent reading, in full, the (layer, KV head) pairs whose
        sharp attention the centroids miss most: when a corpus is built, a probe question quoting
        passages of it back is read over the whole corpus and each head's focused attention that the
        selection would drop is measured (``head_probe``). ``0`` reads every head through the
        centroids (the paper's method) and skips the probe. The heads read in full are
        ``floor(retrieval_share * budget * layers * kv_heads)`` (SmolLM2-135M, 90 KV heads: 5 at
        0.25, 2 at 0.125). Measured (SmolLM2 NIAH, 14 cases at 1K-2K that full KV answers, found at
        0.25 / 0.125 / 0.0625), question read at the budget: share 0: 5 / 0 / 3; 0.125: 10 / 8 / 3;
        0.25: 9 / 8 / 7; 0.5: 11 / 8 / 2; question read in full: share 0: 12 / 10 / 7; 0.25: 13 / 13 /
        11; 0.5: 13 / 13 / 9.
    dense_layers: the first layers read the whole corpus (their attention is broad and positional,
        and what they drop corrupts every later layer); their keys count in the budget.
    kmeans_iters / seed: K-means iterations and seed (the same seed gives the same clusters).
    prefill_chunk: corpus tokens per prefill step (bounds the memory of the offline pass). 4096: the
        chunk every H200 engine benchmark ran with; on the CPU a 6K-token SmolLM2 corpus built with it is
        bit-identical to one built in 512-token chunks, the earlier default, and its prefill is up to ~10%
        faster (fewer passes over the weights).
    backend: ``"auto"`` (Triton on CUDA, torch on CPU), ``"triton"`` or ``"torch"``.
    calibration_probe: a question answered once over the whole corpus when it is built; its queries
        join the observation window's in calibrating the threshold (question and answer tokens
        read the corpus differently from text tokens). ``None`` calibrates on the window alone.
    probe_tokens: tokens generated for the probe.
    sources: measure which documents each answer drew on (``Answer.sources``, and the sources the
        LangChain and LlamaIndex components return): one more q.K pass over the corpus per layer and
        generated token, in torch (the kernels do not expose per-key attention). Measured on CPU
        (SmolLM2, 2K-token corpus, one thread): ~30% of an answer's time and ~9% of a build's.
        ``False``: answers carry no sources and the build skips the probe's source baseline.
    copy_window: after a multi-token read (the question), every decode step of that answer also reads
        the clusters holding each corpus key that a query head of the read gave at least ``copy_focus``
        of its attention, and the ``copy_window`` keys after it in token order: what copying a needle
        token by token needs (an induction head matches the key *after* the one it copied, which its
        cluster's centroid need not score). ``0`` turns it off. The pinned clusters count in the kept
        fraction; with ``selection="threshold"`` they come on top of the budget, with ``"fixed"`` they
        are ranked first and read inside it (the budget still holds). Measured (SmolLM2
        NIAH, held-out seed 1, 16 cases at 1K-2K, full KV 11): off 8 / 11 found at 0.0625 / 0.125 (kept
        0.132 / 0.190), window 8 and focus 0.3: 12 / 11 (kept 0.145 / 0.200); the accuracy benchmark's
        1K-4K cases (55, full KV 42), flat lookup, found at 0.25 / 0.125 / 0.0625: off 39 / 40 / 38, on 40 /
        43 / 46 (kept +0.006 to +0.014).
    copy_focus: the share of a query head's attention that makes a key "focused" for ``copy_window``
        (0.05 to 1).
    copy_cap: per layer and KV head, the pins read at most ``copy_cap`` times the decode budget's keys
        (``kv_budget`` x corpus tokens), the clusters ranked by the attention share that pinned them: a
        model whose heads all focus sharply would otherwise pin the whole corpus. Measured (the accuracy
        benchmark's 1K-4K cases, flat, found at 0.25 / 0.125 / 0.0625): cap 1: 40 / 42 / 42, uncapped 40 / 43
        / 46, cap 4: the same answers as uncapped; the cap of 1 dropped needles at 1K tokens, where the
        budget is 64-128 keys.
    centroid_dtype: how the centroids (both levels) are stored: ``"auto"`` (the KV dtype when the KV is
        16-bit on CUDA, float32 otherwise), ``"float32"``, ``"bfloat16"``, ``"float16"`` or
        ``"float8_e4m3fn"``. The calibration scores the stored centroids, so the thresholds match what is
        read. Every decode step reads every centroid of every layer: on the H200 (Llama-3-8B attention, 512K
        keys, batch 1) the decode lookup takes 0.052 ms over float32 centroids and 0.033 over bf16 (the
        Triton lookup dots float32 centroids in tf32, 16-bit ones with the queries in their dtype).
        float8_e4m3fn halves the bytes again but not the time (whole decode path 0.0983 against 0.0999 ms at
        batch 1, slower at batch 8 and in prefill: the lookup is not bound by its bytes there); it is
        widened to the queries' dtype in the kernel, so the queries are not rounded. Selection measured on
        real SmolLM2 keys (a 4K-token corpus, 100 window queries per layer, 10% fixed budget) against
        float32 centroids: bfloat16 keeps 99.6% of the same keys, float8_e4m3fn 94.6%, and the attention
        mass the selection keeps moves from 0.8903 to 0.8904 / 0.8897.
    cuda_graphs: on CUDA with the Triton backend, an answer's decode steps from its third token on replay
        one CUDA graph of the whole step (captured once per answer), instead of launching each layer's
        kernels from Python: a batch-1 decode step of the engine is otherwise bound by the host. The
        answer's dynamic tokens then live in preallocated buffers (``decode_graph``). Greedy answers are
        the same either way (tested on the H200). ``False``: eager steps.
    system_prompt: the system message placed before the corpus in the chat template.
    """

    kv_budget: float = 0.25
    question_budget: float | None = 1.0
    selection: str = "threshold"
    cluster_fraction: float = 0.05
    hierarchical: bool = False
    l1_cluster_fraction: float = 0.01
    l1_recall: float = 0.99
    observation_window: int = 100
    local_window: int | None = 16
    retrieval_share: float = 0.25
    dense_layers: int = 0
    kmeans_iters: int = 20
    seed: int = 0
    prefill_chunk: int = 4096
    backend: str = "auto"
    calibration_probe: str | None = "What are the most important facts in these documents?"
    probe_tokens: int = 24
    sources: bool = True
    copy_window: int = 8
    copy_focus: float = 0.3
    copy_cap: float = 4.0
    centroid_dtype: str = "auto"
    cuda_graphs: bool = True
    system_prompt: str = (
        "You are a helpful assistant. Answer the question using the documents provided."
    )

    def __post_init__(self) -> None:
        check_budget(self.kv_budget)
        if self.question_budget is not None:
            check_budget(self.question_budget, "question_budget")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection must be one of {SELECTIONS}, got {self.selection!r}")
        if self.centroid_dtype not in CENTROID_DTYPES:
            raise ValueError(f"centroid_dtype must be one of {CENTROID_DTYPES}, got {self.centroid_dtype!r}")
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {self.backend!r}")
        if not 0.0 < self.cluster_fraction <= 1.0:
            raise ValueError(f"cluster_fraction must be in (0, 1], got {self.cluster_fraction}")
        if not 0.0 < self.l1_cluster_fraction <= self.cluster_fraction:
            raise ValueError(
                f"l1_cluster_fraction must be in (0, cluster_fraction={self.cluster_fraction}], "
                f"got {self.l1_cluster_fraction}"
            )
        if not 0.0 <= self.retrieval_share <= 1.0:
            raise ValueError(f"retrieval_share must be in [0, 1], got {self.retrieval_share}")
        if not 0.0 < self.l1_recall <= 1.0:
            raise ValueError(f"l1_recall must be in (0, 1], got {self.l1_recall}")
        for name in ("sources", "cuda_graphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"{name} must be True or False, got {getattr(self, name)!r}")
        for name in ("observation_window", "kmeans_iters", "prefill_chunk", "probe_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if isinstance(self.copy_cap, bool) or not isinstance(self.copy_cap, (int, float)) or not self.copy_cap > 0:
            raise ValueError(f"copy_cap must be a positive number, got {self.copy_cap!r}")
        if not 0.05 <= self.copy_focus <= 1.0:  # focused_attention keeps shares >= 0.05 only
            raise ValueError(f"copy_focus must be in [0.05, 1], got {self.copy_focus}")
        for name in ("local_window", "dense_layers", "copy_window"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 0):
                raise ValueError(f"{name} must be a non-negative integer, got {value!r}")

    @property
    def always_window(self) -> int:
        """Corpus tokens at the end that are always attended."""
        return self.observation_window if self.local_window is None else self.local_window

    def replace(self, **changes) -> "SqueezeConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
