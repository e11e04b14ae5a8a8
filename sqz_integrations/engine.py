"""SqueezedEngine: ``add_corpus`` once (the plan: prefill, cluster, calibrate), ``generate`` many times.

The model is an ordinary transformers causal LM whose attention is dispatched, through the public
attention registry, to :func:`~sqz_integrations.attention.squeezed_attention_forward`. A question
runs with the model's own cache holding only its dynamic tokens (question + answer) at positions
after the corpus; every layer reads the corpus through a :class:`~sqz_integrations.selection.CorpusRead`.
On CUDA with the Triton kernels, the read holds those tokens itself and decode steps replay a CUDA graph
(:mod:`~sqz_integrations.decode_graph`).
"""
from __future__ import annotations

import dataclasses
import inspect
import logging
import os
import queue
import threading
import time
from pathlib import Path
from typing import Iterator, Sequence

import torch
from tqdm.auto import tqdm
from transformers import DynamicCache

from sqz_kernels import get_backend

from . import attention, decode_graph, head_probe, model_support, storage
from .async_stream import consumer_left
from .batch import BatchRead
from .batch_decode import BatchDecodingMixin, Joins, Question
from .calibration import Calibration
from .coalesce import Coalescer
from .config import SqueezeConfig
from .corpus import SqueezedCorpus, split_tokens, squeeze_layer
from .generation import Answer, AnswerStream, Sampler, SamplingParams, SourceScore, TextAssembler
from .prompting import CorpusDocument, Prompt, PromptLayout, as_documents, document_block, document_label
from .selection import CorpusRead, QueryRecorder, ReadPlan

logger = logging.getLogger(__name__)

# load_corpus recomputes the keys and values of a saved corpus's first tokens with the engine's model and compares them
# (saved_key_differences, relative RMS per layer, the larger of keys and values: a model that differs only in its value
# projections computes the same keys). Measured on the keys: the model that built the corpus 0.0 in every layer (SmolLM2
# on the CPU in float32 and bfloat16; random Llamas in bf16 / fp16 on the H200, engine_gpu_report_saved_20261130-0840);
# SmolLM2 with every weight scaled by 1.001 / 1.01 / 1.05: at most 0.003 / 0.04 / 0.16; with 5% noise added: 0.15.
# The tolerance leaves room for another device's rounding (a GPU-built corpus loaded on a CPU) and refuses another
# model or weights more than a few percent apart; a close fine-tune of the same model can pass it.
_KEY_CHECK_TOKENS = 32
# the per-call overrides of how a corpus is read (stream_answer's keyword arguments besides sampling)
_READ_OPTIONS = ("kv_budget", "hierarchical", "selection", "question_budget")
_KEY_CHECK_TOLERANCE = 0.1


def _relative_rms(saved: torch.Tensor, fresh: torch.Tensor) -> float:
    fresh = fresh.float()
    return float((saved.float() - fresh).norm() / fresh.norm().clamp_min(1e-12))


def _sampling_params(name: str, max_new_tokens: int, kwargs: dict) -> SamplingParams:
    """The sampling settings of a call taking :meth:`SqueezedEngine.stream_answer`'s keyword arguments (sampling
    and read options), refusing any other."""
    unknown = sorted(set(kwargs) - {"temperature", "top_p", "stop", "seed", *_READ_OPTIONS})
    if unknown:
        raise TypeError(f"{name}() got unexpected keyword arguments {unknown}")
    return SamplingParams(max_new_tokens, kwargs.get("temperature", 0.0), kwargs.get("top_p", 1.0),
                          kwargs.get("stop"), kwargs.get("seed"))


class SqueezedEngine(BatchDecodingMixin):
    """One model in memory serving any number of squeezed corpora.

    Args:
        model: a transformers causal LM (any family that uses the attention registry).
        tokenizer: its tokenizer; the chat template, if any, places the corpus.
        config: how corpora are squeezed and read (:class:`SqueezeConfig`).
        max_coalesced: concurrent :meth:`answer` and :meth:`stream_answer` calls (threads; LangChain's
            ``batch`` / ``abatch`` / ``astream``, LlamaIndex's async calls) on the same corpus with the same settings
            are answered together as one :meth:`answer_batch` of up to this many rows
            (:mod:`~sqz_integrations.coalesce`), which a call made while it decodes joins at its next step (the batch
            grows, :mod:`~sqz_integrations.batch_decode`); ``1`` answers every call alone, in its own thread. ``None``
            (default): 8 on CUDA, 1 elsewhere. Measured (README): on the H200, 8 threads coalesced gave 3.0-3.8x
            the tokens/s of one by one and ~4x that of the threads each alone (8 streams: 2.9-3.5x one by one); on
            a 2-core CPU, coalesced threads were no faster than the threads each alone (7.6 / 7.6 tokens/s with one
            torch thread, 4.9 / 5.8 with two): torch ops run slower from a worker thread there.
    """

    def __init__(self, model, tokenizer, config: SqueezeConfig | None = None, *, max_coalesced: int | None = None):
        reason = model_support.unsupported(model)
        if reason:  # before the model is touched (its attention implementation is switched below)
            raise ValueError(f"SqueezedEngine cannot serve this {model.config.model_type} model: {reason}")
        self.config = config or SqueezeConfig()
        self.model = model
        self.tokenizer = tokenizer
        self.model.eval()
        self.model.set_attn_implementation(attention.register())
        self.layout = PromptLayout(tokenizer, self.config.system_prompt)
        params = inspect.signature(model.forward).parameters
        # transformers 5.24 renamed the cache argument; older releases call it past_key_values.
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._corpora: dict[str, SqueezedCorpus] = {}
        self._lock = threading.RLock()  # re-entrant: load_corpus checks a name while holding it
        self._eos_ids = self._end_of_turn_ids()
        # why the last CUDA-graph capture failed (answers then decode eagerly; logged once)
        self.cuda_graph_error: str | None = None
        self._device_lock = decode_graph.DeviceLock()
        self._graph_pool = decode_graph.GraphPool()  # captured decode steps, reused by later answers
        # a queued call whose caller left (interrupted while it waited) is dropped, its question never read
        self._coalescer = Coalescer(self._answer_tickets, max_rows=1, abandoned=Question.left)
        self._max_coalesced: int | None = None
        self.max_coalesced = max_coalesced

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(
        cls, model_name_or_path: str | None = None, *, config: SqueezeConfig | None = None,
        max_coalesced: int | None = None, **hf_kwargs,
    ) -> "SqueezedEngine":
        """Load a causal LM and its tokenizer; with no name, the embedded SmolLM2-135M-Instruct.

        ``hf_kwargs`` go to ``AutoModelForCausalLM.from_pretrained`` (``torch_dtype``, ``device_map``, ...).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if model_name_or_path is None:
            from .default_model import default_model_dir

            model_name_or_path = str(default_model_dir())
        tokenizer = AutoTokenizer.from_pretrained(model_name_or_path)
        model = AutoModelForCausalLM.from_pretrained(model_name_or_path, **hf_kwargs)
        return cls(model, tokenizer, config, max_coalesced=max_coalesced)

    @property
    def max_coalesced(self) -> int:
        """Most concurrent :meth:`answer` calls answered together as one batch (1: each alone); set ``None`` for
        the default, 8 on CUDA and 1 elsewhere."""
        if self._max_coalesced is not None:
            return self._max_coalesced
        return 8 if self.device.type == "cuda" else 1

    @max_coalesced.setter
    def max_coalesced(self, rows: int | None) -> None:
        if rows is not None and (isinstance(rows, bool) or not isinstance(rows, int) or rows < 1):
            raise ValueError(f"max_coalesced must be a positive integer or None, got {rows!r}")
        self._max_coalesced = rows

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def model_name(self) -> str:
        name = getattr(self.model.config, "_name_or_path", "") or self.model.config.model_type
        return name.rstrip("/").split("/")[-1]

    @property
    def context_window(self) -> int:
        """Tokens that corpus, question and answer may take together: the model's positions, or its shortest
        attention window (sliding window, attention chunk) where some layers have one (0: unbounded)."""
        return int(model_support.context_limit(self.model.config)[0])

    def _end_of_turn_ids(self) -> set[int]:
        ids = set()
        for source in (self.model.generation_config.eos_token_id, self.tokenizer.eos_token_id):
            if source is None:
                continue
            ids.update(source if isinstance(source, (list, tuple)) else [source])
        return ids

    def backend(self):
        """The kernel module in use: the Triton launchers on CUDA, the torch twins otherwise."""
        return get_backend(self.config.backend, self.device.type)

    def count_tokens(self, text: str) -> int:
        return len(self.layout.encode(text))

    # ------------------------------------------------------------------ corpora
    @property
    def corpora(self) -> dict[str, SqueezedCorpus]:
        with self._lock:
            return dict(self._corpora)

    def get_corpus(self, name: str) -> SqueezedCorpus:
        with self._lock:
            if name not in self._corpora:
                known = ", ".join(repr(n) for n in self._corpora) or "none"
                raise KeyError(f"no corpus named {name!r} (loaded: {known}); add it with engine.add_corpus()")
            return self._corpora[name]

    def remove_corpus(self, name: str) -> None:
        with self._lock:  # the check and the removal together: of two threads removing one name, one gets the KeyError
            self.get_corpus(name)
            del self._corpora[name]
        self._graph_pool.drop(name)

    def release_graphs(self, corpus: str | None = None) -> int:
        """Drop the pooled CUDA-graph decode steps of ``corpus`` (all corpora: ``None``) and return how many. Each
        holds its read's dynamic-token buffers and its graph's private memory; they go back to PyTorch's caching
        allocator (``torch.cuda.empty_cache()`` then returns them to the device). Later answers capture again."""
        if corpus is None:
            return self._graph_pool.clear()
        self.get_corpus(corpus)  # KeyError naming the loaded corpora
        return self._graph_pool.drop(corpus)

    def _check_name(self, name, replace: bool) -> None:
        """A corpus name must be a non-empty string, and not taken unless ``replace``."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"a corpus needs a non-empty string name, got {name!r}")
        with self._lock:
            if name in self._corpora and not replace:
                raise ValueError(f"a corpus named {name!r} exists; pass replace=True to replace it, or another name")

    def add_corpus(
        self,
        name: str,
        documents: Sequence[str | CorpusDocument],
        *,
        progress: bool = True,
        replace: bool = False,
        config: SqueezeConfig | None = None,
    ) -> SqueezedCorpus:
        """Prefill the documents once, cluster every layer's keys and calibrate the threshold.

        ``config`` overrides the engine's for this corpus (e.g. ``hierarchical=True``). An existing
        corpus of the same name is kept unless ``replace=True``.
        """
        self._check_name(name, replace)
        cfg = config or self.config
        if cfg.system_prompt != self.layout.system_prompt:
            raise ValueError("a corpus's config cannot change system_prompt: every prompt is rendered with the "
                             f"engine's ({self.layout.system_prompt!r}); make an engine whose config has that system "
                             "prompt")
        docs = as_documents(documents)
        start = time.perf_counter()
        header_ids, ids, token_doc, spans = self._corpus_tokens(docs)
        self._check_fits(name, len(ids), self._build_room(cfg))
        # the whole build on the device, shared with other threads' forwards (a CUDA-graph capture waits for it)
        with self._device_lock.shared():
            clustered, always = split_tokens(len(ids), len(header_ids), cfg.always_window)
            capture = attention.CorpusCapture(len(ids), window=min(cfg.observation_window, len(ids) - len(header_ids)))
            self._prefill(ids, capture, cfg.prefill_chunk, progress, name)
            layers = []
            token_doc_t = torch.tensor(token_doc)
            n_layers = self.model.config.num_hidden_layers
            for l in tqdm(range(n_layers), desc=f"clustering {name}", disable=not progress, leave=False):
                layers.append(
                    squeeze_layer(
                        capture.keys.pop(l), capture.values.pop(l), clustered.to(self.device),
                        always.to(self.device), token_doc_t, cfg, seed=cfg.seed + l,
                    )
                )
            window = [capture.window_queries(l) for l in range(n_layers)]
            calibration = Calibration(window, layers, capture.scale, len(ids), dense_layers=cfg.dense_layers)
            corpus = SqueezedCorpus(name, docs, ids, spans, self.layout.header_text, layers, calibration, cfg, 0.0)
            if cfg.calibration_probe:
                decode_q, prefill_q = self._probe(corpus, cfg)
                corpus.calibration = Calibration(
                    window, layers, capture.scale, len(ids), decode_q, prefill_q, dense_layers=cfg.dense_layers
                )
            if cfg.retrieval_share > 0:
                corpus.head_misses = self._probe_heads(corpus, clustered, cfg)
        corpus.build_seconds = time.perf_counter() - start
        with self._lock:
            self._check_name(name, replace)  # another thread may have added one meanwhile
            self._corpora[name] = corpus
        self._graph_pool.drop(name)  # the graphs of a corpus this one replaces
        logger.info("corpus %r: %d tokens, %d clusters per head, built in %.1fs", name, len(ids), corpus.n_clusters, corpus.build_seconds)
        return corpus

    def _build_room(self, cfg: SqueezeConfig) -> int:
        """Tokens the build's own questions need after the corpus: the calibration probe and its answer, the head
        probe's question (its quotes re-tokenised: a margin of 8 tokens each for their marks and numbering)."""
        room = 0
        if cfg.calibration_probe:
            room = len(self.layout.suffix_ids(cfg.calibration_probe)) + cfg.probe_tokens
        if cfg.retrieval_share > 0:
            lead = len(self.layout.suffix_ids(head_probe.QUESTION_LEAD))
            room = max(room, lead + head_probe.N_PASSAGES * (head_probe.PASSAGE_TOKENS + 8))
        return room

    def _check_fits(self, name: str, n_tokens: int, room: int = 0) -> None:
        """A corpus of ``n_tokens`` must leave ``room`` tokens (and at least one) of the model's context window."""
        window, kind = model_support.context_limit(self.model.config)
        if window and n_tokens + max(room, 1) > window:
            also = f" and its build's probe questions {room} more" if room else ""
            raise ValueError(f"corpus {name!r} is {n_tokens} tokens{also}; the model's {kind} is {window}")

    def _fitted(self, corpus: SqueezedCorpus, question_tokens: int, params: SamplingParams) -> SamplingParams:
        """``params`` with ``max_new_tokens`` cut to the room the context window leaves after the corpus and the
        question (an answer that reaches it ends with finish_reason "length"); a question that leaves none is
        refused (positions past the window fail in a model with learned ones, and degrade in the others)."""
        window, kind = model_support.context_limit(self.model.config)
        if not window:
            return params
        room = window - corpus.n_tokens - question_tokens
        if room < 1:
            raise ValueError(f"the question is {question_tokens} tokens; after corpus {corpus.name!r}'s "
                             f"{corpus.n_tokens} it leaves no room in the model's {kind} of {window}")
        return params if params.max_new_tokens <= room else dataclasses.replace(params, max_new_tokens=room)

    def _corpus_tokens(self, docs: list[CorpusDocument]):
        """-> (header ids, all ids, the document of every token (-1: template), each document's span)."""
        header_ids = self.layout.encode(self.layout.header_text)
        ids, token_doc, spans = list(header_ids), [-1] * len(header_ids), []
        for i, doc in enumerate(docs):
            piece = self.layout.encode(document_block(i, doc))
            spans.append((len(ids), len(ids) + len(piece)))
            ids += piece
            # The label line ("[Document 2: x.md]") is a local attention sink that every question
            # looks at: it belongs to no document's evidence for the sources.
            n_label = min(len(self.layout.encode(document_label(i, doc))), len(piece))
            token_doc += [-1] * n_label + [i] * (len(piece) - n_label)
        return header_ids, ids, token_doc, spans

    # ------------------------------------------------------------------ saved corpora
    def save_corpus(self, name: str, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Write corpus ``name`` to the folder ``path`` (created), for :meth:`load_corpus` in a later process:
        its KV, centroids, calibration, documents and statistics (:mod:`~sqz_integrations.storage`). An existing
        save is replaced only with ``overwrite=True``, and only once the new one is complete. Returns the folder."""
        corpus = self.get_corpus(name)
        model = {"model_type": self.model.config.model_type, "num_hidden_layers": len(corpus.layers),
                 "kv_heads": corpus.layers[0].keys.shape[0], "head_dim": corpus.layers[0].keys.shape[2],
                 "kv_dtype": str(corpus.layers[0].keys.dtype).removeprefix("torch."), "model_name": self.model_name}
        with self._device_lock.shared():
            return storage.save(corpus, path, model, overwrite=overwrite)

    def load_corpus(self, path: str | os.PathLike, *, name: str | None = None, replace: bool = False) -> SqueezedCorpus:
        """Load a corpus saved by :meth:`save_corpus` onto this engine's device, under its saved name or ``name``.

        The corpus must come from this engine's model: its architecture, tokenizer and chat template must give the
        same token ids, and the model must compute the saved keys of the corpus's first tokens again (one short
        forward; a different model or dtype fails it). A loaded corpus answers as the one that was saved."""
        meta = storage.read_meta(path)
        name = meta["name"] if name is None else name
        self._check_name(name, replace)  # before any tensor is read; again below, under the same lock as the insert
        self._check_fits(name, len(meta["token_ids"]))
        saved = meta["model"]
        if (saved["model_type"], saved["num_hidden_layers"]) != (self.model.config.model_type,
                                                                 self.model.config.num_hidden_layers):
            raise ValueError(f"{path} was built by a {saved['num_hidden_layers']}-layer {saved['model_type']} model "
                             f"({saved['model_name']}); this engine runs a {self.model.config.num_hidden_layers}-layer "
                             f"{self.model.config.model_type} ({self.model_name})")
        if (self.layout.header_text != meta["header_text"]
                or self._corpus_tokens(storage.documents(meta))[1] != meta["token_ids"]):
            raise ValueError(f"{path}: this engine's tokenizer or chat template (system prompt included) gives other "
                             "token ids for the saved documents than the engine that built the corpus")
        with self._device_lock.shared():
            corpus = storage.load(path, meta, self.device, name)
            self._check_saved_keys(corpus, path)
        with self._lock:
            self._check_name(name, replace)  # another thread may have added one meanwhile
            self._corpora[name] = corpus
        self._graph_pool.drop(name)  # the graphs of a corpus this one replaces
        return corpus

    @torch.inference_mode()
    def saved_key_differences(self, corpus: SqueezedCorpus) -> list[float]:
        """Per layer, how far this model's keys and values of the corpus's first tokens (up to ``_KEY_CHECK_TOKENS``,
        one forward) are from the corpus's stored ones: the larger relative RMS difference of the two; 0 for the model
        that built it."""
        m = min(_KEY_CHECK_TOKENS, corpus.n_tokens)
        capture = attention.CorpusCapture(m, window=0)
        self._prefill(corpus.token_ids[:m], capture, m, False, corpus.name)
        out = []
        for l, layer in enumerate(corpus.layers):
            fresh = capture.keys[l]
            if fresh.shape[::2] != layer.keys.shape[::2]:
                raise ValueError(f"corpus {corpus.name!r} stores keys of {layer.keys.shape[0]} KV heads of size "
                                 f"{layer.keys.shape[2]}; this model computes {fresh.shape[0]} of size "
                                 f"{fresh.shape[2]}: it was built by another model")
            if fresh.dtype != layer.keys.dtype:
                raise ValueError(f"corpus {corpus.name!r} stores {layer.keys.dtype} keys; this model computes "
                                 f"{fresh.dtype} (load the model in the dtype the corpus was built with)")
            stored_at = torch.argsort(layer.key_pos.long(), dim=1)[:, :m]  # where positions 0..m-1 are stored
            at = stored_at.unsqueeze(-1).expand(-1, -1, fresh.shape[-1])
            out.append(max(_relative_rms(layer.keys.gather(1, at), fresh),
                           _relative_rms(layer.values.gather(1, at), capture.values[l])))
        return out

    def _check_saved_keys(self, corpus: SqueezedCorpus, path) -> None:
        diffs = self.saved_key_differences(corpus)
        worst = max(range(len(diffs)), key=lambda l: diffs[l])
        if not diffs[worst] <= _KEY_CHECK_TOLERANCE:
            raise ValueError(f"{path} was built by another model (or other weights): layer {worst}'s keys or values "
                             f"of the first tokens differ from this model's by {diffs[worst]:.3f} (relative RMS; the "
                             f"tolerance is {_KEY_CHECK_TOLERANCE})")

    @torch.inference_mode()
    def _prefill(self, ids: list[int], capture: attention.CorpusCapture, chunk: int, progress: bool, name: str) -> None:
        cache = DynamicCache()
        all_ids = torch.tensor([ids], device=self.device)
        for start in tqdm(range(0, len(ids), chunk), desc=f"prefilling {name}", disable=not progress, leave=False):
            capture.position = start
            self.model(
                input_ids=all_ids[:, start : start + chunk],
                use_cache=True,
                squeeze=capture,
                logits_to_keep=1,
                **{self._cache_arg: cache},
            )
        missing = [l for l in range(self.model.config.num_hidden_layers) if l not in capture.keys]
        if missing:
            raise RuntimeError(f"layers {missing} did not dispatch through the attention registry")

    # ------------------------------------------------------------------ questions
    def prompt_ids(self, prompt: Prompt, corpus: str) -> list[int]:
        """The exact token ids of the full prompt a question stands for (corpus included)."""
        c = self.get_corpus(corpus)
        return list(c.token_ids) + self.layout.suffix_ids(prompt)

    def _plan(self, corpus: SqueezedCorpus, kv_budget, hierarchical, selection, question_budget=None) -> ReadPlan:
        return ReadPlan.make(corpus, get_backend(corpus.config.backend, self.device.type), kv_budget, hierarchical,
                             selection, question_budget)

    def _forward(self, ids: list[int], position: int, cache, read: CorpusRead, all_logits: bool = False):
        with self._device_lock.shared():
            input_ids = torch.tensor([ids], device=self.device)
            positions = torch.arange(position, position + len(ids), device=self.device).unsqueeze(0)
            out = self.model(
                input_ids=input_ids,
                position_ids=positions,
                use_cache=cache is not None,  # None: the read keeps the dynamic tokens itself (read.dyn)
                squeeze=read,
                logits_to_keep=0 if all_logits else 1,
                **{self._cache_arg: cache},
            )
        return out.logits[0]

    def _decode(self, corpus: SqueezedCorpus, suffix: list[int], read: CorpusRead, sampler: Sampler,
                max_new_tokens: int, slot: "decode_graph.GraphSlot | None" = None):
        """The decoding loop: yields each new token id until end of turn or ``max_new_tokens``.

        With a ``slot`` (CUDA-graph decode) the dynamic tokens go into the read's own buffers and, on CUDA, the
        single-token steps replay the slot's graph: from the first generated token on when the slot comes from
        the pool, else from the third, captured there (the second step, eager, has compiled and warmed every
        kernel the graph records)."""
        graphs = slot is not None
        cache = None if graphs else DynamicCache()
        capture = graphs and self.device.type == "cuda" and slot.step is None
        position, feed = corpus.n_tokens, suffix
        for i in range(max_new_tokens):
            if capture and i >= 2:
                slot.step = self._capture(read)
                capture = False
            step = slot.step if graphs and len(feed) == 1 else None
            # every device call of a step (not the yield) under the shared lock: another thread may be capturing
            with self._device_lock.shared():
                if step is not None:
                    logits = step(feed[0], position)
                else:
                    if graphs:
                        read.dyn.begin(len(feed), on_device=len(feed) == 1)
                    logits = self._forward(feed, position, cache, read)
                    if graphs:
                        read.dyn.end()
                token = sampler(logits[-1])
            position += len(feed)
            yield token
            if token in self._eos_ids:
                return
            feed = [token]

    def _capture(self, read: CorpusRead, batch: int = 1) -> "decode_graph.GraphedStep | None":
        """A decode step of ``read`` (of ``batch`` rows) as a CUDA graph, or None (logged once) where capturing
        fails."""
        try:
            return decode_graph.GraphedStep(self.model, read, read.dyn, self._cache_arg, self._device_lock, batch)
        except decode_graph.DeviceBusy:  # not the model's fault: this answer stays eager, the next one captures
            return None
        except Exception as exc:  # the model or a kernel does something a graph cannot hold
            while exc.__context__ is not None:  # the first failure, not the capture's end reporting it
                exc = exc.__context__
            if self.cuda_graph_error is None:
                logger.warning("CUDA-graph decode is off for this engine: capturing a step failed (%s); "
                               "answers decode eagerly", exc)
            self.cuda_graph_error = f"{type(exc).__name__}: {exc}"
            self._graph_pool.clear()
            return None

    def _graphs_for(self, corpus: SqueezedCorpus, plan: ReadPlan, max_new_tokens: int) -> bool:
        """Whether an answer decodes through CUDA graphs: CUDA, the Triton path (the torch twins read lengths on
        the host), at least three tokens to generate, and no earlier capture failure."""
        return (corpus.config.cuda_graphs and self.device.type == "cuda" and plan.fused
                and max_new_tokens > 2 and self.cuda_graph_error is None)

    def _graph_slot(self, corpus: SqueezedCorpus, plan: ReadPlan, tokens: int, batch: int | None = None,
                    pooled_only: bool = False) -> "decode_graph.GraphSlot | None":
        """A pooled slot for this kind of answer (its read reset), or a new one with a fresh read (``pooled_only``: a
        pooled slot whose step is captured, else None; a slot left as it is is not reset). The key holds everything a
        captured step depends on: the corpus object, the plan's settings (its thresholds and retrieval heads follow
        from them and the corpus's calibration), the corpus's configuration (sources, copy pins), the size of the
        dynamic-token buffers and, for ``answer_batch``, the number of rows."""
        capacity = decode_graph.capacity_for(tokens)
        key = (id(corpus), plan.kv_budget, plan.question_budget, plan.selection, plan.hierarchical,
               plan.backend.__name__, corpus.config, capacity, batch)
        slot = self._graph_pool.take(corpus.name, key, captured=pooled_only)
        if slot is None and pooled_only:
            return None
        if slot is None:  # a fresh read with its own dynamic-token buffers (the caller holds the device lock)
            if batch is not None:
                return decode_graph.GraphSlot(key, BatchRead(corpus, plan, batch, capacity,
                                                             track_sources=corpus.config.sources))
            read = CorpusRead(corpus, plan, track_sources=corpus.config.sources)
            read.dyn = decode_graph.DynamicTokens(capacity, self.device)
            return decode_graph.GraphSlot(key, read)
        slot.read.reset()
        return slot

    @torch.inference_mode()
    def _probe(self, corpus: SqueezedCorpus, cfg: SqueezeConfig) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Answer a probe question over the whole corpus and keep its queries for calibration."""
        read = QueryRecorder(corpus, self._plan(corpus, 1.0, False, "threshold"), track_sources=cfg.sources)
        suffix = self.layout.suffix_ids(cfg.calibration_probe)
        for _ in self._decode(corpus, suffix, read, Sampler(SamplingParams(), self.device), cfg.probe_tokens):
            pass
        corpus.source_baseline = read.doc_mass.cpu() if cfg.sources else None
        return read.decode_queries(), read.prefill_queries()

    @torch.inference_mode()
    def _probe_heads(self, corpus: SqueezedCorpus, clustered: torch.Tensor, cfg: SqueezeConfig) -> torch.Tensor:
        """Read a question quoting the corpus back and measure, per head, the focused attention the
        selection at the corpus's budget drops (see :mod:`head_probe`)."""
        question = head_probe.probe_question(
            corpus.token_ids, clustered, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True)
        )
        # the decode threshold of the corpus's budget (from the calibration itself, also at budget 1.0, where a
        # read plan looks nothing up and carries no threshold)
        threshold = corpus.calibration.log_threshold(
            cfg.kv_budget, False, corpus.retrieval_heads(cfg.kv_budget, cfg.retrieval_share)
        )
        read = head_probe.MissedFocus(corpus, self._plan(corpus, 1.0, False, "threshold"), threshold)
        cache = DynamicCache()
        self._forward(self.layout.suffix_ids(question), corpus.n_tokens, cache, read)
        return read.missed_per_token()

    @torch.inference_mode()
    def _events(
        self, suffix: list[int], corpus: str, params: SamplingParams, kv_budget, hierarchical, selection, question_budget
    ) -> Iterator:
        """Yields text pieces, then the :class:`Answer`, of the question whose dynamic token ids are ``suffix``."""
        start = time.perf_counter()
        c = self.get_corpus(corpus)
        slot = None
        with self._device_lock.shared():
            plan = self._plan(c, kv_budget, hierarchical, selection, question_budget)
            if self._graphs_for(c, plan, params.max_new_tokens):
                slot = self._graph_slot(c, plan, len(suffix) + params.max_new_tokens)
                read = slot.read
                plan = read.plan  # the pooled read's own plan: the same settings, the tensors its graph holds
            else:
                read = CorpusRead(c, plan, track_sources=c.config.sources)
            sampler = Sampler(params, self.device)
        text = self._text_assembler(params)
        first_token_time, finish = None, "length"
        for token in self._decode(c, suffix, read, sampler, params.max_new_tokens, slot):
            if first_token_time is None:
                first_token_time = time.perf_counter() - start
            if token in self._eos_ids:
                finish = "stop"
                break
            piece = text.push(token)
            if piece:
                yield piece
            if text.stopped:
                finish = "stop"
                break
        tail = text.finish()
        if tail:
            yield tail
        with self._device_lock.shared():
            answer = self._answer_record(c, corpus, suffix, plan, read, text, finish, first_token_time, start)
        if slot is not None and self.cuda_graph_error is None:
            self._graph_pool.give(corpus, slot)  # only now: the record above has read the read's counters
        yield answer

    def _answer_record(self, c, corpus, suffix, plan, read, text, finish, first_token_time, start) -> Answer:
        """The :class:`Answer` of a finished decode (its counters are read from the device)."""
        read.commit()
        return Answer(
            text=text.text,
            token_ids=list(text.ids),
            finish_reason=finish,
            corpus=corpus,
            prompt_tokens=len(suffix),
            corpus_tokens=c.n_tokens,
            completion_tokens=len(text.ids),
            kv_budget=plan.kv_budget,
            kept_fraction=read.kept_fraction(),
            kept_fraction_per_layer=read.kept_per_layer(),
            centroid_reads=float(read.centroids_scored) / max(1, sum(read.steps)) / (c.layers[0].keys.shape[0] * c.n_tokens),
            time_to_first_token=first_token_time or 0.0,
            total_time=time.perf_counter() - start,
            sources=self._sources(c, read),
        )

    def _sources(self, corpus: SqueezedCorpus, read: CorpusRead) -> list[SourceScore]:
        """Documents ranked by the focused attention they got, relative to what a generic question
        gives them (the probe's): position alone favours some documents for any question."""
        mass = read.doc_mass.cpu()
        if float(mass.sum()) <= 0:
            return []
        mass = mass / corpus.source_prior()
        total = float(mass.sum())
        order = torch.argsort(mass, descending=True).tolist()
        return [
            SourceScore(i, float(mass[i]) / total, dict(corpus.documents[i].metadata), corpus.documents[i].text)
            for i in order
            if mass[i] > 0
        ]

    def stream_answer(
        self,
        prompt: Prompt,
        corpus: str,
        max_new_tokens: int = 256,
        *,
        kv_budget: float | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
        hierarchical: bool | None = None,
        selection: str | None = None,
        question_budget: float | None = None,
    ) -> AnswerStream:
        """Stream an answer: iterate for text pieces; ``.answer`` holds the :class:`Answer` afterwards.

        ``prompt`` is a question or a list of chat messages (``{"role", "content"}``); the chat history
        is the dynamic part, the corpus is fixed. ``kv_budget``/``question_budget``/``hierarchical``/
        ``selection`` override the corpus's configuration for this call only. Decoding is greedy unless ``temperature > 0``.

        Where calls are coalesced (``max_coalesced`` > 1, by default on CUDA), the stream's question joins the
        batch of the calls made meanwhile with the same arguments, as :meth:`answer` does; its pieces come from the
        thread that runs that batch, and closing the stream early ends its row at the batch's next step.
        """
        read_options = (kv_budget, hierarchical, selection, question_budget)
        params = SamplingParams(max_new_tokens, temperature, top_p, stop, seed)
        built, suffix, params = self._call(prompt, corpus, params, read_options)  # now, not at the first iteration
        if self.max_coalesced > 1:  # keyed by the corpus object too, as in answer()
            return AnswerStream(self._coalesced_events((corpus, built, params, read_options), suffix))
        return AnswerStream(self._events(suffix, corpus, params, *read_options))

    def _call(self, prompt: Prompt, corpus: str, params: SamplingParams, read_options: tuple):
        """What a single call checks before it runs: the corpus, the prompt and the read options, and the room the
        context window leaves. -> (the corpus object, the question's ids, ``params`` fitted to that room)."""
        built = self.get_corpus(corpus)
        suffix = self.layout.suffix_ids(prompt)
        ReadPlan.options(built, *read_options)
        return built, suffix, self._fitted(built, len(suffix), params)

    def _coalesced_events(self, key: tuple, suffix: list[int], pieces: bool = True) -> Iterator:
        """The events of a call whose question goes through the coalescer: a worker thread submits it (and may
        lead its batch, which then runs in that thread) while this generator, in the caller's thread, hands on the
        text pieces it is sent (if ``pieces``), then the Answer, which comes as soon as the question's row ends."""
        events: queue.SimpleQueue = queue.SimpleQueue()
        sink = events.put if pieces else (lambda event: events.put(event) if isinstance(event, Answer) else None)
        question = Question(suffix, sink=sink, cancelled=threading.Event(), consumer_left=consumer_left())

        def submit() -> None:
            try:
                events.put(self._coalescer.submit(key, question))
            except BaseException as exc:  # noqa: BLE001 - re-raised in the reader's thread
                events.put(exc)

        self._coalescer.max_rows = self.max_coalesced
        threading.Thread(target=submit, name="sqz-stream", daemon=True).start()
        try:
            while True:
                event = events.get()
                if isinstance(event, BaseException):
                    raise event
                if event is None:  # dropped from the queue: its async consumer left before a batch took it
                    return
                yield event
                if isinstance(event, Answer):
                    return
        finally:
            question.cancelled.set()  # a reader that stops early: its row ends (a finished one: no effect)

    def answer(self, prompt: Prompt, corpus: str, max_new_tokens: int = 256, **kwargs) -> Answer:
        """Generate a whole answer with its metadata (see :meth:`stream_answer` for the arguments).

        Calls made concurrently from several threads on the same corpus with the same arguments are answered
        together as one :meth:`answer_batch` (by default on CUDA only; see ``max_coalesced``); the times of each
        :class:`Answer` count from its own call.
        """
        read_options = tuple(kwargs.get(k) for k in _READ_OPTIONS)
        # a bad prompt or option fails its own call, not the batch it would join
        built, suffix, params = self._call(prompt, corpus, _sampling_params("answer", max_new_tokens, kwargs),
                                           read_options)
        if self.max_coalesced == 1:  # in the caller's thread, concurrently with any other call, as before coalescing
            *_, answer = self._events(suffix, corpus, params, *read_options)  # its text pieces, then its Answer
            return answer
        # the corpus object, not only its name: a call made after add_corpus(replace=True) must not join a batch
        # still decoding on the corpus it replaced
        key = (corpus, built, params, read_options)
        events = self._coalesced_events(key, suffix, pieces=False)
        try:
            answer = next((event for event in events if isinstance(event, Answer)), None)
        finally:
            events.close()
        if answer is None:
            raise RuntimeError("the call was dropped from the queue: its async consumer had gone")
        return answer

    def _answer_tickets(self, key, tickets: list) -> list[Answer | None]:
        """The coalescer's batch of questions (:class:`Question`), as rows that calls queued meanwhile join (in the
        rows of ended ones, or in rows the batch adds: a lone call's batch grows as calls arrive); each question's
        sink gets its pieces as they are decoded, then its Answer as soon as its row ends."""
        corpus, built, params, read_options = key
        joins = Joins(take=lambda most, fits: [t.item for t in self._coalescer.take(key, tickets, most, fits)],
                      waiting=lambda fits: self._coalescer.waiting(key, fits), max_rows=self._coalescer.max_rows)
        return self._answer_rows([t.item for t in tickets], corpus, params, *read_options, join=joins, built=built)

    def generate(self, prompt: Prompt, corpus: str, max_new_tokens: int = 256, **kwargs) -> str:
        """The answer's text (see :meth:`stream_answer` for the arguments)."""
        return self.answer(prompt, corpus, max_new_tokens, **kwargs).text

    def stream(self, prompt: Prompt, corpus: str, max_new_tokens: int = 256, **kwargs) -> Iterator[str]:
        """Text pieces as they are decoded (see :meth:`stream_answer` for the arguments)."""
        yield from self.stream_answer(prompt, corpus, max_new_tokens, **kwargs)

    def answer_batch(self, prompts: Sequence[Prompt], corpus: str, max_new_tokens: int = 256, **kwargs) -> list[Answer]:
        """Answer several questions on one corpus together; one :class:`Answer` per prompt, in order.

        The questions are read in one forward where they read the whole corpus (the default
        ``question_budget=1.0``), else one after the other; then every decode step feeds one token per answer
        through one forward (:mod:`~sqz_integrations.batch`): the weights and the corpus are read once per step
        for all of them (on CUDA with the Triton kernels, replayed from a CUDA graph of the batch's step). The
        keyword arguments are those of :meth:`stream_answer`, the same for every prompt; with ``seed`` each
        answer samples as a single call with that seed would. ``time_to_first_token`` / ``total_time`` count
        from the call's start.
        """
        if isinstance(prompts, (str, dict)) or not isinstance(prompts, Sequence):
            raise TypeError(f"prompts must be a list of questions or chat histories, got {type(prompts).__name__}")
        params = _sampling_params("answer_batch", max_new_tokens, kwargs)
        built = self.get_corpus(corpus)
        start = time.perf_counter()  # every answer's times count from the call
        questions = [Question(self.layout.suffix_ids(p), submitted=start) for p in prompts]
        if questions:  # the batch's buffers hold its longest question and max_new_tokens for every row
            params = self._fitted(built, max(len(q.suffix) for q in questions), params)
        return self._answer_rows(questions, corpus, params, *(kwargs.get(k) for k in _READ_OPTIONS)) if questions else []

    def _text_assembler(self, params: SamplingParams) -> TextAssembler:
        return TextAssembler(lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True), params.stop)

    @torch.inference_mode()
    def score_continuation(
        self,
        corpus: str,
        text: str | Sequence[int],
        *,
        kv_budget: float | None = None,
        hierarchical: bool | None = None,
        selection: str | None = None,
        per_token: bool = True,
        question_budget: float | None = None,
    ) -> torch.Tensor:
        """Log-probabilities ``(len(ids) - 1, vocab)`` of each next token of ``text`` placed right
        after the corpus (no chat template): row ``i`` predicts token ``i + 1``.

        ``per_token=True`` feeds one token at a time, re-selecting at every step as decoding does;
        ``False`` reads the whole continuation in one pass with one selection (a multi-token read:
        ``question_budget`` applies to it).
        """
        c = self.get_corpus(corpus)
        ids = self.layout.encode(text) if isinstance(text, str) else list(text)
        if len(ids) < 2:
            raise ValueError("the continuation needs at least two tokens")
        window, kind = model_support.context_limit(self.model.config)
        if window and c.n_tokens + len(ids) - 1 > window:
            raise ValueError(f"the continuation is {len(ids)} tokens; after corpus {corpus!r}'s {c.n_tokens} it runs "
                             f"past the model's {kind} of {window}")
        with self._device_lock.shared():
            read = CorpusRead(c, self._plan(c, kv_budget, hierarchical, selection, question_budget), track_sources=False)
            cache = DynamicCache()
            if per_token:
                rows = [self._forward([t], c.n_tokens + i, cache, read) for i, t in enumerate(ids[:-1])]
                logits = torch.cat(rows)
            else:
                logits = self._forward(ids[:-1], c.n_tokens, cache, read, all_logits=True)
            return torch.log_softmax(logits.float(), dim=-1)
