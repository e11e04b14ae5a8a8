"""What the launchers need to know about the device: its multiprocessor count (for split-K sizing), TMA (tensor
descriptors) and programmatic dependent launch."""
from __future__ import annotations

import functools
import os

import torch

try:  # host-side tensor descriptors (Triton >= 3.3): whole tiles by TMA (prefill attention, decode lookup)
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - older Triton
    TensorDescriptor = None

# Under TRITON_INTERPRET=1 (CPU tensors) every program runs one after the other in Python: a small
# pretend SM count keeps the grids, and so the test run, short.
_INTERPRETER_SMS = 4


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _index(device: torch.device) -> int:
    return device.index if device.index is not None else torch.cuda.current_device()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant for the CPU interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _cuda_sms(_index(device))


@functools.lru_cache(maxsize=None)
def _hopper_index(index: int) -> bool:
    return torch.cuda.get_device_capability(index)[0] >= 9


def is_hopper(device: torch.device) -> bool:
    """A CUDA device of compute capability 9 or later (TMA, programmatic dependent launch)."""
    return device.type == "cuda" and _hopper_index(_index(device))


def is_interpreter(device: torch.device) -> bool:
    return device.type != "cuda"


def tma_tiles(device: torch.device, head_dim: int, interpreter: bool = False) -> bool:
    """Whole ``(rows, head_dim)`` tiles can be read through tensor descriptors here: a Triton that has them, a
    Hopper+ GPU (or, with ``interpreter``, the CPU interpreter, which runs them too), and head_dim <= 128, the
    only rows the descriptor paths were measured and tested with."""
    if TensorDescriptor is None or head_dim > 128:
        return False
    return is_hopper(device) or (interpreter and is_interpreter(device))


# Programmatic dependent launch (Hopper+) in the decode chain (stats -> scores/selection/list -> attention ->
# combine): each kernel after the first is launched with ``launch_pdl=True`` and waits (``gdc_wait``) before
# it reads anything the kernel before it wrote, so its launch and set-up overlap the previous kernel's tail,
# in CUDA graphs too. Never under the interpreter (CPU tensors) or before compute capability 9, and only
# where the installed Triton has the launch option and the gdc calls. SQZ_NO_PDL=1 turns it off (A/B
# timings: the benchmark's --pdl-ab flips ``PDL``).
PDL = os.environ.get("SQZ_NO_PDL") != "1"


@functools.lru_cache(maxsize=None)
def _pdl_supported(index: int) -> bool:
    if os.environ.get("TRITON_INTERPRET") == "1" or not _hopper_index(index):
        return False
    try:
        import triton.language as tl
        from triton.backends.nvidia.compiler import CUDAOptions

        cuda = getattr(getattr(tl, "extra", None), "cuda", None)
        return (hasattr(cuda, "gdc_wait") and hasattr(cuda, "gdc_launch_dependents")
                and "launch_pdl" in getattr(CUDAOptions, "__dataclass_fields__", {}))
    except Exception:
        return False


def use_pdl(device: torch.device) -> bool:
    """True where the decode chain launches its dependent kernels with programmatic dependent launch."""
    if not PDL or device.type != "cuda":
        return False
    return _pdl_supported(_index(device))


# Where it is used: decode with at most 8 (batch row, KV head) rows. Measured on the H200 (whole decode path,
# CUDA graph, off -> on, ms, two alternated runs; kernels_notes.md 2026-11-29 08:45): batch 1 32K 0.0276 /
# 0.0276 -> 0.0256 / 0.0257, 128K 0.0476 / 0.0472 -> 0.0451 / 0.0452 (faster); batch 1 512K 0.1026 / 0.1020
# -> 0.1032 / 0.1029, batch 8 32K 0.0644 / 0.0648 -> 0.0682 / 0.0684, 128K 0.1578 / 0.1575 -> 0.1587 / 0.1588
# (slower), 512K batch 8 equal. Past 160K keys the attention is launched plainly: launched with PDL there its
# early programs (128 KB of shared memory each) slowed the lookup's scores pass still running; the lookup's
# two passes and the split merge keep PDL at any size (512K batch 1, 10:10-10:13: lookup with PDL 0.1011 /
# 0.1011 / 0.1007 / 0.1005 against 0.1022 / 0.1026 / 0.1022 / 0.1022 without; the merge without PDL 0.1028 /
# 0.1026). Letting the lookup's dependents launch only at each program's end was no better (0.1021 / 0.1020).
PDL_MAX_ROWS = 8
PDL_MAX_KEYS = 163840


def pdl_launch(on: bool) -> dict:
    """Launch keyword arguments: ``launch_pdl=True`` when on, nothing at all otherwise (the interpreter
    never sees the option)."""
    return {"launch_pdl": True} if on else {}
