"""The Triton kernels against their torch twins on a CUDA GPU, in bf16 and fp16, at the small shapes
of the CPU tests and at Llama-3-8B attention shapes (32 query heads, 8 KV heads, head_dim 128)."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

if not torch.cuda.is_available():
    pytest.skip("needs a CUDA device", allow_module_level=True)
if __import__("os").environ.get("TRITON_INTERPRET") == "1":
    pytest.skip("TRITON_INTERPRET=1 is set: these tests need compiled kernels", allow_module_level=True)

_spec = importlib.util.spec_from_file_location("kernel_cases", Path(__file__).parent / "kernel_cases.py")
kernel_cases = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kernel_cases)

_FLOAT_CASES = [n for n, p in kernel_cases.CASES.items() if "dtype" in p]
_OTHER_CASES = [n for n, p in kernel_cases.CASES.items() if "dtype" not in p]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", _FLOAT_CASES)
def test_small_cases_on_gpu(case, dtype):
    msg = kernel_cases.run_case(case, device="cuda", dtype=dtype)
    assert msg is None, msg


@pytest.mark.parametrize("case", _OTHER_CASES)
def test_dtype_free_cases_on_gpu(case):
    msg = kernel_cases.run_case(case, device="cuda")
    assert msg is None, msg


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("case", list(kernel_cases.GPU_CASES))
def test_real_shapes(case, dtype):
    msg = kernel_cases.run_case(case, device="cuda", dtype=dtype)
    assert msg is None, msg
