"""Task-free fidelity: how far each KV budget moves the model's next-token distribution.

A corpus of plain essay text (no needle) is built once; a held-out passage (the opening of an
essay that is not in the corpus) is placed right after it, and every next-token distribution of
the passage is computed with full KV and with each budget. Reported per budget: top-1 agreement
(the argmax token is the same as with full KV) and mean KL(full || budget) in nats.

The squeezed engine is scored with ``engine.score_continuation(per_token=True)``: one token at a
time, re-selecting clusters at every step, as decoding does. The kvpress presses score the same
token ids in the kvpress runner (one compressed prefill of the same corpus ids, then the passage).
"""
from __future__ import annotations

import random
import time
from dataclasses import dataclass

import torch

import niah


@dataclass
class FidelityItem:
    name: str
    essays: list[str]
    corpus_text: str
    held_out: str
    continuation: str  # the held-out passage's text (its first ``tokens`` tokens)


def make_items(tokenizer, lengths=(2048, 4096), tokens: int = 96, seed: int = 0) -> list[FidelityItem]:
    """One corpus per length (essays drawn by seed) and a held-out passage for each."""
    essays = niah.load_essays()
    items = []
    for length in lengths:
        rng = random.Random(f"fidelity:{seed}:{length}")
        names = list(essays)
        rng.shuffle(names)
        held_out = names.pop()
        text, used = niah._haystack(essays, names, length, tokenizer)
        offsets = tokenizer(essays[held_out], add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        passage = essays[held_out][: offsets[min(tokens, len(offsets) - 1)][0]]
        items.append(FidelityItem(f"fid{length}", used, text, held_out, passage))
    return items


def compare(ref: torch.Tensor, lp: torch.Tensor) -> dict:
    """ref, lp: (T, vocab) log-probs -> top-1 agreement and mean KL(ref || lp)."""
    kl = (ref.exp() * (ref - lp)).sum(-1)
    return {
        "top1_agreement": float((lp.argmax(-1) == ref.argmax(-1)).float().mean()),
        "mean_kl": float(kl.mean()),
        "max_kl": float(kl.max()),
    }


def run_engine(engine, items: list[FidelityItem], budgets, hierarchical_modes=(False, True), progress=None) -> tuple[list, list]:
    """-> (rows, jobs for the kvpress runner: the same corpus and continuation token ids)."""
    rows, jobs = [], []
    for item in items:
        corpus = engine.add_corpus(item.name, [item.corpus_text], progress=False, replace=True,
                                   config=engine.config.replace(hierarchical=True))
        ids = engine.layout.encode(item.continuation)
        start = time.perf_counter()
        ref = engine.score_continuation(item.name, ids, kv_budget=1.0, per_token=True)
        rows.append({"name": item.name, "system": "full", "kv_budget": 1.0, "tokens": int(ref.shape[0]),
                     "corpus_tokens": corpus.n_tokens, "top1_agreement": 1.0, "mean_kl": 0.0, "max_kl": 0.0,
                     "seconds": time.perf_counter() - start, "full_top1": ref.argmax(-1).tolist()})
        for budget in budgets:
            for hier in hierarchical_modes:
                start = time.perf_counter()
                lp = engine.score_continuation(item.name, ids, kv_budget=budget, hierarchical=hier, per_token=True)
                rows.append({"name": item.name, "system": "squeezed-hier" if hier else "squeezed-flat", "kv_budget": budget,
                             "tokens": int(lp.shape[0]), "corpus_tokens": corpus.n_tokens, **compare(ref, lp),
                             "seconds": time.perf_counter() - start})
                if progress:
                    progress(f"fidelity {item.name} {rows[-1]['system']}@{budget}: top1 {rows[-1]['top1_agreement']:.3f} KL {rows[-1]['mean_kl']:.4f}")
        jobs.append({"name": item.name, "context_ids": list(corpus.token_ids), "continuation_ids": ids})
        engine.remove_corpus(item.name)
    return rows, jobs
