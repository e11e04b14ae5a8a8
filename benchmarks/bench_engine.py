"""End-to-end engine benchmark: answers from a squeezed corpus against cache-augmented generation (the
corpus's full KV cache, prefilled once and reused by every question), on one GPU.

The kernels benchmark (bench_kernels.py) times one attention layer; this one times what a user waits for:
``engine.answer`` (question prefill + greedy decoding, every layer through the transformers hook, the
lookup, the selection and the Triton kernels, Python included) against the same model answering from its
full corpus cache with plain SDPA. Speed does not depend on the weights, so the model is a randomly
initialised Llama with Llama-3-8B attention (32 query heads, 8 KV heads, head_dim 128, hidden 4096,
MLP 14336) and fewer layers; the tokenizer is SmolLM2's (tests/data/smollm2_tokenizer). The corpus is
random words. Reported per corpus size: build time (prefill + K-means + calibration + head probe) and its
peak memory, and per system the time to first token, the time per later token and the kept fraction.

Usage: ``python benchmarks/bench_engine.py [--tokens 32768 131072] [--layers 8] [--budgets 0.25 0.1]``;
``--cpu`` runs the real SmolLM2-135M-Instruct (float32, the torch twins, one thread by default) on the CPU at
6K corpus tokens (its window is 8K), what a CPU user of the engine waits for; ``--cpu-smoke`` runs a tiny model
on the CPU to check this script.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
import transformers
from transformers import AutoTokenizer, DynamicCache, StaticCache

from sqz_integrations import SqueezeConfig, SqueezedEngine, decode_graph
from sqz_integrations.config import CENTROID_DTYPES

ROOT = Path(__file__).resolve().parent.parent
TOKENIZER_DIR = ROOT / "tests" / "data" / "smollm2_tokenizer"
RESULTS = ROOT / "benchmarks" / "results"
WORDS = ("alpha beta gamma delta river stone cloud lamp garden window paper music orange silver table chair "
         "mountain forest ocean desert bridge tower castle village market harbor engine bottle candle mirror "
         "winter summer autumn spring morning evening letter number circle square yellow purple").split()
QUESTIONS = ["Which word comes right after river in the second document?",
             "How often does the word lamp appear near the end?",
             "What is the first word of the last document?"]


def make_model(vocab: int, layers: int, tokens: int, device: str, dtype: torch.dtype, small: bool):
    """A random Llama: Llama-3-8B attention and MLP widths (``small``: a tiny one for the CPU smoke run)."""
    shape = (dict(hidden_size=256, intermediate_size=512, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
             if small else
             dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32, num_key_value_heads=8,
                  head_dim=128))
    config = transformers.LlamaConfig(vocab_size=vocab, num_hidden_layers=layers, rope_theta=500000.0,
                                      max_position_embeddings=tokens + 4096, tie_word_embeddings=False, **shape)
    torch.manual_seed(0)
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # initialised in place: no multi-GB CPU round trip
            model = transformers.LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(saved)
    return model.eval()


def corpus_documents(tokens: int, seed: int = 0) -> list[str]:
    """Random words, about one token each, in documents of ~2000 words."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(2000)) for _ in range(max(1, tokens // 2000))]


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@torch.inference_mode()
def cag_answer(model, cache, cache_arg: str, corpus_len: int, suffix: list[int], new_tokens: int, device: str):
    """Cache-augmented generation: the question and greedy decoding over the corpus's full cache, which is
    cropped back to the corpus afterwards. Returns (time to first token, total time, tokens)."""
    sync(device)
    t0 = time.perf_counter()
    ids = torch.tensor([suffix], device=device)
    pos = corpus_len
    out_ids = []
    ttft = 0.0
    for i in range(new_tokens):
        positions = torch.arange(pos, pos + ids.shape[1], device=device).unsqueeze(0)
        logits = model(input_ids=ids, position_ids=positions, use_cache=True, logits_to_keep=1,
                       **{cache_arg: cache}).logits
        pos += ids.shape[1]
        token = int(logits[0, -1].argmax())
        if i == 0:
            sync(device)
            ttft = time.perf_counter() - t0
        out_ids.append(token)
        ids = torch.tensor([[token]], device=device)
    sync(device)
    total = time.perf_counter() - t0
    extra = cache.get_seq_length() - corpus_len
    if extra > 0:  # a negative count removes that many tokens in transformers 4.x and 5.x alike
        cache.crop(-extra)
    return ttft, total, out_ids


@torch.inference_mode()
def prefill_cache(model, cache_arg: str, ids: list[int], chunk: int, device: str) -> DynamicCache:
    cache = DynamicCache()
    all_ids = torch.tensor([ids], device=device)
    for start in range(0, len(ids), chunk):
        model(input_ids=all_ids[:, start:start + chunk], use_cache=True, logits_to_keep=1, **{cache_arg: cache})
    return cache


class GraphedCAG:
    """Cache-augmented generation as fast as transformers makes it: the corpus prefilled once into a
    ``StaticCache`` (room for the question and the answer after it), the question read eagerly, and every
    decode step one replay of a CUDA graph captured once and reused by every answer (what
    ``torch.compile(mode="reduce-overhead")`` does, without the compile). Each answer overwrites the slots
    after the corpus; the static cache's mask hides the ones past the current position."""

    def __init__(self, model, cache_arg: str, corpus: DynamicCache, room: int, device: str):
        """``corpus``: the corpus's prefilled cache, copied into the static one (a chunked prefill straight into a
        static cache would run SDPA with an explicit mask over all its slots: the math kernel, which ran out of
        memory at 128K on the H200)."""
        self.model, self.cache_arg, self.n = model, cache_arg, corpus.get_seq_length()
        self.cache = StaticCache(config=model.config, max_cache_len=self.n + room)
        self.room = room
        positions = torch.arange(self.n, device=device)
        for i, layer in enumerate(corpus.layers):
            self.cache.update(layer.keys, layer.values, i, cache_kwargs={"cache_position": positions})
        self.token = torch.zeros(1, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.capture_seconds: float | None = None
        self.device = device  # graphs on CUDA only; elsewhere the same static-cache steps run eagerly

    def _forward(self, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids, position_ids=positions.unsqueeze(0), cache_position=positions,
                          use_cache=True, logits_to_keep=1, **{self.cache_arg: self.cache}).logits[0, -1]

    def _rewind(self) -> None:
        """Back to the corpus alone. transformers 5.24's static layers write at a device-side count of the
        tokens they hold (``cumulative_length``, advanced by every forward and every replay) rather than at
        ``cache_position``, which older releases use; the count is set back in place (the graph holds it)."""
        for layer in self.cache.layers:
            count = getattr(layer, "cumulative_length", None)
            if isinstance(count, torch.Tensor):
                count.fill_(self.n)

    def _step(self, token: int, position: int) -> torch.Tensor:
        self.token.fill_(token)
        self.position.fill_(position)
        if self.graph is None:
            return self._forward(self.token, self.position)
        self.graph.replay()
        return self.logits

    def _capture(self) -> None:
        """Called after an eager step has warmed every kernel; the capture itself runs nothing."""
        t0 = time.perf_counter()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.logits = self._forward(self.token, self.position)
        self.graph = graph
        self.capture_seconds = time.perf_counter() - t0

    @torch.inference_mode()
    def answer(self, suffix: list[int], new_tokens: int):
        """Returns (time to first token, total time, tokens)."""
        if len(suffix) + new_tokens > self.room:
            raise ValueError(f"{len(suffix)} + {new_tokens} tokens do not fit in the {self.room} slots after the corpus")
        self._rewind()
        dev = self.token.device
        sync(self.device)
        t0 = time.perf_counter()
        pos = self.n
        logits = self._forward(torch.tensor([suffix], device=dev), torch.arange(pos, pos + len(suffix), device=dev))
        pos += len(suffix)
        out_ids = [int(logits.argmax())]
        ttft = time.perf_counter() - t0
        for i in range(1, new_tokens):
            if self.graph is None and i >= 2 and self.device == "cuda":  # the first answer's second step ran eagerly
                self._capture()
            out_ids.append(int(self._step(out_ids[-1], pos).argmax()))
            pos += 1
        sync(self.device)
        return ttft, time.perf_counter() - t0, out_ids


def leading_equal(a: list[int], b: list[int]) -> int:
    """How many leading tokens two answers share."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def peak_gb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 1e9 if device == "cuda" else None


class CaptureTimer:
    """Times each CUDA-graph capture (at the third token of an answer that finds no pooled graph of its kind;
    inside that answer's total time)."""

    def __init__(self):
        self.seconds: list[float] = []
        self._init = decode_graph.GraphedStep.__init__
        timer = self

        def timed(step, *a, **k):
            t0 = time.perf_counter()
            timer._init(step, *a, **k)
            timer.seconds.append(time.perf_counter() - t0)

        decode_graph.GraphedStep.__init__ = timed

    def take(self) -> list[float]:
        out, self.seconds = self.seconds, []
        return out


def run_size(engine: SqueezedEngine, tokens: int, args, device: str) -> dict:
    rec: dict = {"tokens_requested": tokens}
    captures = CaptureTimer() if device == "cuda" else None
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sync(device)
    t0 = time.perf_counter()
    corpus = engine.add_corpus("bench", corpus_documents(tokens), progress=False, replace=True)
    sync(device)
    rec.update(corpus_tokens=corpus.n_tokens, build_seconds=time.perf_counter() - t0, build_peak_gb=peak_gb(device),
               clusters_per_head=corpus.n_clusters)
    if args.straggler:  # this measurement only
        rec["straggler"] = {f"{b:g}": run_straggler(engine, args.batch, b, args.new_tokens, device) for b in args.budgets}
        if captures is not None:
            decode_graph.GraphedStep.__init__ = captures._init
        return rec
    systems: dict[str, list[dict]] = {}
    # on CUDA every budget twice: decode steps replayed as CUDA graphs (the default) and launched eagerly
    modes = [("", True), (" eager", False)] if device == "cuda" and engine.config.cuda_graphs else [("", False)]
    built = corpus.config
    for budget in [1.0] + args.budgets:
        for label, graphs in modes:
            corpus.config = built.replace(cuda_graphs=graphs)
            runs = []
            for rep in range(args.repeats):
                for q in QUESTIONS:
                    sync(device)
                    ans = engine.answer(q, corpus="bench", max_new_tokens=args.new_tokens, kv_budget=budget)
                    runs.append(dict(ttft=ans.time_to_first_token, total=ans.total_time, tokens=ans.completion_tokens,
                                     kept=ans.kept_fraction, warm=rep > 0 or q != QUESTIONS[0], ids=ans.token_ids))
            systems[f"squeezed@{budget:g}{label}"] = runs
        if len(modes) > 1:  # the graph replays must give the eager steps' tokens
            rec.setdefault("graph_tokens_equal_eager", {})[f"{budget:g}"] = all(
                a["ids"] == b["ids"] for a, b in zip(systems[f"squeezed@{budget:g}"], systems[f"squeezed@{budget:g} eager"]))
    corpus.config = built
    if args.batch > 1:
        rec["batch"] = {f"{b:g}": run_batch(engine, args.batch, b, args.new_tokens, device) for b in args.budgets}
    rec["cuda_graph_error"] = engine.cuda_graph_error
    if captures is not None:
        taken = sorted(captures.take())
        rec["graph_capture_ms"] = dict(n=len(taken), median=1e3 * taken[len(taken) // 2] if taken else None,
                                       max=1e3 * taken[-1] if taken else None)
        decode_graph.GraphedStep.__init__ = captures._init
    # cache-augmented generation with the same model (plain SDPA: no squeeze argument) and its full cache
    corpus_ids = list(corpus.token_ids)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    cache = prefill_cache(engine.model, engine._cache_arg, corpus_ids, args.chunk, device)
    sync(device)
    rec["cag_prefill_seconds"] = time.perf_counter() - t0
    runs = []
    for rep in range(args.repeats):
        for q in QUESTIONS:
            suffix = engine.prompt_ids(q, "bench")[len(corpus_ids):]
            ttft, total, out = cag_answer(engine.model, cache, engine._cache_arg, len(corpus_ids), suffix,
                                          args.new_tokens, device)
            runs.append(dict(ttft=ttft, total=total, tokens=len(out), kept=1.0, warm=rep > 0 or q != QUESTIONS[0],
                             ids=out))
    systems["cag (full KV, SDPA)"] = runs
    # the engine at kv_budget=1.0 is exact full-KV reuse: the same greedy tokens as the CAG loop (up to the
    # engine stopping at an end-of-turn token, which the CAG loop does not)
    rec["full_budget_tokens_equal_cag"] = all(
        a["ids"] == b["ids"][:len(a["ids"])] for a, b in zip(systems["squeezed@1"], runs))
    # per answer, how many leading tokens agree: a random bf16 model's logits are near ties (initialiser std
    # 0.02), so one rounding difference between the two attention paths can change a greedy token and the
    # answers part there (tests/test_engine_gpu.py checks the engine against transformers with margins)
    rec["full_budget_equal_leading_tokens"] = [leading_equal(a["ids"], b["ids"])
                                               for a, b in zip(systems["squeezed@1"], runs)]
    rec["cag_peak_gb"] = peak_gb(device)
    # the strongest CAG transformers offers: a static cache and (on CUDA) one CUDA graph per decode step, reused
    suffixes = [engine.prompt_ids(q, "bench")[len(corpus_ids):] for q in QUESTIONS]
    cag = GraphedCAG(engine.model, engine._cache_arg, cache, max(map(len, suffixes)) + args.new_tokens, device)
    del cache
    graph_runs = []
    for rep in range(args.repeats):
        for q, suffix in zip(QUESTIONS, suffixes):
            ttft, total, out = cag.answer(suffix, args.new_tokens)
            graph_runs.append(dict(ttft=ttft, total=total, tokens=len(out), kept=1.0,
                                   warm=rep > 0 or q != QUESTIONS[0], ids=out))
    systems["cag graph (full KV, static cache)"] = graph_runs
    rec["cag_graph_capture_ms"] = 1e3 * cag.capture_seconds if cag.capture_seconds is not None else None
    # the static cache's masked SDPA is another kernel than the dynamic cache's: report where they part
    rec["cag_graph_equal_leading_tokens"] = [leading_equal(a["ids"], b["ids"]) for a, b in zip(graph_runs, runs)]
    del cag
    rec["systems"] = {name: summarise(r) for name, r in systems.items()}
    return rec


def profile_decode(engine: SqueezedEngine, budget: float, new_tokens: int, device: str) -> str:
    """Where a decode step's time goes: the torch profiler over one warm answer at ``budget``, ops ranked by
    their own host (CPU) time, with the host time spent inside the squeezed attention hook and the number
    of GPU kernels per generated token. A decode step that is slower than its kernels is bound by the host."""
    from torch.profiler import ProfilerActivity, profile

    from sqz_integrations.selection import CorpusRead

    hook_s = [0.0]
    original = CorpusRead.attend

    def timed_attend(self, *a, **k):
        t0 = time.perf_counter()
        try:
            return original(self, *a, **k)
        finally:
            hook_s[0] += time.perf_counter() - t0

    engine.answer(QUESTIONS[0], corpus="bench", max_new_tokens=new_tokens, kv_budget=budget)  # warm
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    CorpusRead.attend = timed_attend
    try:
        with profile(activities=activities) as prof:
            ans = engine.answer(QUESTIONS[0], corpus="bench", max_new_tokens=new_tokens, kv_budget=budget)
    finally:
        CorpusRead.attend = original
    events = prof.key_averages()
    kernels = sum(e.count for e in events if e.device_type.name == "CUDA") if device == "cuda" else 0
    head = (f"profile at kv_budget={budget}: {ans.completion_tokens} tokens, {ans.total_time * 1e3:.1f} ms in all, "
            f"{hook_s[0] * 1e3:.1f} ms of host time inside the attention hook, "
            f"{kernels / max(1, ans.completion_tokens):.0f} GPU kernels per token\n")
    return head + events.table(sort_by="self_cpu_time_total", row_limit=30)


def run_batch(engine: SqueezedEngine, rows: int, budget: float, new_tokens: int, device: str) -> dict:
    """``rows`` different questions answered one after the other (``engine.answer``: CUDA-graph decode on CUDA),
    together (``engine.answer_batch``), and from ``rows`` threads at once calling ``engine.answer`` (as LangChain's
    ``batch`` does): coalesced into batches by the engine, and each alone (``max_coalesced=1``, what concurrent calls
    got before); and from ``rows`` threads each reading a ``stream_answer`` (a server streaming to its users),
    coalesced. Tokens per second over the whole set, the batch sizes the threads' calls were coalesced into,
    and how many answers agree token for token with the one-by-one ones (a batched GEMM may round a near-tie logit
    of the random model the other way)."""
    questions = [f"{QUESTIONS[i % len(QUESTIONS)]} (question {i + 1})" for i in range(rows)]
    # once untimed: compiles the batch's kernels and (CUDA) leaves its step's graph in the pool, as a service
    # answering batches of this size would have it
    engine.answer_batch(questions, "bench", max_new_tokens=new_tokens, kv_budget=budget)
    sizes: list[int] = []
    answer_rows = engine._answer_rows  # what answer_batch and the coalescer run

    def counted(questions, *args, **kwargs):
        answers = answer_rows(questions, *args, **kwargs)
        sizes.append(len(questions))  # its first questions and those that joined it
        return answers

    def from_threads(stream: bool = False, stagger_s: float = 0.0) -> list:
        barrier = threading.Barrier(rows)

        def ask(q):
            barrier.wait()
            time.sleep(questions.index(q) * stagger_s)  # staggered: call i arrives i gaps after the first
            if stream:
                answer_stream = engine.stream_answer(q, "bench", max_new_tokens=new_tokens, kv_budget=budget)
                for _ in answer_stream:
                    pass
                return answer_stream.answer
            return engine.answer(q, "bench", max_new_tokens=new_tokens, kv_budget=budget)

        with ThreadPoolExecutor(rows) as pool:
            return list(pool.map(ask, questions))

    # and once from threads, coalesced (on the CPU too, where it is off by default), untimed: a burst's first call
    # starts alone (no call had overlapped before it); the timed burst below finds the engine gathering, as a
    # service answering bursts would
    engine.max_coalesced = rows
    from_threads()
    timings = {}
    engine._answer_rows = counted
    try:
        for way in ("one by one", "batch", "threads", "streams", "threads alone", "staggered", "staggered, no growth",
                    "staggered alone"):
            engine.max_coalesced = 1 if way.endswith("alone") else rows
            if way == "staggered":  # once untimed: the widths it grows through capture their graphs, as in a service
                from_threads(stagger_s=timings["one by one"]["seconds"] / rows / rows)
            sizes.clear()
            sync(device)
            t0 = time.perf_counter()
            if way == "batch":
                answers = engine.answer_batch(questions, "bench", max_new_tokens=new_tokens, kv_budget=budget)
            elif way.startswith("staggered"):
                # the calls arrive one by one over the time of one answer alone (one by one's mean); "no growth":
                # a batch keeps its width, so calls queued behind it wait for its rows to end
                if way == "staggered, no growth":
                    engine._coalescer.waiting = lambda key, fits: 0
                try:
                    answers = from_threads(stagger_s=timings["one by one"]["seconds"] / rows / rows)
                finally:
                    engine._coalescer.__dict__.pop("waiting", None)
            elif way.startswith("threads") or way == "streams":
                answers = from_threads(stream=way == "streams")
            else:
                answers = [engine.answer(q, "bench", max_new_tokens=new_tokens, kv_budget=budget) for q in questions]
            sync(device)
            seconds = time.perf_counter() - t0
            tokens = sum(a.completion_tokens for a in answers)
            timings[way] = dict(seconds=seconds, tokens=tokens, tokens_per_s=tokens / seconds, batches=list(sizes),
                                ids=[a.token_ids for a in answers], kept=[a.kept_fraction for a in answers],
                                ttft=sorted(a.time_to_first_token for a in answers)[len(answers) // 2])
    finally:
        del engine._answer_rows  # the instance attribute set above
        engine.max_coalesced = None  # the default again
    one = timings["one by one"]
    out = dict(rows=rows, budget=budget, kept_one_by_one=one["kept"])
    for way, t in timings.items():
        tag = way.replace(" ", "_")
        out.update({f"seconds_{tag}": t["seconds"], f"tokens_{tag}": t["tokens"],
                    f"tokens_per_s_{tag}": t["tokens_per_s"], f"median_ttft_s_{tag}": t["ttft"]})
        if way != "one by one":
            out[f"equal_{tag}"] = sum(a == b for a, b in zip(one["ids"], t["ids"]))
            out[f"leading_equal_{tag}"] = [leading_equal(a, b) for a, b in zip(one["ids"], t["ids"])]
            out[f"kept_{tag}"] = t["kept"]
        if way != "one by one":
            out[f"batches_{tag}"] = t["batches"]
    return out


def run_straggler(engine: SqueezedEngine, rows: int, budget: float, new_tokens: int, device: str) -> dict:
    """A batch of ``rows`` answers (``answer_batch``) in which every row but the first ends at its fourth token (made
    to, as if it sampled an end of turn: the random model never does) while the first goes on to ``new_tokens``: with
    narrowing (the default: once the others have ended, the batch moves into a pooled graph of one row) and without
    (the straggler decodes to its end in the graph of ``rows`` rows, its ended rows reading nothing). Seconds per
    batch, median of 3 alternated runs after an untimed one each, and how far the straggler's tokens agree (its
    steps are batched GEMMs of 1 or of ``rows`` rows, which may round a near-tie logit of the random model apart)."""
    from sqz_integrations import batch_decode

    questions = [f"{QUESTIONS[i % len(QUESTIONS)]} (question {i + 1})" for i in range(rows)]
    lead = tuple(engine.layout.suffix_ids(questions[0]))
    take, graph_slot = batch_decode._Rows.take, engine._graph_slot

    def ends_early(r, b, token):
        piece = take(r, b, token)
        if tuple(r.occupant[b].suffix) != lead and len(r.texts[b].ids) >= 4 and not r.done[b]:
            r.done[b], r.finish[b], r.ended[b] = True, "stop", time.perf_counter()
        return piece

    def no_narrowing(*args, pooled_only=False, **kwargs):  # the batch finds no narrower graph, so it stays as wide
        return None if pooled_only else graph_slot(*args, **kwargs)

    def run(way: str) -> tuple[float, list[int]]:
        if way == "no narrowing":
            engine._graph_slot = no_narrowing
        try:
            sync(device)
            t0 = time.perf_counter()
            answers = engine.answer_batch(questions, "bench", max_new_tokens=new_tokens, kv_budget=budget)
            sync(device)
            return time.perf_counter() - t0, answers[0].token_ids
        finally:
            engine.__dict__.pop("_graph_slot", None)

    ways = ("narrowing", "no narrowing")
    batch_decode._Rows.take = ends_early
    try:
        engine.answer_batch(questions[:1], "bench", max_new_tokens=new_tokens, kv_budget=budget)  # a graph of one row
        for way in ways:
            run(way)  # untimed: the graph of `rows` rows is captured and pooled
        timed = {way: [] for way in ways}
        ids = {}
        for _ in range(3):
            for way in ways:
                seconds, ids[way] = run(way)
                timed[way].append(seconds)
    finally:
        batch_decode._Rows.take = take
    return dict(rows=rows, budget=budget, new_tokens=new_tokens, straggler_tokens=len(ids["narrowing"]),
                seconds={way: sorted(t)[1] for way, t in timed.items()}, all_seconds=timed,
                straggler_equal=ids["narrowing"] == ids["no narrowing"],
                straggler_leading_equal=leading_equal(ids["narrowing"], ids["no narrowing"]))


def summarise(runs: list[dict]) -> dict:
    """Medians over the warm answers (the first answer of a size compiles kernels and fills caches)."""
    warm = [r for r in runs if r["warm"]] or runs

    def median(xs):
        xs = sorted(xs)
        return xs[len(xs) // 2]

    per_token = [(r["total"] - r["ttft"]) / max(1, r["tokens"] - 1) for r in warm]
    return dict(ttft_s=median([r["ttft"] for r in warm]), per_token_ms=1e3 * median(per_token),
                kept_fraction=median([r["kept"] for r in warm]), answers=len(warm))


def markdown(meta: dict, records: list[dict]) -> str:
    lines = [f"Engine benchmark, {meta['date']}, {meta['device']}, torch {meta['torch']}, transformers "
             f"{meta['transformers']}. {meta.get('model', 'Random Llama')} ({meta['layers']} layers, {meta['shape']}), "
             f"{meta['dtype']}; "
             f"{meta['new_tokens']} new tokens per answer; copy_window {meta['config']['copy_window']}; medians over "
             "warm answers.", "",
             "| corpus tokens | build s | system | time to first token s | ms per later token | kept |",
             "|---|---|---|---|---|---|"]
    for r in records:
        for name, s in r.get("systems", {}).items():
            lines.append(f"| {r['corpus_tokens']} | {r['build_seconds']:.1f} | {name} | {s['ttft_s']:.3f} | "
                         f"{s['per_token_ms']:.1f} | {s['kept_fraction']:.3f} |")
    batches = [(r["corpus_tokens"], b) for r in records for b in r.get("batch", {}).values()]
    if batches:
        lines += ["", "Different questions on one corpus, generated tokens per second over the whole set: one by one "
                  "(`answer`); together (`answer_batch`); from as many threads at once calling `answer` (as LangChain's "
                  "`batch` does), coalesced by the engine into the batches listed, and each alone (`max_coalesced=1`); "
                  "from as many threads each reading a `stream_answer`, coalesced (median time to first token of "
                  "the threads' calls / the streams in ms). Answers equal: token for token with one by one.", "",
                  "| corpus tokens | budget | questions | one by one tok/s | batch tok/s | threads tok/s (batches) "
                  "| streams tok/s (batches) | threads / streams TTFT ms | threads alone tok/s | batch speed-up "
                  "| threads speed-up | answers equal (batch / threads / streams) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for n, b in batches:
            one = b["tokens_per_s_one_by_one"]
            lines.append(f"| {n} | {b['budget']:g} | {b['rows']} | {one:.1f} | {b['tokens_per_s_batch']:.1f} | "
                         f"{b['tokens_per_s_threads']:.1f} ({'+'.join(map(str, b['batches_threads'])) or '-'}) | "
                         f"{b['tokens_per_s_streams']:.1f} ({'+'.join(map(str, b['batches_streams'])) or '-'}) | "
                         f"{1e3 * b['median_ttft_s_threads']:.0f} / {1e3 * b['median_ttft_s_streams']:.0f} | "
                         f"{b['tokens_per_s_threads_alone']:.1f} | {b['tokens_per_s_batch'] / one:.2f}x | "
                         f"{b['tokens_per_s_threads'] / one:.2f}x | {b['equal_batch']}/{b['rows']} / "
                         f"{b['equal_threads']}/{b['rows']} / {b['equal_streams']}/{b['rows']} |")
    if batches:
        lines += ["", "Staggered arrivals: the same questions from as many threads, call i arriving i gaps after the first, "
                  "the calls spread over the time of one answer alone: coalesced (a running batch grows to seat the "
                  "calls that queue behind it), coalesced with no growth (a batch keeps its width: they wait for its "
                  "rows to end), and each alone. Tokens per second over the whole set (final batch sizes) / median time "
                  "to first token in ms, counted from each call.", "",
                  "| corpus tokens | budget | questions | gap ms | coalesced, growing | coalesced, no growth | alone |",
                  "|---|---|---|---|---|---|---|"]
        for n, b in batches:
            cells = [f"{b[f'tokens_per_s_{tag}']:.1f} ({'+'.join(map(str, b.get(f'batches_{tag}', []))) or '-'}) / "
                     f"{1e3 * b[f'median_ttft_s_{tag}']:.0f}" for tag in ("staggered", "staggered,_no_growth")]
            cells.append(f"{b['tokens_per_s_staggered_alone']:.1f} / {1e3 * b['median_ttft_s_staggered_alone']:.0f}")
            gap = 1e3 * b["seconds_one_by_one"] / b["rows"] / b["rows"]
            lines.append(f"| {n} | {b['budget']:g} | {b['rows']} | {gap:.1f} | " + " | ".join(cells) + " |")
    stragglers = [(r["corpus_tokens"], b) for r in records for b in r.get("straggler", {}).values()]
    if stragglers:
        lines += ["", "A straggler: a batch (`answer_batch`) whose rows but the first end at their fourth token while the "
                  "first goes on; seconds per batch (median of 3), the batch narrowing into a pooled graph of one row "
                  "once the others have ended (the default) or decoding the straggler in its full-width graph.", "",
                  "| corpus tokens | budget | rows | straggler tokens | narrowing s | no narrowing s | straggler equal |",
                  "|---|---|---|---|---|---|---|"]
        for n, b in stragglers:
            lines.append(f"| {n} | {b['budget']:g} | {b['rows']} | {b['straggler_tokens']} | "
                         f"{b['seconds']['narrowing']:.3f} | {b['seconds']['no narrowing']:.3f} | {b['straggler_equal']} |")
    for r in records:
        cap = r.get("graph_capture_ms")
        if cap and cap["n"]:
            lines.append(f"\n{r['corpus_tokens']} tokens: {cap['n']} CUDA-graph captures (an answer captures where no "
                         f"pooled graph of its kind is free: the first of each budget, which the medians leave out), "
                         f"median {cap['median']:.1f} ms (max {cap['max']:.1f}); graph tokens equal eager: "
                         f"{r.get('graph_tokens_equal_eager')}")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--budgets", type=float, nargs="+", default=[0.25, 0.1])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=4096, help="corpus prefill chunk (engine and CAG)")
    ap.add_argument("--batch", type=int, default=8,
                    help="also answer this many different questions one by one and as one batch (0: not)")
    ap.add_argument("--out", type=Path, default=RESULTS)
    ap.add_argument("--copy-window", type=int, default=SqueezeConfig.copy_window,
                    help="SqueezeConfig.copy_window (0: decode reads only its own selection)")
    ap.add_argument("--centroid-dtype", default=SqueezeConfig.centroid_dtype, choices=CENTROID_DTYPES)
    ap.add_argument("--profile", type=float, default=None, metavar="BUDGET",
                    help="after the first size, profile one answer at this budget (and at 1.0) and print where a "
                         "decode step spends its time")
    ap.add_argument("--cpu", action="store_true",
                    help="the real SmolLM2-135M-Instruct on the CPU, float32 (default --tokens 6144)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads with --cpu")
    ap.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU (torch twins): checks the script")
    ap.add_argument("--straggler", action="store_true",
                    help="only a batch whose rows but one end early, with and without narrowing (CUDA graphs)")
    args = ap.parse_args()
    device = "cpu" if args.cpu_smoke or args.cpu else "cuda"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    if args.cpu_smoke:
        args.tokens, args.layers, args.new_tokens, args.repeats, args.batch = [2048], 2, 4, 1, min(args.batch, 3)
    if args.cpu:
        from sqz_integrations.default_model import default_model_dir

        torch.set_num_threads(args.threads)
        if args.tokens == ap.get_default("tokens"):
            args.tokens = [6144]
        tok = AutoTokenizer.from_pretrained(default_model_dir())
        model = transformers.AutoModelForCausalLM.from_pretrained(default_model_dir(), dtype=torch.float32).eval()
        args.layers = model.config.num_hidden_layers
    else:
        tok = AutoTokenizer.from_pretrained(TOKENIZER_DIR)
        model = make_model(len(tok), args.layers, max(args.tokens), device, dtype, small=args.cpu_smoke)
    engine = SqueezedEngine(model, tok, SqueezeConfig(sources=False, prefill_chunk=args.chunk,
                                                       copy_window=args.copy_window, centroid_dtype=args.centroid_dtype))
    meta = dict(date=dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
                device=(torch.cuda.get_device_name(0) if device == "cuda"
                        else f"{platform.processor() or 'cpu'} ({torch.get_num_threads()} torch threads)"),
                torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version(),
                model="SmolLM2-135M-Instruct" if args.cpu else "Random Llama",
                layers=args.layers, dtype=str(dtype).replace("torch.", ""), new_tokens=args.new_tokens,
                shape=("tiny" if args.cpu_smoke else "9 q heads, 3 KV heads, d=64, hidden 576" if args.cpu
                       else "32 q heads, 8 KV heads, d=128, hidden 4096, MLP 14336"),
                config=dict(kv_budget_default=engine.config.kv_budget, prefill_chunk=args.chunk,
                                copy_window=args.copy_window, centroid_dtype=args.centroid_dtype))
    records = []
    for n in args.tokens:
        rec = run_size(engine, n, args, device)
        print(json.dumps(rec), flush=True)
        records.append(rec)
        if args.profile is not None and len(records) == 1:
            for budget in (args.profile, 1.0):
                print(profile_decode(engine, budget, args.new_tokens, device), flush=True)
    md = markdown(meta, records)
    if not args.cpu_smoke:
        args.out.mkdir(parents=True, exist_ok=True)
        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%d-%H%M")
        stem = f"engine_cpu_{stamp}" if args.cpu else f"engine_{stamp}"
        (args.out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, results=records), indent=1))
        (args.out / f"{stem}.md").write_text(md)
    print(md)


if __name__ == "__main__":
    main()
