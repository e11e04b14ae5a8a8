"""What the launchers need to know about the device: its multiprocessor count (for split-K sizing)."""
from __future__ import annotations

import functools

import torch

# Under TRITON_INTERPRET=1 (CPU tensors) every program runs one after the other in Python: a small
# pretend SM count keeps the grids, and so the test run, short.
_INTERPRETER_SMS = 4


@functools.lru_cache(maxsize=None)
def _cuda_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (a small constant for the CPU interpreter)."""
    if device.type != "cuda":
        return _INTERPRETER_SMS
    return _cuda_sms(device.index if device.index is not None else torch.cuda.current_device())


def is_interpreter(device: torch.device) -> bool:
    return device.type != "cuda"
