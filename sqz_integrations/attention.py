"""The transformers hook: an attention function registered under the name ``"squeezed"``.

It is installed through transformers' public attention registry (``AttentionInterface``) and its
mask registry, so any model family that dispatches attention through them works unchanged. The
function receives post-RoPE queries and the keys/values of the model's own cache (the dynamic
tokens only). What it does depends on the ``squeeze=`` keyword given to the model's forward:

- nothing: plain SDPA, so ``engine.model`` still behaves as an ordinary transformers model;
- a :class:`CorpusCapture`: SDPA, while keeping the last full keys/values and the observation-window
  queries of every layer (the offline prefill);
- a :class:`~sqz_integrations.selection.CorpusRead`: squeezed attention over a corpus + the dynamic tokens.
"""
from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION_NAME = "squeezed"


class CorpusCapture:
    """Collects, during the chunked corpus prefill, what the offline step needs from each layer."""

    def __init__(self, n_tokens: int, window: int):
        self.n_tokens = n_tokens
        self.window_start = n_tokens - window
        self.position = 0  # first corpus position of the chunk being run (set by the engine)
        self.queries: dict[int, list[torch.Tensor]] = {}
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}
        self.scale: float | None = None

    def observe(self, layer_idx: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, scale: float):
        if value.shape[-1] != key.shape[-1]:  # a corpus layer stores both in one (KVH, N, D) layout
            raise NotImplementedError(f"layer {layer_idx} has value heads of size {value.shape[-1]} and key heads of "
                                      f"size {key.shape[-1]}: the engine needs them the same size")
        t = query.shape[2]
        lo = max(self.window_start - self.position, 0)
        if lo < t:
            self.queries.setdefault(layer_idx, []).append(query[0, :, lo:].transpose(0, 1).float())
        if key.shape[2] == self.n_tokens:  # the last chunk sees the whole corpus
            self.keys[layer_idx] = key[0]
            self.values[layer_idx] = value[0]
        self.scale = scale

    def window_queries(self, layer_idx: int) -> torch.Tensor:
        """(W, heads, head_dim) float32."""
        return torch.cat(self.queries[layer_idx], dim=0)


def squeezed_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
):
    from .selection import CorpusRead  # imported here: selection imports the corpus, not the hook

    squeeze = kwargs.pop("squeeze", None)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if isinstance(squeeze, CorpusRead):
        if kwargs.get("softcap") is not None:
            raise NotImplementedError("squeezed attention does not support logit soft-capping")
        window = kwargs.get("sliding_window")
        total = squeeze.corpus.n_tokens + key.shape[2]
        if window is not None and total > window:
            raise NotImplementedError(
                f"this layer uses a sliding window of {window} tokens, shorter than corpus + question ({total})"
            )
        return squeeze.attend(module.layer_idx, query, key, value, scale), None
    out = sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    if isinstance(squeeze, CorpusCapture):
        squeeze.observe(module.layer_idx, query, key, value, scale)
    return out


def register() -> str:
    """Register the attention function and its mask builder (idempotent); returns the name."""
    AttentionInterface.register(ATTENTION_NAME, squeezed_attention_forward)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)
    return ATTENTION_NAME
