"""Python entry point of the fused Hadamard rotation + int8 quantize CUDA kernel (csrc/hadamard/hadamard_quantize.cu),
``torch.ops.qmamba.hadamard_quantize(Tensor x, Tensor scale, int bits) -> Tensor``.

``check_hadamard_quantize_args`` checks in Python everything the op requires (metadata only, no host sync: see
``qmamba.kernels.checks``), so a bad argument never reaches a C++ ``TORCH_CHECK``; then ``hadamard_quantize`` calls
``qmamba.kernels.load()``, flattens x to rows (M, n) with a contiguous last dim (a copy only where a view cannot do
that) and moves the scale to a one-element fp32 tensor on x's device. Contract and torch twin:
``qmamba.ops.int8_hadamard``.
"""

from __future__ import annotations

import math

import torch

from qmamba.kernels.build import load
from qmamba.kernels.checks import (INT32_LIMIT, require_cuda, require_float_dtype, require_per_tensor_scale,
                                   require_tensor)
from qmamba.kernels.conv1d import per_tensor_scale

MAX_BLOCK = 8192  # csrc kMaxBlock: the largest Hadamard block (power of two dividing n) the kernel rotates


def check_hadamard_quantize_args(x, scale, bits) -> tuple[int, int]:
    """Everything ``torch.ops.qmamba.hadamard_quantize`` requires, on metadata only (CPU and meta tensors work);
    raises TypeError / ValueError naming the fix. Returns (n, b): the row width and its Hadamard block."""
    op = "hadamard_quantize"
    require_tensor(op, "x", x, "a float tensor (..., n)")
    require_float_dtype(op, "x", x)
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must be (..., n) with n >= 1, got shape {tuple(x.shape)}")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"{op}: bits must be an int in 2..8 (codes are stored as int8), got {bits!r}")
    require_per_tensor_scale(op, "scale", scale)
    n = x.shape[-1]
    b = n & -n  # qmamba.ops.hadamard.hadamard_block: the largest power of two dividing n
    if b > MAX_BLOCK:
        raise ValueError(f"{op}: the kernel rotates Hadamard blocks of up to {MAX_BLOCK} elements, but n = {n} has "
                         f"blocks of {b} (the largest power of two dividing n); use backend='torch' "
                         "(qmamba.ops.int8_hadamard)")
    blocks = math.prod(x.shape[:-1]) * (n // b)
    if blocks >= INT32_LIMIT:
        raise ValueError(f"{op}: {blocks} Hadamard blocks exceed the kernel's grid limit; split the batch")
    return n, b


def hadamard_quantize(x: torch.Tensor, scale, bits: int = 8) -> torch.Tensor:
    """int8 codes of ``hadamard_transform(x)`` in ``scale``: x (..., n) fp32 / fp16 / bf16 on a GPU -> (..., n) int8.

    Bit-identical to ``qmamba.ops.int8_hadamard.hadamard_quantize_ref``. ``scale``: a one-element tensor (best an
    fp32 tensor already on x's device: anything else is copied, which a CUDA graph cannot capture) or a number."""
    n, _ = check_hadamard_quantize_args(x, scale, bits)
    load()
    require_cuda("hadamard_quantize", "x", x)
    rows = x.reshape(-1, n)  # (M, n): a view where the leading dims merge
    if n > 1 and rows.stride(1) != 1:
        rows = rows.contiguous()
    codes = torch.ops.qmamba.hadamard_quantize(rows, per_tensor_scale(scale, x.device, "scale"), int(bits))
    return codes.reshape(x.shape)  # (..., n)
