"""Which models the engine can serve exactly, read from the model and its config before the engine touches it.

The engine reads a corpus through transformers' attention interface: one call per layer and forward, with keys
and values of one head size, and no state outside the KV cache. A model that breaks one of those assumptions
would be answered wrong without an error (attention sinks, a layer calling attention twice) or fail deep inside a
build (recurrent or convolution layers, shared KV, value heads of another size); it is refused by name instead.
Windows that a model applies only through its attention mask (chunked attention, some sliding windows) never reach
the attention call, so they bound the context here: within its window a windowed layer attends as a full one.
"""
from __future__ import annotations

# the layer kinds of ``config.layer_types`` whose layers attend through the attention interface
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention", "attention"}
# model types whose attention the interface cannot express: DiffLlama calls it twice per layer (two value halves)
_TWICE_PER_LAYER = {"diffllama"}


def unsupported(model) -> str | None:
    """Why the engine cannot serve ``model`` (None: it can)."""
    cfg = model.config
    kinds = set(getattr(cfg, "layer_types", None) or ()) | set(getattr(cfg, "layers_block_type", None) or ())
    other = sorted(kinds - _ATTENTION_LAYERS)
    if other or getattr(model, "_is_stateful", False):
        return (f"it has layers that are not attention ({', '.join(other) or 'recurrent state'}): their state is not "
                "in the KV cache the engine squeezes")
    # Layers that reuse an earlier layer's KV are served (Gemma 3n: exact), unless the model also runs them on the last
    # position only in a prefill (Gemma 4 slices its inputs there): the corpus capture needs their window queries.
    shared = getattr(cfg, "num_kv_shared_layers", 0)
    if shared and any(hasattr(m, "first_kv_shared_layer_idx") for m in model.modules()):
        return "its KV-sharing layers read only the last position of a prefill (num_kv_shared_layers)"
    if getattr(cfg, "attn_logit_softcapping", None) is not None:
        return "it soft-caps its attention logits (attn_logit_softcapping), which squeezed attention does not do"
    qk = (getattr(cfg, "qk_nope_head_dim", None) or 0) + (getattr(cfg, "qk_rope_head_dim", None) or 0)
    if qk and getattr(cfg, "v_head_dim", qk) != qk:
        return f"its value heads ({cfg.v_head_dim}) are not the size of its key heads ({qk})"
    if any(hasattr(m, "sinks") for m in model.modules()):
        return "its attention has sinks (a learned logit per head), which squeezed attention does not add"
    if getattr(cfg, "model_type", None) in _TWICE_PER_LAYER:
        return "its layers call attention twice (differential attention)"
    return None


def context_limit(cfg) -> tuple[int, str]:
    """(tokens, what sets them): the model's positions, or its shortest attention window where some layers attend
    within one (a sliding window, an attention chunk) and it is shorter. 0: unbounded."""
    kinds = set(getattr(cfg, "layer_types", None) or ())
    limits = [(getattr(cfg, "max_position_embeddings", 0) or 0, "context window")]
    window = getattr(cfg, "sliding_window", None)
    if (isinstance(window, int) and window > 0 and getattr(cfg, "use_sliding_window", True) is not False
            and (not kinds or "sliding_attention" in kinds)):
        limits.append((window, "sliding window"))
    chunk = getattr(cfg, "attention_chunk_size", None)
    if isinstance(chunk, int) and chunk > 0 and (not kinds or "chunked_attention" in kinds):
        limits.append((chunk, "attention chunk"))
    limits = [(n, what) for n, what in limits if n]
    return min(limits) if limits else (0, "context window")
