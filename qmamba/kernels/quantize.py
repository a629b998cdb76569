"""Python entry point of the fused int8 quantize CUDA kernel (csrc/quantize/quantize_int8.cu): the codes of a float
activation, per-tensor or per-channel along one axis, in one launch (torch takes ~5). First checks in Python
everything the op requires (``check_quantize_int8_args``, metadata only: see ``qmamba.kernels.checks``), then calls
``qmamba.kernels.load()`` and puts the scale in the op's form (a contiguous fp32 vector on x's device). Contract and
torch twin: ``qmamba.ops.int8_quantize``.
"""

from __future__ import annotations

import numbers

import torch

from qmamba.kernels.build import load
from qmamba.kernels.checks import describe, require_cuda, require_float_dtype, require_tensor, shape_of

OP = "quantize_int8"


def check_quantize_int8_args(x, scale, axis, bits, any_float: bool = False) -> int | None:
    """Everything ``torch.ops.qmamba.quantize_int8`` requires of its arguments, checked on metadata only (CPU and meta
    tensors work; never a value read); raises TypeError / ValueError naming the fix. ``any_float``: x may have any
    float dtype (the reference), else fp32 / fp16 / bf16 (the kernel). Returns the channel axis in 0..x.ndim-1 for a
    per-channel scale, None for a per-tensor one (one element: ``axis`` is then ignored)."""
    require_tensor(OP, "x", x, "a float tensor")
    if any_float:
        if not x.is_floating_point():
            raise TypeError(f"{OP}: x must be a float tensor (the activation to quantize), got {x.dtype}")
    else:
        require_float_dtype(OP, "x", x, "; convert it, or use backend='torch'")
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"{OP}: bits must be an int in 2..8 (codes are stored as int8), got {bits!r}")
    if isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        return None
    require_tensor(OP, "scale", scale, "a one-element (per-tensor) or (C,) (per-channel) float tensor")
    if not scale.is_floating_point():
        raise TypeError(f"{OP}: scale must be a float tensor (fp32 scales), got {scale.dtype}")
    if scale.numel() == 1:
        return None
    if not isinstance(axis, int) or isinstance(axis, bool):
        raise TypeError(f"{OP}: axis must be an int (the channel axis of a per-channel scale), got {describe(axis)}")
    if not -x.ndim <= axis < x.ndim:
        raise ValueError(f"{OP}: axis={axis} is out of range for x of shape {shape_of(x)}; a per-channel scale "
                         "needs the channel axis of x")
    a = axis % x.ndim
    if scale.numel() != x.shape[a]:
        raise ValueError(f"{OP}: scale must have 1 (per-tensor) or x.shape[{axis}] = {x.shape[a]} (per-channel) "
                         f"elements, got shape {shape_of(scale)}; pass the channel axis the scale belongs to")
    return a


def quantize_int8(x: torch.Tensor, scale, axis: int = -1, bits: int = 8) -> torch.Tensor:
    """x (...) fp32 / fp16 / bf16 on a GPU, any strides -> int8 codes of x's shape, contiguous:
    ``clamp(rint(float(x) * (1 / scale)), -(2**(bits-1)), 2**(bits-1) - 1)``, bit-identical to
    ``qmamba.quant.numerics.quantize``. scale: one element (per-tensor; ``axis`` ignored) or x.shape[axis] elements
    of any shape (per-channel along ``axis``), any float dtype (cast to fp32 as ``.float()`` does), moved to x's
    device (free when it is already an fp32 tensor there; a Python number or a CPU scale costs a copy, which a CUDA
    graph cannot capture). No host sync: capturable in a CUDA graph."""
    a = check_quantize_int8_args(x, scale, axis, bits)
    load()
    require_cuda(OP, "x", x)
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    scale = scale.to(device=x.device, dtype=torch.float32).reshape(-1).contiguous()  # (1,) or (C,)
    return torch.ops.qmamba.quantize_int8(x, scale, 0 if a is None else a, bits)
