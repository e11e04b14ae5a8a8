"""Concurrent ``answer`` calls answered together (``sqz_integrations.coalesce``, ``SqueezedEngine.answer``)."""
from __future__ import annotations

import asyncio
import queue
import threading
import time
import types
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from conftest import hold_after_first_answer, hold_after_first_token, random_text, wait_for
from sqz_integrations import SqueezeConfig
from sqz_integrations import engine as engine_module
from sqz_integrations.async_stream import iterate_in_thread
from sqz_integrations.batch import BatchRead
from sqz_integrations.coalesce import Coalescer

DOCS = [random_text(120, seed=4), random_text(100, seed=5)]
QUESTIONS = ["Which word comes after river?", "Name a colour.", "What is the first word of the second document?",
             "Say something about lamps, please, in one short sentence."]


class BlockingRun:
    """A batch function that records every batch and holds it until released, so that the calls submitted
    meanwhile queue up: which calls share a batch is then certain, not a matter of timing."""

    def __init__(self, fail_on=None):
        self.batches: list[tuple] = []
        self.release = threading.Event()
        self.fail_on = fail_on

    def __call__(self, key, tickets):
        self.batches.append((key, [t.item for t in tickets]))
        assert self.release.wait(10)
        if self.fail_on in [t.item for t in tickets]:
            raise ValueError(f"bad item {self.fail_on}")
        return [(key, t.item) for t in tickets]


def queued(engine) -> int:
    """Calls queued in the engine's coalescer (a leader's own call counts until it takes its batch)."""
    return sum(map(len, engine._coalescer._queues.values()))


def submit_all(coalescer, run, calls):
    """Submits the calls one at a time (each one queued or running before the next), while the batches are
    held: the first call of each key leads a batch at once, the others queue; then the batches are released."""

    def placed():  # calls queued or in a recorded batch
        return sum(map(len, coalescer._queues.values())) + sum(len(items) for _, items in run.batches)

    with ThreadPoolExecutor(len(calls)) as pool:
        futures = []
        for call in calls:
            futures.append(pool.submit(coalescer.submit, *call))
            wait_for(lambda: placed() == len(futures))
        run.release.set()
        return [f.exception() or f.result() for f in futures]


def queue_in_order(pool, coalescer, key, items) -> list:
    """Submits ``items`` behind the running batch of ``key``, each queued before the next is submitted (threads would
    otherwise race to the queue), but not waiting for the last: a batch that waits for them may go on at once."""
    futures = []
    for n, item in enumerate(items, 1):
        futures.append(pool.submit(coalescer.submit, key, item))
        if n < len(items):
            wait_for(lambda: len(coalescer._queues[key]) == n)
    return futures


def test_calls_queued_behind_a_batch_run_as_batches_of_at_most_max_rows():
    run = BlockingRun()
    coalescer = Coalescer(run, max_rows=3, gather_window_s=-1.0)  # no gathering: the queues decide
    calls = [("k", i) for i in range(6)]
    results = submit_all(coalescer, run, calls)
    assert results == [("k", i) for i in range(6)]  # each call gets its own item's result
    assert [items for _, items in run.batches] == [[0], [1, 2, 3], [4, 5]]  # in arrival order
    assert coalescer._queues == {}  # no leader left behind


def test_different_keys_never_share_a_batch():
    run = BlockingRun()
    coalescer = Coalescer(run, max_rows=8, gather_window_s=-1.0)  # no gathering: the queues decide
    results = submit_all(coalescer, run, [("a", 0), ("a", 1), ("b", 2), ("a", 3), ("b", 4)])
    assert results == [("a", 0), ("a", 1), ("b", 2), ("a", 3), ("b", 4)]
    batches = sorted((key, items) for key, items in run.batches)
    assert batches == [("a", [0]), ("a", [1, 3]), ("b", [2]), ("b", [4])]


def test_a_failed_batch_fails_its_own_calls_only():
    run = BlockingRun(fail_on=2)
    coalescer = Coalescer(run, max_rows=2, gather_window_s=-1.0)  # no gathering: the queues decide
    results = submit_all(coalescer, run, [("k", i) for i in range(5)])
    assert results[0] == ("k", 0)
    assert [str(r) for r in results[1:3]] == ["bad item 2", "bad item 2"]  # the batch [1, 2]
    assert results[3:] == [("k", 3), ("k", 4)]  # the next batch still runs
    assert coalescer._queues == {}


def test_a_lone_call_runs_alone_at_once_and_a_wrong_result_count_is_an_error():
    coalescer = Coalescer(lambda key, tickets: [t.item * 2 for t in tickets], max_rows=4, gap_s=1.0)
    start = time.perf_counter()
    assert coalescer.submit("k", 21) == 42
    assert time.perf_counter() - start < 0.5  # no call has overlapped: no gathering gap
    coalescer._last_overlap = time.perf_counter()  # calls overlapped just now: a lone call waits one gap
    start = time.perf_counter()
    assert coalescer.submit("k", 2) == 4
    assert time.perf_counter() - start >= 1.0
    broken = Coalescer(lambda key, tickets: [], max_rows=4)
    with pytest.raises(RuntimeError, match="returned 0 results"):
        broken.submit("k", 1)
    with pytest.raises(ValueError, match="max_rows"):
        Coalescer(lambda key, tickets: [], max_rows=0)


def test_a_leader_interrupted_before_its_batch_leaves_no_leaderless_queue():
    coalescer = Coalescer(lambda key, tickets: [t.item for t in tickets], max_rows=4)
    coalescer._last_overlap = time.perf_counter()  # so that the leader gathers first

    def interrupted(key):
        raise KeyboardInterrupt

    coalescer._gather = interrupted
    with pytest.raises(KeyboardInterrupt):
        coalescer.submit("k", 1)
    assert coalescer._queues == {}  # else every later call of "k" would wait for a leader that is gone
    del coalescer._gather
    assert coalescer.submit("k", 2) == 2


def test_a_running_batch_takes_queued_calls_that_fit():
    coalescer, taken, waiting = None, [], []

    def run(key, tickets):
        if tickets[0].item == 0:  # the first batch, while 1, 2 and 3 queue behind it
            wait_for(lambda: len(coalescer._queues[key]) == 3)
            assert coalescer.take(key, tickets, 0, lambda item: True) == []
            waiting.append([coalescer.waiting(key, lambda item: item != 2), coalescer.waiting("other", bool)])
            taken.append([t.item for t in coalescer.take(key, tickets, 2, lambda item: item != 2)])
            waiting.append([coalescer.waiting(key, lambda item: True)])
        return [(t.item, [u.item for u in tickets]) for t in tickets]

    coalescer = Coalescer(run, max_rows=1, gather_window_s=-1.0)
    with ThreadPoolExecutor(4) as pool:
        first = pool.submit(coalescer.submit, "k", 0)
        wait_for(lambda: "k" in coalescer._queues and not coalescer._queues["k"])  # 0 leads, its batch runs
        rest = queue_in_order(pool, coalescer, "k", [1, 2, 3])
        results = [first.result(timeout=10)] + [f.result(timeout=10) for f in rest]
    assert taken == [[1, 3]]  # the two that fit, in arrival order, though max_rows is 1
    assert waiting == [[2, 0], [1]]  # those that fit, counted before the take; then the one left
    assert results == [(0, [0, 1, 3]), (1, [0, 1, 3]), (2, [2]), (3, [0, 1, 3])]
    assert coalescer._queues == {}


def test_calls_left_while_queued_are_dropped_with_no_result():
    """A call whose caller has left while it was queued (``abandoned``) is counted by no ``waiting``, taken by no
    batch, leads no batch, and returns None: 2 leaves before the running batch looks at its queue, 3 after the batch
    took 1, when 3 would have led the next batch."""
    coalescer, seen, left = None, [], set()

    def run(key, tickets):
        if tickets[0].item == 0:  # the first batch, while 1, 2, 3 and 4 queue behind it
            wait_for(lambda: len(coalescer._queues[key]) == 4)
            left.add(2)
            seen.append(coalescer.waiting(key, lambda item: True))
            seen.append([t.item for t in coalescer.take(key, tickets, 1, lambda item: True)])
            left.add(3)
        return [(t.item, [u.item for u in tickets]) for t in tickets]

    coalescer = Coalescer(run, max_rows=1, gather_window_s=-1.0, abandoned=lambda item: item in left)
    with ThreadPoolExecutor(5) as pool:
        first = pool.submit(coalescer.submit, "k", 0)
        wait_for(lambda: "k" in coalescer._queues and not coalescer._queues["k"])  # 0 leads, its batch runs
        rest = queue_in_order(pool, coalescer, "k", [1, 2, 3, 4])
        results = [first.result(timeout=10)] + [f.result(timeout=10) for f in rest]
    assert seen == [3, [1]]
    assert results == [(0, [0, 1]), (1, [0, 1]), None, None, (4, [4])]
    assert coalescer._queues == {}


@pytest.fixture
def coalescing_engine(make_tiny_engine, monkeypatch):
    """A tiny engine whose batches of several questions at their start (``_answer_rows``, what answer_batch and the
    coalescer run; a lone call is a batch of one, not recorded) are recorded, and whose coalescer gathers for up to
    0.5 s (so that threads started together join one batch even on a loaded machine)."""
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.25, observation_window=16))
    engine.add_corpus("docs", DOCS, progress=False)
    assert engine.max_coalesced == 1  # the default on the CPU (where it measured no faster)
    engine.max_coalesced = 8
    engine._coalescer.gap_s, engine._coalescer.max_wait_s = 0.1, 0.5
    engine._coalescer.gather_window_s = float("inf")  # gather from the first call on
    batches = []
    answer_rows = engine._answer_rows

    def recorded(questions, *args, **kwargs):
        if len(questions) > 1:
            batches.append(len(questions))
        return answer_rows(questions, *args, **kwargs)

    monkeypatch.setattr(engine, "_answer_rows", recorded)
    return engine, batches


def test_concurrent_answers_are_one_batch_with_each_call_its_own_answer(coalescing_engine):
    engine, batches = coalescing_engine
    single = [engine.answer(q, "docs", max_new_tokens=8) for q in QUESTIONS]
    assert batches == []  # one call at a time: each alone
    barrier = threading.Barrier(len(QUESTIONS))

    def ask(q):
        barrier.wait()
        start = time.perf_counter()
        return engine.answer(q, "docs", max_new_tokens=8), time.perf_counter() - start

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        together = list(pool.map(ask, QUESTIONS))
    assert batches == [len(QUESTIONS)]
    for a, (b, took) in zip(single, together):
        assert b.token_ids == a.token_ids and b.text == a.text
        assert b.kept_fraction == pytest.approx(a.kept_fraction, rel=1e-9)
        # counted from the call, the wait for the batch included
        assert 0 < b.time_to_first_token <= b.total_time <= took


def test_bad_calls_fail_alone_and_other_settings_do_not_join(coalescing_engine):
    engine, batches = coalescing_engine
    barrier = threading.Barrier(5)

    def ask(args):
        barrier.wait()
        prompt, kwargs = args
        try:
            return engine.answer(prompt, "docs", max_new_tokens=6, **kwargs).text
        except Exception as exc:  # noqa: BLE001 - the test looks at which calls fail
            return exc

    calls = [(QUESTIONS[0], {}), ([{"role": "wizard", "content": "hi"}], {}), (QUESTIONS[1], {}),
             (QUESTIONS[2], {"kv_budget": 0.5}), (QUESTIONS[3], {"bogus": 1})]
    with ThreadPoolExecutor(5) as pool:
        out = list(pool.map(ask, calls))
    assert isinstance(out[1], ValueError) and "wizard" in str(out[1])
    assert isinstance(out[4], TypeError) and "bogus" in str(out[4])
    assert out[0] == engine.answer(QUESTIONS[0], "docs", max_new_tokens=6).text
    assert out[3] == engine.answer(QUESTIONS[2], "docs", max_new_tokens=6, kv_budget=0.5).text
    assert batches == [2]  # questions 0 and 1 at the default settings; the kv_budget=0.5 call alone


def test_max_coalesced_one_answers_every_call_alone(make_tiny_engine, monkeypatch):
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.25, observation_window=16))
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="max_coalesced"):
            type(engine)(engine.model, engine.tokenizer, engine.config, max_coalesced=bad)
    with pytest.raises(ValueError, match="max_coalesced"):
        engine.max_coalesced = 0
    engine.max_coalesced = 3
    assert engine.max_coalesced == 3
    engine.max_coalesced = None
    assert engine.max_coalesced == 1  # CPU
    alone = type(engine)(engine.model, engine.tokenizer, engine.config, max_coalesced=1)
    alone.add_corpus("docs", DOCS, progress=False)
    single = [alone.answer(q, "docs", max_new_tokens=4).text for q in QUESTIONS[:3]]
    # each call in its own thread, none queued behind another
    monkeypatch.setattr(alone, "_answer_rows", lambda *a, **k: pytest.fail("a batch with max_coalesced=1"))
    monkeypatch.setattr(alone._coalescer, "submit", lambda *a, **k: pytest.fail("queued with max_coalesced=1"))
    with ThreadPoolExecutor(3) as pool:
        texts = list(pool.map(lambda q: alone.answer(q, "docs", max_new_tokens=4).text, QUESTIONS[:3]))
    assert texts == single


def test_langchain_batch_and_llama_index_gather_join_batches(coalescing_engine):
    """No adapter code: LangChain's batch/abatch run invoke in threads, LlamaIndex's async calls run the engine in
    threads, and the engine's coalescer answers them together."""
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from sqz_integrations.langchain import ChatSqueezed
    from sqz_integrations.llama_index import SqueezedLLM

    engine, batches = coalescing_engine
    single = [engine.answer(q, "docs", max_new_tokens=8).text for q in QUESTIONS]
    llm = ChatSqueezed(engine=engine, corpus="docs", max_new_tokens=8)
    assert [m.content for m in llm.batch(QUESTIONS, config={"max_concurrency": 4})] == single
    assert [m.content for m in asyncio.run(llm.abatch(QUESTIONS, config={"max_concurrency": 4}))] == single
    li = SqueezedLLM(engine=engine, corpus="docs", max_new_tokens=8)

    async def gather():
        return await asyncio.gather(*(li.acomplete(q) for q in QUESTIONS))

    assert [r.text for r in asyncio.run(gather())] == single
    assert batches[:2] == [4, 4] and sum(batches[2:]) >= 2, batches


def read_stream(engine, prompt, **kwargs):
    stream = engine.stream_answer(prompt, "docs", **kwargs)
    return list(stream), stream.answer


def test_concurrent_streams_join_one_batch_with_the_answers_calls(coalescing_engine):
    """Streams coalesce like answer calls (and with them): each reader gets its own row's pieces, which make up its
    answer, the same as the question streamed alone."""
    engine, batches = coalescing_engine
    single = [engine.answer(q, "docs", max_new_tokens=10) for q in QUESTIONS]
    streamed_alone = read_stream(engine, QUESTIONS[0], max_new_tokens=10)  # a lone stream: no batch
    assert batches == [] and "".join(streamed_alone[0]) == streamed_alone[1].text == single[0].text
    barrier = threading.Barrier(len(QUESTIONS))

    def call(i):
        barrier.wait()
        if i % 2:
            return None, engine.answer(QUESTIONS[i], "docs", max_new_tokens=10)
        return read_stream(engine, QUESTIONS[i], max_new_tokens=10)

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        got = list(pool.map(call, range(len(QUESTIONS))))
    assert batches == [len(QUESTIONS)]  # two streams and two answer calls, one batch
    for i, ((pieces, answer), alone) in enumerate(zip(got, single)):
        assert answer.token_ids == alone.token_ids and answer.text == alone.text
        if pieces is not None:
            assert "".join(pieces) == answer.text and len(pieces) > 1, pieces  # piece by piece, not at the end


def test_a_stream_closed_early_ends_its_row_and_the_batch_goes_on(coalescing_engine, monkeypatch):
    engine, batches = coalescing_engine
    alone = engine.answer(QUESTIONS[1], "docs", max_new_tokens=30)
    row_events = engine._row_events
    finished = []

    def held_after_first_piece(questions, *args):
        """Row 0's reader closes its stream after its first piece: the batch waits for that, so the close lands
        while the row still has steps to go."""
        first, waited = questions[0], False
        for q, event in row_events(questions, *args):
            yield q, event
            if q is first and isinstance(event, str) and event and not waited:
                waited = True
                assert first.cancelled.wait(10)
            if not isinstance(event, str):
                finished.append((questions.index(q), event))

    monkeypatch.setattr(engine, "_row_events", held_after_first_piece)
    barrier = threading.Barrier(2)

    def first_piece_then_close():
        barrier.wait()
        stream = engine.stream_answer(QUESTIONS[0], "docs", max_new_tokens=30)
        piece = next(iter(stream))
        stream.close()
        return piece

    def whole_answer():
        barrier.wait()
        wait_for(lambda: queued(engine) == 1)  # after the stream's: the stream's question is row 0
        return engine.answer(QUESTIONS[1], "docs", max_new_tokens=30)

    with ThreadPoolExecutor(2) as pool:
        piece, other = pool.submit(first_piece_then_close), pool.submit(whole_answer)
        piece, other = piece.result(timeout=60), other.result(timeout=60)
    assert batches == [2] and piece
    assert other.token_ids == alone.token_ids  # the other row went on to its end
    (_, closed), (_, kept) = sorted(finished, key=lambda x: x[0])
    assert closed.finish_reason == "cancelled" and closed.completion_tokens < 30
    assert kept.token_ids == alone.token_ids and kept.finish_reason != "cancelled"


def test_a_failed_batch_fails_each_of_its_streams(coalescing_engine, monkeypatch):
    engine, batches = coalescing_engine

    def broken(questions, *args):
        yield questions[0], "partial"
        raise RuntimeError("device fell over")

    monkeypatch.setattr(engine, "_row_events", broken)
    barrier = threading.Barrier(3)

    def stream(q):
        barrier.wait()
        pieces = []
        try:
            for piece in engine.stream_answer(q, "docs", max_new_tokens=6):
                pieces.append(piece)
        except RuntimeError as exc:
            return pieces, str(exc)
        return pieces, None

    with ThreadPoolExecutor(3) as pool:
        out = list(pool.map(stream, QUESTIONS[:3]))
    assert batches == [3]
    assert sorted(out) == [([], "device fell over"), ([], "device fell over"), (["partial"], "device fell over")]


def test_langchain_and_llama_index_async_streams_join_batches(coalescing_engine):
    pytest.importorskip("langchain_core")
    pytest.importorskip("llama_index.core")
    from sqz_integrations.langchain import ChatSqueezed
    from sqz_integrations.llama_index import SqueezedLLM

    engine, batches = coalescing_engine
    single = [engine.answer(q, "docs", max_new_tokens=8).text for q in QUESTIONS]
    llm = ChatSqueezed(engine=engine, corpus="docs", max_new_tokens=8)
    li = SqueezedLLM(engine=engine, corpus="docs", max_new_tokens=8)

    async def langchain_stream(q):
        return "".join([chunk.content async for chunk in llm.astream(q)])

    async def llama_index_stream(q):
        text = ""
        async for response in await li.astream_complete(q):
            text = response.text
        return text

    async def both():
        return (await asyncio.gather(*(langchain_stream(q) for q in QUESTIONS)),
                await asyncio.gather(*(llama_index_stream(q) for q in QUESTIONS)))

    lc, lx = asyncio.run(both())
    assert lc == single and lx == single
    assert batches[:1] == [4] and sum(batches) >= 6, batches  # LangChain's four in one batch, LlamaIndex's batched too


def test_a_call_whose_row_ends_early_returns_before_its_batch_ends(coalescing_engine, monkeypatch):
    """An answer (or a stream) is handed over when its row ends, not when the batch's longest row does."""
    engine, batches = coalescing_engine
    a0, a1 = (engine.answer(q, "docs", max_new_tokens=20) for q in QUESTIONS[:2])
    # an end-of-turn token for row 0 at its third step that row 1 never produces: row 0 then ends there
    end = next(t for t in a0.token_ids[2:] if t not in a1.token_ids)
    monkeypatch.setattr(engine, "_eos_ids", engine._eos_ids | {end})
    short = engine.answer(QUESTIONS[0], "docs", max_new_tokens=20)
    assert short.finish_reason == "stop" and len(short.token_ids) < 20
    returned = threading.Event()

    def until_returned():
        """After row 0's Answer the batch waits until row 0's caller has returned (it would wait in vain if the
        answer came only once every row had ended)."""
        assert returned.wait(10), "row 0's call did not return before its batch ended"

    hold_after_first_answer(engine, monkeypatch, until_returned)
    barrier = threading.Barrier(2)
    pieces: list[str] = []  # row 1's, streamed

    def call(i):
        barrier.wait()
        if i == 0:
            got = engine.answer(QUESTIONS[0], "docs", max_new_tokens=20)
            got_at = len(pieces)  # row 1's pieces so far: the batch is held here
            returned.set()
            return got, got_at
        wait_for(lambda: queued(engine) == 1)  # after question 0's: question 0 is row 0
        stream = engine.stream_answer(QUESTIONS[1], "docs", max_new_tokens=20)
        for piece in stream:
            pieces.append(piece)
        return stream.answer, None

    with ThreadPoolExecutor(2) as pool:
        (first, pieces_then), (second, _) = pool.map(call, range(2))
    assert batches == [2]
    assert first.token_ids == short.token_ids and first.finish_reason == "stop"
    assert second.token_ids == a1.token_ids and "".join(pieces) == second.text
    assert pieces_then < len(pieces)  # row 1 went on decoding after row 0's caller had its answer
    assert 0 < first.time_to_first_token <= first.total_time < second.total_time


def test_a_call_queued_behind_a_batch_takes_the_row_of_an_ended_one(coalescing_engine, monkeypatch):
    """Continuous batching: a call that arrives while a batch decodes is read into the row of a call that has ended
    and decodes with the rows still going, rather than wait for the whole batch; it gets the answer it gets alone."""
    engine, batches = coalescing_engine
    a0, a1 = (engine.answer(q, "docs", max_new_tokens=20) for q in QUESTIONS[:2])
    end = next(t for t in a0.token_ids[2:] if t not in a1.token_ids)  # row 0 ends at its third step
    monkeypatch.setattr(engine, "_eos_ids", engine._eos_ids | {end})
    alone = [engine.answer(q, "docs", max_new_tokens=20) for q in QUESTIONS[:3]]
    assert len(alone[0].token_ids) < 20 and len(alone[1].token_ids) == 20
    barrier, third = threading.Barrier(2), threading.Event()

    def until_queued():  # after row 0's Answer the batch waits until the third call has queued behind it
        third.set()
        wait_for(lambda: queued(engine) == 1)

    joined = hold_after_first_answer(engine, monkeypatch, until_queued)

    def call(i):
        if i < 2:
            barrier.wait()
            if i:
                wait_for(lambda: queued(engine) == 1)  # after question 0's: question 0 is row 0
        else:
            assert third.wait(10)
        return engine.answer(QUESTIONS[i], "docs", max_new_tokens=20)

    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(call, range(3)))
    wait_for(lambda: joined)
    assert batches == [2] and joined == [3]  # one batch of two rows, which the third call joined
    assert [a.token_ids for a in got] == [a.token_ids for a in alone]
    assert got[2].finish_reason == alone[2].finish_reason


def test_calls_arriving_while_a_lone_call_decodes_join_it_as_the_batch_grows(coalescing_engine, monkeypatch):
    """A lone call's batch grows when calls queue behind it: it moves, its row as it stands, into a read of 4 rows
    (a power of two, for 1 + 2 questions) at its next step, and the two calls decode in the new rows rather than wait
    for it to end. Each of the three gets the answer, kept fraction and sources it gets alone."""
    engine, batches = coalescing_engine
    alone = [engine.answer(q, "docs", max_new_tokens=12) for q in QUESTIONS[:3]]
    moves = []
    adopt_rows = BatchRead.adopt_rows

    def recorded(read, src, rows=None):
        moves.append((src.batch, read.batch))
        return adopt_rows(read, src, rows)

    monkeypatch.setattr(BatchRead, "adopt_rows", recorded)
    first_piece = threading.Event()

    def until_queued():  # after the lone call's first token, wait until the two others have queued
        first_piece.set()
        wait_for(lambda: queued(engine) == 2)

    sizes = hold_after_first_token(engine, monkeypatch, until_queued)

    def call(i):
        if i:
            assert first_piece.wait(10)  # the first call decodes alone by now
        return engine.answer(QUESTIONS[i], "docs", max_new_tokens=12)

    with ThreadPoolExecutor(3) as pool:
        got = list(pool.map(call, range(3)))
    wait_for(lambda: sizes)
    assert batches == [] and sizes == [3] and moves == [(1, 4)]  # one batch: started alone, grown to 4 rows
    for a, b in zip(alone, got):
        assert b.token_ids == a.token_ids and b.finish_reason == a.finish_reason
        assert b.kept_fraction == pytest.approx(a.kept_fraction, rel=1e-9)
        assert [s.document_index for s in b.sources] == [s.document_index for s in a.sources] and b.sources
        assert [s.score for s in b.sources] == pytest.approx([s.score for s in a.sources], rel=1e-6)


def assert_a_queued_call_that_leaves_is_not_read(engine, batches, monkeypatch, leave) -> None:
    """A lone call decodes alone (held after its first token) while ``leave()``, in this thread, queues a call of
    QUESTIONS[1] behind it whose caller then leaves. The running batch must neither grow for it nor read its question,
    and the lone call gets the answer it gets alone."""
    alone = engine.answer(QUESTIONS[0], "docs", max_new_tokens=12)
    first_piece, left = threading.Event(), threading.Event()

    def until_left():  # after the lone call's first token, wait until the other call has queued and left
        first_piece.set()
        assert left.wait(10)

    sizes = hold_after_first_token(engine, monkeypatch, until_left)
    reads = []
    forward = engine._forward
    monkeypatch.setattr(engine, "_forward", lambda ids, *a: reads.append(list(ids)) or forward(ids, *a))
    with ThreadPoolExecutor(1) as pool:
        lone = pool.submit(engine.answer, QUESTIONS[0], "docs", max_new_tokens=12)
        assert first_piece.wait(10)  # the lone call's queue is made: the next one the engine makes is the other call's
        leave()
        left.set()
        got = lone.result(timeout=60)
    wait_for(lambda: queued(engine) == 0 and sizes)
    assert batches == [] and sizes == [1]  # it never grew
    assert engine.layout.suffix_ids(QUESTIONS[1]) not in reads  # its question was never read
    assert got.token_ids == alone.token_ids


def test_a_call_interrupted_while_queued_is_not_read(coalescing_engine, monkeypatch):
    """A call interrupted while it waits in the queue behind a lone call (Ctrl-C in a notebook, say) leaves."""
    engine, batches = coalescing_engine

    class Interrupted(queue.SimpleQueue):
        """The interrupted call's event queue: its wait ends in KeyboardInterrupt once the call is queued."""

        def get(self, *args, **kwargs):
            wait_for(lambda: queued(engine) == 1)
            raise KeyboardInterrupt

    def leave():
        monkeypatch.setattr(engine_module, "queue", types.SimpleNamespace(SimpleQueue=Interrupted))
        with pytest.raises(KeyboardInterrupt):
            engine.answer(QUESTIONS[1], "docs", max_new_tokens=12)

    assert_a_queued_call_that_leaves_is_not_read(engine, batches, monkeypatch, leave)


def test_an_async_stream_whose_consumer_leaves_while_queued_is_not_read(coalescing_engine, monkeypatch):
    """An async consumer that stops while its stream's call waits in the queue (a client gone, its task cancelled):
    the call is dropped though its worker thread is blocked waiting for a first piece, and the worker thread ends."""
    engine, batches = coalescing_engine

    async def consume_then_leave():
        stream = iterate_in_thread(lambda: engine.stream_answer(QUESTIONS[1], "docs", max_new_tokens=12))
        first = asyncio.ensure_future(stream.__anext__())
        await asyncio.to_thread(wait_for, lambda: queued(engine) == 1)
        first.cancel()  # the consumer goes while the worker waits for the first piece
        with pytest.raises(asyncio.CancelledError):
            await first

    leave = lambda: asyncio.run(consume_then_leave())  # noqa: E731
    assert_a_queued_call_that_leaves_is_not_read(engine, batches, monkeypatch, leave)
    wait_for(lambda: not any(t.name == "sqz-astream" and t.is_alive() for t in threading.enumerate()))


def test_a_batch_that_cannot_grow_for_memory_goes_on_as_wide_as_it_is(coalescing_engine, monkeypatch, caplog):
    """Out of device memory for the wider read, the batch keeps its width (one warning) rather than fail its calls:
    the calls queued behind the lone call take its row as each call before them ends, and get their answers alone."""
    engine, batches = coalescing_engine
    alone = [engine.answer(q, "docs", max_new_tokens=12) for q in QUESTIONS[:3]]
    tried = []

    def out_of_memory(read, src, rows=None):
        tried.append(read.batch)
        raise torch.OutOfMemoryError("no room for the wider buffers")

    monkeypatch.setattr(BatchRead, "adopt_rows", out_of_memory)
    first_piece = threading.Event()

    def until_queued():
        first_piece.set()
        wait_for(lambda: queued(engine) == 2)

    sizes = hold_after_first_token(engine, monkeypatch, until_queued)

    def call(i):
        if i:
            assert first_piece.wait(10)
        return engine.answer(QUESTIONS[i], "docs", max_new_tokens=12)

    with caplog.at_level("WARNING", logger="sqz_integrations.batch_decode"), ThreadPoolExecutor(3) as pool:
        got = list(pool.map(call, range(3)))
    wait_for(lambda: sizes)
    assert tried == [4] and sizes == [3] and batches == []  # tried once, then one row for the three, one by one
    assert [a.token_ids for a in got] == [a.token_ids for a in alone]
    assert "could not grow" in caplog.text


def test_a_call_after_its_corpus_is_replaced_does_not_join_a_batch_on_the_old_one(coalescing_engine, monkeypatch):
    """Calls are keyed by the corpus object, not only its name: a call made after ``add_corpus(replace=True)`` is
    answered from the new corpus even while a batch with the same settings still decodes on the old one."""
    engine, _ = coalescing_engine
    old = engine.get_corpus("docs")
    seen = {}

    def replace_then_call():
        if seen:  # the later call's own batch comes here too
            return
        new = engine.add_corpus("docs", [random_text(30, seed=9)], progress=False, replace=True)
        seen["new"] = new
        pool = ThreadPoolExecutor(1)  # not waited for here: a call that joined this batch ends only after it goes on
        later = pool.submit(engine.answer, QUESTIONS[1], "docs", max_new_tokens=12)
        pool.shutdown(wait=False)
        # on the old key it would queue to join this held batch, so it could not end while the batch is held
        try:
            seen["later"], seen["joined"] = later.result(timeout=10), False
        except TimeoutError:
            seen["later"], seen["joined"] = later, True

    sizes = hold_after_first_token(engine, monkeypatch, replace_then_call)
    first = engine.answer(QUESTIONS[0], "docs", max_new_tokens=12)
    wait_for(lambda: len(sizes) == 2)
    assert not seen["joined"] and sizes == [1, 1]
    assert first.corpus_tokens == old.n_tokens and seen["later"].corpus_tokens == seen["new"].n_tokens
    assert seen["new"].n_tokens != old.n_tokens
