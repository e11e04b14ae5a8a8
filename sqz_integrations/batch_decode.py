"""The decode loop of a batch of answers on one corpus: :meth:`SqueezedEngine.answer_batch` and the coalescer's
batches run it.

Its questions are read (in one forward where they read the whole corpus, else each alone into its row), then every
step feeds one token per row through one forward over a :class:`~sqz_integrations.batch.BatchRead`. Rows end on
their own: each row's text pieces are handed on as decoded and its :class:`Answer` as soon as it ends, not when the
batch's longest row does. Where calls are coalesced, calls queued meanwhile take the rows of ended ones (continuous
batching), and where more of them wait than rows are free the batch grows: it moves, its rows as they stand, into a
wider read (a power of two of rows, so that few widths need a CUDA graph). A joined question is read alone into its
row and decodes with the others from the next step; so a call that arrives while a lone call decodes (a batch of one)
joins it rather than wait for it to end. The other way, once rows have ended and no call waits, a batch whose live rows
fit fewer rows moves into a pooled graph of that width (never one captured for it): a straggler decodes at its own
width. Ended rows that a graph step still feeds read no corpus key (the kernels' ``live`` flags).

:class:`BatchDecodingMixin` is a part of :class:`~sqz_integrations.engine.SqueezedEngine` kept in its own module, as
transformers keeps ``generate`` in its ``GenerationMixin``: it uses the engine's model, device lock, read plans and
CUDA-graph pool.
"""
from __future__ import annotations

import dataclasses
import logging
import threading
import time
from typing import Callable, Iterator

import torch

from . import decode_graph
from .batch import BatchRead
from .generation import Answer, Sampler, SamplingParams, TextAssembler

logger = logging.getLogger(__name__)

@dataclasses.dataclass(eq=False)
class Question:
    """One question of a batch: its dynamic token ids and, for a call handed to the coalescer, where its text pieces
    go and whether its reader has left."""

    suffix: list[int]
    sink: Callable[[str | Answer], None] | None = None
    cancelled: threading.Event | None = None
    submitted: float = dataclasses.field(default_factory=time.perf_counter)  # its answer's times count from here
    consumer_left: threading.Event | None = None  # an async consumer's (async_stream.consumer_left)

    def left(self) -> bool:
        """Whether its caller has left: a coalesced stream closed early, a call interrupted while it waited, or the
        async consumer of its stream gone."""
        return any(e is not None and e.is_set() for e in (self.cancelled, self.consumer_left))


@dataclasses.dataclass(frozen=True)
class Joins:
    """How a running batch reaches the calls queued behind it (the engine's coalescer): ``take(most, fits)`` moves up
    to ``most`` of those that ``fits`` the batch's buffers into it, ``waiting(fits)`` counts them, and the batch may
    grow to ``max_rows`` rows to seat them."""

    take: Callable[[int, Callable[[Question], bool]], list[Question]]
    waiting: Callable[[Callable[[Question], bool]], int]
    max_rows: int


def _width_for(rows: int, max_rows: int) -> int:
    """A batch grows to a power of two of rows (at most ``max_rows``): few widths, so few CUDA graphs to capture."""
    return min(max_rows, 1 << (rows - 1).bit_length())


class _Rows:
    """Where each row of a decoding batch stands: the question it answers now, its sampler and text, its last token,
    whether it is done (and its Answer handed on), why it finished and when (``time.perf_counter``)."""

    def __init__(self, questions: list[Question], params: SamplingParams, device: torch.device,
                 new_text: Callable[[], TextAssembler], eos_ids: set[int]):
        self.params, self.device, self.new_text, self.eos_ids = params, device, new_text, eos_ids
        self.occupant: list[Question | None] = []
        self.samplers: list[Sampler | None] = []
        self.texts: list[TextAssembler | None] = []
        self.finish: list[str] = []
        self.done: list[bool] = []
        self.answered: list[bool] = []
        self.first_token: list[float] = []
        self.ended: list[float] = []
        self.last: list[int] = []
        self.widen(len(questions))
        for b, q in enumerate(questions):
            self.seat(b, q)

    def seat(self, b: int, question: Question) -> None:
        """Row ``b`` answers ``question`` from now on (the batch's first questions, and each that joins)."""
        self.occupant[b], self.samplers[b], self.texts[b] = question, Sampler(self.params, self.device), self.new_text()
        self.finish[b], self.done[b], self.answered[b] = "length", False, False

    # every per-row list, with the value a free row holds (done and handed on, until a question is seated in it)
    _FREE_ROW = {"occupant": None, "samplers": None, "texts": None, "finish": "length", "done": True, "answered": True,
                 "first_token": 0.0, "ended": 0.0, "last": 0}

    def widen(self, width: int) -> None:
        """Rows added up to ``width`` (from none, at the start), free until a question is seated in them."""
        more = width - len(self.occupant)
        for name, free in self._FREE_ROW.items():
            getattr(self, name).extend([free] * more)

    def keep(self, rows: list[int]) -> None:
        """Only ``rows`` stay, renumbered ``0 .. len(rows) - 1`` in that order (a batch narrowed to its live rows)."""
        for name in self._FREE_ROW:
            values = getattr(self, name)
            setattr(self, name, [values[b] for b in rows])

    def take(self, b: int, token: int) -> str:
        """Row ``b``'s new token -> the text it makes safe to show."""
        self.last[b] = token
        piece = ""
        if token in self.eos_ids:
            self.finish[b] = "stop"
        else:
            piece = self.texts[b].push(token)
            if self.texts[b].stopped:
                self.finish[b] = "stop"
        self.done[b] = self.finish[b] == "stop" or len(self.texts[b].ids) >= self.params.max_new_tokens
        if self.done[b]:
            self.ended[b] = time.perf_counter()
        return piece

    def cancel_left(self) -> None:
        """A reader that left (a coalesced stream closed early): its row stops here."""
        for b, q in enumerate(self.occupant):
            if not self.done[b] and q is not None and q.left():
                self.done[b], self.finish[b], self.ended[b] = True, "cancelled", time.perf_counter()


class BatchDecodingMixin:
    """:meth:`_answer_rows` / :meth:`_row_events`: the batch loop of :class:`SqueezedEngine` (see the module)."""

    def _answer_rows(self, questions: list[Question], corpus: str, params: SamplingParams, kv_budget, hierarchical,
                     selection, question_budget, *, join=None, built=None) -> list[Answer]:
        """:meth:`answer_batch` of ``questions``: each one's sink is handed its pieces as they are decoded, then its
        :class:`Answer` as soon as its row ends; its times count from its ``submitted``. With ``join`` (see
        :meth:`_row_events`) also of the questions that join the batch, whose answers follow the others' in the
        returned list. ``built``: the corpus object the calls were made on (default: the one named ``corpus`` now)."""
        answers: dict = {}
        for q, event in self._row_events(questions, corpus, params, kv_budget, hierarchical, selection, question_budget,
                                         join, built):
            if isinstance(event, Answer):
                answers[q] = event
            if event and q.sink is not None:
                q.sink(event)
        return [answers.get(q) for q in questions]

    @torch.inference_mode()
    def _row_events(self, questions: list[Question], corpus: str, params: SamplingParams, kv_budget, hierarchical,
                    selection, question_budget, join=None, built=None) -> Iterator[tuple[Question, str | Answer]]:
        """The batch of ``questions``: yields ``(question, text piece)`` as the rows decode and ``(question, Answer)``
        as each row ends (before the next step), so a short answer is not held back by the batch's longest. A
        question whose ``cancelled`` event is set stops at the next step (finish reason ``"cancelled"``).

        ``join`` (:class:`Joins`; None: none join): questions queued meanwhile that fit the batch's buffers take the
        rows of ended ones and, where more wait than rows are free, rows the batch adds (it grows, up to
        ``join.max_rows``, into a wider read that takes over its rows as they stand); they are appended to
        ``questions`` and read into their rows (one forward each, alone) before the batch's next step."""
        c = built if built is not None else self.get_corpus(corpus)
        max_new_tokens = params.max_new_tokens
        n = len(questions)
        slot = None
        tokens_needed = max(len(q.suffix) for q in questions) + max_new_tokens
        with self._device_lock.shared():
            plan = self._plan(c, kv_budget, hierarchical, selection, question_budget)
            if self._graphs_for(c, plan, max_new_tokens):
                slot = self._graph_slot(c, plan, tokens_needed, batch=n)
                read, plan = slot.read, slot.read.plan
            else:  # with room (as a pooled graph's read has) for the longer questions of calls that join
                capacity = tokens_needed if join is None else decode_graph.capacity_for(tokens_needed)
                read = BatchRead(c, plan, n, capacity, track_sources=c.config.sources)
        rows = _Rows(questions, params, self.device, lambda: self._text_assembler(params), self._eos_ids)

        def read_alone(b: int) -> Iterator[tuple[Question, str]]:
            """Row b's question read alone into its row (its own pins): its first token."""
            q = rows.occupant[b]
            with self._device_lock.shared():
                read.dyn.begin_row(b, len(q.suffix))
                logits = self._forward(q.suffix, c.n_tokens, None, read)
                read.dyn.end()
                token = rows.samplers[b](logits[-1])
            rows.first_token[b] = time.perf_counter()
            yield q, rows.take(b, token)

        def finished() -> Iterator[tuple[Question, str | Answer]]:
            """Each row done since the last call: its last text, then its Answer, now rather than at the batch's end
            (its counts are final: a done row is fed, but nothing it reads is counted)."""
            for b in range(n):
                if rows.done[b] and not rows.answered[b]:
                    rows.answered[b] = True
                    q = rows.occupant[b]
                    yield q, rows.texts[b].finish()
                    with self._device_lock.shared():
                        answer = self._answer_record(c, corpus, q.suffix, plan, read.row_view(b), rows.texts[b],
                                                     rows.finish[b], rows.first_token[b] - q.submitted, q.submitted)
                    yield q, dataclasses.replace(answer, total_time=rows.ended[b] - q.submitted)

        if plan.reads_all(1) and n > 1:
            # the questions read the whole corpus (the default question_budget=1.0): one forward for all of them,
            # right-padded to the longest (causal: no real token sees the padding); per-row pins and sources come
            # from each row's real tokens (BatchRead)
            suffixes = [q.suffix for q in questions]
            lengths = [len(x) for x in suffixes]
            width = max(lengths)
            wanted = sorted(set(t - 1 for t in lengths))  # the last real position of each row
            with self._device_lock.shared():
                read.dyn.begin_rows(lengths)
                logits = self.model(
                    input_ids=torch.tensor([x + x[-1:] * (width - len(x)) for x in suffixes], device=self.device),
                    position_ids=(c.n_tokens + torch.arange(width, device=self.device)).expand(n, -1),
                    use_cache=False, squeeze=read, logits_to_keep=torch.tensor(wanted, device=self.device),
                    **{self._cache_arg: None},
                ).logits
                read.dyn.end()
                tokens = [rows.samplers[b](logits[b, wanted.index(t - 1)]) for b, t in enumerate(lengths)]
            for b, token in enumerate(tokens):
                rows.first_token[b] = time.perf_counter()
                yield rows.occupant[b], rows.take(b, token)
        else:
            for b in range(n):  # each question alone, into its row
                yield from read_alone(b)

        def fits(q: Question) -> bool:
            return len(q.suffix) + max_new_tokens <= read.dyn.capacity

        # steps of every row: eager, then (CUDA, Triton) replayed from a graph captured at the second (a row's third
        # token, as _decode captures: the eager step before it has compiled and warmed every kernel the graph records),
        # or from the first with a pooled one
        graphs = slot is not None
        step, steps = (slot.step if graphs else None), 0
        grows = True  # until growing fails for want of memory

        def move(width: int, live: list[int] | None = None) -> bool:
            """The batch, its rows as they stand, moved into a read of ``width`` rows. Growing (``live`` None): every
            row, into the pooled graph of that width where one was captured, else a new read (captured at its second
            step, as at a batch's start). Narrowing: only the ``live`` rows, renumbered in that order, and only into a
            pooled graph whose step is captured (a straggler then decodes at that width's speed: a batch of 8 with one
            live row took 3x a batch of one per layer at 512K on the H200, its attention split for 8 rows); where none
            is free the batch stays as it is. -> whether it moved."""
            nonlocal slot, read, plan, n, step, steps
            with self._device_lock.shared():
                if graphs:
                    target = self._graph_slot(c, plan, tokens_needed, batch=width, pooled_only=live is not None)
                    if target is None:
                        return False
                    target.read.adopt_rows(read, live)
                    if self.cuda_graph_error is None:
                        self._graph_pool.give(c.name, slot)  # the moved rows' counts are in the target read now
                    slot, read, plan, step = target, target.read, target.read.plan, target.step
                else:
                    target = BatchRead(c, plan, width, read.dyn.capacity, track_sources=c.config.sources)
                    target.adopt_rows(read, live)
                    read = target
            if live is not None:
                rows.keep(live)
            rows.widen(width)
            n, steps = width, 0
            return True

        while True:
            rows.cancel_left()
            yield from finished()
            free = [b for b in range(n) if rows.answered[b]] if join is not None else []
            if join is not None and n < join.max_rows and grows:
                waiting = join.waiting(fits)
                if waiting > len(free):
                    try:
                        move(_width_for(n - len(free) + waiting, join.max_rows))
                    except torch.OutOfMemoryError:  # the wider buffers do not fit: go on as wide as it is
                        grows = False
                        logger.warning("a batch of %d rows could not grow (out of device memory): the calls queued "
                                       "behind it wait for its rows to end", n)
                    free = [b for b in range(n) if rows.answered[b]]
            for b, q in zip(free, join.take(len(free), fits) if free else []):
                questions.append(q)
                rows.seat(b, q)
                with self._device_lock.shared():
                    read.reset_row(b)
                yield from read_alone(b)
            if free:
                yield from finished()  # a joined question may end at its first token
            if all(rows.done):
                break
            live = [b for b in range(n) if not rows.done[b]]
            if (graphs and step is not None and _width_for(len(live), n) < n and self.cuda_graph_error is None
                    and (join is None or join.waiting(fits) == 0)):
                move(_width_for(len(live), n), live)
            if graphs and step is None and steps == 1:
                step = slot.step = self._capture(read, batch=n)
                graphs = step is not None
            if join is not None and graphs:
                for b in range(n):  # a graph step feeds an ended row too: keep its slots from filling up meanwhile
                    if rows.answered[b]:
                        read.dyn.empty_row(b)
            # a graph step feeds every row (an ended one is fed and not counted); an eager one the live rows only
            fed = list(range(n)) if graphs else [b for b in range(n) if not rows.done[b]]
            positions = [c.n_tokens + read.dyn.lens[b] for b in fed]
            with self._device_lock.shared():
                read.set_active([not d for d in rows.done])
                if step is not None:
                    logits = step(rows.last, positions)
                else:
                    read.dyn.begin(1, on_device=graphs, rows=None if graphs else fed)
                    logits = self.model(
                        input_ids=torch.tensor([rows.last[b] for b in fed], device=self.device).unsqueeze(1),
                        position_ids=torch.tensor(positions, device=self.device).unsqueeze(1),
                        use_cache=False, squeeze=read, logits_to_keep=1, **{self._cache_arg: None},
                    ).logits[:, -1]
                    read.dyn.end()
                read.end_step()
                tokens = {b: rows.samplers[b](logits[i]) for i, b in enumerate(fed) if not rows.done[b]}
            steps += 1
            for b, token in tokens.items():
                yield rows.occupant[b], rows.take(b, token)
        if slot is not None and self.cuda_graph_error is None:
            self._graph_pool.give(c.name, slot)  # only now: every row's record has read the read's counters
