"""Int8 causal depthwise conv1d with fused bias + SiLU and requantized int8 outputs: prefill, one-token update, and
the conv state that links them. References (pure torch, integer-exact sums) and dispatch to qmamba's CUDA kernel.

The math is the ``torch`` int8 backend of ``qmamba.qnn.QuantCausalConv1d`` (``_int8_forward``), then the consumer's
quantizer (DESIGN §3), op for op:

    acc[b, c, t] = sum_{i < K} w[c, i] * x[b, c, t - (K - 1) + i]     int32, x = 0 before t = 0
    out          = acc.float() * (s_x * s_w[c])                          the scales multiply first, fp32
                   + bias[c].float()                                     if bias
    out          = silu(out)                                             if silu, fp32
    out          = out.to(out_dtype)                                     the activation dtype (fp32 / fp16 / bf16)
    codes_j      = clamp(rint(out.float() * (1 / out_scale_j)), -128, 127)   one per consumer (Mamba1's u feeds
                                                                         x_proj.input and scan.u)

One consumer may be dual-scale (issue 5: Mamba1's scan.u): ``out_duals[j]`` a ``DualScale`` for output j (None for the
others) makes its codes ``dual_quantize(out, out_scales[j], s_out)`` in that encoding (``qmamba.quant.dual_scale``),
and the call returns ``(codes, masks)``: the code tensors and, per output, the packed outlier flags (mask encoding:
(B, D, ceil(L / 8)) uint8 packed along L for the prefill; (B, D), the flag in bit 0, for the update) or None.

Shapes: qx (B, D, L) int8 (any strides), qw (D, K) or (D, 1, K) int8, s_x one element, s_w one element or (D,)
(any shape of that many elements, e.g. the module's (D, 1, 1)), bias (D,) or None. With no ``out_scales`` the result
is the float output (B, D, L) in ``out_dtype``; else a list of int8 code tensors (B, D, L), one per scale.

Decode: ``conv_state`` (B, D, K) int8 holds the codes of the last K inputs (oldest first). ``conv1d_int8_update``
shifts it left by one, appends the new codes and convolves the K codes it holds, so prefill followed by updates gives
exactly the prefill of the longer sequence. ``conv1d_int8_initial_state`` builds the state from a prefill's codes.

Mamba1's in_proj fused into the update (``w8a8_gemv_conv1d_update``): in_proj's one-token GEMV (a ``GemvInputs``)
whose first segment of columns, requantized in the conv input's scale, is the conv's input, runs the update in its
epilogue (one kernel fewer per layer and decode step). It returns the GEMV's codes (M, N) (the other segments, e.g.
the scan's z, are column slices) and the update's result, bit for bit the GEMV then the update:

    codes = w8a8_linear_ref(q, scale, weight, weight_scale, bias, out_dtype, out_scale, out_columns)
    conv  = conv1d_int8_update_ref(codes[:, :out_columns[0]], conv_state, out_scale[0], qw, w_scale, ...)

The CUDA kernel (``backend="cuda"``, or ``"auto"`` on a GPU) returns outputs in channel-last layout: (B, D, L)
tensors that are transposed contiguous (B, L, D) tensors, which the next GEMM reads directly; it supports K <= 4.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from qmamba.ops.backend import use_kernels
from qmamba.ops.int8_linear import GemvInputs, w8a8_linear, w8a8_linear_ref
from qmamba.quant.dual_scale import DualScale, check_out_duals, dual_quantize
from qmamba.quant.numerics import quantize

OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _check_common(qx_channels: int, qw: torch.Tensor, x_scale, w_scale, bias, out_dtype, out_scales,
                  op: str) -> int:
    """Validate the arguments shared by prefill and update; returns K."""
    if qw.dtype != torch.int8:
        raise TypeError(f"{op}: qw must hold int8 weight codes, got {qw.dtype}; quantize the conv weight first")
    D = qx_channels
    if qw.ndim not in (2, 3) or qw.shape[0] != D or (qw.ndim == 3 and qw.shape[1] != 1):
        raise ValueError(f"{op}: qw must be (D, K) or (D, 1, K) with D = {D} channels of x, got {tuple(qw.shape)}")
    k = qw.shape[-1]
    if k < 1:
        raise ValueError(f"{op}: the conv needs at least one tap, got K = {k}")
    if not isinstance(x_scale, torch.Tensor) or x_scale.numel() != 1:
        raise ValueError(f"{op}: x_scale must be a one-element tensor (the per-tensor input scale), got "
                         f"{_describe(x_scale)}")
    if not isinstance(w_scale, torch.Tensor) or w_scale.numel() not in (1, D):
        raise ValueError(f"{op}: w_scale must be a tensor of 1 (per-tensor) or D = {D} (per-channel) elements, got "
                         f"{_describe(w_scale)}")
    if bias is not None and bias.numel() != D:
        raise ValueError(f"{op}: bias must have D = {D} elements, got shape {tuple(bias.shape)}")
    if out_dtype not in OUT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be one of {OUT_DTYPES} (the activation dtype), got {out_dtype!r}")
    for i, s in enumerate(out_scales):
        if not isinstance(s, torch.Tensor) or s.numel() != 1:
            raise ValueError(f"{op}: out_scales[{i}] must be a one-element tensor (a per-tensor scale of the "
                             f"consumer's input), got {_describe(s)}")
    return k


def _describe(v) -> str:
    return f"shape {tuple(v.shape)}" if isinstance(v, torch.Tensor) else repr(v)


def _epilogue(acc: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None, silu: bool, out_dtype,
              out_scales: Sequence[torch.Tensor], out_duals: list | None = None, update: bool = False):
    """int32 sums -> the float output in out_dtype, or its codes for each consumer scale (and, with out_duals,
    (codes, masks)). ``update``: one token (B, D), whose mask is one flag byte per element."""
    out = acc.float() * scale
    if bias is not None:
        out = out + bias
    out = (F.silu(out) if silu else out).to(out_dtype)
    if not out_scales:
        return out
    if not out_duals:
        return [quantize(out, s.float().reshape(())) for s in out_scales]
    codes, masks = [], []
    for s, d in zip(out_scales, out_duals):
        if d is None:
            codes.append(quantize(out, s.float().reshape(())))
            masks.append(None)
            continue
        v = out.unsqueeze(-1) if update else out  # the update's token: its flags packed along a time dim of 1
        q, m = dual_quantize(v, s.float().reshape(()), d.outlier_scale.float().reshape(()), d.encoding, d.knee)
        codes.append(q[..., 0] if update else q)
        masks.append(m[..., 0] if (update and m is not None) else m)
    return codes, masks


def conv1d_int8_ref(qx: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                    bias: torch.Tensor | None = None, silu: bool = True, out_dtype: torch.dtype = torch.float32,
                    out_scales: Sequence[torch.Tensor] = (), out_duals: Sequence[DualScale | None] = ()):
    """Prefill: qx (B, D, L) int8 -> (B, D, L) in out_dtype, or [int8 codes (B, D, L) per out_scale]."""
    if qx.dtype != torch.int8 or qx.ndim != 3:
        raise TypeError(f"conv1d_int8: qx must be int8 codes of shape (B, D, L), got {qx.dtype} {tuple(qx.shape)}")
    D, L = qx.shape[1], qx.shape[2]
    k = _check_common(D, qw, x_scale, w_scale, bias, out_dtype, out_scales, "conv1d_int8")
    duals = check_out_duals("conv1d_int8", out_duals, out_scales)
    w32 = qw.reshape(D, k).to(torch.int32)
    xp = F.pad(qx.to(torch.int32), (k - 1, 0))  # (B, D, k - 1 + L): the zeros before t = 0
    acc = torch.zeros(qx.shape, dtype=torch.int32, device=qx.device)
    for i in range(k):  # acc[t] += w[i] * x[t - (k - 1) + i]
        acc += w32[:, i, None] * xp[..., i: i + L]
    # scales multiply first (DESIGN §3): (s_x * s_w) is (1, 1) or (D, 1), as in QuantCausalConv1d._int8_forward
    scale = x_scale.float().reshape(()) * w_scale.float().reshape(-1, 1)
    b = None if bias is None else bias.float().reshape(D)[:, None]
    return _epilogue(acc, scale, b, silu, out_dtype, out_scales, duals)


def conv1d_int8_update_ref(qx: torch.Tensor, conv_state: torch.Tensor, x_scale: torch.Tensor, qw: torch.Tensor,
                           w_scale: torch.Tensor, bias: torch.Tensor | None = None, silu: bool = True,
                           out_dtype: torch.dtype = torch.float32, out_scales: Sequence[torch.Tensor] = (),
                           out_duals: Sequence[DualScale | None] = ()):
    """One decode step: qx (B, D) int8, conv_state (B, D, K) int8 (updated in place: shifted left by one, qx
    appended) -> (B, D) in out_dtype, or [int8 codes (B, D) per out_scale]. The output is the prefill's output at
    the new time step."""
    if qx.dtype != torch.int8 or qx.ndim != 2:
        raise TypeError(f"conv1d_int8_update: qx must be int8 codes of shape (B, D), got {qx.dtype} "
                        f"{tuple(qx.shape)}")
    B, D = qx.shape
    k = _check_common(D, qw, x_scale, w_scale, bias, out_dtype, out_scales, "conv1d_int8_update")
    duals = check_out_duals("conv1d_int8_update", out_duals, out_scales)
    if conv_state.dtype != torch.int8 or tuple(conv_state.shape) != (B, D, k):
        raise ValueError(f"conv1d_int8_update: conv_state must be int8 of shape (B, D, K) = {(B, D, k)} (the codes "
                         f"of the last K inputs; build it with conv1d_int8_initial_state), got {conv_state.dtype} "
                         f"{tuple(conv_state.shape)}")
    window = torch.cat([conv_state[..., 1:], qx.unsqueeze(-1)], dim=-1)  # (B, D, K), oldest first
    conv_state.copy_(window)
    acc = (window.to(torch.int32) * qw.reshape(D, k).to(torch.int32)).sum(-1, dtype=torch.int32)  # (B, D)
    scale = x_scale.float().reshape(()) * w_scale.float().reshape(-1)  # (1,) or (D,)
    b = None if bias is None else bias.float().reshape(D)
    return _epilogue(acc, scale, b, silu, out_dtype, out_scales, duals, update=True)


def conv1d_int8_initial_state(qx: torch.Tensor, k: int) -> torch.Tensor:
    """The conv state after a prefill of qx (B, D, L) int8: (B, D, k) int8 holding its last k inputs, oldest first,
    zero-padded on the left when L < k (the zeros the causal conv sees before t = 0). A new, contiguous tensor."""
    if qx.dtype != torch.int8 or qx.ndim != 3:
        raise TypeError(f"conv1d_int8_initial_state: qx must be int8 codes (B, D, L), got {qx.dtype} "
                        f"{tuple(qx.shape)}")
    B, D, L = qx.shape
    state = torch.zeros(B, D, k, dtype=torch.int8, device=qx.device)
    n = min(k, L)
    if n:
        state[..., k - n:] = qx[..., L - n:]
    return state


def conv1d_int8(qx, x_scale, qw, w_scale, bias=None, silu: bool = True, out_dtype: torch.dtype = torch.float32,
                out_scales: Sequence[torch.Tensor] = (), backend: str = "auto",
                out_duals: Sequence[DualScale | None] = ()):
    """``conv1d_int8_ref`` or qmamba's CUDA kernel (channel-last outputs), by ``backend``."""
    if use_kernels(backend, qx, "conv1d_int8"):
        from qmamba.kernels import conv1d as kernel

        return kernel.conv1d_int8(qx, x_scale, qw, w_scale, bias, silu, out_dtype, out_scales, out_duals)
    return conv1d_int8_ref(qx, x_scale, qw, w_scale, bias, silu, out_dtype, out_scales, out_duals)


def conv1d_int8_update(qx, conv_state, x_scale, qw, w_scale, bias=None, silu: bool = True,
                       out_dtype: torch.dtype = torch.float32, out_scales: Sequence[torch.Tensor] = (),
                       backend: str = "auto", out_duals: Sequence[DualScale | None] = ()):
    """``conv1d_int8_update_ref`` or qmamba's CUDA kernel, by ``backend``; conv_state is updated in place."""
    if use_kernels(backend, qx, "conv1d_int8_update"):
        from qmamba.kernels import conv1d as kernel

        return kernel.conv1d_int8_update(qx, conv_state, x_scale, qw, w_scale, bias, silu, out_dtype, out_scales,
                                         out_duals)
    return conv1d_int8_update_ref(qx, conv_state, x_scale, qw, w_scale, bias, silu, out_dtype, out_scales,
                                  out_duals)


def _check_gemv_inputs(op: str, proj) -> int:
    """``proj`` a ``GemvInputs`` of one token (q 2-D) with segment scales; returns the conv's channels (the first
    segment's column count). The GEMV's own checks (w8a8_linear_ref's) name the fix for the rest."""
    if not isinstance(proj, GemvInputs):
        raise TypeError(f"{op}: proj must be a qmamba.ops.int8_linear.GemvInputs (in_proj's GEMV inputs: "
                        f"QuantLinear.step_gemv_inputs), got {type(proj).__name__}")
    if not isinstance(proj.q, torch.Tensor) or proj.q.ndim != 2:
        raise ValueError(f"{op}: proj.q must be the input codes of one token (M, K), got "
                         f"{_describe(proj.q)}")
    if not isinstance(proj.out_columns, (list, tuple)) or not proj.out_columns:
        raise ValueError(f"{op}: proj.out_columns must list the column count of each out_scale segment (the first "
                         f"the conv's channels), got {proj.out_columns!r}")
    return proj.out_columns[0]


def w8a8_gemv_conv1d_update_ref(proj: GemvInputs, conv_state: torch.Tensor, qw: torch.Tensor, w_scale: torch.Tensor,
                                bias: torch.Tensor | None = None, silu: bool = True,
                                out_dtype: torch.dtype = torch.float32, out_scales: Sequence[torch.Tensor] = (),
                                out_duals: Sequence[DualScale | None] = ()):
    """in_proj's GEMV (``proj``), then the conv update on its first out_columns[0] columns, in the first segment's
    scale: (codes (M, N) int8, the update's result as ``conv1d_int8_update_ref`` returns it); conv_state (M, D, K)
    is updated in place. ``out_dtype``: the activation dtype, of both."""
    op = "w8a8_gemv_conv1d_update"
    channels = _check_gemv_inputs(op, proj)
    codes = w8a8_linear_ref(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, out_dtype,
                            list(proj.out_scale), list(proj.out_columns))
    conv = conv1d_int8_update_ref(codes[:, :channels], conv_state, proj.out_scale[0], qw, w_scale, bias, silu,
                                  out_dtype, out_scales, out_duals)
    return codes, conv


def w8a8_gemv_conv1d_update(proj: GemvInputs, conv_state, qw, w_scale, bias=None, silu: bool = True,
                            out_dtype: torch.dtype = torch.float32, out_scales: Sequence[torch.Tensor] = (),
                            backend: str = "auto", out_duals: Sequence[DualScale | None] = ()):
    """``w8a8_gemv_conv1d_update_ref``, or qmamba's fused CUDA kernel (``torch.ops.qmamba.w8a8_gemv_conv_update``)
    where ``backend`` allows and the GEMV fits it (1..8 rows, K a multiple of 16, at most 4 taps); on a GPU outside
    that, the GEMM / GEMV kernel then the update kernel. The same result in every case."""
    from qmamba.kernels.conv1d import MAX_TAPS
    from qmamba.kernels.linear import GEMV_K_MULTIPLE, GEMV_MAX_ROWS

    op = "w8a8_gemv_conv1d_update"
    channels = _check_gemv_inputs(op, proj)
    if not use_kernels(backend, proj.q, op):
        return w8a8_gemv_conv1d_update_ref(proj, conv_state, qw, w_scale, bias, silu, out_dtype, out_scales,
                                           out_duals)
    M, K = proj.q.shape
    if 1 <= M <= GEMV_MAX_ROWS and K % GEMV_K_MULTIPLE == 0 and qw.shape[-1] <= MAX_TAPS:
        from qmamba.kernels import conv1d as kernel

        return kernel.w8a8_gemv_conv_update(proj, conv_state, qw, w_scale, bias, silu, out_dtype, out_scales,
                                            out_duals)
    codes = w8a8_linear(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, out_dtype,
                        list(proj.out_scale), backend, list(proj.out_columns))
    conv = conv1d_int8_update(codes[:, :channels], conv_state, proj.out_scale[0], qw, w_scale, bias, silu, out_dtype,
                              out_scales, backend, out_duals)
    return codes, conv
