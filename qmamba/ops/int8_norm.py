"""Fused residual add + RMSNorm + int8 quantize: the pre-norm of each residual block, whose output only feeds the
int8 in_proj. Reference (pure torch) and dispatch to qmamba's CUDA kernel.

The math is ``qmamba.models.lm.Block.forward`` up to the mixer, ``qmamba.ops.norm.rms_norm_ref`` and the int8
``QuantLinear`` quantizing its input (DESIGN §3), op for op:

    residual = hidden if residual is None else hidden + residual     torch type promotion (fp16 + fp32 -> fp32)
    residual = residual.float()                                      if residual_in_fp32
    x        = residual.to(norm_dtype)                               norm_dtype = weight.dtype
    y        = (x.float() * rsqrt(mean(x.float() ** 2, -1) + eps)) * weight.float()
    y        = y.to(norm_dtype)
    codes    = clamp(rint(y.float() * (1 / in_scale)), -128, 127)

hidden (..., d) and residual (..., d) (fp32 / fp16 / bf16) are flattened to T = prod(...) rows; returns
(codes int8 (T, d), residual_out (T, d)), residual_out in fp32 if residual_in_fp32 else the promoted dtype of the
add. The mean is a float reduction whose summation order the kernel does not share with torch, so kernel codes may
differ from these by 1 LSB, rarely (DESIGN §3 allows it); residual_out is exact.
"""

from __future__ import annotations

import torch

from qmamba.ops.backend import use_kernels
from qmamba.ops.norm import rms_norm_ref
from qmamba.quant.numerics import quantize


def _check(hidden, residual, weight, in_scale, op: str) -> int:
    if not hidden.is_floating_point() or hidden.ndim < 1:
        raise TypeError(f"{op}: hidden must be a float tensor (..., d), got {hidden.dtype} {tuple(hidden.shape)}")
    d = hidden.shape[-1]
    if residual is not None and residual.shape != hidden.shape:
        raise ValueError(f"{op}: residual must have hidden's shape {tuple(hidden.shape)}, got {tuple(residual.shape)}")
    if weight.ndim != 1 or weight.shape[0] != d:
        raise ValueError(f"{op}: weight must be ({d},) (the norm weight over hidden's last dim), got "
                         f"{tuple(weight.shape)}")
    if not isinstance(in_scale, torch.Tensor) or in_scale.numel() != 1:
        raise ValueError(f"{op}: in_scale must be a one-element tensor (in_proj's per-tensor input scale), got "
                         f"{tuple(in_scale.shape) if isinstance(in_scale, torch.Tensor) else in_scale!r}")
    return d


def add_rmsnorm_quant_ref(hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float,
                          in_scale: torch.Tensor, residual_in_fp32: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes int8 (T, d), residual_out (T, d)) of ``hidden`` (..., d) and ``residual`` (..., d) or None."""
    d = _check(hidden, residual, weight, in_scale, "add_rmsnorm_quant")
    residual = hidden if residual is None else hidden + residual
    if residual_in_fp32:
        residual = residual.float()
    y = rms_norm_ref(residual.to(weight.dtype), weight, eps)  # (..., d) in the norm's dtype
    codes = quantize(y, in_scale.float().reshape(()))
    return codes.reshape(-1, d), residual.reshape(-1, d)


def add_rmsnorm_quant(hidden, residual, weight, eps: float, in_scale, residual_in_fp32: bool,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rmsnorm_quant_ref`` or qmamba's CUDA kernel (one block per row), by ``backend``."""
    if use_kernels(backend, hidden, "add_rmsnorm_quant"):
        from qmamba.kernels import norm as kernel

        return kernel.add_rmsnorm_quant(hidden, residual, weight, eps, in_scale, residual_in_fp32)
    return add_rmsnorm_quant_ref(hidden, residual, weight, eps, in_scale, residual_in_fp32)
