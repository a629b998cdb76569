"""Python entry point of the fused residual add + RMSNorm + int8 quantize CUDA kernel
(csrc/norm/add_rmsnorm_quant.cu). First checks in Python everything the op requires (``check_add_rmsnorm_quant_args``,
metadata only: see ``qmamba.kernels.checks``), then calls ``qmamba.kernels.load()`` and normalizes its arguments
(the input scale to a one-element fp32 tensor on hidden's device). Contract and torch twin: ``qmamba.ops.int8_norm``.
"""

from __future__ import annotations

import math

import torch

from qmamba.kernels.build import load
from qmamba.kernels.checks import (INT32_LIMIT, require_cuda, require_float_dtype, require_per_tensor_scale,
                                   require_tensor, shape_of)
from qmamba.kernels.conv1d import per_tensor_scale

MAX_D = 8192  # csrc kMaxD: 8 elements per thread x 1024 threads, one block per row


def check_add_rmsnorm_quant_args(hidden, residual, weight, in_scale) -> int:
    """Everything ``torch.ops.qmamba.add_rmsnorm_quant`` requires of its arguments, checked on metadata only (CPU
    tensors work); raises TypeError / ValueError naming the fix. Returns d (the normalized row length)."""
    op = "add_rmsnorm_quant"
    require_tensor(op, "hidden", hidden, "a float tensor (..., d)")
    require_float_dtype(op, "hidden", hidden)
    if hidden.ndim < 1:
        raise ValueError(f"{op}: hidden must be (..., d), got a 0-dim tensor")
    d = hidden.shape[-1]
    if not 1 <= d <= MAX_D:
        raise ValueError(f"{op}: the kernel normalizes rows of 1..{MAX_D} elements, got d = {d}; use "
                         "backend='torch' (qmamba.ops.int8_norm)")
    require_tensor(op, "weight", weight, f"a ({d},) tensor (the norm weight)")
    if weight.ndim != 1 or weight.shape[0] != d:
        raise ValueError(f"{op}: weight must be a ({d},) tensor (the norm weight over hidden's last dim), got "
                         f"{shape_of(weight)}")
    require_float_dtype(op, "weight", weight, " (the norm's dtype)")
    require_per_tensor_scale(op, "in_scale", in_scale)
    if residual is not None:
        require_tensor(op, "residual", residual, "None or a tensor of hidden's shape")
        if residual.shape != hidden.shape:
            raise ValueError(f"{op}: residual must have hidden's shape {shape_of(hidden)}, got {shape_of(residual)}")
        if residual.dtype not in (hidden.dtype, torch.float32):
            raise TypeError(f"{op}: residual must have hidden's dtype ({hidden.dtype}) or float32, got "
                            f"{residual.dtype}; convert it")
    rows = math.prod(hidden.shape[:-1])
    if rows >= INT32_LIMIT:
        raise ValueError(f"{op}: {rows} rows exceed the kernel's grid limit; split the batch")
    return d


def add_rmsnorm_quant(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      in_scale, residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (..., d), residual (..., d) or None -> (codes int8 (T, d), residual_out (T, d)), T = prod(...);
    residual_out in fp32 if residual_in_fp32, else the dtype of hidden + residual. d <= 8192. hidden, residual and
    weight must be on one GPU; in_scale is moved there (a one-element fp32 CUDA tensor costs nothing)."""
    check_add_rmsnorm_quant_args(hidden, residual, weight, in_scale)
    load()
    require_cuda("add_rmsnorm_quant", "hidden", hidden, residual=residual, weight=weight)
    codes, residual_out = torch.ops.qmamba.add_rmsnorm_quant(
        hidden, residual, weight, float(eps), per_tensor_scale(in_scale, hidden.device, "in_scale"),
        bool(residual_in_fp32))
    return codes, residual_out
