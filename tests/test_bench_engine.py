"""The end-to-end engine benchmark script on its CPU smoke setting (a tiny random Llama, torch twins)."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_engine_benchmark_cpu_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_engine.py"), "--cpu-smoke"],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rec = json.loads(next(line for line in proc.stdout.splitlines() if line.startswith("{")))
    systems = rec["systems"]
    assert set(systems) == {"squeezed@1", "squeezed@0.25", "squeezed@0.1", "cag (full KV, SDPA)",
                            "cag graph (full KV, static cache)"}
    assert rec["full_budget_tokens_equal_cag"]
    # the static-cache CAG (eager on the CPU) rewinds to the corpus between answers: every answer, not only the
    # first, gives the dynamic-cache CAG's tokens
    assert rec["cag_graph_equal_leading_tokens"] == [4] * len(rec["cag_graph_equal_leading_tokens"])
    assert systems["squeezed@1"]["kept_fraction"] == 1.0
    assert 0 < systems["squeezed@0.1"]["kept_fraction"] < systems["squeezed@0.25"]["kept_fraction"] < 1
    for s in systems.values():
        assert s["ttft_s"] > 0 and s["per_token_ms"] > 0
    assert "| squeezed@0.25 |" in proc.stdout and rec["build_seconds"] > 0
