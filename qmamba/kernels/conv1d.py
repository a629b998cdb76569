"""Python entry points of the int8 causal conv1d CUDA kernels (csrc/conv1d/conv1d_int8.cu): prefill and the
one-token update. Each first checks in Python everything the op requires (``check_conv1d_args`` /
``check_conv1d_update_args``, metadata only: see ``qmamba.kernels.checks``), then calls ``qmamba.kernels.load()``
and normalizes its arguments for the op (scales to fp32 tensors on x's device, the weight to (D, K) int8, the bias
to fp32). Contract and torch twin: ``qmamba.ops.int8_conv1d``. Prefill outputs are channel-last: (B, D, L) tensors
with strides (L * D, 1, D). ``w8a8_gemv_conv_update``: in_proj's W8A8 GEMV with the update fused into its epilogue
(csrc/linear/gemv_int8.cu).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from qmamba.kernels.build import load
from qmamba.kernels.checks import (INT32_LIMIT, fp32_flat, require_channel_scale, require_cuda, require_int8,
                                   require_numel, require_out_dtype, require_per_tensor_scale, shape_of)
from qmamba.ops.int8_linear import GemvInputs
from qmamba.quant.dual_scale import check_out_duals

MAX_TAPS = 4      # csrc kMaxTaps: d_conv of every Mamba model
MAX_OUTS = 4      # csrc kMaxOuts: int8 consumers of one conv output
MAX_BATCH = 65535  # the prefill grid's z dimension


def per_tensor_scale(scale, device: torch.device, name: str) -> torch.Tensor:
    """A one-element fp32 tensor on ``device`` (no copy when it already is one; never a host read)."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    if scale.numel() != 1:
        raise ValueError(f"{name} must be a per-tensor scale (one element), got shape {tuple(scale.shape)}")
    return fp32_flat(scale, device)


def channel_scale(scale, channels: int, device: torch.device, name: str) -> torch.Tensor:
    """A per-tensor (1,) or per-channel (channels,) contiguous fp32 scale on ``device``."""
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale))
    if scale.numel() not in (1, channels):
        raise ValueError(f"{name} must have 1 (per-tensor) or {channels} (per-channel) elements, got shape "
                         f"{tuple(scale.shape)}")
    return fp32_flat(scale, device)


def _weight_and_bias(qw: torch.Tensor, bias: torch.Tensor | None, channels: int, device: torch.device):
    qw = qw.to(device).reshape(channels, -1).contiguous()  # (D, K)
    if bias is not None:
        bias = fp32_flat(bias, device)  # (D,)
    return qw, bias


def _scales(out_scales: Sequence, device: torch.device) -> list[torch.Tensor]:
    return [per_tensor_scale(s, device, f"out_scales[{i}]") for i, s in enumerate(out_scales)]


def _dual_op_args(duals: list, device: torch.device) -> tuple:
    """(dual_index, dual_encoding, dual_knee, dual_outlier_scale) as the op takes them."""
    for j, d in enumerate(duals):
        if d is not None:
            return j, d.encoding_id, d.knee, per_tensor_scale(d.outlier_scale, device, f"out_duals[{j}].outlier_scale")
    return -1, 0, 0, None


def _split(outs: list, n: int, duals: list):
    """The op's results -> codes (a list), or (codes, masks) when the call has out_duals."""
    codes = list(outs[:n])
    if not duals:
        return codes
    masks = [None] * n
    for j, d in enumerate(duals):
        if d is not None and d.encoding == "mask":
            masks[j] = outs[n]
    return codes, masks


def _check_common(op: str, D: int, x_scale, qw, w_scale, bias, out_dtype, out_scales) -> int:
    """The checks of csrc's ``check_args`` that the wrappers' conversions do not make hold anyway; returns K."""
    require_int8(op, "qw", qw, layout="(D, K) or (D, 1, K)", fix="quantize the conv weight first")
    if qw.ndim not in (2, 3) or qw.shape[0] != D or (qw.ndim == 3 and qw.shape[1] != 1):
        raise ValueError(f"{op}: qw must be (D, K) or (D, 1, K) with D = {D} channels of qx, got {shape_of(qw)}")
    K = qw.shape[-1]
    if K < 1:
        raise ValueError(f"{op}: the conv needs at least one tap, got K = {K} (qw {shape_of(qw)})")
    if K > MAX_TAPS:
        raise ValueError(f"{op}: the kernel supports 1 <= K <= {MAX_TAPS} taps (d_conv), got K = {K}; use "
                         "backend='torch' (qmamba.ops.int8_conv1d) for longer convolutions")
    require_per_tensor_scale(op, "x_scale", x_scale)
    require_channel_scale(op, "w_scale", w_scale, D)
    if bias is not None:
        require_numel(op, "bias", bias, D, f"D = {D} elements")
    require_out_dtype(op, out_dtype)
    if len(out_scales) > MAX_OUTS:
        raise ValueError(f"{op}: at most {MAX_OUTS} out_scales (int8 consumers) per call, got {len(out_scales)}; "
                         "split the consumers over two calls")
    for i, s in enumerate(out_scales):
        require_per_tensor_scale(op, f"out_scales[{i}]", s)
    return K


def check_conv1d_args(qx, x_scale, qw, w_scale, bias=None, out_dtype: torch.dtype = torch.float32,
                      out_scales: Sequence = (), out_duals: Sequence = ()) -> int:
    """Everything ``torch.ops.qmamba.conv1d_int8`` requires of its arguments, checked on metadata only (CPU
    tensors work); raises TypeError / ValueError naming the fix. Returns K (taps)."""
    op = "conv1d_int8"
    require_int8(op, "qx", qx, 3, "(B, D, L)", fix="quantize the conv input first")
    B, D, L = qx.shape
    K = _check_common(op, D, x_scale, qw, w_scale, bias, out_dtype, out_scales)
    check_out_duals(op, out_duals, out_scales)
    if B > MAX_BATCH:
        raise ValueError(f"{op}: batch {B} exceeds the kernel's grid limit of {MAX_BATCH}; split the batch")
    if D * L >= INT32_LIMIT:
        raise ValueError(f"{op}: D * L = {D * L} is too large for the kernel's int32 indexing; split the sequence")
    return K


def check_conv1d_update_args(qx, conv_state, x_scale, qw, w_scale, bias=None,
                             out_dtype: torch.dtype = torch.float32, out_scales: Sequence = (),
                             out_duals: Sequence = ()) -> int:
    """Everything ``torch.ops.qmamba.conv1d_int8_update`` requires of its arguments, checked on metadata only (CPU
    tensors work); raises TypeError / ValueError naming the fix. Returns K (taps)."""
    op = "conv1d_int8_update"
    require_int8(op, "qx", qx, 2, "(B, D) (one token)", fix="quantize the conv input first")
    B, D = qx.shape
    K = _check_common(op, D, x_scale, qw, w_scale, bias, out_dtype, out_scales)
    check_out_duals(op, out_duals, out_scales)
    _check_conv_state(op, conv_state, B, D, K, "B")
    return K


def _check_conv_state(op: str, conv_state, rows: int, D: int, K: int, rows_name: str) -> None:
    """conv_state must be int8 codes (rows, D, K), within the kernel's int32 indexing."""
    fix = "build it with qmamba.ops.int8_conv1d.conv1d_int8_initial_state"
    require_int8(op, "conv_state", conv_state, fix=fix)
    if shape_of(conv_state) != (rows, D, K):
        raise ValueError(f"{op}: conv_state must be int8 codes ({rows_name}, D, K) = {(rows, D, K)}, got "
                         f"{shape_of(conv_state)}; {fix}")
    if rows * D >= INT32_LIMIT:
        raise ValueError(f"{op}: {rows_name} * D = {rows * D} is too large for the kernel's int32 indexing; split the "
                         "batch")


def conv1d_int8(qx: torch.Tensor, x_scale, qw: torch.Tensor, w_scale, bias: torch.Tensor | None = None,
                silu: bool = True, out_dtype: torch.dtype = torch.float32, out_scales: Sequence = (),
                out_duals: Sequence = ()):
    """qx (B, D, L) int8, any strides -> (B, D, L) channel-last in ``out_dtype`` when ``out_scales`` is empty, else
    a list of int8 codes (B, D, L) channel-last, one per out_scale; with ``out_duals`` (codes, masks), the dual-scale
    output's mask (B, D, ceil(L / 8)) uint8 channel-last (the others None)."""
    out_scales = list(out_scales)
    check_conv1d_args(qx, x_scale, qw, w_scale, bias, out_dtype, out_scales, out_duals)
    duals = list(out_duals or ())
    load()
    require_cuda("conv1d_int8", "qx", qx)  # the other tensors are moved to qx's device below
    dev, D = qx.device, qx.shape[1]
    qw, bias = _weight_and_bias(qw, bias, D, dev)
    outs = torch.ops.qmamba.conv1d_int8(qx, per_tensor_scale(x_scale, dev, "x_scale"), qw,
                                        channel_scale(w_scale, D, dev, "w_scale"), bias, bool(silu), out_dtype,
                                        _scales(out_scales, dev), *_dual_op_args(duals, dev))
    return _split(outs, len(out_scales), duals) if out_scales else outs[0]


def conv1d_int8_update(qx: torch.Tensor, conv_state: torch.Tensor, x_scale, qw: torch.Tensor, w_scale,
                       bias: torch.Tensor | None = None, silu: bool = True, out_dtype: torch.dtype = torch.float32,
                       out_scales: Sequence = (), out_duals: Sequence = ()):
    """qx (B, D) int8, conv_state (B, D, K) int8 (updated in place) -> (B, D) in ``out_dtype``, or a list of int8
    codes (B, D), one per out_scale; with ``out_duals`` (codes, masks), the dual-scale output's mask (B, D) uint8
    with the flag in bit 0."""
    out_scales = list(out_scales)
    check_conv1d_update_args(qx, conv_state, x_scale, qw, w_scale, bias, out_dtype, out_scales, out_duals)
    duals = list(out_duals or ())
    load()
    # conv_state is updated in place, so it cannot be moved: it must already be on qx's device
    require_cuda("conv1d_int8_update", "qx", qx, conv_state=conv_state)
    dev, D = qx.device, qx.shape[1]
    qw, bias = _weight_and_bias(qw, bias, D, dev)
    outs = torch.ops.qmamba.conv1d_int8_update(qx, conv_state, per_tensor_scale(x_scale, dev, "x_scale"), qw,
                                               channel_scale(w_scale, D, dev, "w_scale"), bias, bool(silu),
                                               out_dtype, _scales(out_scales, dev), *_dual_op_args(duals, dev))
    return _split(outs, len(out_scales), duals) if out_scales else outs[0]


def check_gemv_conv_update_args(proj: GemvInputs, conv_state, qw, w_scale, bias=None,
                                out_dtype: torch.dtype = torch.float32, out_scales: Sequence = (),
                                out_duals: Sequence = ()) -> tuple[int, int]:
    """Everything ``torch.ops.qmamba.w8a8_gemv_conv_update`` requires of its arguments, on metadata only (CPU tensors
    work): the GEMV's (``check_gemv_args``, with segment scales), then the update's on the first segment's columns;
    raises TypeError / ValueError naming the fix. Returns (D, K): the conv's channels and taps."""
    from qmamba.kernels.linear import check_gemv_args

    op = "w8a8_gemv_conv_update"
    if not isinstance(proj, GemvInputs):
        raise TypeError(f"{op}: proj must be a qmamba.ops.int8_linear.GemvInputs (in_proj's GEMV inputs), got "
                        f"{type(proj).__name__}")
    require_int8(op, "proj.q", proj.q, 2, "(M, K) (one token per row)", fix="quantize in_proj's input first")
    if proj.out_columns is None or not proj.out_scale:
        raise ValueError(f"{op}: proj needs segment scales (out_scale, out_columns), the first segment the conv's "
                         "input, which the fused update reads as codes")
    M = proj.q.shape[0]
    check_gemv_args(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, out_dtype, proj.out_scale,
                    proj.out_columns)
    D = proj.out_columns[0]
    K = _check_common(op, D, proj.out_scale[0], qw, w_scale, bias, out_dtype, out_scales)
    check_out_duals(op, out_duals, out_scales)
    _check_conv_state(op, conv_state, M, D, K, "M")
    return D, K


def w8a8_gemv_conv_update(proj: GemvInputs, conv_state: torch.Tensor, qw: torch.Tensor, w_scale,
                          bias: torch.Tensor | None = None, silu: bool = True,
                          out_dtype: torch.dtype = torch.float32, out_scales: Sequence = (),
                          out_duals: Sequence = ()):
    """in_proj's GEMV (``proj``) with the conv update of its first segment's columns fused: (codes (M, N) int8, the
    update's result as ``conv1d_int8_update`` returns it); conv_state (M, D, K) is updated in place."""
    from qmamba.kernels.linear import gemv_op_args

    out_scales = list(out_scales)
    D, _ = check_gemv_conv_update_args(proj, conv_state, qw, w_scale, bias, out_dtype, out_scales, out_duals)
    duals = list(out_duals or ())
    load()
    op = "w8a8_gemv_conv_update"
    # conv_state is updated in place and the GEMV's tensors are not moved: all must already be on q's device
    require_cuda(op, "proj.q", proj.q, conv_state=conv_state, proj_weight=proj.weight, proj_scale=proj.scale,
                 proj_weight_scale=proj.weight_scale, proj_bias=proj.bias,
                 **{f"proj_out_scale[{i}]": s for i, s in enumerate(proj.out_scale)})
    dev = proj.q.device
    x, xs, w, ws, b, scales, bounds = gemv_op_args(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias,
                                                   proj.out_scale, proj.out_columns)
    qw, bias = _weight_and_bias(qw, bias, D, dev)
    outs = torch.ops.qmamba.w8a8_gemv_conv_update(x, xs, w, ws, b, out_dtype, scales, bounds, D, conv_state, qw,
                                                  channel_scale(w_scale, D, dev, "w_scale"), bias, bool(silu),
                                                  _scales(out_scales, dev), *_dual_op_args(duals, dev))
    codes, rest = outs[0], list(outs[1:])
    return codes, (_split(rest, len(out_scales), duals) if out_scales else rest[0])


def conv1d_silu(x: torch.Tensor) -> torch.Tensor:
    """The prefill epilogue's SiLU (csrc ``silu_fast``, the IEEE ``silu`` where it is out of range) applied to an fp32
    CUDA tensor elementwise: what ``test_conv_silu_is_exact`` compares with torch's fp32 SiLU over every fp32 value."""
    if not isinstance(x, torch.Tensor) or x.dtype != torch.float32:
        raise TypeError(f"conv1d_silu: x must be a float32 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    load()
    require_cuda("conv1d_silu", "x", x)
    return torch.ops.qmamba.conv1d_silu(x.contiguous())
