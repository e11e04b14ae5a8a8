"""Batches of answers (``SqueezedEngine.answer_batch``): each row is the answer a single call gives."""
from __future__ import annotations

import pytest
import torch

from conftest import random_text
from sqz_integrations import SqueezeConfig
from sqz_integrations.batch import RowTokens

DOCS = [random_text(120, seed=1), random_text(150, seed=2), random_text(90, seed=3)]
# questions of different lengths (so the rows' dynamic tokens differ in length), one of them a chat history
PROMPTS = [
    "Which word comes after river?",
    "List every colour that the second document names, in the order in which they first appear, please.",
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Lamp?"}],
]


def assert_same_answer(single, batched):
    assert batched.token_ids == single.token_ids
    assert batched.text == single.text
    assert batched.finish_reason == single.finish_reason
    assert batched.prompt_tokens == single.prompt_tokens
    assert batched.kv_budget == single.kv_budget
    assert batched.kept_fraction == pytest.approx(single.kept_fraction, rel=1e-9)
    assert batched.kept_fraction_per_layer == pytest.approx(single.kept_fraction_per_layer, rel=1e-9)
    assert batched.centroid_reads == pytest.approx(single.centroid_reads, rel=1e-9)
    assert [s.document_index for s in batched.sources] == [s.document_index for s in single.sources]
    for a, b in zip(batched.sources, single.sources):
        assert a.score == pytest.approx(b.score, rel=1e-6, abs=1e-9)


@pytest.mark.parametrize("settings", [
    dict(),
    dict(kv_budget=1.0),
    dict(hierarchical=True),
    dict(selection="fixed", question_budget=0.25),
    dict(question_budget=0.25, kv_budget=0.5),
    dict(temperature=1.0, seed=7),
], ids=["threshold", "full", "hierarchical", "fixed", "sparse-question", "sampled"])
def test_batch_rows_are_the_single_answers(make_tiny_engine, settings):
    """Greedy (or seeded) tokens, finish, kept fraction per layer, centroids scored and sources: row by row as
    one call each, with the question reads of different lengths and the copy pins of each row its own."""
    cfg = SqueezeConfig(kv_budget=0.25, observation_window=16, hierarchical=True, cluster_fraction=0.1,
                        l1_cluster_fraction=0.02, copy_window=8, copy_focus=0.05)
    engine = make_tiny_engine("llama", cfg)
    engine.add_corpus("docs", DOCS, progress=False)
    single = [engine.answer(p, "docs", max_new_tokens=10, **settings) for p in PROMPTS]
    batched = engine.answer_batch(PROMPTS, "docs", max_new_tokens=10, **settings)
    assert len(batched) == len(PROMPTS)
    for a, b in zip(single, batched):
        assert_same_answer(a, b)
    assert all(0 <= b.time_to_first_token <= b.total_time for b in batched)


def test_rows_finish_on_their_own(make_tiny_engine):
    """A stop sequence ends one row early while the others go on to max_new_tokens; a row that has finished adds
    nothing to its answer nor to the corpus's read statistics."""
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.25, observation_window=16))
    for name in ("a", "b", "probe"):
        engine.add_corpus(name, DOCS, progress=False)
    first, *others = [engine.generate(p, "probe", max_new_tokens=12) for p in PROMPTS]
    stop = next(w for w in first.split()[1:] if not any(w in o for o in others))  # ends the first answer only
    single = [engine.answer(p, "a", max_new_tokens=12, stop=[stop]) for p in PROMPTS]
    batched = engine.answer_batch(PROMPTS, "b", max_new_tokens=12, stop=[stop])
    assert single[0].finish_reason == "stop" and single[0].text == first[: first.index(stop)]
    assert any(a.finish_reason == "length" for a in single)
    for a, b in zip(single, batched):
        assert_same_answer(a, b)
    sa, sb = engine.get_corpus("a").stats(), engine.get_corpus("b").stats()
    for key in ("kept_fraction", "kept_fraction_per_layer"):
        assert sb[key] == pytest.approx(sa[key], rel=1e-9)
    assert engine.get_corpus("b").reads.reads == engine.get_corpus("a").reads.reads  # steps per layer


def test_batch_refuses_bad_input(make_tiny_engine):
    engine = make_tiny_engine("llama")
    engine.add_corpus("docs", DOCS, progress=False)
    assert engine.answer_batch([], "docs") == []
    with pytest.raises(TypeError, match="list of questions"):
        engine.answer_batch("Which word comes after river?", "docs")
    with pytest.raises(KeyError, match="nope"):
        engine.answer_batch(PROMPTS, "nope")
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.answer_batch(PROMPTS, "docs", max_new_tokens=0)
    with pytest.raises(ValueError, match="kv_budget"):
        engine.answer_batch(PROMPTS, "docs", kv_budget=0)
    with pytest.raises(TypeError, match="temprature"):
        engine.answer_batch(PROMPTS, "docs", temprature=0.5)


def test_row_tokens_keep_each_row_apart():
    """Rows read alone fill their own slots from 0; a step writes each row's token after its own, and reads
    each row's count of valid slots."""
    store = RowTokens(batch=3, capacity=8, device=torch.device("cpu"))
    for row, n in ((0, 2), (1, 4), (2, 1)):
        store.begin_row(row, n)
        k = torch.full((1, 2, n, 4), float(row + 1))
        keys, values, dyn_len = store.append(0, k, -k)
        store.end()
        assert dyn_len is None and keys.shape == (1, 2, n, 4) and bool((keys == row + 1).all())
    assert store.lens == [2, 4, 1]
    store.begin()
    k = torch.arange(3.0).view(3, 1, 1, 1).expand(3, 2, 1, 4) + 10
    keys, values, dyn_len = store.append(0, k, -k)
    store.end()
    assert dyn_len.tolist() == [3, 5, 2] and store.lens == [3, 5, 2]
    assert keys.shape == (3, 2, 5, 4)
    for row, slot in enumerate((2, 4, 1)):
        assert bool((keys[row, :, slot] == 10 + row).all()) and bool((values[row, :, slot] == -10 - row).all())
        assert bool((keys[row, :, :slot] == row + 1).all())
    # a step of the rows still decoding (in the forward's order), the finished one left as it is
    store.begin(rows=[2, 0])
    k = torch.tensor([20.0, 30.0]).view(2, 1, 1, 1).expand(2, 2, 1, 4)
    keys, values, dyn_len = store.append(0, k, -k)
    store.end()
    assert store.lens == [4, 5, 3] and dyn_len.tolist() == [3, 4] and keys.shape == (2, 2, 4, 4)
    assert bool((keys[0, :, 2] == 20).all()) and bool((keys[1, :, 3] == 30).all())
    assert bool((store.keys[0][1, :, :5] == torch.tensor([2, 2, 2, 2, 11.0]).view(1, 5, 1)).all())  # row 1 as it was
    with pytest.raises(ValueError, match="some rows"):
        store.begin(rows=[0, 3])
    with pytest.raises(ValueError, match="do not fit"):
        store.begin_row(1, 4)
    with pytest.raises(IndexError):
        store.begin_row(3, 1)


def test_rows_move_into_another_read_as_they_stand(make_tiny_engine):
    """``BatchRead.adopt_rows``: the rows given (a batch narrowed to its live rows, in that order) take rows 0, 1, ...
    of the other read with their dynamic tokens, copy pins and counts; with none given every row moves (a batch
    grown wider). Rows that do not exist, or more rows than fit, are refused."""
    from sqz_integrations.batch import BatchRead

    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.25, observation_window=16))
    corpus = engine.add_corpus("docs", DOCS, progress=False)
    plan = engine._plan(corpus, None, None, None, None)
    src = BatchRead(corpus, plan, 3, 16)
    for b in range(3):  # row b: b + 1 tokens of value b + 1, pins and counts of its own
        src.dyn.begin_row(b, b + 1)
        k = torch.full((1, 2, b + 1, 16), float(b + 1))
        src.dyn.append(0, k, -k)
        src.dyn.end()
        src.row_keys[:, b] = 10.0 * (b + 1)
        src.row_steps[b] = [b + 1] * len(corpus.layers)
    src.pins[0] = torch.stack([torch.full((2, 5), b == 1) for b in range(3)])
    narrow = BatchRead(corpus, plan, 2, 16)
    narrow.adopt_rows(src, [2, 1])
    assert narrow.dyn.lens == [3, 2]
    assert bool((narrow.dyn.keys[0][0, :, :3] == 3).all()) and bool((narrow.dyn.keys[0][1, :, :2] == 2).all())
    assert bool((narrow.dyn.values[0][1, :, :2] == -2).all())
    assert narrow.row_keys[:, 0].tolist() == [30.0] * len(corpus.layers) and narrow.row_steps[1][0] == 2
    assert not narrow.pins[0][0].any() and narrow.pins[0][1].all()
    wide = BatchRead(corpus, plan, 4, 16)
    wide.adopt_rows(src)
    assert wide.dyn.lens == [1, 2, 3, 0] and wide.row_steps[2][0] == 3
    with pytest.raises(ValueError, match="cannot move"):
        narrow.adopt_rows(src, [0, 3])
    with pytest.raises(ValueError, match="cannot move"):
        narrow.adopt_rows(src)


def test_a_pooled_slot_without_a_captured_step_stays_in_the_pool_when_a_captured_one_is_asked_for():
    """``GraphPool.take(captured=True)`` (a batch narrowing, which replays a pooled graph or stays as wide): a free
    slot of the kind whose step was never captured is left where it is, for an answer that can capture it."""
    from sqz_integrations.decode_graph import GraphPool, GraphSlot

    pool = GraphPool()
    bare = GraphSlot(("kind",), read=None)
    pool.give("docs", bare)
    assert pool.take("docs", ("kind",), captured=True) is None and len(pool) == 1
    assert pool.take("docs", ("kind",)) is bare and len(pool) == 0
    captured = GraphSlot(("kind",), read=None, step=object())
    pool.give("docs", captured)
    assert pool.take("docs", ("other",), captured=True) is None
    assert pool.take("docs", ("kind",), captured=True) is captured and len(pool) == 0
