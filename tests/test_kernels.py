"""The Triton kernels against their torch twins on the CPU, under ``TRITON_INTERPRET=1``.

The interpreter is chosen when a ``@triton.jit`` function is defined, i.e. when the kernel modules are
first imported, and ``sqz_kernels.get_backend`` reads the same variable. Setting it in this process
would leak into every other test module (and would not take effect if one of them imported the kernels
first), so all cases run in one child process (one Triton import) and each case is reported here as
its own test. The cases themselves are in ``kernel_cases.py`` (also used by ``test_kernels_gpu.py``).
"""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

_HERE = Path(__file__).parent
_spec = importlib.util.spec_from_file_location("kernel_cases", _HERE / "kernel_cases.py")
kernel_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_cases)

pytest.importorskip("triton")


@pytest.fixture(scope="module")
def interpreter_results() -> dict[str, dict]:
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run(
        [sys.executable, str(_HERE / "kernel_cases.py")],
        env=env, capture_output=True, text=True, timeout=170,
    )
    results = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            rec = json.loads(line)
            results[rec["case"]] = rec
    if not results:
        pytest.fail(f"the interpreter run reported nothing (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return results


@pytest.mark.parametrize("case", list(kernel_cases.CASES))
def test_kernel_matches_twin(case, interpreter_results):
    rec = interpreter_results.get(case)
    assert rec is not None, f"{case} did not run (the child process stopped before it)"
    assert rec["error"] is None, rec["error"]
