"""LlamaIndex components over a squeezed corpus: `SqueezedLLM` and `SqueezedIndex`.

- `SqueezedLLM` is a `CustomLLM` bound to one `SqueezedEngine` and the name of one corpus
  loaded into it: `complete`, `stream_complete`, `chat`, `stream_chat` and their async forms.
  Usable as `Settings.llm`.
- `SqueezedIndex.from_documents(docs, engine=engine)` loads LlamaIndex `Document`s / nodes
  into a corpus; `.as_query_engine()` and `.as_chat_engine()` answer from the whole corpus
  with no retriever. `Response.source_nodes` are the corpus documents ranked by the
  attention mass they received while the answer was generated (the engine's `sources`).

This module only translates (messages, documents, responses, metadata); the engine does the
work (chat template, stop sequences, streaming, sources, timing).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import threading
from collections.abc import AsyncIterator, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

try:
    from llama_index.core.base.base_query_engine import BaseQueryEngine
    from llama_index.core.base.llms.types import (
        ChatMessage,
        ChatResponse,
        ChatResponseAsyncGen,
        ChatResponseGen,
        CompletionResponse,
        CompletionResponseAsyncGen,
        CompletionResponseGen,
        LLMMetadata,
        MessageRole,
        TextBlock,
    )
    from llama_index.core.base.response.schema import (
        AsyncStreamingResponse,
        Response,
        StreamingResponse,
    )
    from llama_index.core.bridge.pydantic import ConfigDict, Field, field_validator, model_validator
    from llama_index.core.callbacks import CallbackManager, trace_method
    from llama_index.core.chat_engine.types import (
        AgentChatResponse,
        BaseChatEngine,
        StreamingAgentChatResponse,
    )
    from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
    from llama_index.core.llms.custom import CustomLLM
    from llama_index.core.memory import BaseMemory, Memory
    from llama_index.core.schema import (
        BaseNode,
        Document,
        MetadataMode,
        NodeWithScore,
        QueryBundle,
        TextNode,
    )
except ImportError as exc:  # pragma: no cover - exercised by a subprocess test
    raise ImportError(
        "sqz_integrations.llama_index needs LlamaIndex (llama-index-core), which is not "
        "installed. Install it with: pip install 'sqz-integrations[llama-index]'"
    ) from exc

from sqz_integrations import CorpusDocument, SqueezedEngine
from sqz_integrations.async_stream import iterate_in_thread
from sqz_integrations.generation import check_stop_sequences

__all__ = ["SqueezedLLM", "SqueezedIndex", "SqueezedQueryEngine", "SqueezedChatEngine"]

# Key under which a LlamaIndex node id travels in a corpus document's metadata, so that
# sources map back to the nodes that were loaded. Removed again from `source_nodes`.
NODE_ID_KEY = "llama_index_node_id"

_ROLES = {
    MessageRole.SYSTEM: "system",
    MessageRole.DEVELOPER: "system",
    MessageRole.USER: "user",
    MessageRole.ASSISTANT: "assistant",
    MessageRole.CHATBOT: "assistant",
    MessageRole.MODEL: "assistant",
}


def _message_text(message: ChatMessage) -> str:
    parts: list[str] = []
    for block in message.blocks:
        if not isinstance(block, TextBlock):
            raise ValueError(
                f"SqueezedLLM accepts text only; got a {type(block).__name__} in a "
                f"{message.role.value} message."
            )
        parts.append(block.text)
    return "\n".join(parts)


def to_engine_messages(messages: Sequence[ChatMessage]) -> list[dict[str, str]]:
    """Translate LlamaIndex chat messages to the engine's `[{"role", "content"}]` format."""
    out = []
    for message in messages:
        role = _ROLES.get(message.role)
        if role is None:
            raise ValueError(
                f"SqueezedLLM cannot take a {message.role.value!r} message: only system, "
                "user and assistant messages are supported (no tool calling)."
            )
        if message.additional_kwargs.get("tool_calls"):  # an agent's turn: dropping its calls would misstate the chat
            raise ValueError("SqueezedLLM does not support tool calls (an assistant message with tool_calls).")
        out.append({"role": role, "content": _message_text(message)})
    if not out:
        raise ValueError("SqueezedLLM needs at least one message.")
    return out


def _raw(answer: Any) -> dict[str, Any]:
    """`raw` of a response: a dict, so LlamaIndex's token counting reads `usage` from it."""
    return {
        "usage": {
            "prompt_tokens": answer.prompt_tokens + answer.corpus_tokens,
            "completion_tokens": answer.completion_tokens,
            "total_tokens": answer.prompt_tokens + answer.corpus_tokens + answer.completion_tokens,
            "cached_tokens": answer.corpus_tokens,
        },
        "answer": answer,
    }


def _response_kwargs(answer: Any) -> dict[str, Any]:
    return {
        "corpus": answer.corpus,
        "finish_reason": answer.finish_reason,
        "kv_budget": answer.kv_budget,
        "kept_fraction": answer.kept_fraction,
        "time_to_first_token": answer.time_to_first_token,
        "total_time": answer.total_time,
        "prompt_tokens": answer.prompt_tokens,
        "corpus_tokens": answer.corpus_tokens,
        "completion_tokens": answer.completion_tokens,
    }


def _pieces(stream: Any) -> Iterator[tuple[str, Any]]:
    """An engine AnswerStream as (piece, None) while decoding, then ("", answer) once."""
    try:
        for piece in stream:
            yield piece, None
    finally:
        stream.close()  # a consumer that stops early ends the decoding loop
    yield "", stream.answer


def _completion_responses(pieces: Iterator[tuple[str, Any]]) -> CompletionResponseGen:
    text = ""
    for piece, answer in pieces:
        text += piece
        if answer is None:
            yield CompletionResponse(text=text, delta=piece)
        else:
            yield CompletionResponse(
                text=answer.text, delta="", raw=_raw(answer), additional_kwargs=_response_kwargs(answer)
            )


def _chat_responses(pieces: Iterator[tuple[str, Any]]) -> ChatResponseGen:
    text = ""
    for piece, answer in pieces:
        text += piece
        if answer is None:
            yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=piece)
        else:
            yield ChatResponse(
                message=ChatMessage(role=MessageRole.ASSISTANT, content=answer.text),
                delta="",
                raw=_raw(answer),
                additional_kwargs=_response_kwargs(answer),
            )


def source_nodes(answer: Any) -> list[NodeWithScore]:
    """The answer's sources as LlamaIndex nodes, best first, scored by attention mass."""
    nodes = []
    for source in answer.sources:
        metadata = dict(source.metadata)
        node_id = metadata.pop(NODE_ID_KEY, None) or f"{answer.corpus}:{source.document_index}"
        node = TextNode(id_=node_id, text=source.text, metadata=metadata)
        nodes.append(NodeWithScore(node=node, score=float(source.score)))
    return nodes


class SqueezedLLM(CustomLLM):
    """A LlamaIndex LLM that answers from a whole squeezed corpus.

    Example:
        ```python
        from llama_index.core import Settings
        from sqz_integrations.llama_index import SqueezedLLM

        Settings.llm = SqueezedLLM(engine=engine, corpus="handbook", max_new_tokens=128)
        Settings.llm.complete("What does the handbook say about X?")
        ```

    `metadata.context_window` is the room left for the dynamic part of a prompt (question,
    chat history and answer): the model's window minus the corpus tokens already in it.
    The raw engine `Answer` is in `response.raw["answer"]`; token usage in
    `response.raw["usage"]`; corpus, kept fraction and timings in `additional_kwargs`.
    """

    # extra="forbid": a misspelt or retriever-only setting (similarity_top_k) fails by name instead of being dropped
    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True)

    engine: SqueezedEngine = Field(exclude=True, description="Engine holding model and corpus.")
    corpus: str = Field(description="Name of a corpus already added to the engine.")
    max_new_tokens: int = Field(
        default=256, gt=0, alias="max_tokens", description="Most tokens generated per call (`max_tokens` works too)."
    )
    temperature: float = Field(default=0.0, ge=0.0, description="0 decodes greedily.")
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: list[str] | None = Field(default=None, description="Stop sequences (not emitted).")
    seed: int | None = Field(default=None, description="Seed for sampling.")
    kv_budget: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Fraction of corpus keys attended; None: engine config."
    )
    question_budget: float | None = Field(
        default=None, gt=0.0, le=1.0, description="Budget of the question's read; None: engine config."
    )

    @field_validator("stop")
    @classmethod
    def _check_stop(cls, stop: list[str] | None) -> list[str] | None:
        return list(check_stop_sequences(stop)) or None

    @model_validator(mode="after")
    def _check_corpus(self) -> SqueezedLLM:
        self.engine.get_corpus(self.corpus)  # KeyError naming the loaded corpora
        return self

    @classmethod
    def class_name(cls) -> str:
        return "SqueezedLLM"

    @property
    def metadata(self) -> LLMMetadata:
        corpus_tokens = int(self.engine.get_corpus(self.corpus).stats()["tokens"])
        return LLMMetadata(
            context_window=self.engine.context_window - corpus_tokens,
            num_output=self.max_new_tokens,
            is_chat_model=True,
            is_function_calling_model=False,
            model_name=self.engine.model_name,
        )

    # -- translation helpers -------------------------------------------------------------

    def _engine_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        allowed = {"max_new_tokens", "max_tokens", "temperature", "top_p", "stop", "seed", "kv_budget", "question_budget"}
        unknown = sorted(set(kwargs) - allowed)
        if unknown:
            raise TypeError(f"SqueezedLLM got unsupported arguments {unknown}; supported: {sorted(allowed)}")
        given = {name: value for name, value in kwargs.items() if value is not None}  # None: this LLM's setting
        out = {
            "max_new_tokens": given.get("max_new_tokens", given.get("max_tokens", self.max_new_tokens)),
            "temperature": given.get("temperature", self.temperature),
            "top_p": given.get("top_p", self.top_p),
            "seed": given.get("seed", self.seed),
            "kv_budget": given.get("kv_budget", self.kv_budget),
            "question_budget": given.get("question_budget", self.question_budget),
        }
        out["stop"] = given.get("stop", self.stop)  # the engine reads a lone string as one sequence
        return out

    def _completion_prompt(self, prompt: str, formatted: bool) -> str | list[dict[str, str]]:
        if formatted:
            return prompt
        prompt = self.completion_to_prompt(prompt)
        if self.system_prompt:
            return [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": prompt}]
        return prompt

    def _answer(self, prompt: str | list[dict[str, str]], kwargs: dict[str, Any]) -> Any:
        return self.engine.answer(prompt, self.corpus, **self._engine_kwargs(kwargs))

    def _stream_answer(self, prompt: str | list[dict[str, str]], kwargs: dict[str, Any]) -> Iterator[tuple[str, Any]]:
        """(piece, None) while decoding, then ("", answer) once. The engine checks the prompt and the arguments
        here, at the call, so that a streaming method refuses bad input when called, not at its first item."""
        return _pieces(self.engine.stream_answer(prompt, self.corpus, **self._engine_kwargs(kwargs)))

    def _complete_stream(self, prompt: Any, kwargs: dict[str, Any]) -> CompletionResponseGen:
        return _completion_responses(self._stream_answer(prompt, kwargs))

    def _chat_stream(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponseGen:
        return _chat_responses(self._stream_answer(to_engine_messages(messages), kwargs))

    # -- completion ------------------------------------------------------------------------

    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        answer = self._answer(self._completion_prompt(prompt, formatted), kwargs)
        return CompletionResponse(text=answer.text, raw=_raw(answer), additional_kwargs=_response_kwargs(answer))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return self._complete_stream(self._completion_prompt(prompt, formatted), kwargs)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        full = self._completion_prompt(prompt, formatted)
        answer = await asyncio.to_thread(self._answer, full, kwargs)
        return CompletionResponse(text=answer.text, raw=_raw(answer), additional_kwargs=_response_kwargs(answer))

    @llm_completion_callback()
    async def astream_complete(
        self, prompt: str, formatted: bool = False, **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        responses = self._complete_stream(self._completion_prompt(prompt, formatted), kwargs)  # checked here
        return iterate_in_thread(lambda: responses)

    # -- chat ------------------------------------------------------------------------------

    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        answer = self._answer(to_engine_messages(messages), kwargs)
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=answer.text),
            raw=_raw(answer),
            additional_kwargs=_response_kwargs(answer),
        )

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return self._chat_stream(messages, kwargs)  # bad input is refused here, not at the first next()

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        prompt = to_engine_messages(messages)
        answer = await asyncio.to_thread(self._answer, prompt, kwargs)
        return ChatResponse(
            message=ChatMessage(role=MessageRole.ASSISTANT, content=answer.text),
            raw=_raw(answer),
            additional_kwargs=_response_kwargs(answer),
        )

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        responses = self._chat_stream(messages, kwargs)  # bad input is refused here, not at the first item
        return iterate_in_thread(lambda: responses)


# -- index, query engine, chat engine ------------------------------------------------------


class SqueezedQueryEngine(BaseQueryEngine):
    """Answers a query from the whole corpus of its `SqueezedLLM` (no retrieval step)."""

    def __init__(
        self, llm: SqueezedLLM, streaming: bool = False, callback_manager: CallbackManager | None = None
    ) -> None:
        self._llm = llm
        self._streaming = streaming
        super().__init__(callback_manager=callback_manager or llm.callback_manager)

    def _get_prompt_modules(self) -> dict[str, Any]:
        return {}

    def _query(self, query_bundle: QueryBundle) -> Response | StreamingResponse:
        if not self._streaming:
            completion = self._llm.complete(query_bundle.query_str)
            answer = completion.raw["answer"]
            return Response(answer.text, source_nodes=source_nodes(answer), metadata=_response_kwargs(answer))
        nodes: list[NodeWithScore] = []
        metadata: dict[str, Any] = {}
        completions = self._llm.stream_complete(query_bundle.query_str)

        def tokens() -> Iterator[str]:
            for completion in completions:
                if completion.raw is not None:  # the last response carries the answer
                    nodes.extend(source_nodes(completion.raw["answer"]))
                    metadata.update(completion.additional_kwargs)
                if completion.delta:
                    yield completion.delta

        # source_nodes and metadata are filled in when the stream is exhausted.
        return StreamingResponse(response_gen=tokens(), source_nodes=nodes, metadata=metadata)

    async def _aquery(self, query_bundle: QueryBundle) -> Response | AsyncStreamingResponse:
        if not self._streaming:
            completion = await self._llm.acomplete(query_bundle.query_str)
            answer = completion.raw["answer"]
            return Response(answer.text, source_nodes=source_nodes(answer), metadata=_response_kwargs(answer))
        nodes: list[NodeWithScore] = []
        metadata: dict[str, Any] = {}
        completions = await self._llm.astream_complete(query_bundle.query_str)

        async def tokens() -> AsyncIterator[str]:
            async for completion in completions:
                if completion.raw is not None:
                    nodes.extend(source_nodes(completion.raw["answer"]))
                    metadata.update(completion.additional_kwargs)
                if completion.delta:
                    yield completion.delta

        return AsyncStreamingResponse(response_gen=tokens(), source_nodes=nodes, metadata=metadata)


class SqueezedChatEngine(BaseChatEngine):
    """Multi-turn chat over the whole corpus: the history is the dynamic part of the prompt.

    Like LlamaIndex's `SimpleChatEngine`, with the corpus always in context and every
    response carrying `source_nodes` (attention-ranked corpus documents).
    """

    def __init__(
        self,
        llm: SqueezedLLM,
        memory: BaseMemory,
        prefix_messages: list[ChatMessage],
        callback_manager: CallbackManager | None = None,
    ) -> None:
        self._llm = llm
        self._memory = memory
        self._prefix_messages = prefix_messages
        self.callback_manager = callback_manager or llm.callback_manager

    @classmethod
    def from_defaults(
        cls,
        llm: SqueezedLLM,
        chat_history: list[ChatMessage] | None = None,
        memory: BaseMemory | None = None,
        system_prompt: str | None = None,
        prefix_messages: list[ChatMessage] | None = None,
    ) -> SqueezedChatEngine:
        if system_prompt is not None and prefix_messages is not None:
            raise ValueError("Cannot specify both system_prompt and prefix_messages")
        if system_prompt is not None:
            prefix_messages = [ChatMessage(role=MessageRole.SYSTEM, content=system_prompt)]
        if memory is None:
            # History may fill what the corpus and the answer leave of the context window;
            # it is counted with the engine's own tokenizer.
            tokenizer = llm.engine.tokenizer
            memory = Memory.from_defaults(
                chat_history=chat_history,
                token_limit=max(llm.metadata.context_window - llm.max_new_tokens, 1),
                tokenizer_fn=lambda text: tokenizer.encode(text, add_special_tokens=False),
            )
        elif chat_history is not None:
            memory.set(chat_history)
        return cls(llm=llm, memory=memory, prefix_messages=list(prefix_messages or []))

    def _messages(self) -> list[ChatMessage]:
        return self._prefix_messages + self._memory.get()

    async def _amessages(self) -> list[ChatMessage]:
        return self._prefix_messages + await self._memory.aget()

    @trace_method("chat")
    def chat(self, message: str, chat_history: list[ChatMessage] | None = None) -> AgentChatResponse:
        if chat_history is not None:
            self._memory.set(chat_history)
        self._memory.put(ChatMessage(role=MessageRole.USER, content=message))
        response = self._llm.chat(self._messages())
        self._memory.put(response.message)
        answer = response.raw["answer"]
        return AgentChatResponse(
            response=answer.text, source_nodes=source_nodes(answer), metadata=_response_kwargs(answer)
        )

    @trace_method("chat")
    async def achat(self, message: str, chat_history: list[ChatMessage] | None = None) -> AgentChatResponse:
        if chat_history is not None:
            await self._memory.aset(chat_history)
        await self._memory.aput(ChatMessage(role=MessageRole.USER, content=message))
        response = await self._llm.achat(await self._amessages())
        await self._memory.aput(response.message)
        answer = response.raw["answer"]
        return AgentChatResponse(
            response=answer.text, source_nodes=source_nodes(answer), metadata=_response_kwargs(answer)
        )

    @staticmethod
    def _collect(stream: ChatResponseGen, nodes: list[NodeWithScore], metadata: dict[str, Any]) -> ChatResponseGen:
        for response in stream:
            if response.raw is not None:
                nodes.extend(source_nodes(response.raw["answer"]))
                metadata.update(response.additional_kwargs)
            yield response

    @staticmethod
    async def _acollect(
        stream: ChatResponseAsyncGen, nodes: list[NodeWithScore], metadata: dict[str, Any]
    ) -> ChatResponseAsyncGen:
        async for response in stream:
            if response.raw is not None:
                nodes.extend(source_nodes(response.raw["answer"]))
                metadata.update(response.additional_kwargs)
            yield response

    @trace_method("chat")
    def stream_chat(
        self, message: str, chat_history: list[ChatMessage] | None = None
    ) -> StreamingAgentChatResponse:
        if chat_history is not None:
            self._memory.set(chat_history)
        self._memory.put(ChatMessage(role=MessageRole.USER, content=message))
        nodes: list[NodeWithScore] = []
        metadata: dict[str, Any] = {}
        stream = self._collect(self._llm.stream_chat(self._messages()), nodes, metadata)
        # source_nodes (and .metadata) are filled in when the stream ends.
        response = StreamingAgentChatResponse(chat_stream=stream, source_nodes=nodes)
        response.metadata = metadata
        thread = threading.Thread(target=response.write_response_to_history, args=(self._memory,))
        response.write_response_to_history_thread = thread
        thread.start()
        return response

    @trace_method("chat")
    async def astream_chat(
        self, message: str, chat_history: list[ChatMessage] | None = None
    ) -> StreamingAgentChatResponse:
        if chat_history is not None:
            await self._memory.aset(chat_history)
        await self._memory.aput(ChatMessage(role=MessageRole.USER, content=message))
        nodes: list[NodeWithScore] = []
        metadata: dict[str, Any] = {}
        stream = self._acollect(await self._llm.astream_chat(await self._amessages()), nodes, metadata)
        response = StreamingAgentChatResponse(achat_stream=stream, source_nodes=nodes)
        response.metadata = metadata
        response.awrite_response_to_history_task = asyncio.create_task(
            response.awrite_response_to_history(self._memory)
        )
        return response

    def reset(self) -> None:
        self._memory.reset()

    @property
    def chat_history(self) -> list[ChatMessage]:
        return self._memory.get_all()


class SqueezedIndex:
    """A corpus loaded into a `SqueezedEngine`, reachable the way a LlamaIndex index is.

    Example:
        ```python
        index = SqueezedIndex.from_documents(documents, engine=engine)
        print(index.as_query_engine().query("What does the handbook say about X?"))
        chat = index.as_chat_engine()
        chat.chat("Who wrote it?"); chat.chat("And when?")
        ```

    It holds the engine and the corpus name, nothing more: there is no retriever and no
    embedding model; every answer reads the whole (squeezed) corpus.
    """

    def __init__(self, engine: SqueezedEngine, corpus: str) -> None:
        if not isinstance(engine, SqueezedEngine):
            raise TypeError(f"engine must be a SqueezedEngine, got {type(engine).__name__}")
        engine.get_corpus(corpus)  # KeyError naming the loaded corpora
        self.engine = engine
        self.corpus = corpus

    @classmethod
    def from_documents(
        cls,
        documents: Iterable[Document | BaseNode | str],
        *,
        engine: SqueezedEngine,
        corpus: str | None = None,
        replace: bool = False,
        show_progress: bool = True,
    ) -> SqueezedIndex:
        """Load documents (or nodes) into a corpus of `engine`, one corpus document each.

        Without a `corpus` name, the name is derived from the documents' text and metadata, so
        loading the same documents again reuses the corpus instead of rebuilding it; the node ids
        are not part of that name (a `Document` made without `id_` gets a random one each time),
        and a reused corpus takes the ids of the documents loaded last. A document's metadata is
        kept; `metadata["source"]` (or else `file_name`) heads its text.
        """
        docs = [_to_corpus_document(d) for d in documents]
        if not docs:
            raise ValueError("from_documents needs at least one document.")
        if corpus is None:
            corpus = f"llama_index-{_content_digest(docs)}"
            if corpus in engine.corpora and not replace:
                engine.get_corpus(corpus).documents = docs  # same text and metadata: only the node ids can differ
                return cls(engine, corpus)
        engine.add_corpus(corpus, docs, progress=show_progress, replace=replace)
        return cls(engine, corpus)

    def persist(self, persist_dir: str | os.PathLike, *, overwrite: bool = False) -> Path:
        """Save the corpus to `persist_dir` (`engine.save_corpus`) for `from_persist_dir` in a later process."""
        return self.engine.save_corpus(self.corpus, persist_dir, overwrite=overwrite)

    @classmethod
    def from_persist_dir(
        cls, persist_dir: str | os.PathLike, *, engine: SqueezedEngine, corpus: str | None = None, replace: bool = False
    ) -> SqueezedIndex:
        """The index of a corpus saved by `persist`, loaded into `engine` under its saved name or `corpus` (no
        prefill, no clustering)."""
        return cls(engine, engine.load_corpus(persist_dir, name=corpus, replace=replace).name)

    @property
    def nodes(self) -> list[TextNode]:
        """The corpus documents as nodes, in corpus order."""
        out = []
        for i, doc in enumerate(self.engine.get_corpus(self.corpus).documents):
            metadata = dict(doc.metadata)
            node_id = metadata.pop(NODE_ID_KEY, None) or f"{self.corpus}:{i}"
            out.append(TextNode(id_=node_id, text=doc.text, metadata=metadata))
        return out

    def as_llm(self, **kwargs: Any) -> SqueezedLLM:
        """A `SqueezedLLM` bound to this corpus (kwargs: generation settings)."""
        return SqueezedLLM(engine=self.engine, corpus=self.corpus, **kwargs)

    def _llm(self, llm: SqueezedLLM | None, kwargs: dict[str, Any]) -> SqueezedLLM:
        if llm is None:
            return self.as_llm(**kwargs)
        if kwargs:
            raise TypeError("give generation settings either on the llm or as keyword arguments, not both")
        if not isinstance(llm, SqueezedLLM) or llm.engine is not self.engine or llm.corpus != self.corpus:
            raise ValueError("llm must be a SqueezedLLM bound to this index's engine and corpus")
        return llm

    def as_query_engine(
        self, streaming: bool = False, llm: SqueezedLLM | None = None, **kwargs: Any
    ) -> SqueezedQueryEngine:
        """A query engine over the whole corpus; `streaming=True` returns `StreamingResponse`s."""
        return SqueezedQueryEngine(self._llm(llm, kwargs), streaming=streaming)

    def as_chat_engine(
        self,
        chat_history: list[ChatMessage] | None = None,
        memory: BaseMemory | None = None,
        system_prompt: str | None = None,
        prefix_messages: list[ChatMessage] | None = None,
        llm: SqueezedLLM | None = None,
        **kwargs: Any,
    ) -> SqueezedChatEngine:
        """A multi-turn chat engine over the whole corpus (history = the dynamic part)."""
        return SqueezedChatEngine.from_defaults(
            self._llm(llm, kwargs),
            chat_history=chat_history,
            memory=memory,
            system_prompt=system_prompt,
            prefix_messages=prefix_messages,
        )


def _content_digest(docs: list[CorpusDocument]) -> str:
    """12 hex digits of the documents' text and metadata (everything the corpus text or a source node shows), the node
    ids left out."""
    digest = hashlib.sha1()
    for doc in docs:
        metadata = {k: v for k, v in doc.metadata.items() if k != NODE_ID_KEY}
        digest.update(doc.text.encode() + b"\0")
        digest.update(json.dumps(metadata, sort_keys=True, default=repr).encode() + b"\0")
    return digest.hexdigest()[:12]


def _to_corpus_document(doc: Document | BaseNode | str) -> CorpusDocument:
    if isinstance(doc, str):
        return CorpusDocument(text=doc)
    if not isinstance(doc, BaseNode):
        raise TypeError(f"expected a LlamaIndex Document/node or str, got {type(doc).__name__}")
    metadata = dict(doc.metadata)
    if "source" not in metadata and metadata.get("file_name"):
        metadata["source"] = metadata["file_name"]
    metadata[NODE_ID_KEY] = doc.node_id
    return CorpusDocument(text=doc.get_content(metadata_mode=MetadataMode.NONE), metadata=metadata)
