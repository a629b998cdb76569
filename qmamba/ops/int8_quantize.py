"""int8 quantization of an activation, per-tensor or per-channel along one axis: reference and dispatch.

    x: (...) float, scale: one element (per-tensor) or C = x.shape[axis] elements (per-channel along ``axis``)
    codes = clamp(rint(x.float() * (1 / scale.float())), qmin, qmax)     qmin, qmax = -(2**(bits-1)), 2**(bits-1) - 1

exactly ``qmamba.quant.numerics.quantize`` (DESIGN §3: the reciprocal in fp32, the product rounded to fp32, round half
to even), which the reference calls with the scale shaped to broadcast (C at ``axis``, 1 elsewhere). The torch int8
backend of ``qmamba.qnn`` quantizes every activation this way (``QuantPoint.quantize``).

Kernel (``backend`` "cuda" / "auto" on a GPU): ``torch.ops.qmamba.quantize_int8``, one launch instead of torch's ~5,
bit-identical to the reference (the same fp32 ops); its output is always contiguous, where the reference's follows
x's memory layout (same values).
"""

from __future__ import annotations

import torch

from qmamba.kernels.quantize import check_quantize_int8_args
from qmamba.ops.backend import use_kernels
from qmamba.quant.numerics import quantize


def quantize_int8_ref(x: torch.Tensor, scale: torch.Tensor | float, axis: int = -1, bits: int = 8) -> torch.Tensor:
    """x (...) any float dtype -> int8 codes of x's shape: ``numerics.quantize(x, scale shaped to broadcast, bits)``.

    scale: a Python number or a one-element tensor (per-tensor; ``axis`` ignored), or a tensor of x.shape[axis]
    elements, e.g. (C,) (per-channel along ``axis``)."""
    a = check_quantize_int8_args(x, scale, axis, bits, any_float=True)
    if isinstance(scale, torch.Tensor):
        if a is None:
            scale = scale.reshape(())
        else:
            shape = [1] * x.ndim
            shape[a] = x.shape[a]
            scale = scale.reshape(shape)
    return quantize(x, scale, bits)


def quantize_int8(x: torch.Tensor, scale: torch.Tensor | float, axis: int = -1, bits: int = 8,
                  backend: str = "auto") -> torch.Tensor:
    """``quantize_int8_ref`` or qmamba's CUDA kernel (``qmamba.kernels.quantize``), by ``backend``; same codes."""
    if use_kernels(backend, x, "quantize_int8"):
        from qmamba.kernels import quantize as kernel

        return kernel.quantize_int8(x, scale, axis, bits)
    return quantize_int8_ref(x, scale, axis, bits)
