"""Python entry point of the fused residual add + RMSNorm + int8 quantize CUDA kernel
(csrc/norm/add_rmsnorm_quant.cu). Calls ``qmamba.kernels.load()`` and normalizes its arguments (the input scale to
a one-element fp32 tensor on hidden's device). Contract and torch twin: ``qmamba.ops.int8_norm``.
"""

from __future__ import annotations

import torch

from qmamba.kernels.build import load
from qmamba.kernels.conv1d import per_tensor_scale


def add_rmsnorm_quant(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                      in_scale, residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """hidden (..., d), residual (..., d) or None -> (codes int8 (T, d), residual_out (T, d)), T = prod(...);
    residual_out in fp32 if residual_in_fp32, else the dtype of hidden + residual. d <= 8192."""
    load()
    codes, residual_out = torch.ops.qmamba.add_rmsnorm_quant(
        hidden, residual, weight, float(eps), per_tensor_scale(in_scale, hidden.device, "in_scale"),
        bool(residual_in_fp32))
    return codes, residual_out
