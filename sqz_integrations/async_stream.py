"""Async iteration over the engine's blocking streams, for the framework adapters.

The engine decodes on the calling thread; an async caller gets the same pieces from a worker
thread, one at a time, without blocking its event loop.
"""
from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

_DONE = object()
_worker = threading.local()  # in a worker of iterate_in_thread: ``left``, set once its consumer has gone


def consumer_left() -> threading.Event | None:
    """In the worker thread of :func:`iterate_in_thread`: an event set as soon as the async consumer stops (also while
    the worker is blocked waiting for its next item), else None. The engine's coalesced calls watch it, so a call
    whose consumer has gone is dropped from the queue, or its row ended, without waiting for its next piece."""
    return getattr(_worker, "left", None)


async def iterate_in_thread(make_iterator: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Run a blocking iterator in one worker thread and yield its items asynchronously.

    If the consumer stops early, the worker stops at the next item and closes the iterator
    (which ends the engine's decoding loop).
    """
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    cancelled = threading.Event()

    def put(item: tuple[bool, Any]) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the event loop closed while the worker finished
            pass

    def produce() -> None:
        iterator = None
        _worker.left = cancelled
        try:
            iterator = make_iterator()
            for item in iterator:
                if cancelled.is_set():
                    break
                put((True, item))
        except BaseException as exc:  # handed to the consumer, re-raised there
            put((False, exc))
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
            _worker.left = None
            put((True, _DONE))

    worker = threading.Thread(target=produce, name="sqz-astream", daemon=True)
    worker.start()
    try:
        while True:
            ok, item = await queue.get()
            if not ok:
                raise item
            if item is _DONE:
                break
            yield item
    finally:
        cancelled.set()
