"""Choosing between the pure-torch reference of an op and its CUDA fast path.

Every op takes ``backend``: ``"torch"`` (the reference, any device), ``"cuda"`` (the fast path; an error naming the fix
when it cannot load) or ``"auto"`` (the fast path when the inputs are on a GPU and it imports, else the reference).
Fast-path packages are imported lazily, on first use, so ``import qmamba`` never needs them.
"""

from __future__ import annotations

import functools
import importlib

import torch

BACKENDS = ("auto", "torch", "cuda")

# package that provides each fast path, and how a user gets it
_INSTALL_HINT = {
    "mamba_ssm": 'pip install "qmamba[cuda]" (mamba-ssm needs a CUDA GPU and nvcc to build)',
    "causal_conv1d": 'pip install "qmamba[cuda]" (causal-conv1d needs a CUDA GPU and nvcc to build)',
}


@functools.lru_cache(maxsize=None)
def try_import(module: str):
    """The module, or None when it cannot be imported here (CPU machine, missing package, broken build)."""
    try:
        return importlib.import_module(module)
    except Exception:  # a broken CUDA build raises OSError / ImportError / RuntimeError alike
        return None


def validate_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    return backend


def use_fast_path(backend: str, tensor: torch.Tensor, module: str, op: str) -> bool:
    """True when ``op`` should run its fast path from ``module`` for inputs like ``tensor``."""
    validate_backend(backend)
    if backend == "torch":
        return False
    available = tensor.is_cuda and try_import(module) is not None
    if backend == "cuda" and not available:
        why = "its inputs are not on a CUDA device" if not tensor.is_cuda else f"`import {module}` fails"
        raise RuntimeError(f"{op}: backend='cuda' was asked for but {why}. "
                           f"Install the fast path with {_INSTALL_HINT[module]}, or use backend='torch'.")
    return available


def use_kernels(backend: str, tensor: torch.Tensor, op: str) -> bool:
    """True when ``op`` should run qmamba's own kernel (``qmamba.kernels``: csrc/ CUDA or Triton) for inputs like
    ``tensor``. ``"cuda"`` where the kernels cannot load raises one error saying why; ``"auto"`` falls back to the
    torch reference only where there is nothing to run them on (CPU tensors). On a GPU, ``"auto"`` builds the kernels
    and a failed build is an error, never a silent fallback."""
    validate_backend(backend)
    if backend == "torch":
        return False
    if not tensor.is_cuda:
        if backend == "cuda":
            raise RuntimeError(f"{op}: backend='cuda' was asked for but its inputs are not on a CUDA device; "
                               "move the model to a GPU or use backend='torch'")
        return False
    from qmamba import kernels  # lazy: never at import qmamba

    kernels.load()
    return True


def use_triton(backend: str, tensor: torch.Tensor, op: str, problem=None) -> bool:
    """True when ``op`` should run its Triton kernel (no build: ``triton`` ships with CUDA torch) for inputs like
    ``tensor``. "torch": never; "auto": when the inputs are on a GPU, triton imports and ``problem()`` (an optional
    callable: why this call's arguments do not fit the kernel, or None) finds nothing, else the torch reference;
    "cuda": the kernel, or one error naming the reason."""
    if backend not in BACKENDS:
        raise ValueError(f"{op}: backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return False
    if not tensor.is_cuda:
        why = "its inputs are not on a CUDA device"
    elif try_import("triton") is None:
        why = "`import triton` fails"
    else:
        why = problem() if problem is not None else None
    if why is not None and backend == "cuda":
        raise RuntimeError(f"{op}: backend='cuda' was asked for but {why}; use backend='torch' or 'auto'")
    return why is None
