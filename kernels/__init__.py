"""Squeezed-attention kernels, imported as ``sqz_kernels`` (never as ``kernels``: that name is a
Hugging Face package on PyPI which transformers probes for).

``reference`` holds the pure-torch twins; ``triton_ops`` holds the Triton launchers with the same
signatures. :func:`get_backend` picks one.
"""
from __future__ import annotations

from types import ModuleType

from . import reference

BACKENDS = ("auto", "triton", "torch")


def triton_available() -> bool:
    """True when Triton imports and a CUDA device is present (the interpreter mode counts too)."""
    import os

    try:
        import triton  # noqa: F401
    except Exception:
        return False
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True
    import torch

    return torch.cuda.is_available()


def get_backend(name: str, device_type: str) -> ModuleType:
    """The module whose functions run the online path: ``reference`` (torch) or ``triton_ops``.

    ``auto`` takes Triton for CUDA tensors when it is available and the torch twins otherwise.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown backend {name!r}; choose one of {BACKENDS}")
    if name == "torch" or (name == "auto" and (device_type != "cuda" or not triton_available())):
        return reference
    try:
        from . import triton_ops
    except ImportError as exc:  # the Triton kernels are optional on CPU machines
        if name == "triton":
            raise ImportError(f"backend='triton' needs the Triton kernels: {exc}") from exc
        return reference
    return triton_ops
