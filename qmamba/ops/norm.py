"""RMSNorm and gated RMSNorm: references and dispatch to mamba_ssm's Triton kernels.

    rms_norm:        y = x / sqrt(mean(x^2) + eps) * weight                       (over the last dim)
    gated_rms_norm:  norm_before_gate=False (Mamba2's default): y = rms_norm(x * silu(z)) * weight
                     norm_before_gate=True:                      y = rms_norm(x) * weight * silu(z)
                     with the mean taken over groups of ``group_size`` channels (Mamba2 normalizes per B/C group).
Math in fp32; output in x's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmamba.ops.backend import try_import, use_fast_path


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return (y * weight.float()).to(x.dtype)


def gated_rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, z: torch.Tensor | None = None, eps: float = 1e-6,
                       group_size: int | None = None, norm_before_gate: bool = False) -> torch.Tensor:
    xf = x.float()
    gate = F.silu(z.float()) if z is not None else None
    if gate is not None and not norm_before_gate:
        xf = xf * gate
    d = xf.shape[-1]
    gs = group_size or d
    if d % gs:
        raise ValueError(f"gated_rms_norm: group_size {gs} must divide the last dim {d}")
    grouped = xf.reshape(*xf.shape[:-1], d // gs, gs)  # (..., groups, group_size)
    y = (grouped * torch.rsqrt(grouped.pow(2).mean(-1, keepdim=True) + eps)).reshape(xf.shape) * weight.float()
    if gate is not None and norm_before_gate:
        y = y * gate
    return y.to(x.dtype)


def rms_norm(x, weight, eps=1e-5, backend: str = "auto"):
    if use_fast_path(backend, x, "mamba_ssm", "rms_norm"):
        fn = try_import("mamba_ssm.ops.triton.layer_norm").rms_norm_fn
        return fn(x, weight, None, eps=eps)
    return rms_norm_ref(x, weight, eps)


def gated_rms_norm(x, weight, z=None, eps=1e-6, group_size=None, norm_before_gate=False, backend: str = "auto"):
    if use_fast_path(backend, x, "mamba_ssm", "gated_rms_norm"):
        fn = try_import("mamba_ssm.ops.triton.layernorm_gated").rmsnorm_fn
        return fn(x, weight, None, z=z, eps=eps, group_size=group_size, norm_before_gate=norm_before_gate)
    return gated_rms_norm_ref(x, weight, z, eps, group_size, norm_before_gate)
