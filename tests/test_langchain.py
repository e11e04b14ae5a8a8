"""ChatSqueezed (LangChain) over the real embedded SmolLM2: translation, streaming, metadata,
stop sequences, sources, the standard `langchain-tests` unit suite, and a RAG chain made
retriever-free."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("langchain_core")

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.documents import Document
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnablePassthrough
from langchain_tests.unit_tests import ChatModelUnitTests

from conftest import string_stop
from essays import PLANTED_INDEX, PLANTED_QUESTION, knowledge_base
from sqz_integrations.langchain import ChatSqueezed

pytestmark = pytest.mark.slow

CORPUS = "lc-kb"
N = 12  # new tokens per call: enough to see the answer, short enough for a 2-core CI
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def lc_docs() -> list[Document]:
    return [Document(page_content=text, metadata={"source": source}) for source, text in knowledge_base()]


@pytest.fixture(scope="module")
def llm(smol_engine, lc_docs) -> ChatSqueezed:
    return ChatSqueezed.from_documents(
        lc_docs, engine=smol_engine, corpus=CORPUS, replace=True, progress=False, max_new_tokens=N
    )


@pytest.fixture(scope="module")
def reference(smol_engine, llm):
    """The engine's own answer to a prompt on the test corpus (greedy, cached per prompt)."""
    cache = {}

    def answer(prompt, **kwargs):
        key = (repr(prompt), repr(sorted(kwargs.items())))
        if key not in cache:
            cache[key] = smol_engine.answer(prompt, CORPUS, max_new_tokens=N, **kwargs)
        return cache[key]

    return answer


# -- importing ---------------------------------------------------------------------------------


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=120)


def test_package_import_pulls_in_no_framework():
    result = _run(
        """
        import sys
        import sqz_integrations
        loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("langchain_core", "langchain", "llama_index"))
        assert not loaded, loaded
        """
    )
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize(
    "module, blocked, extra",
    [("sqz_integrations.langchain", "langchain_core", "langchain"),
     ("sqz_integrations.llama_index", "llama_index", "llama-index")],
)
def test_missing_framework_names_the_pip_install(module, blocked, extra):
    result = _run(
        f"""
        import sys
        class Block:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] == {blocked!r}:
                    raise ImportError("No module named " + repr(name))
        sys.meta_path.insert(0, Block())
        try:
            import {module}
        except ImportError as exc:
            print(exc)
        else:
            raise SystemExit("imported without " + {blocked!r})
        """
    )
    assert result.returncode == 0, result.stderr
    assert f"pip install 'sqz-integrations[{extra}]'" in result.stdout


# -- the langchain-tests standard unit suite ---------------------------------------------------


class TestChatSqueezedStandard(ChatModelUnitTests):
    """The standard suite. Tool calling and structured output are not supported, so the
    suite's `has_tool_calling` / `has_structured_output` properties read False by themselves
    (ChatSqueezed does not override `bind_tools` / `with_structured_output`)."""

    @pytest.fixture(autouse=True)
    def _engine(self, smol_engine, llm) -> None:
        type(self).engine = smol_engine  # the model fixture builds from chat_model_params

    @property
    def chat_model_class(self) -> type[ChatSqueezed]:
        return ChatSqueezed

    @property
    def chat_model_params(self) -> dict:
        return {"engine": type(self).engine, "corpus": CORPUS}

    @property
    def returns_usage_metadata(self) -> bool:
        return True


def test_tool_calling_is_declared_unsupported(llm):
    suite = TestChatSqueezedStandard()
    assert suite.has_tool_calling is False and suite.has_structured_output is False
    with pytest.raises(NotImplementedError):
        llm.bind_tools([])
    with pytest.raises(ValueError, match="tool"):
        llm.invoke([HumanMessage("hi"), ToolMessage("42", tool_call_id="1")])
    broken_call = AIMessage("", invalid_tool_calls=[{"name": "f", "args": "{", "id": "1", "error": "bad JSON"}])
    with pytest.raises(ValueError, match="tool calls"):  # an agent's turn, even with calls that failed to parse
        llm.invoke([HumanMessage("hi"), broken_call, HumanMessage("and?")])


# -- invoke / stream / batch / async -----------------------------------------------------------


def test_invoke_is_the_engine_answer_with_metadata(llm, smol_engine, reference):
    msg = llm.invoke(QUESTION)
    answer = reference(QUESTION)
    assert isinstance(msg, AIMessage)
    assert msg.content == answer.text and msg.content.strip()
    corpus_tokens = smol_engine.get_corpus(CORPUS).stats()["tokens"]
    usage = msg.usage_metadata
    assert usage["input_tokens"] == answer.prompt_tokens + corpus_tokens
    assert usage["input_token_details"]["cache_read"] == corpus_tokens
    assert usage["output_tokens"] == answer.completion_tokens <= N
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    meta = msg.response_metadata
    assert meta["corpus"] == CORPUS and meta["model_name"] == smol_engine.model_name
    assert 0 < meta["kept_fraction"] <= 1
    assert 0 < meta["time_to_first_token"] <= meta["total_time"]
    assert meta["finish_reason"] in ("stop", "length")
    sources = meta["sources"]
    assert sources and [s["score"] for s in sources] == sorted((s["score"] for s in sources), reverse=True)
    assert {s["document_index"] for s in sources} <= set(range(len(knowledge_base())))
    assert all(s["metadata"]["source"] and s["text"] for s in sources)


def test_budgets_per_call_and_per_model_reach_the_engine(smol_engine, llm, reference):
    sparse = reference(QUESTION, kv_budget=0.25, question_budget=0.25)
    msg = llm.invoke(QUESTION, kv_budget=0.25, question_budget=0.25)
    assert msg.content == sparse.text
    assert msg.response_metadata["kept_fraction"] == pytest.approx(sparse.kept_fraction)
    fixed = ChatSqueezed(engine=smol_engine, corpus=CORPUS, max_new_tokens=N, kv_budget=0.25, question_budget=0.25)
    assert fixed.invoke(QUESTION).response_metadata["kept_fraction"] == pytest.approx(sparse.kept_fraction)
    # the default reads the question in full: more of the corpus than the sparse read
    assert llm.invoke(QUESTION, kv_budget=0.25).response_metadata["kept_fraction"] > sparse.kept_fraction
    with pytest.raises(ValueError):
        ChatSqueezed(engine=smol_engine, corpus=CORPUS, question_budget=0.0)


def test_chat_history_is_the_dynamic_part(llm, smol_engine):
    history = [
        SystemMessage("Answer in one short sentence."),
        HumanMessage("Who wrote the essays?"),
        AIMessage("Paul Graham wrote them."),
        HumanMessage("What is the secret code of the blue vault?"),
    ]
    msg = llm.invoke(history)
    as_dicts = [
        {"role": "system", "content": "Answer in one short sentence."},
        {"role": "user", "content": "Who wrote the essays?"},
        {"role": "assistant", "content": "Paul Graham wrote them."},
        {"role": "user", "content": "What is the secret code of the blue vault?"},
    ]
    answer = smol_engine.answer(as_dicts, CORPUS, max_new_tokens=N)
    assert msg.content == answer.text
    single = smol_engine.answer(history[-1].content, CORPUS, max_new_tokens=1)
    assert msg.usage_metadata["input_tokens"] - single.corpus_tokens == answer.prompt_tokens > single.prompt_tokens


class TokenRecorder(BaseCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    def on_llm_new_token(self, token: str, **kwargs) -> None:
        self.tokens.append(token)


def test_stream_matches_invoke_and_feeds_callbacks(llm, reference):
    recorder = TokenRecorder()
    chunks = list(llm.stream(QUESTION, config={"callbacks": [recorder]}))
    full = chunks[0]
    for chunk in chunks[1:]:
        full += chunk
    assert full.content == reference(QUESTION).text
    assert len([c for c in chunks if c.content]) > 1  # really streamed, piece by piece
    assert "".join(recorder.tokens) == full.content and len([t for t in recorder.tokens if t]) > 1
    assert full.usage_metadata["output_tokens"] > 0
    assert full.response_metadata["corpus"] == CORPUS and full.response_metadata["sources"]


def test_streaming_flag_routes_invoke_through_callbacks(smol_engine, llm):
    recorder = TokenRecorder()
    streaming = ChatSqueezed(engine=smol_engine, corpus=CORPUS, max_new_tokens=N, streaming=True)
    msg = streaming.invoke(QUESTION, config={"callbacks": [recorder]})
    assert "".join(recorder.tokens) == msg.content and len([t for t in recorder.tokens if t]) > 1
    assert msg.response_metadata["sources"] and msg.usage_metadata["output_tokens"] > 0


def test_multi_token_stop_sequence_cuts_invoke_and_stream(llm, reference):
    question = QUESTION
    full = reference(question).text
    words = full.split()
    assert len(words) >= 3, full
    stop = " " + " ".join(words[1:3])  # two words: several tokens
    expected = full[: full.index(stop)]
    assert llm.invoke(question, stop=[stop]).content == expected
    streamed = "".join(c.content for c in llm.stream(question, stop=[stop]))
    assert streamed == expected
    bound = llm.bind(stop=[stop])
    assert bound.invoke(question).content == expected
    late = string_stop(full)  # a lone string is one stop sequence, not one per character (OpenAI-style callers)
    assert llm.invoke(question, stop=late).content == full[: full.index(late)]


def test_batch_and_async_agree_with_invoke(llm, reference):
    questions = [QUESTION, PLANTED_QUESTION]
    expected = [reference(q).text for q in questions]
    assert [m.content for m in llm.batch(questions)] == expected

    async def run() -> tuple[str, str]:
        msg = await llm.ainvoke(questions[0])
        pieces = [c.content async for c in llm.astream(questions[1])]
        return msg.content, "".join(pieces)

    assert list(asyncio.run(run())) == expected


def test_bad_input_gets_a_clear_error(smol_engine, llm):
    with pytest.raises(KeyError, match="no corpus named 'missing'"):
        ChatSqueezed(engine=smol_engine, corpus="missing")
    with pytest.raises(ValueError, match="greater than 0"):
        ChatSqueezed(engine=smol_engine, corpus=CORPUS, max_new_tokens=0)
    with pytest.raises(ValueError, match="Extra inputs"):
        ChatSqueezed(engine=smol_engine, corpus=CORPUS, max_new_tokenz=5)
    with pytest.raises(TypeError, match="unsupported call arguments"):
        llm.invoke("hi", tools=[{"name": "x"}])
    with pytest.raises(ValueError, match="text only"):
        llm.invoke([HumanMessage(content=[{"type": "image_url", "image_url": {"url": "x"}}])])
    for blank in ("", "  \n", [HumanMessage("")]):  # as engine.answer("") is: the chat's last user message
        with pytest.raises(ValueError, match="question is empty"):
            llm.invoke(blank)


def test_call_arguments_set_to_none_keep_the_model_settings(llm, reference):
    """LangChain passes unset call arguments as None (stop=None above all): they mean the model's own settings."""
    expected = reference(QUESTION).text
    assert llm.invoke(QUESTION, max_tokens=None, stop=None).content == expected
    assert llm.bind(temperature=None, kv_budget=None).invoke(QUESTION).content == expected


# -- documents and sources ---------------------------------------------------------------------


def test_from_documents_keeps_metadata(smol_engine, llm, lc_docs):
    corpus = smol_engine.get_corpus(CORPUS)
    assert [d.text for d in corpus.documents] == [d.page_content for d in lc_docs]
    assert [d.metadata for d in corpus.documents] == [d.metadata for d in lc_docs]
    assert corpus.stats()["documents"] == len(lc_docs)


def test_planted_fact_document_ranks_first(llm):
    # long enough for the answer to reach the fact: sources rank what the answer drew on
    msg = llm.invoke(PLANTED_QUESTION, max_new_tokens=24)
    sources = msg.response_metadata["sources"]
    assert sources[0]["document_index"] == PLANTED_INDEX, [(s["document_index"], s["score"]) for s in sources]
    assert sources[0]["metadata"]["source"] == knowledge_base()[PLANTED_INDEX][0]


# -- a RAG chain, and the same app without its retriever ---------------------------------------


class KeywordRetriever(BaseRetriever):
    """Top-k documents by shared lower-case words with the query (enough for a test)."""

    docs: list[Document]
    k: int = 1

    def _get_relevant_documents(self, query: str, *, run_manager=None) -> list[Document]:
        words = set(query.lower().replace("?", "").split())
        ranked = sorted(self.docs, key=lambda d: -len(words & set(d.page_content.lower().split())))
        return ranked[: self.k]


def test_rag_chain_and_retriever_free_chain(smol_engine, llm, lc_docs, reference):
    def format_docs(docs: list[Document]) -> str:
        return "\n\n".join(d.page_content for d in docs)

    # The typical app: retriever | format docs | prompt | llm | parser. Its LLM sees only the
    # retrieved chunk: a ChatSqueezed on a one-line corpus stands in for a plain chat model.
    plain = ChatSqueezed.from_documents(
        ["No documents are loaded; use the context in the question."],
        engine=smol_engine, corpus="lc-plain", replace=True, progress=False, max_new_tokens=N,
    )
    rag_prompt = ChatPromptTemplate.from_messages(
        [("human", "Context:\n{context}\n\nQuestion: {question}")]
    )
    retriever = KeywordRetriever(docs=lc_docs)
    rag = (
        {"context": retriever | format_docs, "question": RunnablePassthrough()}
        | rag_prompt
        | plain
        | StrOutputParser()
    )
    assert retriever.invoke(PLANTED_QUESTION)[0] == lc_docs[PLANTED_INDEX]
    rag_answer = rag.invoke(PLANTED_QUESTION)

    # The same app, retriever-free: the whole knowledge base is the squeezed corpus.
    prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
    app = {"question": RunnablePassthrough()} | prompt | llm | StrOutputParser()
    squeezed_answer = app.invoke(PLANTED_QUESTION)

    assert isinstance(rag_answer, str) and rag_answer.strip()
    assert squeezed_answer == reference(PLANTED_QUESTION).text and squeezed_answer.strip()
    assert "".join(app.stream(PLANTED_QUESTION)) == squeezed_answer


def test_save_local_and_load_local_round_trip(smol_engine, llm, reference, tmp_path):
    folder = llm.save_local(tmp_path / "kb")
    loaded = ChatSqueezed.load_local(folder, engine=smol_engine, corpus="lc-kb-loaded", max_new_tokens=N)
    assert loaded.corpus == "lc-kb-loaded"
    try:
        msg = loaded.invoke(QUESTION)
        assert msg.content == reference(QUESTION).text
        assert [s["document_index"] for s in msg.response_metadata["sources"]] == \
            [s["document_index"] for s in llm.invoke(QUESTION).response_metadata["sources"]]
        with pytest.raises(ValueError, match="replace=True"):
            ChatSqueezed.load_local(folder, engine=smol_engine, corpus="lc-kb-loaded")
    finally:
        smol_engine.remove_corpus("lc-kb-loaded")
