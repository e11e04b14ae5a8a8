"""The engine contract on tiny random models of several families (fast) and its error handling."""
from __future__ import annotations

import math

import pytest
import torch

from conftest import TINY_FAMILIES, random_text, string_stop
from sqz_integrations import CorpusDocument, SqueezeConfig
from sqz_integrations.corpus import budget_keys, centroid_storage
from sqz_integrations.selection import CorpusRead

DOCS = [random_text(120, seed=1), random_text(150, seed=2), random_text(90, seed=3)]
QUESTION = "Which word comes after river?"


def hf_greedy(engine, ids: list[int], n: int) -> list[int]:
    out = engine.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, min_new_tokens=n)
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_full_budget_equals_plain_transformers(make_tiny_engine, family):
    engine = make_tiny_engine(family, SqueezeConfig(kv_budget=1.0, observation_window=16))
    engine.add_corpus("docs", DOCS, progress=False)
    ids = engine.prompt_ids(QUESTION, corpus="docs")
    ans = engine.answer(QUESTION, corpus="docs", max_new_tokens=12)
    # the tiny model's vocabulary includes the end-of-turn id; compare the tokens up to where we stopped
    expected = hf_greedy(engine, ids, len(ans.token_ids) + (ans.finish_reason == "stop"))
    got = ans.token_ids + ([expected[-1]] if ans.finish_reason == "stop" else [])
    assert got == expected
    assert ans.kept_fraction == pytest.approx(1.0)


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_question_logits_match_full_prompt(make_tiny_engine, family):
    engine = make_tiny_engine(family, SqueezeConfig(kv_budget=1.0, observation_window=16))
    corpus = engine.add_corpus("docs", DOCS, progress=False)
    suffix = engine.prompt_ids(QUESTION, corpus="docs")[corpus.n_tokens:]
    got = engine.score_continuation("docs", suffix, per_token=False)
    with torch.no_grad():
        full = engine.model(torch.tensor([engine.prompt_ids(QUESTION, "docs")])).logits[0].float()
    want = torch.log_softmax(full, -1)[corpus.n_tokens : corpus.n_tokens + len(suffix) - 1]
    assert torch.allclose(got, want, atol=2e-4), (got - want).abs().max()
    # one token at a time (re-selecting every step) gives the same at full budget
    stepwise = engine.score_continuation("docs", suffix, per_token=True)
    assert torch.allclose(stepwise, want, atol=2e-4)


def test_question_budget_applies_to_multi_token_reads_only(make_tiny_engine):
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.25, observation_window=16))
    corpus = engine.add_corpus("docs", DOCS, progress=False)
    suffix = engine.prompt_ids(QUESTION, corpus="docs")[corpus.n_tokens:]
    exact = engine.score_continuation("docs", suffix, per_token=False, kv_budget=1.0)
    # one multi-token read at question_budget=1.0 is exact whatever the decode budget
    dense_q = engine.score_continuation("docs", suffix, per_token=False, kv_budget=0.125, question_budget=1.0)
    assert torch.allclose(dense_q, exact, atol=2e-4)
    # the default reads a question in full; question_budget=kv_budget is the paper's sparse reading
    default_q = engine.score_continuation("docs", suffix, per_token=False, kv_budget=0.125)
    assert torch.allclose(default_q, exact, atol=2e-4)
    sparse_q = engine.score_continuation("docs", suffix, per_token=False, kv_budget=0.125, question_budget=0.125)
    assert not torch.allclose(sparse_q, exact, atol=2e-4)
    # token by token, every read is a decode read: question_budget does not apply
    stepwise = engine.score_continuation("docs", suffix, per_token=True, kv_budget=1.0, question_budget=0.125)
    assert torch.allclose(stepwise, exact, atol=2e-4)
    # an answer whose question is read in full reads more than one read entirely at the budget
    plain = engine.answer(QUESTION, corpus="docs", max_new_tokens=6, question_budget=0.25)
    dense = engine.answer(QUESTION, corpus="docs", max_new_tokens=6)
    assert plain.kept_fraction < dense.kept_fraction < 1.0
    with pytest.raises(ValueError, match="question_budget"):
        engine.answer(QUESTION, corpus="docs", question_budget=0.0)
    with pytest.raises(ValueError, match="question_budget"):
        SqueezeConfig(question_budget=1.5)


def test_hierarchical_full_budget_is_exact(make_tiny_engine):
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=1.0, hierarchical=True, observation_window=16))
    engine.add_corpus("docs", DOCS, progress=False)
    ids = engine.prompt_ids(QUESTION, corpus="docs")
    ans = engine.answer(QUESTION, corpus="docs", max_new_tokens=8)
    assert ans.token_ids == hf_greedy(engine, ids, 8)[: len(ans.token_ids)]


def test_questions_never_change_the_corpus(make_tiny_engine):
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.25, hierarchical=True, observation_window=16))
    corpus = engine.add_corpus("docs", DOCS, progress=False)
    before = {k: v.clone() for k, v in corpus.fingerprint().items()}
    ids_before = list(corpus.token_ids)
    for budget in (1.0, 0.5, 0.125):
        engine.generate(QUESTION, corpus="docs", max_new_tokens=4, kv_budget=budget)
        engine.generate([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"},
                         {"role": "user", "content": QUESTION}], corpus="docs", max_new_tokens=4,
                        kv_budget=budget, hierarchical=False)
    after = corpus.fingerprint()
    assert before.keys() == after.keys()
    for k in before:
        assert torch.equal(before[k], after[k]), k
    assert corpus.token_ids == ids_before


def test_budget_per_call_and_fixed_mode(make_tiny_engine):
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.5, selection="fixed", observation_window=16, question_budget=None))
    corpus = engine.add_corpus("docs", DOCS, progress=False)
    for budget in (0.5, 0.25):
        ans = engine.answer(QUESTION, corpus="docs", max_new_tokens=4, kv_budget=budget)
        # fixed mode never exceeds its budget (the always-kept keys included)
        assert ans.kept_fraction <= budget + 1e-9
        assert ans.kept_fraction >= (corpus.n_always / corpus.n_tokens)
        assert ans.kv_budget == budget
    assert budget_keys(1000, 100, 0.05) == 0  # budget smaller than the always-kept keys


def test_several_corpora_side_by_side(make_tiny_engine):
    engine = make_tiny_engine("llama")
    a = engine.add_corpus("a", DOCS[:1], progress=False)
    b = engine.add_corpus("b", [CorpusDocument(DOCS[1], {"source": "b.txt"})], progress=False)
    assert set(engine.corpora) == {"a", "b"}
    assert a.n_tokens != b.n_tokens
    assert "b.txt" in engine.tokenizer.decode(b.token_ids)
    engine.generate(QUESTION, corpus="a", max_new_tokens=2)
    engine.generate(QUESTION, corpus="b", max_new_tokens=2)
    assert a.stats()["questions_read"] > 0 and b.stats()["questions_read"] > 0
    engine.remove_corpus("a")
    assert set(engine.corpora) == {"b"}


def test_bad_input_is_refused_clearly(make_tiny_engine):
    engine = make_tiny_engine("llama")
    with pytest.raises(KeyError, match="no corpus named 'nope'"):
        engine.generate(QUESTION, corpus="nope")
    with pytest.raises(ValueError, match="at least one document"):
        engine.add_corpus("x", [])
    with pytest.raises(ValueError, match="document 1 is empty"):
        engine.add_corpus("x", ["text", "   "])
    engine.add_corpus("x", DOCS[:1], progress=False)
    with pytest.raises(ValueError, match="exists; pass replace=True"):
        engine.add_corpus("x", DOCS[1:2], progress=False)
    with pytest.raises(ValueError, match="kv_budget must be in"):
        engine.generate(QUESTION, corpus="x", kv_budget=1.5)
    with pytest.raises(ValueError, match="without level-1 centroids"):
        engine.generate(QUESTION, corpus="x", hierarchical=True)
    for options in ({"kv_budget": 1.5}, {"hierarchical": True}, {"selection": "best"}):  # at the call, not when read
        with pytest.raises(ValueError, match="kv_budget must be in|level-1|selection must be"):
            engine.stream_answer(QUESTION, corpus="x", **options)
    with pytest.raises(ValueError, match="max_new_tokens"):
        engine.generate(QUESTION, corpus="x", max_new_tokens=0)
    for temperature in (None, float("nan"), -1):
        with pytest.raises(ValueError, match="temperature must be a number >= 0"):
            engine.generate(QUESTION, corpus="x", temperature=temperature)
    for prompt in (None, 5, {"role": "user", "content": "x"}):
        with pytest.raises(TypeError, match="question string or a list of chat messages"):
            engine.generate(prompt, corpus="x")
    with pytest.raises(ValueError, match="role"):
        engine.generate([{"role": "robot", "content": "x"}], corpus="x")
    with pytest.raises(ValueError, match="question is empty"):  # a chat asks its last user message
        engine.generate([{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"},
                         {"role": "user", "content": " "}], corpus="x")
    with pytest.raises(ValueError, match="context window"):
        make_tiny_engine("llama", max_position_embeddings=64).add_corpus("big", DOCS, progress=False)
    with pytest.raises(ValueError, match="kv_budget"):
        SqueezeConfig(kv_budget=0)
    with pytest.raises(ValueError, match="cannot change system_prompt"):  # every prompt is rendered with the engine's
        engine.add_corpus("y", DOCS[:1], progress=False, config=engine.config.replace(system_prompt="In French."))


def test_the_context_window_bounds_corpus_question_and_answer(make_tiny_engine):
    """Nothing runs past the model's context window: a corpus must leave room for its build's probe questions, a
    question must fit after the corpus, and an answer stops where the window ends (finish_reason "length")."""
    probe = make_tiny_engine("llama")
    n = len(probe.prompt_ids(QUESTION, probe.add_corpus("x", DOCS, progress=False).name)) - len(
        probe.layout.suffix_ids(QUESTION))  # the corpus's tokens
    room = probe._build_room(probe.config)
    assert room > probe.config.probe_tokens
    with pytest.raises(ValueError, match="probe questions"):
        make_tiny_engine("llama", max_position_embeddings=n + room - 1).add_corpus("x", DOCS, progress=False)
    no_probes = SqueezeConfig(kv_budget=0.25, observation_window=16, calibration_probe=None, retrieval_share=0)
    question = len(probe.layout.suffix_ids(QUESTION))
    engine = make_tiny_engine("llama", no_probes, max_position_embeddings=n + question + 12)
    corpus = engine.add_corpus("x", DOCS, progress=False)
    left = engine.context_window - corpus.n_tokens - question
    assert left == 12
    for answer in (engine.answer(QUESTION, "x", max_new_tokens=500),
                   engine.answer_batch([QUESTION], "x", max_new_tokens=500)[0]):
        assert answer.completion_tokens == left and answer.finish_reason == "length"
    streamed = engine.stream_answer(QUESTION, "x", max_new_tokens=500)
    assert len("".join(streamed)) >= 0 and streamed.answer.completion_tokens <= left
    long_question = " ".join(["river"] * 2 * left)
    with pytest.raises(ValueError, match="leaves no room"):
        engine.answer(long_question, "x", max_new_tokens=4)
    fits = engine.context_window - corpus.n_tokens + 1  # its last token is predicted at the window's last position
    assert engine.score_continuation("x", list(range(100, 100 + fits))).shape[0] == fits - 1
    with pytest.raises(ValueError, match="runs past the model's context window"):
        engine.score_continuation("x", list(range(100, 100 + fits + 1)))


def test_stream_pieces_join_to_the_answer_and_stop_sequences(make_tiny_engine):
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.5, observation_window=16))
    engine.add_corpus("docs", DOCS, progress=False)
    full = engine.generate(QUESTION, corpus="docs", max_new_tokens=20)
    pieces = list(engine.stream(QUESTION, corpus="docs", max_new_tokens=20))
    assert "".join(pieces) == full
    assert len(full) > 4
    stop = full[3:6]  # a sequence that appears in the answer: everything from it on is cut
    cut = engine.generate(QUESTION, corpus="docs", max_new_tokens=20, stop=[stop])
    assert cut == full[: full.index(stop)]
    streamed = engine.stream_answer(QUESTION, corpus="docs", max_new_tokens=20, stop=[stop])
    assert "".join(streamed) == cut
    assert streamed.answer.finish_reason == "stop" and stop not in streamed.answer.text
    late = string_stop(full)  # a lone string is one stop sequence, not one per character
    assert engine.generate(QUESTION, corpus="docs", max_new_tokens=20, stop=late) == full[: full.index(late)]


def test_sampling_is_seeded(make_tiny_engine):
    engine = make_tiny_engine("llama")
    engine.add_corpus("docs", DOCS, progress=False)
    a = engine.generate(QUESTION, corpus="docs", max_new_tokens=8, temperature=1.0, seed=3)
    b = engine.generate(QUESTION, corpus="docs", max_new_tokens=8, temperature=1.0, seed=3)
    assert a == b


def test_calibration_survives_huge_keys(make_tiny_engine):
    """Keys scaled by 1e3 (the overflow of the authors' exp()): thresholds and outputs stay finite."""
    # 0.125: every head of this model focuses sharply, so the copy pins reach their bound, copy_cap (4) x the
    # budget, which at 0.125 is half the corpus and leaves the read sparse
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.125, observation_window=16))
    with torch.no_grad():
        for layer in engine.model.model.layers:
            layer.self_attn.k_proj.weight.mul_(1e3)
    corpus = engine.add_corpus("docs", DOCS, progress=False)
    for prefill in (False, True):
        t = corpus.calibration.log_threshold(0.25, prefill=prefill)
        assert math.isfinite(t)
    for layer in corpus.layers:
        assert torch.isfinite(layer.centroids).all()
    ans = engine.answer(QUESTION, corpus="docs", max_new_tokens=4)
    assert 0.0 < ans.kept_fraction < 1.0
    logp = engine.score_continuation("docs", "river stone cloud lamp", kv_budget=0.25)
    assert torch.isfinite(logp).all()


def test_hierarchical_skips_level2_centroids(make_tiny_engine):
    cfg = SqueezeConfig(kv_budget=0.25, hierarchical=True, cluster_fraction=0.1, l1_cluster_fraction=0.02,
                        l1_recall=0.9, observation_window=16)
    engine = make_tiny_engine("llama", cfg)
    engine.add_corpus("docs", DOCS * 3, progress=False)
    flat = engine.answer(QUESTION, corpus="docs", max_new_tokens=6, hierarchical=False)
    hier = engine.answer(QUESTION, corpus="docs", max_new_tokens=6, hierarchical=True)
    assert hier.centroid_reads < flat.centroid_reads
    assert hier.kept_fraction > 0


def test_sources_off_same_answer_no_sources(make_tiny_engine):
    cfg = SqueezeConfig(kv_budget=0.25, observation_window=16)
    engine = make_tiny_engine("llama", cfg)
    engine.add_corpus("on", DOCS, progress=False)
    engine.add_corpus("off", DOCS, progress=False, config=cfg.replace(sources=False))
    assert engine.get_corpus("off").source_baseline is None
    on = engine.answer(QUESTION, corpus="on", max_new_tokens=5)
    off = engine.answer(QUESTION, corpus="off", max_new_tokens=5)
    assert on.sources and off.sources == []
    assert on.token_ids == off.token_ids and on.kept_fraction == pytest.approx(off.kept_fraction)
    with pytest.raises(TypeError, match="sources"):
        SqueezeConfig(sources="no")


def test_sources_measured_in_slices_are_the_same(make_tiny_engine, monkeypatch):
    from sqz_kernels import reference

    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.25, observation_window=16))
    engine.add_corpus("docs", DOCS, progress=False)
    whole = engine.answer(QUESTION, corpus="docs", max_new_tokens=4, question_budget=0.25)
    monkeypatch.setattr(reference, "MAX_LOGITS", 1)  # one query token at a time
    sliced = engine.answer(QUESTION, corpus="docs", max_new_tokens=4, question_budget=0.25)
    assert whole.token_ids == sliced.token_ids and whole.sources
    assert [s.document_index for s in whole.sources] == [s.document_index for s in sliced.sources]
    for a, b in zip(whole.sources, sliced.sources):
        assert a.score == pytest.approx(b.score, rel=1e-5)


def test_copy_pins_take_the_focused_key_and_the_keys_after_it():
    """A query that matches one corpus key pins that key's cluster and the clusters of the ``window``
    keys after it in token order, in the focusing head only; keys outside the clusters need no pin."""
    from types import SimpleNamespace

    from sqz_integrations.selection import copy_pins

    gen = torch.Generator().manual_seed(0)
    kvh, n, d = 2, 40, 16
    keys = torch.randn(kvh, n, d, generator=gen) * 0.1
    # stored order = token order reversed; 7 clusters (5 keys, the last 6); stored 36-39 are always read
    key_pos = torch.arange(n - 1, -1, -1, dtype=torch.int32).expand(kvh, n).contiguous()
    offsets = torch.tensor([0, 5, 10, 15, 20, 25, 30, 36]).expand(kvh, -1).contiguous()
    target = 20  # stored index 20 = token 19
    keys[1, target] = torch.randn(d, generator=gen) * 3
    q = torch.zeros(1, 2 * kvh, 3, d)
    q[0, 2:] = keys[1, target] * 4  # both query heads of KV head 1 focus on it
    layer = SimpleNamespace(keys=keys, cluster_offsets=offsets, key_pos=key_pos, n_clustered=36)
    pins = copy_pins(layer, q, torch.zeros(1, kvh, 3, d), d ** -0.5, focus=0.3, window=6)
    # tokens 19..25 = stored 20, 19, ..., 14: clusters 4 (stored 20-24) and 2-3 (stored 10-19)
    expected = torch.zeros_like(pins)
    expected[1, [2, 3, 4]] = True
    assert torch.equal(pins, expected)
    # a focused always-read key (stored 39 = token 0): its window covers tokens 0-6, i.e. the always-read
    # stored 39-36 (no pin) and stored 35-33 (cluster 6)
    keys[1, target] *= 0.03
    keys[1, 39] = torch.randn(d, generator=gen) * 3
    q[0, 2:] = keys[1, 39] * 4
    expected = torch.zeros_like(pins)
    expected[1, 6] = True
    assert torch.equal(copy_pins(layer, q, torch.zeros(1, kvh, 3, d), d ** -0.5, focus=0.3, window=6), expected)
    # a focus no key reaches pins nothing
    assert not copy_pins(layer, q * 0, torch.zeros(1, kvh, 3, d), d ** -0.5, focus=0.3, window=6).any()
    # a head split between two keys (shares ~0.62 and ~0.38) pins both clusters; capped at 5 keys, only the
    # cluster of the stronger one
    keys[1, 39] = 0
    keys[1, 2], keys[1, 27] = torch.eye(d)[0] * 10, torch.eye(d)[1] * 10  # clusters 0 and 5
    q = torch.zeros(1, 2 * kvh, 3, d)
    q[0, 2:, :, 0], q[0, 2:, :, 1] = 4.0, 3.8
    args = (layer, q, torch.zeros(1, kvh, 3, d), d ** -0.5, 0.3, 0)
    assert copy_pins(*args)[1].nonzero().flatten().tolist() == [0, 5]
    assert copy_pins(*args, cap_keys=10)[1].nonzero().flatten().tolist() == [0, 5]
    assert copy_pins(*args, cap_keys=5)[1].nonzero().flatten().tolist() == [0]
    assert not copy_pins(*args, cap_keys=5)[0].any()


def test_copy_window_pins_decode_reads(make_tiny_engine, monkeypatch):
    """With copy_window, the question's read pins clusters that every decode step of the answer reads
    (counted in the kept fraction); off, nothing is pinned; bad values are refused."""
    from sqz_integrations import selection

    reads = []
    original = selection.CorpusRead.lookup

    def lookup(self, layer_idx, q, scale):
        out = original(self, layer_idx, q, scale)
        if q.shape[2] == 1 and layer_idx in self.pins:
            offs = self.corpus.layers[layer_idx].cluster_offsets
            pinned_keys = (self.pins[layer_idx] * (offs[:, 1:] - offs[:, :-1])).sum(-1)
            cap = self.corpus.config.copy_cap * self.plan.kv_budget * self.corpus.n_tokens
            assert bool((pinned_keys <= cap).all())  # the pins' bound per KV head
            sel, pins = out[1], self.pins[layer_idx][None]
            if self.plan.selection == "threshold":
                reads.append(bool((sel | ~pins).all()))
            else:  # per head, every pin is read, or the budget is spent on pins only
                reads.append(bool(((sel | ~pins).all(-1) | (~sel | pins).all(-1)).all()))
        return out

    monkeypatch.setattr(selection.CorpusRead, "lookup", lookup)
    cfg = SqueezeConfig(kv_budget=0.125, observation_window=16, sources=False)
    engine = make_tiny_engine("llama", cfg)
    engine.add_corpus("off", DOCS, progress=False, config=cfg.replace(copy_window=0))
    engine.add_corpus("on", DOCS, progress=False, config=cfg.replace(copy_window=8, copy_focus=0.05))
    off = engine.answer(QUESTION, corpus="off", max_new_tokens=6)
    assert reads == []
    on = engine.answer(QUESTION, corpus="on", max_new_tokens=6)
    assert reads and all(reads)  # every decode step read every pinned cluster
    assert on.kept_fraction >= off.kept_fraction
    # fixed mode reads the pins inside its budget, which still holds
    engine.add_corpus("fixed", DOCS, progress=False,
                      config=cfg.replace(copy_window=8, copy_focus=0.05, selection="fixed", question_budget=None))
    reads.clear()
    fixed = engine.answer(QUESTION, corpus="fixed", max_new_tokens=6)
    assert reads and all(reads)  # pins ranked first
    assert fixed.kept_fraction <= 0.125 + 1e-9
    with pytest.raises(ValueError, match="copy_window"):
        SqueezeConfig(copy_window=-1)
    with pytest.raises(ValueError, match="copy_focus"):
        SqueezeConfig(copy_focus=0.01)
    with pytest.raises(ValueError, match="copy_cap"):
        SqueezeConfig(copy_cap=0)


def test_centroid_dtype_stores_rounded_centroids_and_calibrates_on_them(make_tiny_engine):
    """fp8 centroids: the same clusters as float32 (the clustering runs in float32), the centroids rounded once,
    and the calibration scores what is stored; a full-budget read does not look at them."""
    base = SqueezeConfig(kv_budget=0.25, hierarchical=True, observation_window=16)
    engine = make_tiny_engine("llama", base)
    a = engine.add_corpus("docs", DOCS, progress=False)
    b = engine.add_corpus("fp8", DOCS, progress=False, config=base.replace(centroid_dtype="float8_e4m3fn"))
    assert a.layers[0].centroids.dtype == torch.float32  # "auto" on CPU
    assert centroid_storage("auto", torch.zeros(1, dtype=torch.bfloat16)) == torch.float32
    for la, lb in zip(a.layers, b.layers):
        assert lb.centroids.dtype == lb.l1_centroids.dtype == torch.float8_e4m3fn
        assert torch.equal(la.cluster_offsets, lb.cluster_offsets) and torch.equal(la.keys, lb.keys)
        assert torch.equal(la.centroids.to(torch.float8_e4m3fn).float(), lb.centroids.float())
    rounded = b.calibration.log_threshold(0.25, False)
    assert rounded != a.calibration.log_threshold(0.25, False)  # the rounding is seen by the calibration
    assert (engine.answer(QUESTION, corpus="fp8", max_new_tokens=6, kv_budget=1.0).token_ids
            == engine.answer(QUESTION, corpus="docs", max_new_tokens=6, kv_budget=1.0).token_ids)
    ans = engine.answer(QUESTION, corpus="fp8", max_new_tokens=6, kv_budget=0.25, hierarchical=True)
    assert 0 < ans.kept_fraction < 1 and ans.completion_tokens > 0
    with pytest.raises(ValueError, match="centroid_dtype"):
        SqueezeConfig(centroid_dtype="float64")


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_preallocated_dynamic_tokens_give_the_same_answer(make_tiny_engine, family, monkeypatch):
    """The CUDA-graph decode's data path on the CPU (no graph): the question and answer tokens in preallocated
    buffers, single tokens read through the device-side count (``dyn_len``), give the answer, kept fraction and
    sources of the model's own cache."""
    from sqz_integrations import decode_graph

    engine = make_tiny_engine(family, SqueezeConfig(kv_budget=0.25, observation_window=16))
    engine.add_corpus("docs", DOCS, progress=False)
    plain = engine.answer(QUESTION, corpus="docs", max_new_tokens=10)
    on_device = []
    append = decode_graph.DynamicTokens.append

    def spy(self, layer_idx, k, v):
        on_device.append(self.on_device)
        return append(self, layer_idx, k, v)

    monkeypatch.setattr(decode_graph.DynamicTokens, "append", spy)
    monkeypatch.setattr(engine, "_graphs_for", lambda corpus, plan, max_new_tokens: True)
    static = engine.answer(QUESTION, corpus="docs", max_new_tokens=10)
    assert len(plain.token_ids) > 2 and any(on_device) and not all(on_device)
    assert static.token_ids == plain.token_ids
    assert static.kept_fraction == pytest.approx(plain.kept_fraction, rel=1e-12)
    assert [s.document_index for s in static.sources] == [s.document_index for s in plain.sources]
    for a, b in zip(static.sources, plain.sources):
        assert a.score == pytest.approx(b.score, rel=1e-6)


def test_chunked_prefill_builds_the_same_keys(make_tiny_engine):
    """A corpus prefilled in chunks (positions and cache carried from one chunk to the next) holds the keys and
    values of one pass, and answers the same at full budget."""
    engine = make_tiny_engine("llama", SqueezeConfig(observation_window=16))
    whole = engine.add_corpus("whole", DOCS, progress=False, config=engine.config.replace(prefill_chunk=4096))
    chunked = engine.add_corpus("chunked", DOCS, progress=False, config=engine.config.replace(prefill_chunk=64))
    assert whole.n_tokens > 4 * 64

    def in_token_order(layer, t):  # the clusters (the stored order) may differ where keys differ in their last bits
        return t.gather(1, layer.key_pos.argsort(1).unsqueeze(-1).expand_as(t))

    for a, b in zip(whole.layers, chunked.layers):
        for name in ("keys", "values"):
            torch.testing.assert_close(in_token_order(a, getattr(a, name)), in_token_order(b, getattr(b, name)),
                                       rtol=1e-5, atol=1e-5)
    assert (engine.answer(QUESTION, corpus="whole", max_new_tokens=8, kv_budget=1.0).token_ids
            == engine.answer(QUESTION, corpus="chunked", max_new_tokens=8, kv_budget=1.0).token_ids)


def test_pooled_read_answers_like_a_fresh_one(make_tiny_engine, monkeypatch):
    """The CUDA-graph path's pool on the CPU (no graph is captured there): a later answer of the same kind takes
    the earlier answer's read, reset in place (counters, copy pins, sources, dynamic tokens), and gives what a
    fresh read gives; another budget or a replaced corpus does not take it."""
    engine = make_tiny_engine("llama", SqueezeConfig(kv_budget=0.25, observation_window=16))
    engine.add_corpus("docs", DOCS, progress=False)
    questions = [QUESTION, "Which document talks about the harbor, and what does it say?", QUESTION]
    fresh = [engine.answer(q, corpus="docs", max_new_tokens=10) for q in questions]
    monkeypatch.setattr(engine, "_graphs_for", lambda corpus, plan, max_new_tokens: True)
    reads = []
    reset = CorpusRead.reset
    monkeypatch.setattr(CorpusRead, "reset", lambda self: (reads.append(self), reset(self))[1])
    pooled = [engine.answer(q, corpus="docs", max_new_tokens=10) for q in questions]
    assert len(reads) == 2 and reads[0] is reads[1]  # the second and third answers took the first one's read
    assert reads[0].pins  # the question pinned clusters, and the next question's pins replaced them in place
    for a, b in zip(pooled, fresh):
        assert a.token_ids == b.token_ids
        assert a.kept_fraction == pytest.approx(b.kept_fraction, rel=1e-12)
        assert [(s.document_index, round(s.score, 6)) for s in a.sources] == \
            [(s.document_index, round(s.score, 6)) for s in b.sources]
    assert fresh[0].kept_fraction != fresh[1].kept_fraction  # the two questions read differently
    engine.answer(QUESTION, corpus="docs", max_new_tokens=10, kv_budget=0.5)
    assert len(reads) == 2 and len(engine._graph_pool) == 2  # another plan: a slot of its own
    engine.add_corpus("docs", DOCS, progress=False, replace=True)
    assert len(engine._graph_pool) == 0
    engine.answer(QUESTION, corpus="docs", max_new_tokens=10)
    assert len(reads) == 2
    engine.add_corpus("other", DOCS[:2], progress=False)
    engine.answer(QUESTION, corpus="other", max_new_tokens=10)
    assert len(engine._graph_pool) == 2
    with pytest.raises(KeyError, match="no corpus named"):
        engine.release_graphs("missing")
    assert engine.release_graphs("other") == 1 and len(engine._graph_pool) == 1  # "docs" keeps its slot
    assert engine.release_graphs() == 1 and len(engine._graph_pool) == 0
    engine.answer(QUESTION, corpus="docs", max_new_tokens=10)
    assert len(reads) == 2  # a fresh read: nothing left to take


def test_dynamic_tokens_refuse_overflow():
    from sqz_integrations.decode_graph import DynamicTokens

    store = DynamicTokens(4, torch.device("cpu"))
    store.begin(3)
    k = torch.randn(1, 2, 3, 8)
    keys, values, n = store.append(0, k, k + 1)
    assert n is None and torch.equal(keys, k) and torch.equal(values, k + 1)
    store.end()
    store.begin(1, on_device=True)
    keys, _, n = store.append(0, k[:, :, :1] * 2, k[:, :, :1])
    assert keys.shape[2] == 4 and int(n) == 4 and torch.equal(keys[:, :, 3:], k[:, :, :1] * 2)
    store.end()
    with pytest.raises(ValueError, match="do not fit"):
        store.begin(1)
    with pytest.raises(ValueError, match="capacity"):
        DynamicTokens(0, torch.device("cpu"))


def test_device_lock_lets_a_capture_run_alone():
    """A capture (exclusive) waits for every shared holder and blocks new ones; shared is re-entrant per thread
    (a corpus build runs forwards) and a capture inside a shared block of its own thread is refused."""
    import threading
    import time

    from sqz_integrations.decode_graph import DeviceBusy, DeviceLock

    lock, events = DeviceLock(), []
    in_shared, release = threading.Event(), threading.Event()

    def reader():
        with lock.shared():
            with lock.shared():  # re-entrant
                in_shared.set()
                release.wait(5)
                events.append("reader done")

    def writer():
        with lock.exclusive():
            events.append("capture")

    r = threading.Thread(target=reader)
    r.start()
    assert in_shared.wait(5)
    w = threading.Thread(target=writer)
    w.start()
    time.sleep(0.2)
    assert events == []  # the capture waits for the shared holder
    release.set()
    r.join(5)
    w.join(5)
    assert events == ["reader done", "capture"]
    with lock.shared(), pytest.raises(RuntimeError, match="capture cannot start"):
        with lock.exclusive():
            pass
    # a capture that cannot get the device in time gives up, and lets the waiting shared holders go on
    busy, got = threading.Event(), []
    def hold():
        with lock.shared():
            busy.set()
            release.wait(5)

    holder = threading.Thread(target=hold)
    release.clear()
    holder.start()
    assert busy.wait(5)
    with pytest.raises(DeviceBusy, match="busy"):
        with lock.exclusive(timeout=0.1):
            got.append("captured")
    with lock.shared():  # not blocked behind the abandoned capture
        got.append("shared")
    assert got == ["shared"]
    release.set()
    holder.join(5)


def test_of_two_builds_under_one_name_only_the_first_to_finish_lands(make_tiny_engine, monkeypatch):
    """The name is checked again when a build is done: a corpus another thread added under it meanwhile stays, and the
    later build fails by name instead of silently replacing it."""
    engine = make_tiny_engine("llama")
    prefill = engine._prefill

    def racing(*args, **kwargs):  # another thread's build of the same name lands while this one prefills
        monkeypatch.setattr(engine, "_prefill", prefill)
        engine.add_corpus("x", DOCS[:1], progress=False)
        return prefill(*args, **kwargs)

    monkeypatch.setattr(engine, "_prefill", racing)
    with pytest.raises(ValueError, match="exists; pass replace=True"):
        engine.add_corpus("x", DOCS, progress=False)
    assert len(engine.get_corpus("x").documents) == 1
