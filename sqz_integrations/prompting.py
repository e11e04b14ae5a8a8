"""Where the corpus sits in the prompt: a context block inside the model's own chat template.

The full prompt a question stands for is ``header + corpus block + suffix``: the header (chat
template up to the first user turn) and the corpus block are fixed and prefilled once; the suffix
(the question or the chat history, and the assistant header) is the dynamic part. Each piece is
tokenised on its own, so the corpus's token ids never depend on the question.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

# A marker no real text contains: the chat template is rendered around it and cut there.
_MARK = "\u0000SQZ-CORPUS\u0000"
ROLES = ("system", "user", "assistant")

Prompt = str | Sequence[Mapping[str, Any]]


@dataclass(frozen=True)
class CorpusDocument:
    """One document of a corpus: its text and free metadata (``source`` is shown in the corpus text)."""

    text: str
    metadata: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"document text must be a str, got {type(self.text).__name__}")
        if not isinstance(self.metadata, dict):
            raise TypeError(f"document metadata must be a dict, got {type(self.metadata).__name__}")


def as_documents(documents: Sequence[str | CorpusDocument]) -> list[CorpusDocument]:
    """Accept strings or CorpusDocuments; refuse an empty corpus or empty documents by name."""
    if isinstance(documents, (str, CorpusDocument)):
        documents = [documents]
    docs = []
    for i, doc in enumerate(documents):
        if isinstance(doc, str):
            doc = CorpusDocument(doc)
        elif not isinstance(doc, CorpusDocument):
            raise TypeError(f"document {i} must be a str or CorpusDocument, got {type(doc).__name__}")
        if not doc.text.strip():
            raise ValueError(f"document {i} is empty")
        docs.append(doc)
    if not docs:
        raise ValueError("a corpus needs at least one document")
    return docs


def document_label(index: int, doc: CorpusDocument) -> str:
    """The line that opens a document in the context block."""
    source = doc.metadata.get("source") or doc.metadata.get("title")
    return f"[Document {index + 1}" + (f": {source}]\n" if source else "]\n")


def document_block(index: int, doc: CorpusDocument) -> str:
    """The text of one document inside the context block."""
    return f"{document_label(index, doc)}{doc.text.strip()}\n\n"


def normalise_messages(prompt: Prompt) -> list[dict[str, str]]:
    """A question string or chat messages -> validated ``[{"role", "content"}]``."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise ValueError("the question is empty")
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Mapping) or not isinstance(prompt, Sequence):
        raise TypeError(f"a prompt is a question string or a list of chat messages, got {type(prompt).__name__}")
    messages = []
    for i, m in enumerate(prompt):
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise ValueError(f"message {i} must be a mapping with 'role' and 'content', got {m!r}")
        if m["role"] not in ROLES:
            raise ValueError(f"message {i} has role {m['role']!r}; expected one of {ROLES}")
        if not isinstance(m["content"], str):
            raise TypeError(f"message {i} content must be a str, got {type(m['content']).__name__}")
        messages.append({"role": m["role"], "content": m["content"]})
    users = [m for m in messages if m["role"] == "user"]
    if not users:
        raise ValueError("the chat needs at least one user message")
    if not users[-1]["content"].strip():
        raise ValueError("the question is empty (the chat's last user message has no text)")
    return messages


class PromptLayout:
    """Renders prompts for one tokenizer and system prompt: the fixed header and the dynamic suffix."""

    def __init__(self, tokenizer, system_prompt: str):
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.has_template = bool(getattr(tokenizer, "chat_template", None))
        self.header_text, _ = self._render([{"role": "user", "content": "?"}])

    def _render(self, messages: list[dict[str, str]]) -> tuple[str, str]:
        """Split the full prompt text at the corpus marker -> (before, after)."""
        # The user's own system messages join the dynamic part, after the corpus: the fixed part
        # must not change from one question to the next.
        extra_system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        chat = [m for m in messages if m["role"] != "system"]
        first_user = next(i for i, m in enumerate(chat) if m["role"] == "user")
        lead = f"{extra_system}\n\n" if extra_system else ""
        chat[first_user] = {"role": "user", "content": _MARK + lead + chat[first_user]["content"]}
        if self.has_template:
            full = [{"role": "system", "content": self.system_prompt}, *chat]
            text = self.tokenizer.apply_chat_template(full, tokenize=False, add_generation_prompt=True)
        else:
            turns = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in chat)
            text = f"{self.system_prompt}\n\n{turns}Assistant:"
        before, sep, after = text.partition(_MARK)
        if not sep:
            raise ValueError("the chat template dropped the user message; cannot place the corpus")
        return before, after

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def suffix_ids(self, prompt: Prompt) -> list[int]:
        """Token ids of the dynamic part of the prompt (after the corpus block)."""
        before, after = self._render(normalise_messages(prompt))
        if before != self.header_text:
            raise ValueError(
                "this chat template renders the part before the corpus differently for this prompt, "
                "so the corpus cannot be reused for it"
            )
        return self.encode(after)
