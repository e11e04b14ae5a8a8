"""Selected ranges -> a compact work list of indices, built on the GPU without a host sync.

Used twice: selected clusters -> the corpus keys to load (the corpus is sorted by cluster, so each
selected cluster is one contiguous key range), and kept level-1 clusters -> the level-2 centroids to
score (level-2 centroids are sorted by parent).

Two launches, each over (row = (batch row, KV head), chunk of ``_CHUNK`` ranges):
1. :func:`_chunk_sum_kernel`: the number of selected indices in each chunk;
2. :func:`_scan_expand_kernel`: the chunk's start (sum of the earlier chunks' counts, one vector load),
   the inclusive prefix ``cum`` of selected sizes inside the chunk (``tl.cumsum``), and then every slot
   ``j`` of the chunk finds its range ``c`` and writes ``offsets[c + 1] - (cum[c] - j)``. The range is
   found with markers: the chunk's own output slots first hold -1, then the index of each non-empty
   selected range at its first slot, and a running max (``tl.associative_scan``) over the slots gives
   every slot its range: three independent loads per block of slots.

Measured on the H200 (512K keys, 26K clusters, 8 KV heads, batch 1): torch ``where`` + ``cumsum`` over
the clusters, then a binary search over the whole row, took 84 us (batch 8: 300 us), mostly in torch's
inner-dimension scan, which walks each long row sequentially; the chunked form has no sequential pass:
threshold selection + both launches took 23 us (batch 8: 47 us) with a binary search per slot (10
dependent loads of ``cum``), and take 16 us (batch 8: 34 us) with the markers; at 32K-128K keys 20 -> 13.5
us (benchmarks/results/kernels_worklist_search_20261128-2339 against kernels_20261128-2340).

:func:`select_worklist` folds the threshold selection into launch 1; :func:`.lookup.centroid_selection`
folds it and launch 1 into the lookup's scores pass and calls :func:`expand_worklist` alone (prefill), or
in decode also runs launch 2's expansion inside that scores pass, there by a binary search with ``tl.gather``
over the block's sizes in registers (:func:`_expand_gather`) rather than the markers.

The list has room for every index (``capacity`` = the total length); slots at and after ``cum[-1]`` are
left unwritten and are never read (readers bound themselves by ``cum[-1]``).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import reference


# 1024 ranges per program: 26 chunks per row for 26K clusters (512K keys at 5%), so a batch-1 row still
# spreads over 26 programs; the chunk scan is one tl.cumsum. Not swept: the two launches together are
# ~10 us of the 23 us above.
_CHUNK = 1024
_SLOTS = 1024  # output slots per step of the expansion loop
# Expansion by markers + running max (True) or by a binary search per slot (False, the first version;
# SQZ_WORKLIST_SEARCH=1 selects it, for A/B timings).
_MARKERS = os.environ.get("SQZ_WORKLIST_SEARCH") != "1"


@triton.jit
def _sizes(SEL, OFFS, row, off_row, stride_off, n_ranges, k, CHUNK: tl.constexpr):
    c = k * CHUNK + tl.arange(0, CHUNK)
    cm = c < n_ranges
    sel = tl.load(SEL + row.to(tl.int64) * n_ranges + c, mask=cm, other=0)
    lo = tl.load(OFFS + off_row * stride_off + c, mask=cm, other=0)
    hi = tl.load(OFFS + off_row * stride_off + c + 1, mask=cm, other=0)
    return c, cm, tl.where(sel != 0, hi - lo, 0).to(tl.int32)


@triton.jit
def _chunk_sum_kernel(SEL, OFFS, SUMS, SCORES, LOG_COUNTS, PINS, LIVE, n_ranges, n_chunks, offset_rows, stride_off,
                      stride_pin, log_threshold, CHUNK: tl.constexpr, FROM_SCORES: tl.constexpr, HAS_PINS: tl.constexpr,
                      HAS_LIVE: tl.constexpr):
    row = tl.program_id(0)
    k = tl.program_id(1)
    if FROM_SCORES:
        # the threshold selection folded in (one launch less): SEL is written here, as select_clusters would
        c = k * CHUNK + tl.arange(0, CHUNK)
        cm = c < n_ranges
        s = tl.load(SCORES + row.to(tl.int64) * n_ranges + c, mask=cm, other=float("-inf"))
        lc = tl.load(LOG_COUNTS + (row % offset_rows) * n_ranges + c, mask=cm, other=float("-inf"))
        inf = float("inf")
        keep = (s > -inf) & (s < inf) & (lc > -inf) & (lc < inf) & (s >= log_threshold)
        if HAS_PINS:  # ranges this row reads whatever their score (the engine's copy pins); stride_pin 0: one set
            # for every batch row
            pin = tl.load(PINS + (row // offset_rows) * stride_pin + (row % offset_rows) * n_ranges + c,
                          mask=cm, other=0)
            keep = keep | ((pin != 0) & (lc > -inf) & (lc < inf))
        if HAS_LIVE:  # a batch row that is not live selects nothing, pins included
            keep = keep & (tl.load(LIVE + row // offset_rows) != 0)
        tl.store(SEL + row.to(tl.int64) * n_ranges + c, keep.to(tl.int8), mask=cm)
        lo = tl.load(OFFS + (row % offset_rows) * stride_off + c, mask=cm, other=0)
        hi = tl.load(OFFS + (row % offset_rows) * stride_off + c + 1, mask=cm, other=0)
        size = tl.where(keep, hi - lo, 0).to(tl.int32)
    else:
        _, _, size = _sizes(SEL, OFFS, row, row % offset_rows, stride_off, n_ranges, k, CHUNK)
    tl.store(SUMS + row * n_chunks + k, tl.sum(size, 0))


@triton.jit
def _max_combine(a, b):
    return tl.maximum(a, b)


@triton.jit
def _expand_markers(idx_row, cum_row, offs_row, c, cm, size, local, total, base, first, SLOTS: tl.constexpr):
    """Expand one chunk of ranges ``c`` (``first`` its first range, ``size`` the selected sizes, ``local``
    their inclusive prefix, ``total`` their sum, ``base`` the selected indices of the earlier chunks) into
    its ``total`` output slots at ``idx_row`` (already offset by ``base``); ``cum_row[c] = base + local``
    must already be stored by this program. Also called from the lookup's fused scores pass.

    The chunk's own output slots [0, total) first hold markers: -1 everywhere, then at the first slot of
    every non-empty selected range its index in the chunk. A running max over the slots then gives every
    slot its range: a few independent loads per slot block instead of the dependent loads of a binary
    search."""
    for s0 in range(0, total, SLOTS):
        j = s0 + tl.arange(0, SLOTS)
        tl.store(idx_row + j, tl.full([SLOTS], -1, tl.int32), mask=j < total)
    tl.debug_barrier()  # all -1 written before any marker
    tl.store(idx_row + (local - size), (c - first).to(tl.int32), mask=cm & (size > 0))
    tl.debug_barrier()  # markers and cum written before they are read by other threads
    carry = tl.max(tl.full([SLOTS], -1, tl.int32), 0)
    for s0 in range(0, total, SLOTS):
        j = s0 + tl.arange(0, SLOTS)
        valid = j < total
        m = tl.load(idx_row + j, mask=valid, other=-1)
        m = tl.maximum(tl.associative_scan(m, 0, _max_combine), carry)
        carry = tl.max(m, 0)
        cum_c = tl.load(cum_row + first + m, mask=valid, other=0) - base
        end = tl.load(offs_row + first + m + 1, mask=valid, other=0).to(tl.int32)
        tl.store(idx_row + j, end - (cum_c - j), mask=valid)


@triton.jit
def _expand_gather(idx_row, local, ends, total, STEPS: tl.constexpr, SLOTS: tl.constexpr):
    """Expand one chunk of ranges into its ``total`` output slots at ``idx_row``, like :func:`_expand_markers`,
    from registers alone: ``local`` the inclusive prefix of the chunk's selected sizes, ``ends`` each range's
    end (``offsets[c + 1]``), both one value per range of the chunk (``2**STEPS`` ranges). Slot ``j`` finds its
    range by a binary search over ``local`` with ``tl.gather`` (shared memory inside the program) instead of
    marker stores, barriers and loads through global memory."""
    n: tl.constexpr = 1 << STEPS
    for s0 in range(0, total, SLOTS):
        j = s0 + tl.arange(0, SLOTS)
        lo = tl.zeros([SLOTS], dtype=tl.int32)
        hi = tl.full([SLOTS], n - 1, tl.int32)
        for _ in tl.static_range(STEPS):  # the first range whose inclusive prefix passes j holds slot j
            mid = (lo + hi) // 2
            right = tl.gather(local, mid, 0) <= j
            lo = tl.where(right, mid + 1, lo)
            hi = tl.where(right, hi, mid)
        tl.store(idx_row + j, tl.gather(ends, lo, 0) - (tl.gather(local, lo, 0) - j), mask=j < total)


@triton.jit
def _scan_expand_kernel(
    SEL, OFFS, SUMS, CUM, IDX, n_ranges, n_chunks, capacity, offset_rows, stride_off,
    CHUNK: tl.constexpr, CHUNKS_P2: tl.constexpr, SLOTS: tl.constexpr, SEARCH_STEPS: tl.constexpr,
    MARKERS: tl.constexpr,
):
    row = tl.program_id(0)
    k = tl.program_id(1)
    off_row = row % offset_rows
    ch = tl.arange(0, CHUNKS_P2)
    sums = tl.load(SUMS + row * n_chunks + ch, mask=ch < k, other=0)
    base = tl.sum(sums, 0)  # selected indices in the chunks before this one
    c, cm, size = _sizes(SEL, OFFS, row, off_row, stride_off, n_ranges, k, CHUNK)
    local = tl.cumsum(size, 0)
    cum_row = CUM + row.to(tl.int64) * n_ranges
    tl.store(cum_row + c, base + local, mask=cm)
    total = tl.sum(size, 0)
    last = tl.minimum(n_ranges - k * CHUNK, CHUNK) - 1
    first = k * CHUNK
    idx_row = IDX + row.to(tl.int64) * capacity + base
    if MARKERS:
        _expand_markers(idx_row, cum_row, OFFS + off_row * stride_off, c, cm, size, local, total, base, first, SLOTS)
    else:
        tl.debug_barrier()  # the binary search below reads what the other threads just wrote
        for s0 in range(0, total, SLOTS):
            j = s0 + tl.arange(0, SLOTS)
            valid = j < total
            lo = tl.zeros([SLOTS], dtype=tl.int32)
            hi = tl.zeros([SLOTS], dtype=tl.int32) + last
            for _ in range(SEARCH_STEPS):  # first c of the chunk with local cum[c] > j
                mid = (lo + hi) // 2
                v = tl.load(cum_row + first + mid, mask=valid, other=0) - base
                right = v <= j
                lo = tl.where(right, mid + 1, lo)
                hi = tl.where(right, hi, mid)
            cum_c = tl.load(cum_row + first + lo, mask=valid, other=0) - base
            end = tl.load(OFFS + off_row * stride_off + first + lo + 1, mask=valid, other=0).to(tl.int32)
            tl.store(idx_row + j, end - (cum_c - j), mask=valid)


def expand_worklist(
    sel: torch.Tensor, offsets: torch.Tensor, sums: torch.Tensor, chunk: int, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The second launch alone: ``sel`` ``(batch, kv_heads, n)`` int8 and ``sums`` ``(batch * kv_heads,
    n_chunks)`` int32, the selected sizes per chunk of ``chunk`` ranges (written by
    :func:`_chunk_sum_kernel` or, fused, by the lookup's scores pass) -> ``(idx, cum)``."""
    b, kvh, n = sel.shape
    n_chunks = sums.shape[1]
    cum = torch.empty(b, kvh, n, dtype=torch.int32, device=sel.device)
    idx = torch.empty(b, kvh, max(capacity, 1), dtype=torch.int32, device=sel.device)
    _scan_expand_kernel[(b * kvh, n_chunks)](
        sel, offsets, sums, cum, idx, n, n_chunks, idx.shape[-1], kvh, offsets.stride(0),
        CHUNK=chunk, CHUNKS_P2=triton.next_power_of_2(n_chunks), SLOTS=_SLOTS,
        SEARCH_STEPS=max(1, (min(n, chunk) - 1).bit_length()), MARKERS=_MARKERS,
    )
    return idx, cum


def _check(b_kvh_n, offsets):
    b, kvh, n = b_kvh_n
    if offsets.shape != (kvh, n + 1):
        raise ValueError(f"offsets {tuple(offsets.shape)} do not match selected {(b, kvh, n)}")
    if n == 0:
        raise ValueError("need at least one range")


def build_worklist(
    selected: torch.Tensor, offsets: torch.Tensor, capacity: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Selected ranges -> ``(idx, cum)``.

    ``selected``: ``(batch, kv_heads, n)`` bool; ``offsets``: ``(kv_heads, n + 1)``, range ``c`` of KV head
    ``h`` is ``offsets[h, c] : offsets[h, c + 1]``; ``capacity``: at least ``offsets[:, -1]``.
    Returns ``idx (batch, kv_heads, capacity)`` int32 whose first ``cum[..., -1]`` entries are the
    indices of the selected ranges in order, and ``cum (batch, kv_heads, n)`` int32, the inclusive
    prefix of the selected range sizes.
    """
    b, kvh, n = selected.shape
    _check(selected.shape, offsets)
    offsets = offsets.contiguous()
    sel = selected.contiguous().view(torch.int8)
    n_chunks = triton.cdiv(n, _CHUNK)
    sums = torch.empty(b * kvh, n_chunks, dtype=torch.int32, device=selected.device)
    _chunk_sum_kernel[(b * kvh, n_chunks)](sel, offsets, sums, sel, sel, sel, sel, n, n_chunks, kvh,
                                           offsets.stride(0), 0, 0.0, CHUNK=_CHUNK, FROM_SCORES=False, HAS_PINS=False,
                                           HAS_LIVE=False)
    return expand_worklist(sel, offsets, sums, _CHUNK, capacity)


def live_flags(live: torch.Tensor) -> torch.Tensor:
    """A checked ``live`` (bool ``(batch,)``) as the kernels read it: contiguous int8, one flag per batch row."""
    return live.contiguous().view(torch.int8)


def check_pins(pins: torch.Tensor | None, batch: int, kv_heads: int, n_ranges: int) -> tuple[torch.Tensor | None, int]:
    """``pins`` (bool, ``(kv_heads, ranges)`` for every batch row or ``(batch, kv_heads, ranges)`` one set per row;
    checked as the torch twins check it) -> ``(its contiguous int8 view, its batch-row stride)`` for the kernels:
    stride 0 where every row reads the same set (``None`` stays ``None``)."""
    reference.check_pins(pins, batch, kv_heads, n_ranges)
    if pins is None:
        return None, 0
    return pins.contiguous().view(torch.int8), (kv_heads * n_ranges if pins.dim() == 3 else 0)


def select_worklist(
    log_scores: torch.Tensor, log_counts: torch.Tensor, log_threshold: float, offsets: torch.Tensor, capacity: int,
    *, pins: torch.Tensor | None = None, live: torch.Tensor | None = None,
) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
    """``select_clusters(log_scores, log_counts, log_threshold=...)`` (OR the non-empty ``pins``, one set for every
    row or one per row; nothing in a row that is not ``live``) and :func:`build_worklist` of it in two launches
    instead of three: ``(selected, (idx, cum))``."""
    b, kvh, n = log_scores.shape
    _check(log_scores.shape, offsets)
    pins, stride_pin = check_pins(pins, b, kvh, n)
    reference.check_live(live, b, log_scores.device)
    offsets = offsets.contiguous()
    scores = log_scores.to(torch.float32).contiguous()
    counts = log_counts.to(torch.float32).contiguous()
    selected = torch.empty(b, kvh, n, dtype=torch.bool, device=log_scores.device)
    sel = selected.view(torch.int8)
    n_chunks = triton.cdiv(n, _CHUNK)
    sums = torch.empty(b * kvh, n_chunks, dtype=torch.int32, device=log_scores.device)
    live8 = live_flags(live) if live is not None else sel
    _chunk_sum_kernel[(b * kvh, n_chunks)](sel, offsets, sums, scores, counts, pins if pins is not None else sel, live8,
                                           n, n_chunks, kvh, offsets.stride(0), stride_pin, float(log_threshold),
                                           CHUNK=_CHUNK, FROM_SCORES=True, HAS_PINS=pins is not None,
                                           HAS_LIVE=live is not None)
    return selected, expand_worklist(sel, offsets, sums, _CHUNK, capacity)
