"""LangChain chat model over a squeezed corpus: `ChatSqueezed`.

`ChatSqueezed` is a `BaseChatModel` bound to one `SqueezedEngine` and the name of one
corpus already loaded into it. The corpus is the fixed part of every prompt (its KV cache is
prefilled, clustered and shared once); the chat messages of a call are the dynamic part.
This module only translates between LangChain and the engine: messages to role/content
dicts, engine `Answer`s to `AIMessage`s with `usage_metadata` and `response_metadata`
(corpus, kept fraction, time to first token, total time, ranked `sources`).

Tool calling and structured output are not supported (the engine generates free text only).
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Iterable, Iterator
from pathlib import Path
from typing import Any

try:
    from langchain_core.callbacks import (
        AsyncCallbackManagerForLLMRun,
        CallbackManagerForLLMRun,
    )
    from langchain_core.documents import Document
    from langchain_core.language_models import BaseChatModel
    from langchain_core.language_models.base import LangSmithParams
    from langchain_core.messages import (
        AIMessage,
        AIMessageChunk,
        BaseMessage,
        ChatMessage,
        HumanMessage,
        SystemMessage,
    )
    from langchain_core.messages.ai import InputTokenDetails, UsageMetadata
    from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
    from pydantic import ConfigDict, Field, field_validator, model_validator
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "sqz_integrations.langchain needs LangChain (langchain-core), which is not "
        "installed. Install it with: pip install 'sqz-integrations[langchain]'"
    ) from exc

from sqz_integrations import CorpusDocument, SqueezedEngine
from sqz_integrations.async_stream import iterate_in_thread
from sqz_integrations.generation import check_stop_sequences

logger = logging.getLogger(__name__)

__all__ = ["ChatSqueezed"]

# Standard LangChain constructor parameters that only concern remote APIs. They are
# accepted so that code written for hosted chat models constructs this one unchanged, and
# ignored with a warning: a local in-process model has no key, no network timeout and
# nothing to retry.
_REMOTE_ONLY_PARAMS = ("api_key", "timeout", "max_retries")

# Per-call keyword arguments (invoke(..., **kwargs)) mapped to engine keyword arguments.
_CALL_KWARGS = {
    "max_tokens": "max_new_tokens",
    "max_new_tokens": "max_new_tokens",
    "temperature": "temperature",
    "top_p": "top_p",
    "seed": "seed",
    "kv_budget": "kv_budget",
    "question_budget": "question_budget",
}

_ROLES = {"system": "system", "developer": "system", "user": "user", "human": "user",
          "assistant": "assistant", "ai": "assistant"}


def _message_text(message: BaseMessage) -> str:
    """The text of a message; non-text content blocks are refused with a clear error."""
    content = message.content
    if isinstance(content, str):
        return content
    parts: list[str] = []
    for block in content:
        if isinstance(block, str):
            parts.append(block)
        elif isinstance(block, dict) and block.get("type") == "text":
            parts.append(str(block.get("text", "")))
        else:
            kind = block.get("type") if isinstance(block, dict) else type(block).__name__
            raise ValueError(
                f"ChatSqueezed accepts text only; got a {kind!r} content block in a "
                f"{type(message).__name__}."
            )
    return "".join(parts)


def to_engine_messages(messages: Iterable[BaseMessage]) -> list[dict[str, str]]:
    """Translate LangChain messages to the engine's `[{"role", "content"}]` chat format."""
    out: list[dict[str, str]] = []
    for message in messages:
        if isinstance(message, SystemMessage):
            role = "system"
        elif isinstance(message, HumanMessage):
            role = "user"
        elif isinstance(message, AIMessage):
            if message.tool_calls or message.invalid_tool_calls:
                raise ValueError("ChatSqueezed does not support tool calls (AIMessage.tool_calls).")
            role = "assistant"
        elif isinstance(message, ChatMessage) and message.role.lower() in _ROLES:
            role = _ROLES[message.role.lower()]
        else:
            raise ValueError(
                f"ChatSqueezed cannot take a {type(message).__name__} "
                f"(role {getattr(message, 'role', message.type)!r}): only system, human "
                "and AI messages are supported (no tool calling)."
            )
        out.append({"role": role, "content": _message_text(message)})
    if not out:
        raise ValueError("ChatSqueezed needs at least one message.")
    return out


def _usage(answer: Any) -> UsageMetadata:
    """Input tokens = corpus tokens (served from the squeezed cache) + dynamic tokens."""
    input_tokens = answer.prompt_tokens + answer.corpus_tokens
    return UsageMetadata(
        input_tokens=input_tokens,
        output_tokens=answer.completion_tokens,
        total_tokens=input_tokens + answer.completion_tokens,
        input_token_details=InputTokenDetails(cache_read=answer.corpus_tokens),
    )


def _response_metadata(answer: Any, model_name: str) -> dict[str, Any]:
    return {
        "model_name": model_name,
        "finish_reason": answer.finish_reason,
        "corpus": answer.corpus,
        "kv_budget": answer.kv_budget,
        "kept_fraction": answer.kept_fraction,
        "time_to_first_token": answer.time_to_first_token,
        "total_time": answer.total_time,
        "sources": [
            {
                "document_index": s.document_index,
                "score": s.score,
                "metadata": dict(s.metadata),
                "text": s.text,
            }
            for s in answer.sources
        ],
    }


class ChatSqueezed(BaseChatModel):
    """A chat model that answers from a whole squeezed corpus, with no retriever.

    Example:
        ```python
        from sqz_integrations import SqueezedEngine
        from sqz_integrations.langchain import ChatSqueezed

        engine = SqueezedEngine.from_pretrained()
        engine.add_corpus("handbook", ["document one ...", "document two ..."])
        llm = ChatSqueezed(engine=engine, corpus="handbook", max_new_tokens=128)
        msg = llm.invoke("What does the handbook say about X?")
        msg.response_metadata["sources"][0]   # the document that drew most attention
        ```

    The component holds a reference to the engine, the corpus name and generation
    settings, nothing more: many components (and corpora) share one engine.
    """

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    engine: SqueezedEngine = Field(exclude=True)
    """The engine that holds the model and the squeezed corpus."""
    corpus: str
    """Name of a corpus already added to `engine` (`engine.add_corpus`)."""
    max_new_tokens: int = Field(default=256, gt=0, alias="max_tokens")
    """Most tokens generated per call (LangChain's standard name `max_tokens` works too)."""
    temperature: float = Field(default=0.0, ge=0.0)
    """0 decodes greedily."""
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] | None = None
    """Default stop sequences (never part of the output); a per-call `stop` replaces them."""
    seed: int | None = None
    """Seed for sampling (temperature > 0), for repeatable samples."""
    kv_budget: float | None = Field(default=None, gt=0.0, le=1.0)
    """Fraction of the corpus keys each step attends to; None keeps the engine's config."""
    question_budget: float | None = Field(default=None, gt=0.0, le=1.0)
    """Budget of the question's read (its tokens read together); None keeps the engine's config."""
    streaming: bool = False
    """If True, `invoke` goes through the streaming path (callbacks see every token)."""

    @model_validator(mode="before")
    @classmethod
    def _drop_remote_only_params(cls, values: Any) -> Any:
        if isinstance(values, dict):
            for name in _REMOTE_ONLY_PARAMS:
                if name in values:
                    values = {k: v for k, v in values.items() if k != name}
                    logger.warning(
                        "ChatSqueezed ignores %r: the model runs in this process.", name
                    )
        return values

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: list[str] | None) -> list[str] | None:
        return list(check_stop_sequences(stop)) or None

    @model_validator(mode="after")
    def _check_corpus(self) -> ChatSqueezed:
        self.engine.get_corpus(self.corpus)  # KeyError naming the loaded corpora
        return self

    # -- construction from LangChain documents -------------------------------------------

    @classmethod
    def from_documents(
        cls,
        documents: Iterable[Document | str],
        *,
        engine: SqueezedEngine,
        corpus: str,
        replace: bool = False,
        progress: bool = True,
        **kwargs: Any,
    ) -> ChatSqueezed:
        """Load LangChain `Document`s into a new corpus of `engine` and bind a model to it.

        Each document's `page_content` becomes one corpus document and its `metadata` is
        kept (`metadata["source"]`, if present, is written into the corpus text as a header
        and comes back in `response_metadata["sources"]`). `kwargs` go to `ChatSqueezed`.
        """
        docs = [cls._to_corpus_document(d) for d in documents]
        if not docs:
            raise ValueError("from_documents needs at least one document.")
        engine.add_corpus(corpus, docs, progress=progress, replace=replace)
        return cls(engine=engine, corpus=corpus, **kwargs)

    def save_local(self, folder_path: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save the corpus for `load_local` in a later process (`engine.save_corpus`), as a vector
        store's `save_local` does; the generation settings are not saved."""
        return self.engine.save_corpus(self.corpus, folder_path, overwrite=overwrite)

    @classmethod
    def load_local(
        cls,
        folder_path: str | os.PathLike,
        *,
        engine: SqueezedEngine,
        corpus: str | None = None,
        replace: bool = False,
        **kwargs: Any,
    ) -> ChatSqueezed:
        """Load a corpus saved by `save_local` (or `engine.save_corpus`) into `engine`, under its saved
        name or `corpus`, and bind a model to it: no prefill, no clustering. `kwargs` go to `ChatSqueezed`."""
        loaded = engine.load_corpus(folder_path, name=corpus, replace=replace)
        return cls(engine=engine, corpus=loaded.name, **kwargs)

    @staticmethod
    def _to_corpus_document(doc: Document | str) -> CorpusDocument:
        if isinstance(doc, str):
            return CorpusDocument(text=doc)
        if isinstance(doc, Document):
            return CorpusDocument(text=doc.page_content, metadata=dict(doc.metadata))
        raise TypeError(
            f"expected langchain_core.documents.Document or str, got {type(doc).__name__}"
        )

    # -- LangChain plumbing ---------------------------------------------------------------

    @property
    def _llm_type(self) -> str:
        return "squeezed-chat"

    @property
    def model_name(self) -> str:
        """Name of the engine's model."""
        return self.engine.model_name

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model_name": self.engine.model_name,
            "corpus": self.corpus,
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "kv_budget": self.kv_budget,
            "question_budget": self.question_budget,
            "stop": self.stop,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="sqz",
            ls_model_name=kwargs.get("model") or self.engine.model_name,
            ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature),
            ls_max_tokens=kwargs.get("max_tokens", kwargs.get("max_new_tokens", self.max_new_tokens)),
        )
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    def get_token_ids(self, text: str) -> list[int]:
        """Token ids of `text` under the engine's tokenizer (no special tokens)."""
        return list(self.engine.tokenizer.encode(text, add_special_tokens=False))

    def get_num_tokens(self, text: str) -> int:
        return self.engine.count_tokens(text)

    def _engine_kwargs(self, stop: list[str] | None, kwargs: dict[str, Any]) -> dict[str, Any]:
        out: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": self.seed,
            "kv_budget": self.kv_budget,
            "question_budget": self.question_budget,
        }
        unknown = sorted(set(kwargs) - set(_CALL_KWARGS) - {"stream"})
        if unknown:
            raise TypeError(
                f"ChatSqueezed got unsupported call arguments {unknown}; supported: "
                f"{sorted(_CALL_KWARGS)} and stop"
            )
        for name, value in kwargs.items():
            if name in _CALL_KWARGS and value is not None:  # None: the model's own setting, as for `stop`
                out[_CALL_KWARGS[name]] = value
        out["stop"] = self.stop if stop is None else stop  # the engine reads a lone string as one sequence
        return out

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        answer = self.engine.answer(
            to_engine_messages(messages), self.corpus, **self._engine_kwargs(stop, kwargs)
        )
        message = AIMessage(
            content=answer.text,
            usage_metadata=_usage(answer),
            response_metadata=_response_metadata(answer, self.engine.model_name),
        )
        return ChatResult(
            generations=[
                ChatGeneration(message=message, generation_info={"finish_reason": answer.finish_reason})
            ]
        )

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        stream = self.engine.stream_answer(
            to_engine_messages(messages), self.corpus, **self._engine_kwargs(stop, kwargs)
        )
        try:
            for piece in stream:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
                if run_manager is not None:
                    run_manager.on_llm_new_token(piece, chunk=chunk)
                yield chunk
        finally:
            stream.close()  # a consumer that stops early ends the decoding loop
        answer = stream.answer
        last = ChatGenerationChunk(
            message=AIMessageChunk(
                content="",
                usage_metadata=_usage(answer),
                response_metadata=_response_metadata(answer, self.engine.model_name),
                chunk_position="last",
            ),
            generation_info={"finish_reason": answer.finish_reason},
        )
        if run_manager is not None:
            run_manager.on_llm_new_token("", chunk=last)
        yield last

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        # The engine decodes in a worker thread; chunks cross to the event loop through a
        # queue, so the loop never blocks on the model and one thread owns the generator.
        async for chunk in iterate_in_thread(lambda: self._stream(messages, stop, None, **kwargs)):
            if run_manager is not None:
                await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
            yield chunk
