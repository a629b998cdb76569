"""Triton gated RMSNorm that reads its gate as int8 codes: Mamba2's output norm in int8 mode, one kernel where the
float path takes three elementwise ops to dequantize z and then mamba_ssm's norm kernel.

    z  = fp32(cast(q_z * s_z, z_dtype))          the dequantized gate, rounded to the activation dtype first
    g  = silu(z)                                 (``qmamba.qnn``'s ``_deq`` then ``gated_rms_norm_ref``'s z.float())
    norm_before_gate=False:  v = x * g;  y = v * rsqrt(mean_group(v^2) + eps) * w
    norm_before_gate=True:   y = x * rsqrt(mean_group(x^2) + eps) * w * g
    out = cast(y, x.dtype)

Contract and torch twin: ``qmamba.ops.int8_gated_norm.gated_rms_norm_from_codes_ref``. A float op: it agrees with the
twin within float tolerance (the sum of squares in another order), not bit for bit. One program per (row, group);
rows are x's leading dims, read at a row stride (z's codes are a column slice of in_proj's output). CPU tests run it
under ``TRITON_INTERPRET=1``.

``gated_rms_norm_hadamard_quantize`` goes on to out_proj's input in the same program (one group: the row): the
norm's output rounded to x's dtype (what the unfused path stores), its block-diagonal Walsh-Hadamard transform in
the reference's stage order (``kernels/triton/hadamard._butterfly``, then * fp32(1 / sqrt(b))), and its int8 codes
in out_proj's input scale (``_quantize_codes``: IEEE reciprocal, rint, clamp): ``hadamard_quantize`` of the norm's
output, bit for bit, given the same norm output. Twin: ``gated_rms_norm_hadamard_quantize_ref``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qmamba.kernels.triton.hadamard import _butterfly
from qmamba.kernels.triton.launch import on_device_of
from qmamba.kernels.triton.ssd_int8 import _quantize_codes
from qmamba.kernels.triton.w8a8_gemm import _TORCH_TO_TL

MAX_GROUP = 16384  # one group's channels held in registers


@triton.jit
def _gated_norm(x_ptr, qz_ptr, zs_ptr, w_ptr, row, cols, mask, n, x_rs, z_rs, eps, Z_DTYPE: tl.constexpr,
                NORM_BEFORE_GATE: tl.constexpr):
    """The gated norm of one row's (or group's) ``cols`` (``n`` of them, ``mask`` the valid ones), fp32."""
    x = tl.load(x_ptr + row * x_rs + cols, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(qz_ptr + row * z_rs + cols, mask=mask, other=0).to(tl.float32)
    z = (q * tl.load(zs_ptr)).to(Z_DTYPE).to(tl.float32)
    g = z * tl.sigmoid(z)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    v = x if NORM_BEFORE_GATE else x * g
    r = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / n + eps)
    y = v * r * w
    if NORM_BEFORE_GATE:
        y = y * g
    return y


@triton.jit
def _gated_norm_codes_kernel(x_ptr, qz_ptr, zs_ptr, w_ptr, y_ptr, gs, x_rs, z_rs, y_rs, eps,
                             Z_DTYPE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * gs + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < gs
    y = _gated_norm(x_ptr, qz_ptr, zs_ptr, w_ptr, row, cols, mask, gs, x_rs, z_rs, eps, Z_DTYPE, NORM_BEFORE_GATE)
    tl.store(y_ptr + row * y_rs + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(x: torch.Tensor, qz: torch.Tensor, z_scale: torch.Tensor):
    """(x, qz) as (rows, d) views with contiguous rows (any row stride: z's codes may be a column slice of
    in_proj's output), and z's scale as fp32."""
    d = x.shape[-1]
    x2, q2 = x.reshape(-1, d), qz.reshape(-1, d)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if q2.stride(-1) != 1:
        q2 = q2.contiguous()
    return x2, q2, z_scale if z_scale.dtype == torch.float32 else z_scale.float()


def _num_warps(block: int) -> int:
    return max(1, min(16, block // 256))


def gated_rms_norm_from_codes(x: torch.Tensor, weight: torch.Tensor, qz: torch.Tensor, z_scale: torch.Tensor,
                              z_dtype: torch.dtype, eps: float, group_size: int | None,
                              norm_before_gate: bool) -> torch.Tensor:
    """x (..., d) float, qz (..., d) int8 codes of the gate in the one-element ``z_scale`` (any row stride; the last
    dim contiguous), weight (d,) -> (..., d) in x's dtype (see the top of this file). Arguments are checked by the
    caller (``qmamba.ops.int8_gated_norm``)."""
    d = x.shape[-1]
    gs = group_size or d
    x2, q2, zs = _rows(x, qz, z_scale)
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if y.numel() == 0:
        return y.reshape(x.shape)
    block = triton.next_power_of_2(gs)
    with on_device_of(x):
        _gated_norm_codes_kernel[(x2.shape[0], d // gs)](
            x2, q2, zs, weight, y, gs, x2.stride(0), q2.stride(0), y.stride(0), float(eps),
            Z_DTYPE=_TORCH_TO_TL[z_dtype], NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK=block,
            num_warps=_num_warps(block), enable_fp_fusion=False)  # as the fused kernel below
    return y.reshape(x.shape)


@triton.jit
def _gated_norm_hadamard_quant_kernel(x_ptr, qz_ptr, zs_ptr, w_ptr, os_ptr, q_ptr, d, x_rs, z_rs, q_rs, eps, had_scale,
                                      Z_DTYPE: tl.constexpr, Y_DTYPE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr,
                                      BLOCK: tl.constexpr, HB: tl.constexpr, LOG_HB: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < d
    y = _gated_norm(x_ptr, qz_ptr, zs_ptr, w_ptr, row, cols, mask, d, x_rs, z_rs, eps, Z_DTYPE, NORM_BEFORE_GATE)
    y = tl.where(mask, y.to(Y_DTYPE).to(tl.float32), 0.0)  # the norm's output as the unfused path stores it
    h = tl.reshape(y, (BLOCK // HB, HB))
    for i in tl.static_range(LOG_HB):
        h = _butterfly(h, BLOCK // HB, HB, 1 << i)
    h = tl.reshape(h * had_scale, (BLOCK,))
    codes = _quantize_codes(h, tl.load(os_ptr)).to(tl.int8)
    tl.store(q_ptr + row * q_rs + cols, codes, mask=mask)


def gated_rms_norm_hadamard_quantize(x: torch.Tensor, weight: torch.Tensor, qz: torch.Tensor, z_scale: torch.Tensor,
                                     z_dtype: torch.dtype, eps: float, norm_before_gate: bool,
                                     out_scale: torch.Tensor) -> torch.Tensor:
    """``gated_rms_norm_from_codes`` over the whole row (one group), then out_proj's rotated input codes: (..., d)
    int8 in the one-element ``out_scale`` (see the top of this file). Arguments are checked by the caller."""
    import math

    from qmamba.ops.hadamard import hadamard_block

    d = x.shape[-1]
    x2, q2, zs = _rows(x, qz, z_scale)
    codes = torch.empty(x2.shape, dtype=torch.int8, device=x.device)
    if codes.numel() == 0:
        return codes.reshape(x.shape)
    hb = hadamard_block(d)
    block = max(triton.next_power_of_2(d), hb)
    os_ = out_scale if out_scale.dtype == torch.float32 else out_scale.float()
    with on_device_of(x):
        # no FMA contraction: the transform's adds and the scale's multiply round as the reference's
        _gated_norm_hadamard_quant_kernel[(x2.shape[0],)](
            x2, q2, zs, weight, os_, codes, d, x2.stride(0), q2.stride(0), codes.stride(0), float(eps),
            1.0 / math.sqrt(hb), Z_DTYPE=_TORCH_TO_TL[z_dtype], Y_DTYPE=_TORCH_TO_TL[x.dtype],
            NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK=block, HB=hb, LOG_HB=hb.bit_length() - 1,
            num_warps=_num_warps(block), enable_fp_fusion=False)
    return codes.reshape(x.shape)
