"""Saved corpora (``engine.save_corpus`` / ``load_corpus``): a loaded corpus answers as the saved one, and nothing
a user saved is lost or silently misread."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import random_text

from sqz_integrations import CorpusDocument, SqueezeConfig
from sqz_integrations import storage

DOCS = [CorpusDocument(random_text(120, seed=1), {"source": "a.md", "tags": ["x", 1]}),
        CorpusDocument(random_text(150, seed=2), {"source": "b.md"}), random_text(90, seed=3)]
QUESTIONS = ["Which word comes after river?", "Which document talks about the garden?"]
CONFIG = SqueezeConfig(kv_budget=0.25, observation_window=16, hierarchical=True)


def answers(engine, corpus: str, **kwargs) -> list[tuple]:
    out = []
    for q in QUESTIONS:
        a = engine.answer(q, corpus=corpus, max_new_tokens=8, **kwargs)
        out.append((a.token_ids, a.kept_fraction, [(s.document_index, s.score, s.metadata) for s in a.sources]))
    return out


@pytest.fixture
def saved(make_tiny_engine, tmp_path):
    """An engine with corpus "docs" (asked once), saved to tmp_path / "docs"."""
    engine = make_tiny_engine("llama", CONFIG)
    engine.add_corpus("docs", DOCS, progress=False)
    engine.answer(QUESTIONS[0], corpus="docs", max_new_tokens=4)
    return engine, engine.save_corpus("docs", tmp_path / "docs")


def test_loaded_corpus_answers_as_the_saved_one(saved, make_tiny_engine):
    engine, path = saved
    other = make_tiny_engine("llama", CONFIG)  # the same weights (seeded), another engine: a later process
    loaded = other.load_corpus(path)
    original = engine.get_corpus("docs")
    assert loaded.name == "docs" and other.corpora["docs"] is loaded
    before, after = original.fingerprint(), loaded.fingerprint()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) and before[k].dtype == after[k].dtype for k in before)
    assert [(d.text, d.metadata) for d in loaded.documents] == [(d.text, d.metadata) for d in original.documents]
    assert loaded.token_ids == original.token_ids and loaded.doc_spans == original.doc_spans
    assert loaded.config == original.config
    assert torch.equal(loaded.head_misses, original.head_misses)
    assert torch.equal(loaded.source_baseline, original.source_baseline)
    stats = loaded.stats()
    assert stats == original.stats()  # questions read and kept fractions so far, build time, sizes
    for budget in (0.5, 0.25, 0.125):
        for prefill in (False, True):
            assert loaded.calibration.log_threshold(budget, prefill) == original.calibration.log_threshold(budget, prefill)
            assert loaded.calibration.l1_log_threshold(budget, 0.99, prefill) == \
                original.calibration.l1_log_threshold(budget, 0.99, prefill)
    for kwargs in ({}, {"hierarchical": True}, {"kv_budget": 0.125, "selection": "fixed"}, {"kv_budget": 1.0}):
        assert answers(other, "docs", **kwargs) == answers(engine, "docs", **kwargs)
    nested = other.save_corpus("docs", path.parent / "more" / "folders")  # missing parents are created
    assert make_tiny_engine("llama", CONFIG).load_corpus(nested).stats() == loaded.stats()


def test_save_never_replaces_a_save_unasked(saved, make_tiny_engine, tmp_path):
    engine, path = saved
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=True"):
        engine.save_corpus("docs", path)
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a saved corpus"):
        engine.save_corpus("docs", tmp_path / "notes", overwrite=True)
    assert (tmp_path / "notes" / "mine.txt").read_text() == "keep me"
    engine.add_corpus("docs", DOCS[:2], progress=False, replace=True)
    engine.save_corpus("docs", path, overwrite=True)
    assert len(make_tiny_engine("llama", CONFIG).load_corpus(path).documents) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["docs", "notes"]  # no temporary folder left behind


def test_save_refuses_metadata_that_json_cannot_hold(make_tiny_engine, tmp_path):
    engine = make_tiny_engine("llama", CONFIG)
    engine.add_corpus("docs", [CorpusDocument("some text " * 20, {"when": object()})], progress=False)
    with pytest.raises(TypeError, match="document 0's metadata"):
        engine.save_corpus("docs", tmp_path / "docs")
    assert list(tmp_path.iterdir()) == []
    # values JSON holds but changes (a tuple comes back a list, a key 7 the string '7') are refused too
    for changed in ({"pages": (3, 4)}, {7: "seven"}, {"score": float("nan")}):
        engine.add_corpus("docs", [CorpusDocument("some text " * 20, changed)], progress=False, replace=True)
        with pytest.raises(TypeError, match="document 0's metadata"):
            engine.save_corpus("docs", tmp_path / "docs")
    assert list(tmp_path.iterdir()) == []


def test_a_save_killed_between_its_renames_points_to_the_previous_one(saved, make_tiny_engine, tmp_path):
    """Where a save must rename twice (no atomic swap on that system or filesystem) and is killed between the two
    renames, its folder is missing but the previous save is whole beside it: loading says where it is."""
    engine, path = saved
    left = tmp_path / f".{path.name}.old-x1"
    left.mkdir()
    path.rename(left / path.name)  # the state after the first rename
    with pytest.raises(FileNotFoundError, match=f"previous save in {left / path.name}"):
        engine.load_corpus(path, name="again")
    (left / path.name).rename(path)
    assert engine.load_corpus(path, name="again").n_tokens == engine.get_corpus("docs").n_tokens


def test_overwriting_a_save_swaps_it_in_one_step(saved, monkeypatch):
    """Overwriting swaps the new save with the old one in one step where the system can (no moment without a save at
    the path), else renames twice; either way the new save is in place and nothing is left beside it."""
    engine, path = saved
    for can_swap in (True, False):
        if not can_swap:
            monkeypatch.setattr(storage, "_exchange", lambda a, b: False)
        engine.add_corpus("docs", DOCS[: 2 if can_swap else 1], progress=False, replace=True)
        engine.save_corpus("docs", path, overwrite=True)
        assert len(storage.read_meta(path)["documents"]) == (2 if can_swap else 1)
        assert sorted(p.name for p in path.parent.iterdir()) == [path.name]
    before = {p.name: p.read_bytes() for p in path.iterdir()}

    def refused(src, dst):
        raise PermissionError(f"cannot move {src}")

    monkeypatch.setattr(storage.os, "replace", refused)  # the first of the two renames fails
    with pytest.raises(PermissionError):
        engine.save_corpus("docs", path, overwrite=True)
    monkeypatch.undo()
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary folder left beside it
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before


def test_load_names_and_replaces_only_when_asked(saved, make_tiny_engine):
    engine, path = saved
    with pytest.raises(ValueError, match="replace=True"):
        engine.load_corpus(path)
    copy = engine.load_corpus(path, name="docs-copy")
    assert copy.name == "docs-copy" and set(engine.corpora) == {"docs", "docs-copy"}
    assert engine.load_corpus(path, replace=True) is engine.get_corpus("docs")


def test_load_refuses_another_model_or_tokenizer(saved, make_tiny_engine, tmp_path):
    _, path = saved
    with pytest.raises(ValueError, match="another model"):
        make_tiny_engine("llama", CONFIG, seed=1).load_corpus(path)  # same architecture, other weights
    other_values = make_tiny_engine("llama", CONFIG)  # the same keys: only the last layer's values differ
    with torch.no_grad():
        other_values.model.model.layers[-1].self_attn.v_proj.weight.mul_(-3.0)
    with pytest.raises(ValueError, match="keys or values"):
        other_values.load_corpus(path)
    with pytest.raises(ValueError, match="model"):
        make_tiny_engine("qwen2", CONFIG).load_corpus(path)
    with pytest.raises(ValueError, match="chat template"):
        make_tiny_engine("llama", CONFIG.replace(system_prompt="Answer in French.")).load_corpus(path)
    with pytest.raises(ValueError, match="context window"):  # the same model, with a window too short for the corpus
        make_tiny_engine("llama", CONFIG, max_position_embeddings=64).load_corpus(path)
    bf16 = make_tiny_engine("llama", CONFIG)
    bf16.model.to(torch.bfloat16)
    with pytest.raises(ValueError, match="4 of size 16: it was built by another model"):  # not a dtype matter
        make_tiny_engine("llama", CONFIG, num_key_value_heads=4).load_corpus(path)
    with pytest.raises(ValueError, match="dtype"):
        bf16.load_corpus(path)


def test_load_reports_a_damaged_or_foreign_save(saved, make_tiny_engine, tmp_path):
    _, path = saved
    engine = make_tiny_engine("llama", CONFIG)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        engine.load_corpus(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="not a saved corpus"):
        engine.load_corpus(tmp_path / "empty")
    meta = json.loads((path / storage.META_FILE).read_text())
    (path / storage.META_FILE).write_text(json.dumps({**meta, "version": storage.VERSION + 1}))
    with pytest.raises(ValueError, match="format version"):
        engine.load_corpus(path)
    (path / storage.META_FILE).write_text(json.dumps({k: v for k, v in meta.items() if k != "calibration"}))
    with pytest.raises(ValueError, match="lacks calibration"):
        engine.load_corpus(path)
    # nested parts a damaged save lacks: named, not a bare KeyError (or an IndexError at the first answer)
    model = {k: v for k, v in meta["model"].items() if k != "model_type"}
    documents = [{"text": d["text"]} for d in meta["documents"]]
    calibration = dict(list(meta["calibration"].items())[1:])
    for damaged, says in (({"model": model}, "'model' needs"), ({"documents": documents}, "'documents' needs"),
                          ({"reads": {"kept": []}}, "'reads' needs"), ({"layers": meta["layers"][:-1]}, "'layers' has"),
                          ({"calibration": calibration}, "calibration lacks")):
        (path / storage.META_FILE).write_text(json.dumps({**meta, **damaged}))
        with pytest.raises(ValueError, match=says):
            engine.load_corpus(path)
    (path / storage.META_FILE).write_text(json.dumps(meta))
    layer = path / storage.layer_file(1)
    data = layer.read_bytes()
    layer.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="damaged"):
        engine.load_corpus(path)
    layer.unlink()
    with pytest.raises(FileNotFoundError, match="incomplete"):
        engine.load_corpus(path)
    assert engine.corpora == {}
