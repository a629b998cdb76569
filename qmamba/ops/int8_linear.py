"""W8A8 linear layer with the dequant epilogue (and optionally a requant epilogue) fused: reference and dispatch.

    qx: (..., K) int8, x_scale: per-tensor (one element)    qw: (N, K) int8 (nn.Linear layout), w_scale: 1 or (N,)
    acc = sum_k qx[..., k] * qw[n, k]                      int32, exact
    out = acc * (x_scale * w_scale[n]) (+ bias[n])          fp32, scales multiplied first (DESIGN §3)
    y   = out.to(out_dtype)                                 the activation dtype: what QuantLinear returns
    with out_scale (N,):  q = clamp(rint(y.float() * (1 / out_scale[n])), -128, 127)   int8 codes

The requant epilogue takes a per-column scale so one GEMM can emit codes for several consumers (in_proj's columns
feed conv1d's input and the scan's z, each with its own per-tensor scale): pass the scales repeated per column, or
(``out_columns``) one one-element scale per segment of columns and the segments' column counts:

    out_scale = [s_conv_in, s_z], out_columns = [d_inner, d_inner]   the same codes as the per-column scale
                                                                     torch.cat([s_conv_in.expand(d_inner), ...])

(the GEMV reads the segments as they are: no per-column tensor is built at each decode step). Rows M = the product
of the leading dims.

Kernels (``backend`` "cuda" / "auto" on a GPU): M <= ``GEMV_MAX_M`` (one-token decoding) runs the CUDA GEMV
(``torch.ops.qmamba.w8a8_gemv``: memory bound, reads the weight once), larger M the Triton GEMM. Both are
bit-identical to the reference (integer sums, then the same fp32 ops in the same order).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from qmamba.ops.backend import use_kernels
from qmamba.quant.numerics import int8_linear_ref, quantize

# Decode route threshold: rows (tokens) up to this run the GEMV, more the GEMM. The GEMV kernel supports up to 8;
# benchmarks/int8_gemm.py measures where it stops winning.
GEMV_MAX_M = 8

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


MAX_OUT_SEGMENTS = 4  # csrc kMaxSegments


class GemvInputs(NamedTuple):
    """A one-token W8A8 GEMV with segment requant scales, handed to a consumer to run fused with its own op (Mamba1's
    in_proj into the conv1d update: ``qmamba.ops.int8_conv1d.w8a8_gemv_conv1d_update``): ``q`` the input codes
    (M, K) int8, ``scale`` their per-tensor scale, ``weight`` (N, K) int8, ``weight_scale`` 1 or N elements, ``bias``
    (N,) or None, ``out_scale`` one one-element scale per segment of output columns and ``out_columns`` the segments'
    column counts: the arguments of ``w8a8_linear(q, scale, weight, weight_scale, bias, out_dtype, out_scale,
    out_columns=out_columns)``."""

    q: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None
    out_scale: list
    out_columns: list


def _check(qx, x_scale, qw, w_scale, bias, out_dtype, out_scale, out_columns=None) -> None:
    if qx.dtype != torch.int8 or qw.dtype != torch.int8:
        raise TypeError(f"w8a8_linear expects int8 codes, got qx {qx.dtype} and qw {qw.dtype}; quantize() them first")
    if qw.ndim != 2 or qx.ndim < 1 or qx.shape[-1] != qw.shape[1]:
        raise ValueError(f"w8a8_linear: expected qx (..., K) and qw (N, K), got {tuple(qx.shape)} and "
                         f"{tuple(qw.shape)}")
    N = qw.shape[0]
    if not isinstance(x_scale, torch.Tensor) or x_scale.numel() != 1:
        raise ValueError("w8a8_linear: x_scale must be a one-element tensor (a per-tensor activation scale), got "
                         f"{type(x_scale).__name__} {tuple(getattr(x_scale, 'shape', ()))}")
    if w_scale.numel() not in (1, N):
        raise ValueError(f"w8a8_linear: w_scale must be per-tensor (1 element) or per-output-channel ({N},), "
                         f"got shape {tuple(w_scale.shape)}")
    if bias is not None and bias.numel() != N:
        raise ValueError(f"w8a8_linear: bias must have N={N} elements, got shape {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"w8a8_linear: out_dtype must be one of {OUT_DTYPES} (the activation dtype), got "
                         f"{out_dtype}")
    if out_columns is not None:
        check_out_segments("w8a8_linear", out_scale, out_columns, N)
    elif out_scale is not None and (not isinstance(out_scale, torch.Tensor) or out_scale.numel() != N):
        raise ValueError(f"w8a8_linear: out_scale must hold one scale per output column ({N},) — repeat a "
                         f"per-tensor scale over its columns, or pass one scale per segment with out_columns — got "
                         f"{tuple(out_scale.shape) if isinstance(out_scale, torch.Tensor) else type(out_scale)}")


def check_out_segments(op: str, out_scale, out_columns, N: int) -> None:
    """Segment scales: ``out_scale`` a sequence of one-element tensors, ``out_columns`` as many positive column
    counts, summing to N, at most ``MAX_OUT_SEGMENTS``."""
    columns = list(out_columns)
    if not (isinstance(out_scale, (list, tuple)) and all(isinstance(s, torch.Tensor) and s.numel() == 1
                                                         for s in out_scale)):
        raise ValueError(f"{op}: with out_columns, out_scale must be a list of one-element tensors (one scale per "
                         f"segment of columns), got {type(out_scale).__name__}")
    if not (1 <= len(columns) <= MAX_OUT_SEGMENTS and len(columns) == len(out_scale)
            and all(isinstance(c, int) and c > 0 for c in columns) and sum(columns) == N):
        raise ValueError(f"{op}: out_columns must be 1..{MAX_OUT_SEGMENTS} positive column counts, one per "
                         f"out_scale, summing to N={N}; got {columns} for {len(out_scale)} scales")


def out_scale_per_column(out_scale, out_columns, N: int) -> torch.Tensor | None:
    """The per-column requant scale (N,) fp32 of ``out_scale`` (per column already, or per segment of
    ``out_columns``); None without one."""
    if out_scale is None:
        return None
    if out_columns is None:
        return out_scale.float().reshape(N)
    return torch.cat([s.float().reshape(1).expand(c) for s, c in zip(out_scale, out_columns)])


def w8a8_linear_ref(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                    out_scale: torch.Tensor | None = None, out_columns=None) -> torch.Tensor:
    """The torch int8 backend's linear (``int8_linear_ref(...).to(out_dtype)``), then optionally requantized.

    Returns (..., N) ``out_dtype``, or (..., N) int8 codes when ``out_scale`` (N,) (or segment scales with
    ``out_columns``) is given."""
    _check(qx, x_scale, qw, w_scale, bias, out_dtype, out_scale, out_columns)
    N = qw.shape[0]
    sw = w_scale.reshape(-1) if w_scale.numel() > 1 else w_scale.reshape(())
    y = int8_linear_ref(qx, x_scale.reshape(()), qw, sw, None if bias is None else bias.reshape(N)).to(out_dtype)
    if out_scale is None:
        return y  # (..., N)
    return quantize(y, out_scale_per_column(out_scale, out_columns, N))  # (..., N) int8: y * (1 / s), rint, clamp


def w8a8_linear(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
                out_scale: torch.Tensor | None = None, backend: str = "auto", out_columns=None) -> torch.Tensor:
    """``w8a8_linear_ref`` through qmamba's kernels where ``backend`` allows: the CUDA GEMV for at most
    ``GEMV_MAX_M`` rows (K a multiple of 16), else the Triton GEMM. Same contract and result as the reference."""
    if not use_kernels(backend, qx, "w8a8_linear"):
        return w8a8_linear_ref(qx, x_scale, qw, w_scale, bias, out_dtype, out_scale, out_columns)
    _check(qx, x_scale, qw, w_scale, bias, out_dtype, out_scale, out_columns)
    from qmamba.kernels import linear as klinear

    M, K = math.prod(qx.shape[:-1]), qx.shape[-1]
    if 1 <= M <= GEMV_MAX_M and K % 16 == 0:
        return klinear.w8a8_gemv(qx, x_scale, qw, w_scale, bias, out_dtype, out_scale, out_columns)
    return klinear.w8a8_gemm(qx, x_scale, qw, w_scale, bias, out_dtype,
                             out_scale_per_column(out_scale, out_columns, qw.shape[0]))
