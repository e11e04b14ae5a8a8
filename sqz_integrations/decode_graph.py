"""Decode steps as CUDA-graph replays.

At batch 1 in eager transformers a decode step of the engine is bound by the host: each layer's lookup,
attention and bookkeeping launch a few small kernels, and the GPU waits for Python between them
(README, engine on the H200). A CUDA graph records one decode step's launches once per answer and
replays them with one call.

A graph needs every tensor it reads at a fixed address and every shape fixed, so the dynamic tokens
(the question and the generated ones) cannot live in transformers' growing ``DynamicCache``. They go
into :class:`DynamicTokens`: buffers sized for the whole answer, written in place at a position held
on the device, and read by the attention with the count of valid slots held on the device too
(``dyn_len`` of the kernels). The model then runs with ``use_cache=False``: the attention hook gets
the new tokens' keys and values and the read stores them (:meth:`CorpusRead.attend`).
"""
from __future__ import annotations

import threading
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch


class DeviceBusy(RuntimeError):
    """Another thread kept the device (e.g. a corpus build): this answer decodes eagerly, the next one captures."""


# How long a capture waits for the other threads' device work: a corpus build holds the device for seconds, and
# every new forward waits behind a waiting capture, so the answer gives up and decodes eagerly instead.
CAPTURE_WAIT_S = 0.5


class DeviceLock:
    """Lets a CUDA-graph capture run while no other thread of the engine works on the device.

    A capture records what its thread launches; work launched meanwhile from another thread (on the legacy
    default stream) invalidates it. Measured on the H200: two threads answering at once, one capturing, failed
    with CUBLAS_STATUS_EXECUTION_FAILED / "operation not permitted when stream is capturing". Forwards,
    replays and corpus builds hold the lock shared (re-entrant per thread: a build runs forwards); a capture
    holds it alone, and once one is waiting no new shared holder starts.
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._shared = 0
        self._exclusive = False
        self._waiting = 0
        self._depth = threading.local()

    @contextmanager
    def shared(self):
        depth = getattr(self._depth, "n", 0)
        if depth == 0:
            with self._cond:
                while self._exclusive or self._waiting:
                    self._cond.wait()
                self._shared += 1
        self._depth.n = depth + 1
        try:
            yield
        finally:
            self._depth.n = depth
            if depth == 0:
                with self._cond:
                    self._shared -= 1
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self, timeout: float | None = None):
        """Held alone; raises :class:`DeviceBusy` after ``timeout`` seconds of waiting (``None``: waits)."""
        if getattr(self._depth, "n", 0):
            raise RuntimeError("a capture cannot start inside a forward or a corpus build of the same thread")
        with self._cond:
            self._waiting += 1
            try:
                if not self._cond.wait_for(lambda: not (self._exclusive or self._shared), timeout):
                    raise DeviceBusy(f"the device stayed busy for {timeout} s")
            finally:
                self._waiting -= 1
                self._cond.notify_all()  # shared holders that waited behind this request go on
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


class DynamicTokens:
    """Preallocated keys/values of an answer's dynamic tokens, per layer: ``(batch, kv_heads, capacity, dim)``.

    Before each forward the engine calls :meth:`begin` with the number of new tokens; every layer's
    :meth:`append` writes them after the ones already there. ``on_device`` makes :meth:`append` return the
    whole buffers and the device-side count instead of views cut on the host, so that launches recorded in
    a graph stay valid for every later step (the engine reads single tokens that way before the capture too,
    so that the kernels the graph records are compiled and warm). A multi-token read (the question) is cut on
    the host: its copy pins read the dynamic keys without a device-side count.
    """

    def __init__(self, capacity: int, device: torch.device):
        if capacity < 1:
            raise ValueError(f"capacity must be positive, got {capacity}")
        self.capacity = capacity
        self.n = 0  # tokens stored before the current forward (host)
        self.new = 0  # tokens of the current forward
        self.on_device = False
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._start = torch.zeros((), dtype=torch.long, device=device)
        self._valid = torch.zeros((), dtype=torch.long, device=device)

    def reset(self) -> None:
        """Empty, for another answer: the buffers stay where they are (a captured graph reads them)."""
        self.n = self.new = 0
        self.on_device = False

    def begin(self, new_tokens: int, on_device: bool = False) -> None:
        if self.n + new_tokens > self.capacity:
            raise ValueError(f"{self.n + new_tokens} dynamic tokens do not fit in {self.capacity}")
        self.new = new_tokens
        self.on_device = on_device
        self._start.fill_(self.n)
        self._valid.fill_(self.n + new_tokens)

    def end(self) -> None:
        self.n += self.new
        self.new = 0

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store this forward's ``k``/``v`` ``(batch, kv_heads, T, dim)`` -> ``(keys, values, dyn_len)``:
        the valid slots (``dyn_len`` None), or with ``on_device`` the whole buffers and their count."""
        if layer_idx not in self.keys:
            b, kvh, _, d = k.shape
            self.keys[layer_idx] = k.new_zeros(b, kvh, self.capacity, d)
            self.values[layer_idx] = v.new_zeros(b, kvh, self.capacity, v.shape[-1])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        slots = self._start + torch.arange(k.shape[2], device=k.device)
        keys.index_copy_(2, slots, k.to(keys.dtype))
        values.index_copy_(2, slots, v.to(values.dtype))
        if self.on_device:
            return keys, values, self._valid
        end = self.n + self.new
        return keys[:, :, :end], values[:, :, :end], None


class HostInts:
    """A small integer device tensor refreshed from Python every decode step without a host sync: the values are
    staged in pinned host memory (on CUDA) and copied asynchronously, where a plain ``copy_`` from a host list waits
    for the device. Reusing the staging buffer is safe because the engine reads each step's logits on the host (its
    sampler) before it stages the next step's values: the previous copy has run by then."""

    def __init__(self, dst: torch.Tensor):
        self.dst = dst
        self.host = torch.zeros(dst.shape, dtype=dst.dtype, pin_memory=dst.is_cuda)

    def copy(self, values) -> None:
        self.host.view(-1).copy_(torch.as_tensor(values, dtype=self.host.dtype).view(-1))
        self.dst.copy_(self.host, non_blocking=True)


class GraphedStep:
    """One decode step of ``model`` with ``read``, recorded as a CUDA graph; :meth:`__call__` replays it.

    The read's host-side counters (steps, centroids scored) advance in Python, which a replay skips:
    the capture's increments are measured, undone, and added again after every replay. The device-side
    ones (kept keys, source mass) are recorded kernels and replay by themselves.
    """

    def __init__(self, model, read, store, cache_arg: str, lock: DeviceLock, batch: int = 1):
        dev = store._valid.device
        self.lock = lock
        self.read, self.store = read, store
        self.batch = batch
        self.input_ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self.position_ids = torch.zeros(batch, 1, dtype=torch.long, device=dev)
        self._ids, self._positions = HostInts(self.input_ids), HostInts(self.position_ids)  # rows' values, no sync
        before = read.host_counters()
        store.on_device = True
        try:
            self.graph = torch.cuda.CUDAGraph()
            # thread_local: only this thread's own unsafe calls are checked; DeviceLock keeps the engine's other
            # threads off the device meanwhile
            with lock.exclusive(CAPTURE_WAIT_S), torch.cuda.graph(self.graph, capture_error_mode="thread_local"):
                logits = model(
                    input_ids=self.input_ids, position_ids=self.position_ids, use_cache=False,
                    squeeze=read, logits_to_keep=1, **{cache_arg: None},
                ).logits
                self.logits = logits[:, -1]  # (batch, vocab)
        finally:
            after = read.host_counters()
            read.set_host_counters(before)
        self.delta = tuple(
            [a - b for a, b in zip(x1, x0)] if isinstance(x1, list) else x1 - x0 for x0, x1 in zip(before, after)
        )

    def __call__(self, token: int | list[int], position: int | list[int]) -> torch.Tensor:
        """Logits ``(1, vocab)`` of ``token`` at ``position`` (valid until the next call); for the rows of a batch
        (a batch of one too), lists of one token and position per row and logits ``(batch, vocab)``."""
        if isinstance(token, int):
            self.input_ids.fill_(token)
            self.position_ids.fill_(position)
        else:
            self._ids.copy(token)
            self._positions.copy(position)
        self.store.begin(1, on_device=True)
        with self.lock.shared():
            self.graph.replay()
        self.store.end()
        self.read.add_host_counters(self.delta)
        return self.logits


def capacity_for(tokens: int) -> int:
    """Dynamic-token slots for an answer of ``tokens`` (question + new tokens): the next power of two, at least
    256, so that answers of similar length share one pooled graph. The attention reads only the valid slots
    (``dyn_len``): a larger buffer costs memory, not time."""
    return max(256, 1 << max(0, tokens - 1).bit_length())


@dataclass
class GraphSlot:
    """A read with its dynamic-token buffers and, once captured, its decode step: what :class:`GraphPool` keeps
    between answers. ``key`` says which answers can take it (see ``SqueezedEngine._graph_slot``)."""

    key: tuple
    read: object  # selection.CorpusRead (not imported: decode_graph sits below selection)
    step: GraphedStep | None = None


@dataclass
class GraphPool:
    """Decode graphs kept for the next answer of the same kind (corpus, read plan, configuration, buffer size).

    A capture costs ~15-20 ms and an answer's first steps ran eagerly before it (H200, README); an answer that
    takes a pooled slot resets its read in place (the graph's tensors keep their addresses) and replays from its
    first generated token on. A slot is held by one answer at a time; at most ``per_corpus`` free slots are kept
    per corpus (the oldest dropped first), and a corpus's slots go when it is removed or replaced.
    """

    per_corpus: int = 4
    _free: dict = field(default_factory=dict)  # corpus name -> [GraphSlot], oldest first
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def take(self, corpus: str, key: tuple, captured: bool = False) -> GraphSlot | None:
        """The newest free slot of this kind (``captured``: only one whose step is captured), or None."""
        with self._lock:
            slots = self._free.get(corpus, [])
            for i in range(len(slots) - 1, -1, -1):
                if slots[i].key == key and (slots[i].step is not None or not captured):
                    return slots.pop(i)
        return None

    def give(self, corpus: str, slot: GraphSlot) -> None:
        with self._lock:
            slots = self._free.setdefault(corpus, [])
            if any(s.key == slot.key for s in slots):  # another thread's answer pooled one of this kind meanwhile
                return
            slots.append(slot)
            del slots[:-self.per_corpus]

    def drop(self, corpus: str) -> int:
        """Forget one corpus's free slots; -> how many."""
        with self._lock:
            return len(self._free.pop(corpus, []))

    def clear(self) -> int:
        """Forget every free slot; -> how many."""
        with self._lock:
            n = sum(map(len, self._free.values()))
            self._free.clear()
            return n

    def __len__(self) -> int:
        with self._lock:
            return sum(map(len, self._free.values()))
