"""Where a GPU corpus build's time goes: ``add_corpus`` of bench_engine's random Llama, each phase timed with a
device sync (prefill, K-means per layer, calibration's distributions, the probe question, the head probe).

    python benchmarks/profile_build.py [--tokens 32768 131072] [--repeat 2] [--kmeans-dtype float32] [--save DIR]

Every size is built ``--repeat`` times in one process: the first build also compiles and warms kernels. With
``--save``, each size's corpus is then saved under DIR and loaded back (``engine.save_corpus`` / ``load_corpus``),
both timed (the load from the disk, the save's pages dropped from the page cache, then from the cache), and the
loaded corpus's answer compared with the built one's.
"""
from __future__ import annotations

import argparse
import collections
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_engine  # noqa: E402
from sqz_integrations import SqueezeConfig, SqueezedEngine, calibration, clustering  # noqa: E402
from sqz_integrations import corpus as corpus_module  # noqa: E402
from sqz_integrations import engine as engine_module  # noqa: E402


def timed(owner, name: str, totals: dict, label: str | None = None) -> None:
    original = getattr(owner, name)

    def wrapper(*args, **kwargs):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            torch.cuda.synchronize()
            totals[label or name] += time.perf_counter() - t0

    setattr(owner, name, wrapper)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, nargs="+", default=[32768, 131072])
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--kmeans-dtype", default=None, choices=[None, "float32", "bfloat16"])
    ap.add_argument("--save", type=Path, default=None, help="save and load each corpus under this folder, timed")
    args = ap.parse_args()
    totals: dict = collections.defaultdict(float)
    if args.kmeans_dtype:
        kmeans = clustering.spherical_kmeans
        dtype = getattr(torch, args.kmeans_dtype)
        corpus_module.spherical_kmeans = lambda *a, **k: kmeans(*a, **{**k, "assign_dtype": dtype})
    timed(corpus_module, "spherical_kmeans", totals, "k-means")
    timed(engine_module, "squeeze_layer", totals, "squeeze_layer (k-means included)")
    timed(calibration, "_distribution", totals, "calibration distributions")
    timed(engine_module.SqueezedEngine, "_prefill", totals, "prefill")
    timed(engine_module.SqueezedEngine, "_probe", totals, "probe question")
    timed(engine_module.SqueezedEngine, "_probe_heads", totals, "head probe (its calibration included)")
    tok = bench_engine.AutoTokenizer.from_pretrained(bench_engine.TOKENIZER_DIR)
    model = bench_engine.make_model(len(tok), args.layers, max(args.tokens), "cuda", torch.bfloat16, small=False)
    engine = SqueezedEngine(model, tok, SqueezeConfig(sources=False, prefill_chunk=4096))
    for n in args.tokens:
        docs = bench_engine.corpus_documents(n)
        for rep in range(args.repeat):
            totals.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            engine.add_corpus("bench", docs, progress=False, replace=True)
            torch.cuda.synchronize()
            total = time.perf_counter() - t0
            parts = ", ".join(f"{k} {v:.2f}" for k, v in totals.items())
            print(f"{n} tokens, build {rep + 1}: {total:.2f} s ({parts})", flush=True)
        if args.save:
            save_and_load(engine, args.save / f"bench-{n}", n)


def save_and_load(engine: SqueezedEngine, path: Path, n: int) -> None:
    question = "What does the first document say?"
    built = engine.answer(question, "bench", max_new_tokens=16)
    t0 = time.perf_counter()
    engine.save_corpus("bench", path, overwrite=True)
    saved_s = time.perf_counter() - t0
    size = sum(f.stat().st_size for f in path.iterdir())
    loads = {}
    for cache in ("cold", "warm"):
        if cache == "cold":  # the save's pages out of the page cache, so the load reads the disk
            for f in path.iterdir():
                fd = os.open(f, os.O_RDONLY)
                os.fsync(fd)
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
                os.close(fd)
        t0 = time.perf_counter()
        engine.load_corpus(path, name="bench-loaded", replace=True)
        torch.cuda.synchronize()
        loads[cache] = time.perf_counter() - t0
    again = engine.answer(question, "bench-loaded", max_new_tokens=16)
    engine.remove_corpus("bench-loaded")
    print(f"{n} tokens: saved {size / 1e9:.2f} GB in {saved_s:.2f} s, loaded in {loads['cold']:.2f} s from the disk "
          f"(page cache dropped for its files) and {loads['warm']:.2f} s from the page cache; the loaded corpus "
          f"answers the same tokens: {again.token_ids == built.token_ids}", flush=True)


if __name__ == "__main__":
    main()
