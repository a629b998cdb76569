"""Mamba2's gated RMSNorm with its gate z given as int8 codes (int8 mode: in_proj emits z's codes, or z's
quantization point made them): reference and dispatch to qmamba's Triton kernel.

    z = dequantize(q_z, s_z).to(z_dtype)                     what the float path hands the norm (QuantPoint.roundtrip)
    y = gated_rms_norm_ref(x, weight, z, eps, group_size, norm_before_gate)

x (..., d) float, q_z (..., d) int8, s_z one element (z's per-tensor scale), weight (d,); y (..., d) in x's dtype.
Kernel (``backend`` "cuda" / "auto" on a GPU): ``qmamba.kernels.triton.gated_norm``, one launch instead of the
dequantize's elementwise ops and the norm's kernel; z is bit for bit the reference's, the norm a float reduction
in another order (agreement within float tolerance, tests/gpu/test_gpu_kernel_gated_norm.py).

``gated_rms_norm_hadamard_quantize`` also makes out_proj's input in the same op (Mamba2 in int8 mode, one norm
group): ``hadamard_quantize_ref(y, out_scale)`` of the norm's output y, the codes out_proj's rotated int8 GEMM
reads; one Triton kernel on a GPU instead of the norm's and the rotate + quantize kernel.
"""

from __future__ import annotations

import torch

from qmamba.ops.backend import use_triton
from qmamba.ops.int8_hadamard import hadamard_quantize_ref
from qmamba.ops.norm import gated_rms_norm_ref
from qmamba.quant.numerics import dequantize

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check(x, weight, qz, z_scale, z_dtype, group_size) -> None:
    op = "gated_rms_norm_from_codes"
    if not isinstance(x, torch.Tensor) or x.dtype not in FLOAT_DTYPES or x.ndim < 1:
        raise TypeError(f"{op}: x must be a float32 / float16 / bfloat16 tensor (..., d), got "
                        f"{getattr(x, 'dtype', type(x).__name__)}")
    if not isinstance(qz, torch.Tensor) or qz.dtype != torch.int8 or qz.shape != x.shape:
        raise TypeError(f"{op}: qz must be the gate's int8 codes of x's shape {tuple(x.shape)}, got "
                        f"{getattr(qz, 'dtype', type(qz).__name__)} {tuple(getattr(qz, 'shape', ()))}")
    d = x.shape[-1]
    if weight.shape != (d,):
        raise ValueError(f"{op}: weight must be ({d},), got {tuple(weight.shape)}")
    if not isinstance(z_scale, torch.Tensor) or z_scale.numel() != 1:
        raise ValueError(f"{op}: z_scale must be a one-element tensor (z's per-tensor scale), got "
                         f"{tuple(z_scale.shape) if isinstance(z_scale, torch.Tensor) else z_scale!r}")
    if z_dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: z_dtype must be the activation dtype (float32 / float16 / bfloat16), got {z_dtype}")
    gs = group_size or d
    if d % gs:
        raise ValueError(f"{op}: group_size {gs} must divide the last dim {d}")


def gated_rms_norm_from_codes_ref(x: torch.Tensor, weight: torch.Tensor, qz: torch.Tensor, z_scale: torch.Tensor,
                                  z_dtype: torch.dtype, eps: float = 1e-6, group_size: int | None = None,
                                  norm_before_gate: bool = False) -> torch.Tensor:
    """The float path's ops: z dequantized to ``z_dtype``, then ``gated_rms_norm_ref``."""
    _check(x, weight, qz, z_scale, z_dtype, group_size)
    z = dequantize(qz, z_scale).to(z_dtype)
    return gated_rms_norm_ref(x, weight, z, eps, group_size, norm_before_gate)


def _kernel_problem(x, weight, qz, z_scale, group_size):
    """Why the Triton kernel cannot take this call (None when it can): one device, a group in registers."""
    from qmamba.kernels.triton.gated_norm import MAX_GROUP

    if not (weight.device == qz.device == z_scale.device == x.device):
        return "its tensors are not all on x's device"
    if (group_size or x.shape[-1]) > MAX_GROUP:
        return f"a group of {group_size or x.shape[-1]} channels exceeds the kernel's {MAX_GROUP}"
    return None


def gated_rms_norm_from_codes(x: torch.Tensor, weight: torch.Tensor, qz: torch.Tensor, z_scale: torch.Tensor,
                              z_dtype: torch.dtype, eps: float = 1e-6, group_size: int | None = None,
                              norm_before_gate: bool = False, backend: str = "auto") -> torch.Tensor:
    """``gated_rms_norm_from_codes_ref``, through the Triton kernel where ``backend`` allows (inputs on a GPU)."""
    if use_triton(backend, x, "gated_rms_norm_from_codes",
                  lambda: _kernel_problem(x, weight, qz, z_scale, group_size)):
        _check(x, weight, qz, z_scale, z_dtype, group_size)
        from qmamba.kernels.triton.gated_norm import gated_rms_norm_from_codes as kernel

        return kernel(x, weight, qz, z_scale.reshape(()), z_dtype, eps, group_size, norm_before_gate)
    return gated_rms_norm_from_codes_ref(x, weight, qz, z_scale, z_dtype, eps, group_size, norm_before_gate)


def gated_rms_norm_hadamard_quantize_ref(x: torch.Tensor, weight: torch.Tensor, qz: torch.Tensor,
                                         z_scale: torch.Tensor, z_dtype: torch.dtype, eps: float,
                                         norm_before_gate: bool, out_scale: torch.Tensor) -> torch.Tensor:
    """The unfused ops: the gated norm over the whole row (one group), then out_proj's rotate + quantize."""
    y = gated_rms_norm_from_codes_ref(x, weight, qz, z_scale, z_dtype, eps, None, norm_before_gate)
    return hadamard_quantize_ref(y, out_scale, 8)


def gated_rms_norm_hadamard_quantize(x: torch.Tensor, weight: torch.Tensor, qz: torch.Tensor, z_scale: torch.Tensor,
                                     z_dtype: torch.dtype, eps: float, norm_before_gate: bool,
                                     out_scale: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """``gated_rms_norm_hadamard_quantize_ref``, through the Triton kernel where ``backend`` allows (inputs on a
    GPU): int8 codes of x's shape in ``out_scale``."""
    if use_triton(backend, x, "gated_rms_norm_hadamard_quantize",
                  lambda: _kernel_problem(x, weight, qz, z_scale, None)):
        _check(x, weight, qz, z_scale, z_dtype, None)
        from qmamba.kernels.triton.gated_norm import gated_rms_norm_hadamard_quantize as kernel

        return kernel(x, weight, qz, z_scale.reshape(()), z_dtype, eps, norm_before_gate, out_scale.reshape(()))
    return gated_rms_norm_hadamard_quantize_ref(x, weight, qz, z_scale, z_dtype, eps, norm_before_gate, out_scale)
