"""A batch of answers on one corpus: the questions read, then one decode step at a time for every row.

Batch-1 decoding reads the model's weights and the selected corpus keys once per generated token of one
answer. Rows that decode together share those reads: one forward per step feeds one token per row, and the
kernels' batch attends every row to the one copy of the corpus KV (each row with its own selection).

The questions differ in length, so each row's dynamic tokens (its question, then what it generated) sit in
its own row of shared buffers from slot 0 on, with its own count of valid slots (the kernels' per-row
``dyn_len``). Questions that read the whole corpus (the default) are read in one forward, right-padded;
otherwise each is read alone, into its row (its own sparse read). Either way each row's copy pins and sources
come from its own tokens. Eager steps feed only the rows still decoding; a CUDA-graph step (fixed shapes)
feeds every row, a finished row's token dropped and nothing it reads counted.
"""
from __future__ import annotations

import torch

from .corpus import SqueezedCorpus
from .decode_graph import HostInts
from .selection import CorpusRead, ReadPlan, kept_sums


class RowTokens:
    """Keys/values of each row's dynamic tokens, per layer ``(batch, kv_heads, capacity, dim)``, row ``b``'s
    valid in its first ``lens[b]`` slots.

    :meth:`begin_row` starts a forward of one row alone (its question), :meth:`begin` one of every row with one
    token each; :meth:`append` (called by :meth:`CorpusRead.attend` in every layer) stores the forward's
    keys/values after the row's own and returns what the attention reads. Steps of every row keep the slots to
    write and the counts to read on the device, so that a CUDA graph can hold them (``on_device``: the whole
    buffers are read, each row up to its own count; the twins, which read every slot they are given, get them
    cut to the longest row instead).
    """

    def __init__(self, batch: int, capacity: int, device: torch.device):
        if batch < 1 or capacity < 1:
            raise ValueError(f"batch and capacity must be positive, got {batch} and {capacity}")
        self.batch, self.capacity = batch, capacity
        self.lens = [0] * batch  # valid slots per row before the current forward (host)
        self.row: int | None = None  # the row read alone by the current forward, None: every row
        self.new = 0
        self.on_device = False
        self._lengths: list[int] | None = None  # during begin_rows: each row's real tokens
        self.live: list[int] | None = None  # the rows fed by a step of some rows (the others have finished)
        self._live_idx: torch.Tensor | None = None
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self._slots = torch.zeros(batch, dtype=torch.long, device=device)  # where each row's new token goes
        self._valid = torch.zeros(batch, dtype=torch.long, device=device)
        self._slots_from_host = HostInts(self._slots)

    def reset(self) -> None:
        """Empty, for another batch: the buffers stay where they are (a captured graph reads them)."""
        self.lens = [0] * self.batch
        self.row, self.new, self.on_device, self._lengths = None, 0, False, None
        self.live = self._live_idx = None

    def empty_row(self, row: int) -> None:
        """Row ``row`` holds no tokens: an ended row that a graph step still feeds while it waits for a question to
        join (its slots would otherwise fill up)."""
        self.lens[row] = 0

    def adopt_rows(self, src: "RowTokens", rows: list[int] | None = None) -> None:
        """Rows ``0 .. len(rows) - 1`` take over ``src``'s rows ``rows`` (default: every row, in order) as they stand (a
        batch grown wider, or narrowed to its live rows, moves here), in place: a captured graph reads these buffers.
        The rows after them stay as they are (empty after a reset)."""
        rows = list(range(src.batch)) if rows is None else list(rows)
        if len(rows) > self.batch or src.capacity != self.capacity or not all(0 <= r < src.batch for r in rows):
            raise ValueError(f"rows {rows} of {src.batch} x {src.capacity} slots cannot move into {self.batch} x "
                             f"{self.capacity}")
        moved = len(rows)
        for layer_idx, k in src.keys.items():
            if layer_idx not in self.keys:
                self.keys[layer_idx] = k.new_zeros(self.batch, *k.shape[1:])
                self.values[layer_idx] = src.values[layer_idx].new_zeros(self.batch, *src.values[layer_idx].shape[1:])
            self.keys[layer_idx][:moved] = k[rows]
            self.values[layer_idx][:moved] = src.values[layer_idx][rows]
        self.lens[:moved] = [src.lens[r] for r in rows]

    def begin_row(self, row: int, new_tokens: int) -> None:
        if not 0 <= row < self.batch:
            raise IndexError(f"row {row} is not in a batch of {self.batch}")
        self._check(self.lens[row] + new_tokens)
        self.row, self.new = row, new_tokens

    def begin_rows(self, lengths: list[int]) -> None:
        """A forward of every row's question at once, right-padded to the longest: row ``b``'s first ``lengths[b]``
        tokens are real. Causal attention lets no real token see the padding after it, and the padded slots are
        overwritten by the row's next tokens (:meth:`end` counts only the real ones)."""
        if len(lengths) != self.batch or any(self.lens) or min(lengths) < 1:
            raise ValueError(f"the questions of an empty batch of {self.batch}, each at least one token, not {lengths}")
        self._check(max(lengths))
        self.row, self.new, self.on_device = None, max(lengths), False
        self._lengths = list(lengths)

    def begin(self, new_tokens: int = 1, on_device: bool = False, rows: list[int] | None = None) -> None:
        """A forward of every row, one token each (``decode_graph.GraphedStep`` calls it before each replay), or,
        with ``rows``, of those rows only (in that order: the forward's batch rows), the others left as they are."""
        if new_tokens != 1:
            raise ValueError(f"a step of every row feeds one token per row, not {new_tokens}")
        if rows is not None and (on_device or not rows or not all(0 <= r < self.batch for r in rows)):
            raise ValueError(f"a step of some rows takes rows of the batch of {self.batch}, not {rows}, and no graph")
        self.live = None if rows is None or len(rows) == self.batch else list(rows)
        self._check(max(self.lens[r] for r in (self.live or range(self.batch))) + 1)
        self.row, self.new, self.on_device = None, 1, on_device
        self._lengths = None
        self._slots_from_host.copy(self.lens)
        torch.add(self._slots, 1, out=self._valid)
        self._live_idx = None if self.live is None else torch.tensor(self.live, device=self._slots.device)

    def end(self) -> None:
        if self._lengths is not None:
            self.lens, self._lengths = self._lengths, None
        elif self.live is not None:
            for r in self.live:
                self.lens[r] += 1
            self.live = self._live_idx = None
        elif self.row is None:
            self.lens = [n + 1 for n in self.lens]
        else:
            self.lens[self.row] += self.new
        self.row, self.new = None, 0

    def _check(self, needed: int) -> None:
        if needed > self.capacity:
            raise ValueError(f"{needed} dynamic tokens do not fit in {self.capacity}")

    def append(self, layer_idx: int, k: torch.Tensor, v: torch.Tensor):
        """Store this forward's ``k``/``v`` ``(rows, kv_heads, T, dim)`` -> ``(keys, values, dyn_len)``: for one
        row, its valid slots (``dyn_len`` None); for every row, the buffers up to the longest row and the per-row
        counts."""
        if layer_idx not in self.keys:
            _, kvh, _, d = k.shape
            self.keys[layer_idx] = k.new_zeros(self.batch, kvh, self.capacity, d)
            self.values[layer_idx] = v.new_zeros(self.batch, kvh, self.capacity, v.shape[-1])
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        if self._lengths is not None:
            t = k.shape[2]
            keys[:, :, :t] = k.to(keys.dtype)
            values[:, :, :t] = v.to(values.dtype)
            return keys[:, :, :t], values[:, :, :t], None
        if self.row is not None:
            r, start = self.row, self.lens[self.row]
            end = start + k.shape[2]
            keys[r, :, start:end] = k[0].to(keys.dtype)
            values[r, :, start:end] = v[0].to(values.dtype)
            return keys[r:r + 1, :, :end], values[r:r + 1, :, :end], None
        if self.live is not None:  # the rows still decoding, gathered (a copy of their dynamic tokens)
            idx, slots = self._live_idx, self._slots[self._live_idx]
            keys[idx, :, slots] = k[:, :, 0].to(keys.dtype)
            values[idx, :, slots] = v[:, :, 0].to(values.dtype)
            end = max(self.lens[r] for r in self.live) + 1
            return keys[idx, :, :end], values[idx, :, :end], self._valid[idx]
        slots = self._slots.view(-1, 1, 1, 1)
        keys.scatter_(2, slots.expand(-1, k.shape[1], 1, k.shape[3]), k.to(keys.dtype))
        values.scatter_(2, slots.expand(-1, v.shape[1], 1, v.shape[3]), v.to(values.dtype))
        if self.on_device:
            return keys, values, self._valid
        end = max(self.lens) + 1
        return keys[:, :, :end], values[:, :, :end], self._valid


class BatchRead(CorpusRead):
    """A :class:`CorpusRead` for a batch of answers: the dynamic tokens in :class:`RowTokens`, one set of copy
    pins per row, and what each row read (kept keys, centroids scored, source mass) counted per row while the
    row is active. :meth:`row_view` gives one row's counters as a read of its own (for the answer's record).

    The counts kept on the device (kept keys, hierarchical centroids scored, source mass) are weighted by the
    rows' active flags, also on the device, so a CUDA-graph replay of a step counts them by itself. The counts
    kept on the host (steps, flat centroids scored) are the same for every row at every step: the layers record
    them once, and :meth:`end_step` adds them to the active rows after each step, eager or replayed."""

    def __init__(self, corpus: SqueezedCorpus, plan: ReadPlan, batch: int, capacity: int, track_sources: bool = True):
        super().__init__(corpus, plan, track_sources)
        dev = corpus.layers[0].keys.device
        n_layers = len(corpus.layers)
        self.batch = batch
        self.dyn = RowTokens(batch, capacity, dev)
        self.row_keys = torch.zeros(n_layers, batch, dtype=torch.float64, device=dev)  # per KV head, summed over steps
        self.row_steps = [[0] * n_layers for _ in range(batch)]
        self.row_scored_host = [0.0] * batch
        self.row_scored_dev = torch.zeros(batch, dtype=torch.float64, device=dev)
        self.row_mass = torch.zeros(batch, len(corpus.documents), dtype=torch.float64, device=dev)
        self._row: int | None = None  # the row of a batched question read being pinned or measured
        self._step_scored: dict[int, float] = {}  # layer -> centroids a step of one row scores (host-known part)
        self.active = [True] * batch
        self._active_dev = torch.ones(batch, dtype=torch.float64, device=dev)
        # the same flags as the kernels take them: an ended row that a step of every row feeds reads no corpus key
        self._live_dev = torch.ones(batch, dtype=torch.bool, device=dev)
        self._one = torch.ones(1, dtype=torch.float64, device=dev)

    def set_active(self, active: list[bool]) -> None:
        """Which rows still decode: the others are fed, but nothing they read is counted."""
        if len(active) != self.batch:
            raise ValueError(f"{len(active)} flags for a batch of {self.batch}")
        if list(active) == self.active:
            return  # the device copy as it is: most steps change no row (a copy from the host waits for the device)
        self.active = list(active)
        self._active_dev.copy_(torch.tensor(self.active, dtype=torch.float64))
        torch.ne(self._active_dev, 0, out=self._live_dev)  # in place: a pooled graph reads it by address

    def _one_row(self) -> int | None:
        """The row a computation is for when it is for one row only (a question read alone, or one row of a
        batched question read), else None (every row)."""
        return self._row if self._row is not None else self.dyn.row

    def _each_question(self, fn, q, dyn_k, *rest) -> None:
        """``fn(q, dyn_k, *rest)`` per row of a batched question read, on that row's real tokens alone (what a
        read of the row's question alone computes)."""
        for b, t in enumerate(self.dyn._lengths):
            self._row = b
            try:
                fn(q[b:b + 1, :, :t], dyn_k[b:b + 1, :, :t], *[x[b:b + 1] for x in rest])
            finally:
                self._row = None

    def _step_live(self):
        if self.dyn.row is not None or self.dyn.live is not None or self.dyn._lengths is not None:
            return None  # one row, the live rows only, or the questions: every row of the forward reads
        return self._live_dev

    def _step_pins(self, layer_idx):
        pins = self.pins.get(layer_idx)
        if pins is None:
            return None
        if self.dyn.row is not None:
            pins = pins[self.dyn.row:self.dyn.row + 1]
        elif self.dyn.live is not None:
            pins = pins[self.dyn._live_idx]
        return pins  # (rows read, KV heads, clusters): the fused Triton lookup takes one set per row

    def _pin_question(self, layer_idx, layer, q, dyn_k, scale) -> None:
        if self.dyn._lengths is None:
            return super()._pin_question(layer_idx, layer, q, dyn_k, scale)
        self._each_question(lambda qb, kb: super(BatchRead, self)._pin_question(layer_idx, layer, qb, kb, scale),
                            q, dyn_k)

    def _store_pins(self, layer_idx, pins) -> None:
        if layer_idx not in self.pins:
            self.pins[layer_idx] = pins.new_zeros(self.batch, *pins.shape)
        self.pins[layer_idx][self._one_row()] = pins

    def _measures(self, tokens: int) -> bool:
        lengths = self.dyn._lengths
        return super()._measures(tokens if lengths is None else min(lengths))

    def _measure_sources(self, layer_idx, layer, q, dyn_k, selected, scale, dyn_len=None) -> None:
        if self.dyn._lengths is None:
            return super()._measure_sources(layer_idx, layer, q, dyn_k, selected, scale, dyn_len)

        def one(qb, kb, sb):
            if super(BatchRead, self)._measures(qb.shape[2]):
                super(BatchRead, self)._measure_sources(layer_idx, layer, qb, kb, sb, scale)

        self._each_question(one, q, dyn_k, selected)

    def _weights(self) -> torch.Tensor:
        """``(rows,)`` float64: 1 for a counted row of the current forward, 0 for a finished one (the rows of a
        step of some rows are all counted)."""
        return self._one if self.dyn.row is not None or self.dyn.live is not None else self._active_dev

    def _add_rows(self, total: torch.Tensor, per_row: torch.Tensor) -> None:
        """``total`` ``(batch, ...)`` += ``per_row``, the current forward's rows (one row read alone, every row, or
        the fed ones)."""
        if self.dyn.row is not None:
            total[self.dyn.row] += per_row[0]
        elif self.dyn.live is None:
            total += per_row
        else:
            total.index_add_(0, self.dyn._live_idx, per_row)

    def _record(self, layer_idx, layer, scores, selected) -> None:
        counts = self._cluster_sizes(layer_idx, layer)
        kvh = selected.shape[1]
        per_row = torch.sum(selected * counts, dim=(1, 2), dtype=torch.float64) / kvh * self._weights()
        self._add_rows(self.row_keys[layer_idx], per_row)
        # centroids scored over a row's KV heads, as CorpusRead counts them (a read of everything scores none)
        per_step = 0.0
        if scores is not None and self.plan.hierarchical:
            self._add_rows(self.row_scored_dev, torch.isfinite(scores).sum(dim=(1, 2)).double() * self._weights())
            per_step = layer.l1_centroids.shape[0] * layer.l1_centroids.shape[1]
        elif scores is not None:
            per_step = scores.shape[1] * scores.shape[2]
        one = self.dyn.row
        if one is not None or self.dyn._lengths is not None:  # a question read, of one row or of every row
            for b in ([one] if one is not None else range(self.batch)):
                self.row_steps[b][layer_idx] += 1
                self.row_scored_host[b] += per_step
        else:  # a decode step: counted by end_step (a graph replay does not run this)
            self._step_scored[layer_idx] = per_step

    def end_step(self) -> None:
        """After a decode step of every row (eager or a graph replay): its host-side counts, to the active rows."""
        for b in range(self.batch):
            if self.active[b]:
                for layer_idx, scored in self._step_scored.items():
                    self.row_steps[b][layer_idx] += 1
                    self.row_scored_host[b] += scored

    def reset(self) -> None:
        """Ready for another batch of as many rows with the same plan, in place (a pooled graph holds this read's
        tensors). The layers' decode-step counts stay: a replay from the first step does not record them."""
        n_layers = len(self.corpus.layers)
        self.row_keys.zero_()
        self.row_scored_dev.zero_()
        self.row_mass.zero_()
        self.row_steps = [[0] * n_layers for _ in range(self.batch)]
        self.row_scored_host = [0.0] * self.batch
        for pins in self.pins.values():
            pins.zero_()
        self.set_active([True] * self.batch)
        self.dyn.reset()

    def reset_row(self, row: int) -> None:
        """Row ``row`` empty for another question, the other rows as they are (a queued call taking the row of an
        ended one): its tokens, pins and counts, in place."""
        self.row_keys[:, row].zero_()
        self.row_scored_dev[row] = 0.0
        self.row_mass[row].zero_()
        self.row_steps[row] = [0] * len(self.corpus.layers)
        self.row_scored_host[row] = 0.0
        for pins in self.pins.values():
            pins[row].zero_()
        self.dyn.lens[row] = 0

    def adopt_rows(self, src: "BatchRead", rows: list[int] | None = None) -> None:
        """Rows ``0 .. len(rows) - 1`` take over ``src``'s rows ``rows`` (default: every row, in order) as they stand:
        their dynamic tokens, copy pins and counts (a running batch grown wider, or narrowed to its live rows,
        :mod:`~sqz_integrations.batch_decode`). Same corpus and plan; this read was just made or reset, so its other
        rows are empty."""
        if src.corpus is not self.corpus or src.plan.kv_budget != self.plan.kv_budget:
            raise ValueError("rows move only between reads of one corpus with one plan")
        rows = list(range(src.batch)) if rows is None else list(rows)
        self.dyn.adopt_rows(src.dyn, rows)
        moved = slice(0, len(rows))
        self.row_keys[:, moved] = src.row_keys[:, rows]
        self.row_scored_dev[moved] = src.row_scored_dev[rows]
        self.row_mass[moved] = src.row_mass[rows]
        for b, r in enumerate(rows):
            self.row_steps[b] = list(src.row_steps[r])
            self.row_scored_host[b] = src.row_scored_host[r]
        for layer_idx, pins in src.pins.items():
            if layer_idx not in self.pins:
                self.pins[layer_idx] = pins.new_zeros(self.batch, *pins.shape[1:])
            self.pins[layer_idx][moved] = pins[rows]
        for layer_idx, scored in src._step_scored.items():  # the same for every read of this plan (see end_step)
            self._step_scored.setdefault(layer_idx, scored)

    def host_counters(self):
        """Nothing for ``decode_graph.GraphedStep`` to carry over: :meth:`end_step` counts the host side."""
        return [], 0.0

    def set_host_counters(self, counters) -> None:
        pass

    def add_host_counters(self, delta) -> None:
        pass

    def _add_mass(self, layer, mass) -> None:
        index = layer.key_doc.clamp_min(0).flatten()
        row = self._one_row()
        if row is not None:
            self.row_mass[row].index_add_(0, index, mass[0].flatten())
        elif self.dyn.live is not None:
            per_row = mass.new_zeros(mass.shape[0], self.row_mass.shape[1]).index_add_(1, index, mass.flatten(1))
            self.row_mass.index_add_(0, self.dyn._live_idx, per_row)
        else:
            self.row_mass.index_add_(1, index, (mass * self._active_dev.view(-1, 1, 1)).flatten(1))

    def row_view(self, row: int) -> "RowRead":
        return RowRead(self, row)


class RowRead:
    """One row of a :class:`BatchRead`, with the read-out of a :class:`CorpusRead` (kept fraction, centroids
    scored, source mass, commit), so that an answer's record is built the same way for a batch row."""

    def __init__(self, batch: BatchRead, row: int):
        self.corpus = batch.corpus
        self.steps = list(batch.row_steps[row])
        self._sums = kept_sums(batch.row_keys[:, row].tolist(), self.steps, batch.corpus.layers)
        self.centroids_scored = batch.row_scored_host[row] + float(batch.row_scored_dev[row])
        self.doc_mass = batch.row_mass[row]

    def _kept_sums(self) -> list[float]:
        return self._sums

    # CorpusRead's read-out, over this row's sums and steps
    kept_per_layer = CorpusRead.kept_per_layer
    kept_fraction = CorpusRead.kept_fraction
    commit = CorpusRead.commit
