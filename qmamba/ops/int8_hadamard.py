"""Fused Hadamard rotation + int8 quantize: the codes of a rotated linear's input (Quamba rotates out_proj's input so
its outlier channels spread before per-tensor quantization). Reference (pure torch) and dispatch to qmamba's CUDA
kernel (csrc/hadamard/hadamard_quantize.cu), which computes the codes in one pass instead of ~40 small torch kernels.

The math is ``quantize(hadamard_transform(x), scale, bits)`` (``qmamba.ops.hadamard``, ``qmamba.quant.numerics``),
op for op, as the int8 ``QuantLinear`` runs it:

    y     = x.float()                                      (..., n), blocks of b = largest power of two dividing n
    y     = butterflies h = 1, 2, ..., b/2:  (y[i], y[i+h]) -> (y[i] + y[i+h], y[i] - y[i+h])     fp32
    v     = y * float(1 / sqrt(b))                         the Python double rounded to an fp32 scalar, as torch does
    codes = clamp(rint(v * (1 / scale)), qmin, qmax)       1 / scale in fp32, rint half to even

x: (..., n) fp32 / fp16 / bf16; scale: per-tensor (a one-element tensor of any shape, or a number); returns int8 codes
of x's shape. The kernel is bit-identical to the reference (the same separately rounded fp32 ops in the same order);
it rotates blocks of up to ``qmamba.kernels.hadamard.MAX_BLOCK`` (8192) elements — wider power-of-two blocks run the
reference with ``backend="auto"`` and are an error with ``backend="cuda"``.
"""

from __future__ import annotations

import numbers

import torch

from qmamba.ops.backend import use_kernels
from qmamba.ops.hadamard import hadamard_block, hadamard_transform
from qmamba.quant.numerics import qrange, quantize

MAX_KERNEL_BLOCK = 8192  # = qmamba.kernels.hadamard.MAX_BLOCK (not imported: kernels load lazily)


def _check(x, scale, bits, op: str = "hadamard_quantize") -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"{op}: x must be a float tensor (..., n), got "
                        f"{x.dtype if isinstance(x, torch.Tensor) else type(x).__name__}")
    if x.ndim < 1 or x.shape[-1] < 1:
        raise ValueError(f"{op}: x must be (..., n) with n >= 1, got shape {tuple(x.shape)}")
    qrange(bits)  # ValueError unless an int in 2..8
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{op}: scale must be per-tensor (one element: the linear input's scale), got shape "
                             f"{tuple(scale.shape)}")
    elif not isinstance(scale, numbers.Real) or isinstance(scale, bool):
        raise TypeError(f"{op}: scale must be a one-element tensor or a number, got {type(scale).__name__}")


def hadamard_quantize_ref(x: torch.Tensor, scale: torch.Tensor | float, bits: int = 8) -> torch.Tensor:
    """``quantize(hadamard_transform(x), scale, bits)``: x (..., n) -> int8 codes (..., n)."""
    _check(x, scale, bits)
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(())  # per-tensor: the same values as any broadcast shape of it
    return quantize(hadamard_transform(x), scale, bits)


def hadamard_quantize(x: torch.Tensor, scale: torch.Tensor | float, bits: int = 8,
                      backend: str = "auto") -> torch.Tensor:
    """``hadamard_quantize_ref`` or qmamba's CUDA kernel (one thread group per row block), by ``backend``; the same
    codes either way. On a GPU, ``"auto"`` runs the reference only where the kernel does not apply (Hadamard blocks
    wider than 8192)."""
    if use_kernels(backend, x, "hadamard_quantize"):
        _check(x, scale, bits)
        if backend == "cuda" or hadamard_block(x.shape[-1]) <= MAX_KERNEL_BLOCK:
            from qmamba.kernels import hadamard as kernel

            return kernel.hadamard_quantize(x, scale, bits)
    return hadamard_quantize_ref(x, scale, bits)
