"""Retrieval heads: found by the head probe when a corpus is built, read in full, paid from the budget."""
from __future__ import annotations

import pytest
import torch

from sqz_integrations import SqueezeConfig
from sqz_integrations.head_probe import probe_question
from sqz_integrations.selection import CorpusRead

from conftest import random_text

DOCS = [random_text(160, seed=1), random_text(140, seed=2)]
QUESTION = "Which word comes after river?"


@pytest.fixture
def engine_and_corpus(make_tiny_engine):
    # copy_window=0: the budget checked here is the retrieval heads' and the centroids' (the copy pins come on
    # top of it, up to the budget again: test_engine checks them)
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.25, observation_window=16, retrieval_share=1.0,
                                                     question_budget=None, copy_window=0))
    return engine, engine.add_corpus("docs", DOCS, progress=False)


def test_the_probe_measures_every_head(engine_and_corpus):
    _, corpus = engine_and_corpus
    misses = corpus.head_misses
    n_layers, kvh = len(corpus.layers), corpus.layers[0].keys.shape[0]
    assert misses.shape == (n_layers, kvh)
    assert bool((misses >= 0).all()) and bool((misses <= 1).all())
    # a budget of 0.25 drops most clusters: some head loses some focused attention on the quotes
    assert float(misses.sum()) > 0


def test_probe_question_quotes_the_corpus(smol_tokenizer):
    ids = smol_tokenizer("one two three four five six seven eight nine ten " * 20, add_special_tokens=False)["input_ids"]
    question = probe_question(ids, torch.arange(5, len(ids) - 5), smol_tokenizer.decode)
    quotes = [line.split('"')[1] for line in question.splitlines()[1:]]
    assert len(quotes) == 4 and all(q and q in smol_tokenizer.decode(ids) for q in quotes)


def test_the_heads_that_missed_most_are_read_in_full(engine_and_corpus):
    engine, corpus = engine_and_corpus
    n_layers, kvh = len(corpus.layers), corpus.layers[0].keys.shape[0]
    # plant a ranking: layer 1, head 0 missed most
    corpus.head_misses = torch.zeros(n_layers, kvh, dtype=torch.float64)
    corpus.head_misses[1, 0] = 0.5
    corpus.head_misses[0, 1] = 0.1
    heads = corpus.retrieval_heads(0.25, 1.0)  # 0.25 of 4 heads pays for one
    assert heads.tolist() == [[False, False], [True, False]]
    assert corpus.retrieval_heads(0.25, 0.0) is None
    assert corpus.retrieval_heads(1.0, 1.0) is None  # a full read has nothing to add
    assert int(corpus.retrieval_heads(0.5, 1.0).sum()) == 2

    plan = engine._plan(corpus, 0.25, False, "threshold")
    read = CorpusRead(corpus, plan, track_sources=False)
    layer = corpus.layers[1]
    q = torch.randn(1, 4, 3, layer.keys.shape[-1])
    _, selected, _ = read.lookup(1, q, 0.125)
    assert bool(selected[0, 0][torch.isfinite(layer.log_counts[0])].all())
    assert not bool(selected[0, 1].all())

    # the dense head is paid from the budget: the other heads' threshold is stricter
    cal = corpus.calibration
    assert cal.sparse_head_budget(0.25, heads) == pytest.approx((0.25 * 4 - 1) / 3)
    assert cal.log_threshold(0.25, False, heads) >= cal.log_threshold(0.25, False, None)
    plain = engine._plan(corpus, 0.25, False, "threshold")
    assert plain.dense_head_layers[0] == frozenset({1})


def test_answers_keep_the_budget_with_retrieval_heads(engine_and_corpus):
    engine, corpus = engine_and_corpus
    ans = engine.answer(QUESTION, corpus="docs", max_new_tokens=6)
    heads = corpus.retrieval_heads(0.25, 1.0)
    layer = int(heads.any(1).nonzero()[0])
    # the layer with the dense head reads at least that head in full
    assert ans.kept_fraction_per_layer[layer] >= 1 / heads.shape[1] - 1e-9
    assert ans.kept_fraction < 0.25 * 1.6
    exact = engine.answer(QUESTION, corpus="docs", max_new_tokens=6, kv_budget=1.0)
    assert exact.kept_fraction == 1.0


def test_retrieval_share_is_checked():
    with pytest.raises(ValueError, match="retrieval_share"):
        SqueezeConfig(retrieval_share=1.5)
    with pytest.raises(ValueError, match="retrieval_share"):
        SqueezeConfig(retrieval_share=-0.1)


def test_calibration_expects_the_budget_with_dense_heads(engine_and_corpus):
    _, corpus = engine_and_corpus
    cal = corpus.calibration
    heads = corpus.retrieval_heads(0.5, 1.0)
    assert int(heads.sum()) == 2
    # the dense heads are paid from the budget, so the calibration queries still keep about half
    assert cal.expected_kept_fraction(0.5, heads) == pytest.approx(cal.expected_kept_fraction(0.5), abs=0.1)
    assert cal.expected_kept_fraction(0.5, heads) >= int(heads.sum()) / heads.numel()
    assert "calibration_kept_fraction" in corpus.stats()


def test_the_probe_in_slices_measures_the_same(make_tiny_engine, monkeypatch):
    from sqz_kernels import reference

    config = SqueezeConfig(kv_budget=0.25, observation_window=16, retrieval_share=1.0)
    whole = make_tiny_engine("llama", config).add_corpus("docs", DOCS, progress=False).head_misses
    monkeypatch.setattr(reference, "MAX_LOGITS", 1)  # one probe token at a time
    sliced = make_tiny_engine("llama", config).add_corpus("docs", DOCS, progress=False).head_misses
    assert float(whole.sum()) > 0
    assert torch.allclose(whole, sliced, atol=1e-6)
