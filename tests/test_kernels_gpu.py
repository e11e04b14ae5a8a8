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


@pytest.mark.parametrize("batch", [1, 3])
def test_decode_chain_pdl_in_cuda_graph(batch):
    """The decode chain (stats -> scores/selection/list -> attention -> combine) with programmatic dependent
    launch, replayed from a CUDA graph, gives bit for bit what it gives with PDL off (eager), and the work
    list equals the twin's. Replayed several times: each replay re-zeroes the look-back flags. (Batch 3 is
    past hardware.PDL_MAX_ROWS: the gate keeps PDL off there; batch 1 uses it.)"""
    from sqz_kernels import hardware
    from sqz_kernels import reference as ref
    from sqz_kernels import triton_ops as tri

    gen = torch.Generator().manual_seed(3)
    kvh, g, d, c, n, tail, m = 8, 4, 128, 1638, 32768, 100, 300
    keys, values, offs, cent, logn = kernel_cases.corpus(kvh, c, n, tail, d, "bfloat16", "cuda", gen)
    q = (torch.randn(batch, kvh * g, 1, d, generator=gen) * 0.5).to(torch.bfloat16).cuda()
    dk = torch.randn(batch, kvh, m, d, generator=gen).to(torch.bfloat16).cuda()
    dv = torch.randn(batch, kvh, m, d, generator=gen).to(torch.bfloat16).cuda()
    scale = d ** -0.5
    thr = kernel_cases._mid_gap_threshold(ref.centroid_scores(q, cent, logn, scale))

    def path():
        _, sel, wl = tri.centroid_selection(q, cent, logn, scale, offs, thr, n)
        return tri.squeezed_attention(q, keys, values, offs, sel, dk, dv, scale, worklist=wl), wl[1]

    saved = hardware.PDL
    try:
        hardware.PDL = False
        want_out, want_cum = path()
        hardware.PDL = True
        print("PDL in use:", hardware.use_pdl(q.device))
        path()
        torch.cuda.synchronize()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            path()
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            got_out, got_cum = path()
        for _ in range(5):
            graph.replay()
        torch.cuda.synchronize()
    finally:
        hardware.PDL = saved
    assert torch.equal(got_cum, want_cum)
    assert torch.equal(got_cum.cpu(), ref.centroid_selection(q, cent, logn, scale, offs, thr, n)[2][1].cpu())
    assert torch.equal(got_out, want_out)
