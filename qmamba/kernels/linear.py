"""Python entry points of the fused W8A8 linear kernels (contract: ``qmamba.ops.int8_linear.w8a8_linear_ref``).

    w8a8_gemm  Triton GEMM (qmamba/kernels/triton/w8a8_gemm.py): prefill, any M; also CPU under TRITON_INTERPRET=1
    w8a8_gemv  CUDA GEMV (csrc/linear/gemv_int8.cu, ``torch.ops.qmamba.w8a8_gemv``): decode, M = 1..8, K % 16 == 0

Both take qx (..., K) int8, a one-element fp32 x_scale, qw (N, K) int8, w_scale (1 or N elements), bias (N,) or None,
the output (activation) dtype, and an optional per-column out_scale (N,) that makes them return int8 codes; they
return (..., N). Scales and bias are passed to the kernels as fp32 (``.float()`` is free when they already are), and
never read on the host, so decode steps can be captured in CUDA graphs. The Triton GEMM autotunes on the first call
of each (M bucket, N, K): run one warm-up step before capturing a graph that contains it.
"""

from __future__ import annotations

import math

import torch


def _prep(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
          bias: torch.Tensor | None, out_scale: torch.Tensor | None):
    if qx.dtype != torch.int8 or qw.dtype != torch.int8:
        raise TypeError(f"w8a8 kernels take int8 codes, got qx {qx.dtype} and qw {qw.dtype}")
    if qw.ndim != 2 or qx.shape[-1] != qw.shape[1]:
        raise ValueError(f"w8a8 kernels: expected qx (..., K) and qw (N, K), got {tuple(qx.shape)} and "
                         f"{tuple(qw.shape)}")
    N, K = qw.shape
    x2 = qx.reshape(math.prod(qx.shape[:-1]), K).contiguous()  # (M, K)
    xs = x_scale.float().reshape(1)
    ws = w_scale.float().reshape(-1).contiguous()
    b = None if bias is None else bias.float().reshape(N).contiguous()
    os_ = None if out_scale is None else out_scale.float().reshape(N).contiguous()
    return x2, xs, qw.contiguous(), ws, b, os_


def w8a8_gemm(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
              out_scale: torch.Tensor | None = None, split_k: int | None = None,
              config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """Triton GEMM: (..., K) x (N, K) -> (..., N) ``out_dtype`` (int8 with ``out_scale``). ``split_k`` /
    ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) override the defaults (autotuned on CUDA)."""
    from qmamba.kernels.triton import w8a8_gemm as tk  # lazy: Triton only when used

    if not qx.is_cuda and not tk.interpreting():
        raise RuntimeError("w8a8_gemm: the Triton kernel needs CUDA tensors (or TRITON_INTERPRET=1 set before "
                           "triton is imported, for CPU tests); use qmamba.ops.w8a8_linear(backend='torch') here")
    lead = qx.shape[:-1]
    x2, xs, w, ws, b, os_ = _prep(qx, x_scale, qw, w_scale, bias, out_scale)
    out = tk.w8a8_gemm(x2, xs, w, ws, b, out_dtype, os_, split_k=split_k, config=config)  # (M, N)
    return out.reshape(*lead, w.shape[0])


def w8a8_gemv(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
              out_scale: torch.Tensor | None = None) -> torch.Tensor:
    """CUDA GEMV for 1..8 rows (tokens): (..., K) x (N, K) -> (..., N) ``out_dtype`` (int8 with ``out_scale``).
    K must be a multiple of 16 (16-byte weight loads)."""
    from qmamba.kernels import load

    load()
    lead = qx.shape[:-1]
    x2, xs, w, ws, b, os_ = _prep(qx, x_scale, qw, w_scale, bias, out_scale)
    # 16-byte vector loads need 16-byte aligned rows: a view at an odd offset gets a fresh copy
    if x2.data_ptr() % 16:
        x2 = x2.clone()
    if w.data_ptr() % 16:
        w = w.clone()
    out = torch.ops.qmamba.w8a8_gemv(x2, xs, w, ws, b, out_dtype, os_)  # (M, N)
    return out.reshape(*lead, w.shape[0])
