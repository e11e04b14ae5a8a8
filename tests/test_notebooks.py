"""The example notebooks: committed with their outputs, in sync with their generator, and
executed headless (nbclient) on the embedded model."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
sys.path.insert(0, str(EXAMPLES))
import build_notebooks  # noqa: E402

NAMES = sorted(build_notebooks.NOTEBOOKS)


def test_three_notebooks_are_committed():
    assert NAMES == sorted(p.name for p in EXAMPLES.glob("*.ipynb"))
    assert len(NAMES) == 3


@pytest.mark.parametrize("name", NAMES)
def test_committed_with_outputs_and_in_sync_with_generator(name):
    committed = nbformat.read(EXAMPLES / name, as_version=4)
    generated = build_notebooks.build(name)
    assert [(c.cell_type, c.source) for c in committed.cells] == [(c.cell_type, c.source) for c in generated.cells], (
        f"{name} differs from examples/build_notebooks.py: run `python examples/build_notebooks.py --execute {name}`"
    )
    code_cells = [c for c in committed.cells if c.cell_type == "code"]
    assert all(c.execution_count for c in code_cells), f"{name} is committed without its outputs"
    assert [c.execution_count for c in code_cells] == list(range(1, len(code_cells) + 1))
    assert not [o for c in code_cells for o in c.outputs if o.output_type == "error"]
    assert any(c.outputs for c in code_cells)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_executes_headless(name):
    nb = build_notebooks.build(name)
    start = time.perf_counter()
    build_notebooks.execute(nb, timeout=600)  # raises CellExecutionError on any failing cell
    seconds = time.perf_counter() - start
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    if "comparison" in name or "squeezed_vs" in name:
        assert any("image/png" in o.get("data", {}) for o in outputs), "the latency/accuracy plot is missing"
    print(f"{name}: {seconds:.0f} s")
