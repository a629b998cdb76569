"""Python entry points of the fused W8A8 linear kernels (contract: ``qmamba.ops.int8_linear.w8a8_linear_ref``).

    w8a8_gemm  Triton GEMM (qmamba/kernels/triton/w8a8_gemm.py): prefill, any M; also CPU under TRITON_INTERPRET=1
    w8a8_gemv  CUDA GEMV (csrc/linear/gemv_int8.cu, ``torch.ops.qmamba.w8a8_gemv``): decode, M = 1..8, K % 16 == 0

Both take qx (..., K) int8, a one-element fp32 x_scale, qw (N, K) int8, w_scale (1 or N elements), bias (N,) or None,
the output (activation) dtype, and an optional per-column out_scale (N,) that makes them return int8 codes (the GEMV
also takes one one-element scale per segment of columns, ``out_columns`` their column counts); they return (..., N).
Scales and bias are passed to the kernels as flat fp32 (``fp32_flat``: no op when they already are), and never read
on the host, so decode steps can be captured in CUDA graphs. The Triton GEMM autotunes on the first call
of each (M bucket, N, K): run one warm-up step before capturing a graph that contains it. Arguments are checked in
Python first (``check_w8a8_args`` / ``check_gemv_args``, metadata only: see ``qmamba.kernels.checks``).
"""

from __future__ import annotations

import itertools
import math

import torch

from qmamba.kernels.checks import (INT32_LIMIT, fp32_flat, require_channel_scale, require_cuda, require_int8,
                                   require_numel, require_out_dtype, require_per_tensor_scale, shape_of)

GEMV_MAX_ROWS = 8     # csrc kMaxM: rows (tokens) of one GEMV call
GEMV_K_MULTIPLE = 16  # 16-byte loads of the weight rows
# the int32 accumulator holds K products of at most 128 * 128 (DESIGN §3: split larger reductions)
GEMV_MAX_K = INT32_LIMIT // (128 * 128) - 1


def check_w8a8_args(op: str, qx, x_scale, qw, w_scale, bias=None, out_dtype: torch.dtype = torch.float32,
                    out_scale=None, out_columns=None) -> tuple[int, int, int]:
    """The argument contract shared by the GEMM and the GEMV, on metadata only (CPU tensors work); raises
    TypeError / ValueError naming the fix. Returns (M, N, K), M = prod(qx.shape[:-1])."""
    require_int8(op, "qx", qx, layout="(..., K)")
    require_int8(op, "qw", qw, layout="(N, K)")
    if qw.ndim != 2 or qx.ndim < 1 or qx.shape[-1] != qw.shape[1]:
        raise ValueError(f"{op}: expected qx (..., K) and qw (N, K) (nn.Linear's layout), got {shape_of(qx)} and "
                         f"{shape_of(qw)}")
    N, K = qw.shape
    require_per_tensor_scale(op, "x_scale", x_scale, numbers_ok=False)
    require_channel_scale(op, "w_scale", w_scale, N, "per-output-channel", numbers_ok=False)
    if bias is not None:
        require_numel(op, "bias", bias, N, f"N = {N} elements")
    require_out_dtype(op, out_dtype)
    if out_columns is not None:
        from qmamba.ops.int8_linear import check_out_segments

        check_out_segments(op, out_scale, out_columns, N)
    elif out_scale is not None:
        require_numel(op, "out_scale", out_scale, N, f"one scale per output column, N = {N} elements (repeat a "
                      "per-tensor scale over its columns, or pass one per segment with out_columns)")
    return math.prod(qx.shape[:-1]), N, K


def check_gemv_args(qx, x_scale, qw, w_scale, bias=None, out_dtype: torch.dtype = torch.float32,
                    out_scale=None, out_columns=None) -> tuple[int, int, int]:
    """Everything ``torch.ops.qmamba.w8a8_gemv`` requires (besides contiguity and 16-byte alignment, which
    ``w8a8_gemv`` arranges itself), on metadata only; raises TypeError / ValueError naming the fix. Returns
    (M, N, K)."""
    op = "w8a8_gemv"
    M, N, K = check_w8a8_args(op, qx, x_scale, qw, w_scale, bias, out_dtype, out_scale, out_columns)
    if not 1 <= M <= GEMV_MAX_ROWS:
        raise ValueError(f"{op}: x must have 1..{GEMV_MAX_ROWS} rows (tokens), got {M}; use the GEMM "
                         "(qmamba.kernels.linear.w8a8_gemm) for more")
    if K % GEMV_K_MULTIPLE:
        raise ValueError(f"{op}: K={K} must be a multiple of {GEMV_K_MULTIPLE} (16-byte weight loads); use the GEMM "
                         "(qmamba.kernels.linear.w8a8_gemm) or pad K")
    if K > GEMV_MAX_K:
        raise ValueError(f"{op}: K={K} could overflow the int32 accumulator (needs K <= {GEMV_MAX_K}); split the "
                         "reduction or use backend='torch'")
    if N >= INT32_LIMIT:
        raise ValueError(f"{op}: N={N} output columns are too many for the kernel's indexing; split the weight")
    return M, N, K


def _prep(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
          bias: torch.Tensor | None, out_scale: torch.Tensor | None, row_stride_ok: bool = False):
    """The kernels' layouts: x (M, K) contiguous (``row_stride_ok``: rows at any stride, each contiguous, as the
    GEMM reads them: a column slice of a wider projection goes without a copy), fp32 scales / bias flat and
    contiguous (arguments checked)."""
    N, K = qw.shape
    x2 = qx if qx.dim() == 2 else qx.reshape(math.prod(qx.shape[:-1]), K)  # (M, K), a view where one exists
    if not (x2.is_contiguous() or (row_stride_ok and x2.stride(-1) == 1)):
        x2 = x2.contiguous()
    dev = qx.device
    xs, ws = fp32_flat(x_scale, dev), fp32_flat(w_scale, dev)
    b = None if bias is None else fp32_flat(bias, dev)
    os_ = None if out_scale is None else fp32_flat(out_scale, dev)
    return x2, xs, qw if qw.is_contiguous() else qw.contiguous(), ws, b, os_


def w8a8_gemm(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
              out_scale: torch.Tensor | None = None, split_k: int | None = None,
              config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """Triton GEMM: (..., K) x (N, K) -> (..., N) ``out_dtype`` (int8 with ``out_scale``). ``split_k`` /
    ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) override the defaults (autotuned on CUDA)."""
    check_w8a8_args("w8a8_gemm", qx, x_scale, qw, w_scale, bias, out_dtype, out_scale)
    from qmamba.kernels.triton import w8a8_gemm as tk  # lazy: Triton only when used
    from qmamba.kernels.triton.launch import interpreting

    if not qx.is_cuda and not interpreting():
        raise RuntimeError("w8a8_gemm: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "triton is imported, for CPU tests); use qmamba.ops.w8a8_linear(backend='torch') here")
    lead = qx.shape[:-1]
    x2, xs, w, ws, b, os_ = _prep(qx, x_scale, qw, w_scale, bias, out_scale, row_stride_ok=True)
    out = tk.w8a8_gemm(x2, xs, w, ws, b, out_dtype, os_, split_k=split_k, config=config)  # (M, N)
    return out.reshape(*lead, w.shape[0])


def w8a8_gemv(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
              out_scale: torch.Tensor | None = None, out_columns=None) -> torch.Tensor:
    """CUDA GEMV for 1..8 rows (tokens): (..., K) x (N, K) -> (..., N) ``out_dtype`` (int8 with ``out_scale``:
    (N,) per column, or with ``out_columns`` a list of one-element scales, one per segment of that many columns).
    K must be a multiple of 16 (16-byte weight loads). All tensors on one GPU (scales are not moved)."""
    check_gemv_args(qx, x_scale, qw, w_scale, bias, out_dtype, out_scale, out_columns)
    from qmamba.kernels import load

    load()
    segments = list(out_scale) if out_columns is not None else []
    require_cuda("w8a8_gemv", "qx", qx, x_scale=x_scale, qw=qw, w_scale=w_scale, bias=bias,
                 out_scale=None if out_columns is not None else out_scale,
                 **{f"out_scale[{i}]": s for i, s in enumerate(segments)})
    lead = qx.shape[:-1]
    args = gemv_op_args(qx, x_scale, qw, w_scale, bias, out_scale, out_columns)
    out = torch.ops.qmamba.w8a8_gemv(args[0], args[1], args[2], args[3], args[4], out_dtype, *args[5:])  # (M, N)
    return out.reshape(*lead, qw.shape[0])


def gemv_op_args(qx, x_scale, qw, w_scale, bias, out_scale, out_columns) -> tuple:
    """(x, x_scale, w, w_scale, bias, out_scale, out_bounds) as ``torch.ops.qmamba.w8a8_gemv`` (and the GEMV with
    the conv update fused) take them, from checked arguments: x (M, K) and w contiguous, 16-byte aligned (a view at
    an odd offset gets a fresh copy), scales and bias flat fp32, segment scales and their bounds."""
    x2, xs, w, ws, b, os_ = _prep(qx, x_scale, qw, w_scale, bias, None if out_columns is not None else out_scale)
    if out_columns is not None:
        scales = [s.float().reshape(1) for s in out_scale]
        bounds = [int(c) for c in itertools.accumulate(out_columns)][:-1]
    else:
        scales, bounds = ([] if os_ is None else [os_]), []
    # 16-byte vector loads need 16-byte aligned rows
    if x2.data_ptr() % 16:
        x2 = x2.clone()
    if w.data_ptr() % 16:
        w = w.clone()
    return x2, xs, w, ws, b, scales, bounds
