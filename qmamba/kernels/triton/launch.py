"""What every Triton kernel launcher of qmamba shares: whether Triton interprets, and on which device it launches.

    interpreting()     True under ``TRITON_INTERPRET=1`` (CPU tensors, tests): launchers pick small blocks
    on_device_of(x)    the launch context for x's GPU: Triton launches on the *current* device, which need not be
                       x's (a model on cuda:1 in a process whose current device is cuda:0); nothing for CPU tensors
"""

from __future__ import annotations

import contextlib

import torch
import triton


def interpreting() -> bool:
    """True when Triton runs kernels in its Python interpreter (``TRITON_INTERPRET=1``, read by Triton)."""
    return bool(triton.knobs.runtime.interpret)


def on_device_of(x: torch.Tensor):
    """Launch context for a Triton kernel on x's GPU (see the top of this file)."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
