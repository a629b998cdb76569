"""Triton gated RMSNorm that reads its gate as int8 codes: Mamba2's output norm in int8 mode, one kernel where the
float path takes three elementwise ops to dequantize z and then mamba_ssm's norm kernel.

    z  = fp32(cast(q_z * s_z, z_dtype))          the dequantized gate, rounded to the activation dtype first
    g  = silu(z)                                 (``qmamba.qnn``'s ``_deq`` then ``gated_rms_norm_ref``'s z.float())
    norm_before_gate=False:  v = x * g;  y = v * rsqrt(mean_group(v^2) + eps) * w
    norm_before_gate=True:   y = x * rsqrt(mean_group(x^2) + eps) * w * g
    out = cast(y, x.dtype)

Contract and torch twin: ``qmamba.ops.int8_norm.gated_rms_norm_from_codes_ref``. A float op: it agrees with the
twin within float tolerance (the sum of squares in another order), not bit for bit. One program per (row, group);
rows are x's leading dims, read at a row stride (z's codes are a column slice of in_proj's output). CPU tests run it
under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qmamba.kernels.triton.launch import on_device_of

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
MAX_GROUP = 16384  # one group's channels held in registers


@triton.jit
def _gated_norm_codes_kernel(x_ptr, qz_ptr, zs_ptr, w_ptr, y_ptr, gs, n_groups, x_rs, z_rs, y_rs, eps,
                             Z_DTYPE: tl.constexpr, NORM_BEFORE_GATE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    grp = tl.program_id(1)
    cols = grp * gs + tl.arange(0, BLOCK)
    mask = tl.arange(0, BLOCK) < gs
    x = tl.load(x_ptr + row * x_rs + cols, mask=mask, other=0.0).to(tl.float32)
    q = tl.load(qz_ptr + row * z_rs + cols, mask=mask, other=0).to(tl.float32)
    z = (q * tl.load(zs_ptr)).to(Z_DTYPE).to(tl.float32)
    g = z * tl.sigmoid(z)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    v = x if NORM_BEFORE_GATE else x * g
    r = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / gs + eps)
    y = v * r * w
    if NORM_BEFORE_GATE:
        y = y * g
    tl.store(y_ptr + row * y_rs + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def gated_rms_norm_from_codes(x: torch.Tensor, weight: torch.Tensor, qz: torch.Tensor, z_scale: torch.Tensor,
                              z_dtype: torch.dtype, eps: float, group_size: int | None,
                              norm_before_gate: bool) -> torch.Tensor:
    """x (..., d) float, qz (..., d) int8 codes of the gate in the one-element ``z_scale`` (any row stride; the last
    dim contiguous), weight (d,) -> (..., d) in x's dtype (see the top of this file). Arguments are checked by the
    caller (``qmamba.ops.int8_norm``)."""
    d = x.shape[-1]
    gs = group_size or d
    x2, q2 = x.reshape(-1, d), qz.reshape(-1, d)  # views for x's rows and in_proj's column slice
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    if q2.stride(-1) != 1:
        q2 = q2.contiguous()
    rows = x2.shape[0]
    y = torch.empty((rows, d), dtype=x.dtype, device=x.device)
    if rows == 0 or d == 0:
        return y.reshape(x.shape)
    zs = z_scale if z_scale.dtype == torch.float32 else z_scale.float()
    block = triton.next_power_of_2(gs)
    with on_device_of(x):
        _gated_norm_codes_kernel[(rows, d // gs)](
            x2, q2, zs, weight, y, gs, d // gs, x2.stride(0), q2.stride(0), y.stride(0), float(eps),
            Z_DTYPE=_TORCH_TO_TL[z_dtype], NORM_BEFORE_GATE=bool(norm_before_gate), BLOCK=block,
            num_warps=max(1, min(16, block // 256)))
    return y.reshape(x.shape)
