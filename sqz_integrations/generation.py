"""Decoding helpers: sampling, stop sequences, incremental detokenisation, and what a call returns."""
from __future__ import annotations

import numbers
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch


@dataclass(frozen=True)
class SourceScore:
    """A corpus document and the share of attention mass its keys received during an answer."""

    document_index: int
    score: float
    metadata: dict
    text: str


@dataclass
class Answer:
    """One generated answer and what it cost."""

    text: str
    token_ids: list[int]
    # "stop" (end of turn or a stop sequence), "length", or "cancelled" (a coalesced stream closed early: its row
    # of the batch stopped; nobody reads that answer)
    finish_reason: str
    corpus: str
    prompt_tokens: int  # dynamic tokens fed: the question or chat history and the template around it
    corpus_tokens: int
    completion_tokens: int
    kv_budget: float
    kept_fraction: float  # measured: corpus keys read / corpus keys, over layers, heads and steps
    kept_fraction_per_layer: list[float]
    centroid_reads: float  # centroids scored per step and KV head, as a fraction of corpus keys
    time_to_first_token: float
    total_time: float
    sources: list[SourceScore] = field(default_factory=list)


def check_stop_sequences(stop) -> tuple[str, ...]:
    """Stop sequences must be non-empty strings; ``None`` means none. A lone string is one sequence (as OpenAI-style
    APIs take it), not the sequence of its characters."""
    stop = (stop,) if isinstance(stop, str) else tuple(stop or ())
    if any(not isinstance(s, str) or not s for s in stop):
        raise ValueError(f"stop sequences must be non-empty strings, got {list(stop)!r}")
    return stop


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive integer, got {self.max_new_tokens!r}")
        if not isinstance(self.temperature, numbers.Real) or not self.temperature >= 0:  # NaN and None included
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature!r}")
        if not isinstance(self.top_p, numbers.Real) or not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        # a list, None or a lone string as given -> the tuple of sequences (a frozen dataclass: set through object)
        object.__setattr__(self, "stop", check_stop_sequences(self.stop))


class Sampler:
    """Greedy at temperature 0, otherwise nucleus sampling with a seeded generator."""

    def __init__(self, params: SamplingParams, device: torch.device):
        self.params = params
        self.generator = None
        if params.temperature > 0:
            self.generator = torch.Generator(device=device)
            if params.seed is not None:
                self.generator.manual_seed(params.seed)
            else:
                self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        """logits (vocab,) -> token id."""
        if self.params.temperature == 0:
            return int(torch.argmax(logits))
        probs = torch.softmax(logits.float() / self.params.temperature, dim=-1)
        if self.params.top_p < 1:
            sorted_p, idx = torch.sort(probs, descending=True)
            keep = torch.cumsum(sorted_p, 0) - sorted_p < self.params.top_p
            probs = torch.zeros_like(probs).scatter_(0, idx[keep], sorted_p[keep])
        return int(torch.multinomial(probs, 1, generator=self.generator))


class TextAssembler:
    """Turns generated token ids into text pieces that are safe to show.

    Holds back an incomplete UTF-8 character and any tail that could still become a stop sequence;
    once a stop sequence appears, the text is cut before it and nothing after it is ever emitted.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self.decode = decode
        self.stop = stop
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add a token; returns the newly safe text (possibly empty)."""
        self.ids.append(token_id)
        self.text = self.decode(self.ids)
        for s in self.stop:
            cut = self.text.find(s, max(0, self.emitted - len(s) + 1))
            if cut != -1:
                self.text = self.text[:cut]
                self.stopped = True
        if self.stopped:
            return self._emit(len(self.text))
        safe = len(self.text)
        if self.text.endswith("\ufffd"):
            safe -= 1
        hold = 0
        for s in self.stop:  # the longest tail that is the start of a stop sequence
            for k in range(min(len(s) - 1, safe), 0, -1):
                if self.text[safe - k : safe] == s[:k]:
                    hold = max(hold, k)
                    break
        return self._emit(max(safe - hold, self.emitted))

    def finish(self) -> str:
        """Flush what was held back (the answer ended without completing a stop sequence)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto]
        self.emitted = max(self.emitted, upto)
        return piece


class AnswerStream:
    """Iterate for text pieces as they are decoded; ``.answer`` holds the :class:`Answer` at the end."""

    def __init__(self, events: Iterator):
        self._events = events
        self.answer: Answer | None = None

    def __iter__(self) -> Iterator[str]:
        for event in self._events:
            if isinstance(event, Answer):
                self.answer = event
            elif event:
                yield event

    def close(self) -> None:
        """Stop generating early (frees the question's cache)."""
        close = getattr(self._events, "close", None)
        if close:
            close()
