"""sqz-integrations: a squeezed KV cache of a fixed corpus in place of chunked retrieval.

Squeezed Attention (Hooper et al., ACL 2025): the corpus is prefilled once, the keys of every layer
and KV head are clustered, and each question reads only the clusters its queries score highly.
This module imports neither LangChain nor LlamaIndex; their components live in
``sqz_integrations.langchain`` and ``sqz_integrations.llama_index``.
"""
from .config import SqueezeConfig
from .corpus import SqueezedCorpus
from .engine import SqueezedEngine
from .generation import Answer, AnswerStream, SourceScore
from .prompting import CorpusDocument

__all__ = [
    "Answer",
    "AnswerStream",
    "CorpusDocument",
    "SourceScore",
    "SqueezeConfig",
    "SqueezedCorpus",
    "SqueezedEngine",
]
__version__ = "0.1.0"
