"""Models the engine cannot serve exactly are refused by name before it touches them, and attention windows that a
model applies only through its mask bound the context (tiny random configs of the families concerned)."""
from __future__ import annotations

import copy
import re

import pytest
import torch
from conftest import tiny_model

from sqz_integrations import SqueezeConfig, SqueezedEngine
MOE = dict(num_local_experts=4, num_experts_per_tok=2)
GEMMA_N = dict(num_hidden_layers=4, head_dim=16, sliding_window=4096, hidden_size_per_layer_input=8,
               num_kv_shared_layers=2, layer_types=["sliding_attention", "full_attention"] * 2)

REFUSED = {
    "gemma2 (soft-capping)": ("Gemma2Config", dict(head_dim=16), "soft-caps its attention logits"),
    "gpt-oss (attention sinks)": ("GptOssConfig", dict(head_dim=16, sliding_window=4096, **MOE,
                                                       layer_types=["sliding_attention", "full_attention"]), "sinks"),
    "qwen3-next (linear attention)": ("Qwen3NextConfig", dict(head_dim=16), "not attention (linear_attention)"),
    "lfm2 (convolutions)": ("Lfm2Config", dict(layer_types=["conv", "full_attention"]), "not attention (conv)"),
    "deepseek-v3 (value heads of another size)": (
        "DeepseekV3Config", dict(num_key_value_heads=4, kv_lora_rank=16, q_lora_rank=None, qk_rope_head_dim=8,
                                 qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4, num_experts_per_tok=2,
                                 moe_intermediate_size=32, first_k_dense_replace=1, n_group=1, topk_group=1),
        "value heads"),
    "diffllama (attention twice per layer)": ("DiffLlamaConfig", {}, "call attention twice"),
    "gemma4 (KV-sharing layers on the last prefill position)": ("Gemma4TextConfig", dict(GEMMA_N, global_head_dim=16),
                                                                "KV-sharing layers"),
}
SERVED = {  # close to a refused one, served exactly: Gemma 3n's KV-sharing layers see every position
    "gemma3n (KV-sharing layers)": ("Gemma3nTextConfig", dict(GEMMA_N, laurel_rank=8, altup_num_inputs=2,
                                                              activation_sparsity_pattern=[0.0] * 4)),
}

WINDOWED = {  # windows the attention call never sees: they bound the context instead
    "mistral sliding window": ("MistralConfig", dict(sliding_window=256), "sliding window", 256),
    "phimoe sliding window": ("PhimoeConfig", dict(sliding_window=256, **MOE), "sliding window", 256),
    "llama4 attention chunk": ("Llama4TextConfig", dict(head_dim=16, intermediate_size_mlp=128, num_local_experts=2,
                                                        num_experts_per_tok=1, attention_chunk_size=256,
                                                        no_rope_layers=[1, 1]), "attention chunk", 256),
}


def tiny(config_name: str, overrides: dict, vocab_size: int):
    """conftest's tiny model of a transformers config class (Gemma 3n / 4 also size their per-layer inputs)."""
    extra = {"vocab_size_per_layer_input": vocab_size} if "hidden_size_per_layer_input" in overrides else {}
    return tiny_model(config_name, vocab_size, pad_token_id=0, **extra, **overrides)


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_model_the_engine_cannot_serve_is_refused_untouched(case, smol_tokenizer):
    config_name, overrides, reason = REFUSED[case]
    model = tiny(config_name, overrides, len(smol_tokenizer))
    before = model.config._attn_implementation
    with pytest.raises(ValueError, match=f"cannot serve this .*{re.escape(reason)}"):
        SqueezedEngine(model, smol_tokenizer)
    assert model.config._attn_implementation == before  # the user's model is left as it was


@pytest.mark.parametrize("case", list(WINDOWED))
def test_a_window_in_the_mask_bounds_the_context(case, smol_tokenizer):
    config_name, overrides, kind, window = WINDOWED[case]
    engine = SqueezedEngine(tiny(config_name, overrides, len(smol_tokenizer)), smol_tokenizer,
                            SqueezeConfig(kv_budget=0.25, observation_window=16))
    assert engine.context_window == window
    with pytest.raises(ValueError, match=f"the model's {kind} is {window}"):
        engine.add_corpus("long", ["river stone lamp " * 200], progress=False)
    corpus = engine.add_corpus("short", ["river stone lamp " * 10], progress=False)
    answer = engine.answer("Which word comes after river?", "short", max_new_tokens=500)
    assert corpus.n_tokens + answer.prompt_tokens + answer.completion_tokens <= window


@pytest.mark.parametrize("case", list(SERVED))
def test_a_model_close_to_a_refused_one_is_served_exactly(case, smol_tokenizer):
    config_name, overrides = SERVED[case]
    model = tiny(config_name, overrides, len(smol_tokenizer))
    untouched = copy.deepcopy(model)  # the engine switches the model's attention to its own
    engine = SqueezedEngine(model, smol_tokenizer, SqueezeConfig(kv_budget=0.25, observation_window=16))
    engine.add_corpus("docs", ["river stone lamp garden " * 30], progress=False)
    question = "Which word comes after river?"
    ids = engine.prompt_ids(question, "docs")
    expected = untouched.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)[0, len(ids):].tolist()
    assert engine.answer(question, "docs", max_new_tokens=8, kv_budget=1.0).token_ids == expected
