"""Concurrent calls that can share one batch are run as one batch.

LangChain's ``batch``/``abatch``, LlamaIndex's async calls and a threaded server all reach the engine as
concurrent ``answer`` calls from several threads. Answered one by one, each re-reads the weights and the
corpus every step; :meth:`SqueezedEngine.answer_batch` reads them once per step for all rows. A
:class:`Coalescer` turns the first into the second without the caller doing anything.

Calls are grouped by a key (same corpus, same settings). The first call of a key becomes its leader: it
takes up to ``max_rows`` of the calls queued, runs them as one batch and hands each its result (or the batch's
exception). Calls that arrive while a batch runs queue up; when it ends, the oldest of them leads the next
batch. Different keys never wait for each other.

A running batch may :meth:`Coalescer.take` calls queued meanwhile into it (into the row of a call that has ended, or
into rows it adds: :meth:`Coalescer.waiting` says how many wait), rather than leave them to wait for the whole batch
to end; so a call that arrives while a lone call decodes joins it at its next step.

A call whose caller has left while it was queued (``abandoned``: an ``answer`` or a stream interrupted while it
waited) is dropped wherever the queue is read, with ``None`` as its result, so no batch reads its question.

Before it starts, a leader waits while other calls keep arriving (``gap_s`` at a time, at most ``max_wait_s``),
but only if calls have overlapped in the last ``gather_window_s`` seconds: a lone interactive call starts at once
(on a GPU a wait of 2 ms would be a fifth of a short answer's first token), and the first call of a burst
starts alone while the rest of the burst queues behind it (and joins it, where the batch can grow).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Any


@dataclass(eq=False)
class Ticket:
    """One call: what it asked, when, and (once its batch has run) its result or error."""

    item: Any
    submitted: float = field(default_factory=time.perf_counter)
    result: Any = None
    error: BaseException | None = None
    promoted: bool = False  # woken to lead the next batch rather than with a result
    ready: threading.Event = field(default_factory=threading.Event)

    def outcome(self) -> Any:
        if self.error is not None:
            raise self.error
        return self.result


class Coalescer:
    """``submit(key, item)`` from any thread -> that item's result, computed by
    ``run(key, tickets) -> results`` (one per ticket, in order) together with the other items of the
    same key submitted meanwhile. ``run`` may add queued calls to its running batch with :meth:`take`."""

    def __init__(self, run: Callable[[Hashable, list[Ticket]], list[Any]], max_rows: int,
                 gap_s: float = 0.002, max_wait_s: float = 0.02, gather_window_s: float = 60.0,
                 abandoned: Callable[[Any], bool] = lambda item: False):
        if max_rows < 1:
            raise ValueError(f"max_rows must be at least 1, got {max_rows}")
        self._run = run
        self._abandoned = abandoned
        self.max_rows = max_rows
        self.gap_s = gap_s
        self.max_wait_s = max_wait_s
        self.gather_window_s = gather_window_s
        self._lock = threading.Lock()
        self._queues: dict[Hashable, list[Ticket]] = {}  # a key is in here while it has a leader
        self._last_overlap = float("-inf")  # when a call last found its key already led

    def submit(self, key: Hashable, item: Any) -> Any:
        ticket = Ticket(item)
        with self._lock:
            queue = self._queues.get(key)
            lead = queue is None
            if lead:
                self._queues[key] = queue = []
            else:
                self._last_overlap = ticket.submitted
            queue.append(ticket)
        if not lead:
            ticket.ready.wait()
            if not ticket.promoted:
                return ticket.outcome()
        self._lead(key, ticket)
        return ticket.outcome()

    def take(self, key: Hashable, batch: list[Ticket], most: int, fits: Callable[[Any], bool]) -> list[Ticket]:
        """From inside ``run(key, batch)``: move up to ``most`` of the calls queued for ``key`` whose item ``fits``
        into the running ``batch`` (appended, in arrival order; ``run`` then returns their results too, after
        the others'). -> the calls taken."""
        if most < 1:
            return []
        with self._lock:
            queue = self._pruned(key)
            taken = [t for t in queue if fits(t.item)][:most]
            if taken:
                self._queues[key] = [t for t in queue if t not in taken]
        batch.extend(taken)
        return taken

    def waiting(self, key: Hashable, fits: Callable[[Any], bool]) -> int:
        """From inside ``run(key, batch)``: how many calls are queued for ``key`` whose item ``fits`` (what a batch
        that could grow wider would :meth:`take`)."""
        with self._lock:
            return sum(1 for t in self._pruned(key) if fits(t.item))

    def _pruned(self, key: Hashable, keep: Ticket | None = None) -> list[Ticket]:
        """Under the lock: ``key``'s queue without the calls whose caller has left (but ``keep``), which get ``None``
        as their result now."""
        queue = self._queues.get(key, [])
        left = [t for t in queue if t is not keep and self._abandoned(t.item)]
        if not left:
            return queue
        for t in left:
            t.result = None
            t.ready.set()
        self._queues[key] = queue = [t for t in queue if t not in left]
        return queue

    def _gather(self, key: Hashable) -> None:
        """Wait while calls of ``key`` keep arriving: a lone call waits one gap."""
        deadline = time.perf_counter() + self.max_wait_s
        seen = 0
        while True:
            with self._lock:
                n = len(self._queues[key])
            if n >= self.max_rows or n == seen or time.perf_counter() >= deadline:
                return
            seen = n
            time.sleep(self.gap_s)

    def _lead(self, key: Hashable, ticket: Ticket) -> None:
        # the leader's ticket is the oldest of the queue, so it is in the batch it runs
        batch = [ticket]
        try:
            if time.perf_counter() - self._last_overlap <= self.gather_window_s:
                self._gather(key)
            with self._lock:
                queue = self._pruned(key, keep=ticket)
                batch, self._queues[key] = queue[: self.max_rows], queue[self.max_rows :]
            results = self._run(key, batch)
            if len(results) != len(batch):
                raise RuntimeError(f"a batch of {len(batch)} calls returned {len(results)} results")
            for member, result in zip(batch, results):
                member.result = result
        except BaseException as exc:  # every call of the batch sees its failure (an interrupt too), none hangs
            for member in batch:
                member.error = exc
        finally:
            with self._lock:
                # without the leader's own ticket, still queued if it was interrupted before taking its batch, and
                # without calls left meanwhile (none of those should lead a batch)
                rest = [t for t in self._pruned(key, keep=ticket) if t is not ticket]
                if rest:
                    self._queues[key] = rest
                    rest[0].promoted = True
                    rest[0].ready.set()
                else:
                    del self._queues[key]
            for member in batch:
                if member is not ticket:
                    member.ready.set()
