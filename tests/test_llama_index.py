"""SqueezedLLM / SqueezedIndex (LlamaIndex) over the real embedded SmolLM2: the LLM interface
(sync, streaming, async), metadata, Settings.llm, a query engine and a multi-turn chat engine
with no retriever, and sources as scored nodes."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("llama_index.core")

from llama_index.core import Document, Settings
from llama_index.core.base.response.schema import Response, StreamingResponse
from llama_index.core.chat_engine import SimpleChatEngine
from llama_index.core.llms import ChatMessage, MessageRole

from conftest import string_stop
from essays import PLANTED_INDEX, PLANTED_QUESTION, knowledge_base
from sqz_integrations.llama_index import SqueezedIndex, SqueezedLLM

pytestmark = pytest.mark.slow

N = 12
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def li_docs() -> list[Document]:
    return [
        Document(text=text, metadata={"source": source}, id_=f"doc-{i}")
        for i, (source, text) in enumerate(knowledge_base())
    ]


@pytest.fixture(scope="module")
def index(smol_engine, li_docs) -> SqueezedIndex:
    index = SqueezedIndex.from_documents(li_docs, engine=smol_engine, show_progress=False)
    yield index
    smol_engine.remove_corpus(index.corpus)


@pytest.fixture(scope="module")
def llm(index) -> SqueezedLLM:
    return index.as_llm(max_new_tokens=N)


@pytest.fixture(scope="module")
def reference(smol_engine, index):
    """The engine's own answer to a prompt on the test corpus (greedy, cached per prompt)."""
    cache = {}

    def answer(prompt, **kwargs):
        key = (repr(prompt), repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = smol_engine.answer(prompt, index.corpus, max_new_tokens=N, **kwargs)
        return cache[key]

    return answer


def user(text: str) -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, content=text)


# -- the LLM -----------------------------------------------------------------------------------


def test_metadata(llm, smol_engine, index):
    meta = llm.metadata
    corpus_tokens = smol_engine.get_corpus(index.corpus).stats()["tokens"]
    assert meta.context_window == smol_engine.context_window - corpus_tokens > 0
    assert meta.num_output == N
    assert meta.is_chat_model is True and meta.is_function_calling_model is False
    assert meta.model_name == smol_engine.model_name


def test_complete_and_chat_are_the_engine_answer(llm, index, reference):
    answer = reference(QUESTION)
    completion = llm.complete(QUESTION)
    assert completion.text == answer.text and completion.text.strip()
    assert completion.raw["usage"]["completion_tokens"] == answer.completion_tokens
    assert completion.raw["usage"]["prompt_tokens"] == answer.prompt_tokens + answer.corpus_tokens
    assert completion.additional_kwargs["corpus"] == index.corpus
    assert 0 < completion.additional_kwargs["time_to_first_token"] <= completion.additional_kwargs["total_time"]

    history = [
        ChatMessage(role=MessageRole.SYSTEM, content="Answer in one short sentence."),
        user("Who wrote the essays?"),
        ChatMessage(role=MessageRole.ASSISTANT, content="Paul Graham wrote them."),
        user(QUESTION),
    ]
    chat = llm.chat(history)
    expected = reference([{"role": m.role.value, "content": m.content} for m in history])
    assert chat.message.role == MessageRole.ASSISTANT and chat.message.content == expected.text
    assert chat.raw["answer"].prompt_tokens == expected.prompt_tokens > answer.prompt_tokens


def test_budgets_per_call_and_per_model_reach_the_engine(llm, index, reference):
    sparse = reference(QUESTION, kv_budget=0.25, question_budget=0.25)
    completion = llm.complete(QUESTION, kv_budget=0.25, question_budget=0.25)
    assert completion.text == sparse.text
    assert completion.additional_kwargs["kept_fraction"] == pytest.approx(sparse.kept_fraction)
    fixed = index.as_llm(max_new_tokens=N, kv_budget=0.25, question_budget=0.25)
    assert fixed.complete(QUESTION).additional_kwargs["kept_fraction"] == pytest.approx(sparse.kept_fraction)
    # the default reads the question in full: more of the corpus than the sparse read
    assert llm.complete(QUESTION, kv_budget=0.25).additional_kwargs["kept_fraction"] > sparse.kept_fraction


def test_streaming_matches_and_is_incremental(llm, reference):
    text = reference(QUESTION).text
    deltas = [r.delta for r in llm.stream_complete(QUESTION)]
    assert "".join(deltas) == text and len([d for d in deltas if d]) > 1
    responses = list(llm.stream_chat([user(QUESTION)]))
    assert "".join(r.delta for r in responses) == text
    assert responses[-1].message.content == text and responses[-1].raw["answer"].sources


def test_async_forms_agree(llm, reference):
    text = reference(QUESTION).text

    async def run() -> list[str]:
        completion = await llm.acomplete(QUESTION)
        chat = await llm.achat([user(QUESTION)])
        streamed = "".join([r.delta async for r in await llm.astream_complete(QUESTION)])
        chat_streamed = "".join([r.delta async for r in await llm.astream_chat([user(QUESTION)])])
        return [completion.text, chat.message.content, streamed, chat_streamed]

    assert asyncio.run(run()) == [text] * 4


def test_stop_sequence_and_bad_input(llm, smol_engine, reference):
    full = reference(QUESTION).text
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + " ".join(words[1:3])
    expected = full[: full.index(stop)]
    assert llm.complete(QUESTION, stop=[stop]).text == expected
    assert "".join(r.delta for r in llm.stream_complete(QUESTION, stop=[stop])) == expected
    with pytest.raises(ValueError, match="tool"):
        llm.chat([user("hi"), ChatMessage(role=MessageRole.TOOL, content="42")])
    calling = ChatMessage(role=MessageRole.ASSISTANT, content="", additional_kwargs={"tool_calls": [{"id": "1"}]})
    with pytest.raises(ValueError, match="tool calls"):
        llm.chat([user("hi"), calling, user("and?")])
    with pytest.raises(TypeError, match="unsupported"):
        llm.complete(QUESTION, max_tokenz=3)
    with pytest.raises(KeyError, match="no corpus named 'missing'"):
        SqueezedLLM(engine=smol_engine, corpus="missing")
    # a lone string is one stop sequence (not one per character); None falls back to the LLM's own settings
    late = string_stop(full)
    assert llm.complete(QUESTION, stop=late).text == full[: full.index(late)]
    assert llm.complete(QUESTION, stop=None, temperature=None, max_tokens=None).text == full
    stopping = SqueezedLLM(engine=smol_engine, corpus=llm.corpus, max_new_tokens=N, stop=[stop])
    assert stopping.complete(QUESTION, stop=None).text == expected
    # the question is the chat's last user message: blank is refused as a blank string prompt is
    for blank in ("", "  \n"):
        with pytest.raises(ValueError, match="question is empty"):
            llm.chat([user(blank)])
        with pytest.raises(ValueError, match="question is empty"):
            llm.complete(blank)
        with pytest.raises(ValueError, match="question is empty"):  # at the call, not at the first item
            llm.stream_complete(blank)
        with pytest.raises(ValueError, match="question is empty"):
            llm.stream_chat([user(blank)])
    with pytest.raises(TypeError, match="unsupported"):
        llm.stream_complete(QUESTION, max_tokenz=3)

    async def async_forms():
        with pytest.raises(ValueError, match="question is empty"):
            await llm.astream_chat([user("")])
        with pytest.raises(TypeError, match="unsupported"):
            await llm.astream_complete(QUESTION, max_tokenz=3)

    asyncio.run(async_forms())


def test_llm_settings_are_checked_by_name(llm, smol_engine):
    """A misspelt or retriever-only setting fails by name instead of being dropped; `max_tokens` is
    LlamaIndex's usual name for the length limit."""
    short = SqueezedLLM(engine=smol_engine, corpus=llm.corpus, max_tokens=3)
    assert short.max_new_tokens == 3 and short.complete(QUESTION).raw["answer"].completion_tokens <= 3
    with pytest.raises(ValueError, match="temprature"):
        SqueezedLLM(engine=smol_engine, corpus=llm.corpus, temprature=0.7)
    index = SqueezedIndex(smol_engine, llm.corpus)
    assert index.as_query_engine(max_tokens=3)._llm.max_new_tokens == 3
    with pytest.raises(ValueError, match="similarity_top_k"):
        index.as_query_engine(similarity_top_k=3)


def test_usable_as_settings_llm(llm, reference):
    previous = Settings._llm
    try:
        Settings.llm = llm
        assert Settings.llm is llm
        # A stock LlamaIndex component picks it up from Settings.
        chat = SimpleChatEngine.from_defaults()
        assert chat.chat(QUESTION).response == reference(QUESTION).text.strip()
    finally:
        Settings._llm = previous


# -- index, query engine, chat engine ----------------------------------------------------------


def test_index_loads_documents_once(index, li_docs, smol_engine):
    assert [n.node_id for n in index.nodes] == [d.doc_id for d in li_docs]
    assert [n.text for n in index.nodes] == [d.text for d in li_docs]
    assert [n.metadata for n in index.nodes] == [d.metadata for d in li_docs]
    again = SqueezedIndex.from_documents(li_docs, engine=smol_engine, show_progress=False)
    assert again.corpus == index.corpus  # same documents: the corpus is reused, not rebuilt
    with pytest.raises(TypeError, match="Document"):
        SqueezedIndex.from_documents([42], engine=smol_engine)


def test_corpus_name_follows_text_and_metadata_not_node_ids(make_tiny_engine):
    """from_documents reuses a corpus for the same text and metadata (a Document made without id_ gets a random id each
    time), taking the new node ids; changed metadata (shown in source nodes, or in the corpus text as a title) builds
    another corpus."""
    engine = make_tiny_engine()
    texts = ["The lamp is blue.", "The river is long.", "The stone is grey."]

    def load(prefix: str, **metadata):
        docs = [Document(text=t, metadata=dict(metadata), id_=f"{prefix}-{i}") for i, t in enumerate(texts)]
        return SqueezedIndex.from_documents(docs, engine=engine, show_progress=False)

    first = load("a", author="A")
    again = load("b", author="A")
    assert again.corpus == first.corpus and list(engine.corpora) == [first.corpus]  # reused, not rebuilt
    assert [n.node_id for n in again.nodes] == ["b-0", "b-1", "b-2"]
    other = load("c", author="B")
    assert other.corpus != first.corpus and [n.metadata for n in other.nodes] == [{"author": "B"}] * 3
    titled = load("d", title="Old"), load("e", title="New")
    assert titled[0].corpus != titled[1].corpus and titled[1].nodes[0].metadata == {"title": "New"}


def test_query_engine_with_scored_source_nodes(index, reference):
    response = index.as_query_engine(max_new_tokens=N).query(QUESTION)
    assert isinstance(response, Response)
    assert response.response == reference(QUESTION).text
    scores = [n.score for n in response.source_nodes]
    assert scores and scores == sorted(scores, reverse=True) and all(s > 0 for s in scores)
    assert abs(sum(scores) - 1.0) < 1e-6
    ids = {d.node_id for d in index.nodes}
    assert {n.node.node_id for n in response.source_nodes} <= ids
    assert response.metadata["corpus"] == index.corpus


def test_streaming_query_engine(index, reference):
    response = index.as_query_engine(streaming=True, max_new_tokens=N).query(QUESTION)
    assert isinstance(response, StreamingResponse)
    tokens = list(response.response_gen)
    assert "".join(tokens) == reference(QUESTION).text and len(tokens) > 1
    assert response.source_nodes  # filled in when the stream ended

    async def run() -> tuple[str, int]:
        r = await index.as_query_engine(streaming=True, max_new_tokens=N).aquery(QUESTION)
        text = "".join([t async for t in r.async_response_gen()])
        return text, len(r.source_nodes)

    text, n_sources = asyncio.run(run())
    assert text == "".join(tokens) and n_sources > 0


def test_chat_engine_multi_turn(index, reference):
    chat = index.as_chat_engine(max_new_tokens=N)
    first = chat.chat(PLANTED_QUESTION)
    second = chat.chat("Repeat that number.")
    assert first.response.strip() and second.response.strip()
    assert first.source_nodes and second.source_nodes
    # The whole history is the dynamic part of the second turn's prompt.
    history = [
        {"role": "user", "content": PLANTED_QUESTION},
        {"role": "assistant", "content": first.response},
        {"role": "user", "content": "Repeat that number."},
    ]
    expected = reference(history)
    assert second.response == expected.text
    assert second.metadata["prompt_tokens"] == expected.prompt_tokens > first.metadata["prompt_tokens"]
    assert [m.role for m in chat.chat_history] == [MessageRole.USER, MessageRole.ASSISTANT] * 2
    chat.reset()
    assert chat.chat_history == []

    streamed = chat.stream_chat(PLANTED_QUESTION)
    assert "".join(streamed.response_gen) == first.response
    assert streamed.source_nodes and len(chat.chat_history) == 2

    async def run() -> str:
        r = await chat.astream_chat("Repeat that number.")
        return "".join([t async for t in r.async_response_gen()])

    assert asyncio.run(run()) == second.response
    assert len(chat.chat_history) == 4


def test_planted_fact_document_ranks_first(index, li_docs):
    # long enough for the answer to reach the fact: sources rank what the answer drew on
    response = index.as_query_engine(max_new_tokens=24).query(PLANTED_QUESTION)
    top = response.source_nodes[0]
    assert top.node.node_id == li_docs[PLANTED_INDEX].doc_id, [(n.node.node_id, n.score) for n in response.source_nodes]
    assert top.node.metadata["source"] == knowledge_base()[PLANTED_INDEX][0]


def test_persist_and_load_from_persist_dir(index, smol_engine, reference, tmp_path):
    index.persist(tmp_path / "index")
    loaded = SqueezedIndex.from_persist_dir(tmp_path / "index", engine=smol_engine, corpus="li-loaded")
    try:
        assert loaded.corpus == "li-loaded"
        assert [(n.node_id, n.text, n.metadata) for n in loaded.nodes] == \
            [(n.node_id, n.text, n.metadata) for n in index.nodes]
        response = loaded.as_query_engine(max_new_tokens=N).query(QUESTION)
        assert response.response == reference(QUESTION).text
        assert {n.node.node_id for n in response.source_nodes} <= {n.node_id for n in index.nodes}
    finally:
        smol_engine.remove_corpus("li-loaded")
