"""Python entry points of the int8 causal conv1d CUDA kernels (csrc/conv1d/conv1d_int8.cu): prefill and the
one-token update. Each calls ``qmamba.kernels.load()`` and normalizes its arguments for the op (scales to fp32
tensors on x's device, the weight to (D, K) int8, the bias to fp32). Contract and torch twin:
``qmamba.ops.int8_conv1d``. Prefill outputs are channel-last: (B, D, L) tensors with strides (L * D, 1, D).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qmamba.kernels.build import load


def per_tensor_scale(scale, device: torch.device, name: str) -> torch.Tensor:
    """A one-element fp32 tensor on ``device`` (no copy when it already is one; never a host read)."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    if scale.numel() != 1:
        raise ValueError(f"{name} must be a per-tensor scale (one element), got shape {tuple(scale.shape)}")
    return scale.to(device=device, dtype=torch.float32).reshape(1)


def channel_scale(scale, channels: int, device: torch.device, name: str) -> torch.Tensor:
    """A per-tensor (1,) or per-channel (channels,) contiguous fp32 scale on ``device``."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    if scale.numel() not in (1, channels):
        raise ValueError(f"{name} must have 1 (per-tensor) or {channels} (per-channel) elements, got shape "
                         f"{tuple(scale.shape)}")
    return scale.to(device=device, dtype=torch.float32).reshape(-1).contiguous()


def _weight_and_bias(qw: torch.Tensor, bias: torch.Tensor | None, channels: int, device: torch.device):
    if qw.shape[0] != channels:
        raise ValueError(f"conv1d_int8: qw must be (D, K) or (D, 1, K) with D = {channels}, got {tuple(qw.shape)}")
    qw = qw.to(device).reshape(channels, -1).contiguous()  # (D, K)
    if bias is not None:
        bias = bias.to(device=device, dtype=torch.float32).reshape(-1).contiguous()  # (D,)
    return qw, bias


def _scales(out_scales: Sequence, device: torch.device) -> list[torch.Tensor]:
    return [per_tensor_scale(s, device, f"out_scales[{i}]") for i, s in enumerate(out_scales)]


def conv1d_int8(qx: torch.Tensor, x_scale, qw: torch.Tensor, w_scale, bias: torch.Tensor | None = None,
                silu: bool = True, out_dtype: torch.dtype = torch.float32, out_scales: Sequence = ()):
    """qx (B, D, L) int8, any strides -> (B, D, L) channel-last in ``out_dtype`` when ``out_scales`` is empty, else
    a list of int8 codes (B, D, L) channel-last, one per out_scale."""
    load()
    if qx.ndim != 3:
        raise ValueError(f"conv1d_int8: qx must be (B, D, L) int8 codes, got shape {tuple(qx.shape)}")
    dev, D = qx.device, qx.shape[1]
    qw, bias = _weight_and_bias(qw, bias, D, dev)
    outs = torch.ops.qmamba.conv1d_int8(qx, per_tensor_scale(x_scale, dev, "x_scale"), qw,
                                        channel_scale(w_scale, D, dev, "w_scale"), bias, bool(silu), out_dtype,
                                        _scales(out_scales, dev))
    return list(outs) if out_scales else outs[0]


def conv1d_int8_update(qx: torch.Tensor, conv_state: torch.Tensor, x_scale, qw: torch.Tensor, w_scale,
                       bias: torch.Tensor | None = None, silu: bool = True, out_dtype: torch.dtype = torch.float32,
                       out_scales: Sequence = ()):
    """qx (B, D) int8, conv_state (B, D, K) int8 (updated in place) -> (B, D) in ``out_dtype``, or a list of int8
    codes (B, D), one per out_scale."""
    load()
    if qx.ndim != 2:
        raise ValueError(f"conv1d_int8_update: qx must be (B, D) int8 codes, got shape {tuple(qx.shape)}")
    dev, D = qx.device, qx.shape[1]
    qw, bias = _weight_and_bias(qw, bias, D, dev)
    outs = torch.ops.qmamba.conv1d_int8_update(qx, conv_state, per_tensor_scale(x_scale, dev, "x_scale"), qw,
                                               channel_scale(w_scale, D, dev, "w_scale"), bias, bool(silu),
                                               out_dtype, _scales(out_scales, dev))
    return list(outs) if out_scales else outs[0]
