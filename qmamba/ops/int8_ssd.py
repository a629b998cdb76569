"""int8 Mamba2 SSD: the chunked scan (prefill) and its one-token decode step, on int8 codes of x, dt, B, C.

Inputs are the codes the quantization points produce and the scales they are in (DESIGN §3):
    qx: (batch, L, h, p) int8      x_scale: (h,) per head (Quamba2, ``PerChannel(axis=-2)``) or one element
    qdt: (batch, L, h) int8        dt_scale: one element (or (h,) per head)
    qB, qC: (batch, L, g, n) int8  B_scale, C_scale: (g,) per SSD group (``PerChannel(axis=-2)``) or one element
    A: (h,) fp32 (= -exp(A_log))   D: (h,) or (h, p)   dt_bias: (h,)
The decode step takes one token: qx (batch, h, p), qdt (batch, h), qB / qC (batch, g, n), and updates the fp32 state
(batch, h, p, n) in place.

Dual-scale x (issue 5, ``qmamba.quant.dual_scale``): ``x_dual=DualScale(s_out, encoding, knee)`` reads qx with the
inlier scale ``x_scale`` and the outlier scale ``x_dual.outlier_scale`` (one element or (h,), like x_scale). The
mask encoding also takes ``x_mask``, the packed outlier flags: uint8 (batch, L, h, ceil(p / 8)) for the scan,
(batch, h, ceil(p / 8)) for the step (bit j of byte i = element 8i + j of headdim, ``dual_scale.pack_mask``; any
strides); the piecewise encoding takes none. x is then ``dual_scale.dequantize_codes(qx, x_scale, x_dual, x_mask)``
(fp32) instead of ``q * x_scale``, and everything else is unchanged. ``x_dual=None`` (the default) is single scale,
exactly as before.

The math is ``qmamba.ops.ssd``'s on the dequantized codes, ``q.float() * scale`` (the scale broadcast as
``qmamba.quant.granularity`` does; x dual-scale as above), in fp32: dt = softplus(dt + dt_bias); per head
    S[t] = exp(dt[t] A) S[t-1] + dt[t] x[t] B[t]^T    (S: p x n),     y[t] = S[t] C[t] + D x[t].
No gate z: Mamba2's gate is applied in its norm. ``ssd_chunk_scan_int8_ref`` is exactly what the ``torch`` int8
backend computes (``QuantSSDScan`` in int8 mode on fp32 activations: dequantized codes into ``ssd_chunk_scan_ref``);
the Triton kernels (``qmamba.kernels.triton.ssd_int8``) match it to fp32 rounding (dual-scale x included; their
docstring says where an FMA may enter).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmamba.ops.backend import use_kernels
from qmamba.ops.ssd import ssd_chunk_scan_ref
from qmamba.quant.dual_scale import DualScale, check_dual_mask, dequantize_codes
from qmamba.quant.numerics import dequantize, quantize


def _check_codes(name: str, q: torch.Tensor, ndim: int, shape_doc: str) -> None:
    if q.dtype != torch.int8:
        raise TypeError(f"{name} must hold int8 codes, got {q.dtype}; quantize it first (qmamba.quant.quantize)")
    if q.dim() != ndim:
        raise ValueError(f"{name} must be {shape_doc}, got shape {tuple(q.shape)}")


def _scale(name: str, scale: torch.Tensor, channels: int, what: str, lead: int, trail: int) -> torch.Tensor:
    """``scale`` (one element, or ``channels`` of them) shaped to broadcast against codes whose channel axis has
    ``lead`` dims before it and ``trail`` after it, as ``PerTensor`` / ``PerChannel`` ``.broadcast`` shape it."""
    if not isinstance(scale, torch.Tensor):
        raise TypeError(f"{name} must be an fp32 tensor (one element, or ({channels},) per {what}), got "
                        f"{type(scale).__name__}; a Python float would force a host sync in CUDA graphs")
    if scale.numel() == 1:
        return scale.reshape(())
    if scale.numel() != channels:
        raise ValueError(f"{name} must have one element (per-tensor) or {channels} (one per {what}), got shape "
                         f"{tuple(scale.shape)}")
    return scale.reshape((1,) * lead + (channels,) + (1,) * trail)


def _x_values(qx: torch.Tensor, x_scale: torch.Tensor, x_dual: DualScale | None, x_mask: torch.Tensor | None,
              lead: int) -> torch.Tensor:
    """fp32 x from its codes (x's heads after ``lead`` dims, headdim last): ``q * x_scale``, or dual-scale
    ``dequantize_codes`` with the outlier scale shaped as x_scale is."""
    check_dual_mask("x", qx, x_dual, x_mask)
    h = qx.shape[lead]
    s_in = _scale("x_scale", x_scale, h, "head", lead, 1)
    if x_dual is None:
        return dequantize(qx, s_in)
    s_out = _scale("x_dual.outlier_scale", x_dual.outlier_scale, h, "head", lead, 1)
    return dequantize_codes(qx, s_in, DualScale(s_out, x_dual.encoding, x_dual.knee), x_mask)


def _check_scan_shapes(qx, qdt, qB, qC):
    _check_codes("qx", qx, 4, "(batch, L, heads, headdim)")
    _check_codes("qdt", qdt, 3, "(batch, L, heads)")
    _check_codes("qB", qB, 4, "(batch, L, groups, d_state)")
    _check_codes("qC", qC, 4, "(batch, L, groups, d_state)")
    b, L, h, _ = qx.shape
    if qdt.shape != (b, L, h):
        raise ValueError(f"qdt must be (batch, L, heads) = {(b, L, h)} to match qx, got {tuple(qdt.shape)}")
    if qB.shape != qC.shape or qB.shape[:2] != (b, L):
        raise ValueError(f"qB and qC must both be (batch={b}, L={L}, groups, d_state), got {tuple(qB.shape)} and "
                         f"{tuple(qC.shape)}")
    if h % qB.shape[2]:
        raise ValueError(f"the {qB.shape[2]} B/C groups must divide the {h} heads of qx")


def _check_step_shapes(state, qx, qdt, qB, qC):
    _check_codes("qx", qx, 3, "(batch, heads, headdim)")
    _check_codes("qdt", qdt, 2, "(batch, heads)")
    _check_codes("qB", qB, 3, "(batch, groups, d_state)")
    _check_codes("qC", qC, 3, "(batch, groups, d_state)")
    b, h, p = qx.shape
    if qdt.shape != (b, h):
        raise ValueError(f"qdt must be (batch, heads) = {(b, h)} to match qx, got {tuple(qdt.shape)}")
    if qB.shape != qC.shape or qB.shape[0] != b or h % qB.shape[1]:
        raise ValueError(f"qB and qC must both be (batch={b}, groups, d_state) with groups dividing {h} heads, got "
                         f"{tuple(qB.shape)} and {tuple(qC.shape)}")
    if state.dtype != torch.float32 or state.shape != (b, h, p, qB.shape[2]):
        raise ValueError(f"state must be an fp32 tensor (batch, heads, headdim, d_state) = {(b, h, p, qB.shape[2])} "
                         f"(it is updated in place), got {state.dtype} {tuple(state.shape)}")


def ssd_chunk_scan_int8_ref(qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, chunk_size, D=None,
                            dt_bias=None, dt_softplus=True, out_dtype=torch.float32, initial_states=None,
                            return_final_states=False, x_dual: DualScale | None = None,
                            x_mask: torch.Tensor | None = None):
    """Pure-torch int8 SSD scan: dequantize the codes, then ``ssd_chunk_scan_ref`` (see module docstring).

    Returns y (batch, L, h, p) in ``out_dtype`` and, with ``return_final_states``, the fp32 state after the last
    token (batch, h, p, n), which ``ssd_step_int8`` continues from. ``initial_states``: (batch, h, p, n).
    ``x_dual`` / ``x_mask``: dual-scale x (module docstring); x_mask (batch, L, h, ceil(p / 8)) uint8."""
    _check_scan_shapes(qx, qdt, qB, qC)
    h, g = qx.shape[2], qB.shape[2]
    x = _x_values(qx, x_scale, x_dual, x_mask, 2)  # (b, L, h, p) fp32
    dt = dequantize(qdt, _scale("dt_scale", dt_scale, h, "head", 2, 0))  # (b, L, h)
    B = dequantize(qB, _scale("B_scale", B_scale, g, "group", 2, 1))  # (b, L, g, n)
    C = dequantize(qC, _scale("C_scale", C_scale, g, "group", 2, 1))
    out = ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, D=D, dt_bias=dt_bias, dt_softplus=dt_softplus,
                             initial_states=initial_states, return_final_states=return_final_states)
    if return_final_states:
        return out[0].to(out_dtype), out[1]
    return out.to(out_dtype)


def ssd_step_int8_ref(state, qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, D=None, dt_bias=None,
                      dt_softplus=True, out_dtype=torch.float32, x_dual: DualScale | None = None,
                      x_mask: torch.Tensor | None = None):
    """One decode token: ``S = exp(dt A) S + dt x B^T`` into ``state`` (fp32 (batch, h, p, n), in place), returns
    ``y = S C + D x`` (batch, h, p) in ``out_dtype``. Shapes in the module docstring. The same fp32 ops as
    ``SSDScan.step`` on the dequantized codes (``QuantSSDScan.step`` in int8 mode on fp32 activations).
    ``x_dual`` / ``x_mask``: dual-scale x (module docstring); x_mask (batch, h, ceil(p / 8)) uint8."""
    _check_step_shapes(state, qx, qdt, qB, qC)
    h, g = qx.shape[1], qB.shape[1]
    x = _x_values(qx, x_scale, x_dual, x_mask, 1)  # (b, h, p)
    dt = dequantize(qdt, _scale("dt_scale", dt_scale, h, "head", 1, 0))  # (b, h)
    B = dequantize(qB, _scale("B_scale", B_scale, g, "group", 1, 1))  # (b, g, n)
    C = dequantize(qC, _scale("C_scale", C_scale, g, "group", 1, 1))
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    # (b, h, n): heads share their group's B / C (an expand: repeat_interleave may sync with the host)
    b, n = qB.shape[0], qB.shape[2]
    B = B.unsqueeze(2).expand(b, g, h // g, n).reshape(b, h, n)
    C = C.unsqueeze(2).expand(b, g, h // g, n).reshape(b, h, n)
    dA = torch.exp(dt * A.float())  # (b, h)
    state.mul_(dA[..., None, None]).add_((dt[..., None] * x).unsqueeze(-1) * B.unsqueeze(-2))
    y = torch.einsum("bhpn,bhn->bhp", state, C)
    if D is not None:
        Df = D.float()
        y = y + x * (Df.unsqueeze(-1) if Df.dim() == 1 else Df)
    return y.to(out_dtype)


def ssd_chunk_scan_int8(qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, chunk_size, D=None, dt_bias=None,
                        dt_softplus=True, out_dtype=torch.float32, initial_states=None, return_final_states=False,
                        backend: str = "auto", x_dual: DualScale | None = None, x_mask: torch.Tensor | None = None):
    """int8 SSD scan through the Triton kernel where ``backend`` allows (``qmamba.ops.backend.use_kernels``), else
    ``ssd_chunk_scan_int8_ref``. Same arguments and results as the reference."""
    args = (qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, chunk_size)
    kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, out_dtype=out_dtype, initial_states=initial_states,
                  return_final_states=return_final_states, x_dual=x_dual, x_mask=x_mask)
    if use_kernels(backend, qx, "ssd_chunk_scan_int8"):
        from qmamba.kernels.triton.ssd_int8 import ssd_chunk_scan_int8_triton  # lazy: imports triton

        return ssd_chunk_scan_int8_triton(*args, **kwargs)
    return ssd_chunk_scan_int8_ref(*args, **kwargs)


def ssd_step_int8(state, qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, D=None, dt_bias=None,
                  dt_softplus=True, out_dtype=torch.float32, backend: str = "auto", x_dual: DualScale | None = None,
                  x_mask: torch.Tensor | None = None):
    """int8 SSD decode step through the Triton kernel where ``backend`` allows, else ``ssd_step_int8_ref``.
    Updates ``state`` in place either way."""
    args = (state, qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale)
    kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, out_dtype=out_dtype, x_dual=x_dual, x_mask=x_mask)
    if use_kernels(backend, qx, "ssd_step_int8"):
        from qmamba.kernels.triton.ssd_int8 import ssd_step_int8_triton

        return ssd_step_int8_triton(*args, **kwargs)
    return ssd_step_int8_ref(*args, **kwargs)


def _require_floats(op: str, x, B, C) -> None:
    for name, t in (("x", x), ("B", B), ("C", C)):
        if not isinstance(t, torch.Tensor) or not t.is_floating_point():
            raise TypeError(f"{op}_from_float: {name} must be the float activation, got "
                            f"{getattr(t, 'dtype', type(t).__name__)}; pass codes to {op} instead")


def _codes_of_floats(x, x_scale, B, B_scale, C, C_scale, lead: int):
    """``numerics.quantize`` codes of the float x / B / C in their scales (heads / groups after ``lead`` dims)."""
    h, g = x.shape[lead], B.shape[lead]
    return (quantize(x, _scale("x_scale", x_scale, h, "head", lead, 1)),
            quantize(B, _scale("B_scale", B_scale, g, "group", lead, 1)),
            quantize(C, _scale("C_scale", C_scale, g, "group", lead, 1)))


def ssd_step_int8_from_float(state, x, x_scale, qdt, dt_scale, A, B, B_scale, C, C_scale, D=None, dt_bias=None,
                             dt_softplus=True, out_dtype=torch.float32, backend: str = "auto"):
    """``ssd_step_int8`` with x (batch, h, p), B and C (batch, g, n) given as the float activations (the conv's output)
    instead of codes: each is quantized with its scale first (``numerics.quantize``, the codes its quantization point
    makes), then the step runs on the codes. The Triton kernel quantizes them where it loads them (one launch instead
    of three quantize kernels and the step; the same codes: the IEEE reciprocal of the scale, the product rounded to
    fp32, rint, clamp). Single-scale x only."""
    _require_floats("ssd_step_int8", x, B, C)
    kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, out_dtype=out_dtype)
    if use_kernels(backend, x, "ssd_step_int8"):
        from qmamba.kernels.triton.ssd_int8 import ssd_step_int8_triton

        return ssd_step_int8_triton(state, x, x_scale, qdt, dt_scale, A, B, B_scale, C, C_scale, float_in=True,
                                    **kwargs)
    qx, qB, qC = _codes_of_floats(x, x_scale, B, B_scale, C, C_scale, 1)
    return ssd_step_int8_ref(state, qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, **kwargs)


def ssd_chunk_scan_int8_from_float(x, x_scale, qdt, dt_scale, A, B, B_scale, C, C_scale, chunk_size, D=None,
                                   dt_bias=None, dt_softplus=True, out_dtype=torch.float32, initial_states=None,
                                   return_final_states=False, backend: str = "auto"):
    """``ssd_chunk_scan_int8`` with x (batch, L, h, p), B and C (batch, L, g, n) given as the float activations (the
    conv's output): each is quantized with its scale first (``numerics.quantize``), then the scan runs on the codes.
    The Triton kernels make the codes as they load them (no quantize kernels; the same codes). Single-scale x only."""
    _require_floats("ssd_chunk_scan_int8", x, B, C)
    kwargs = dict(D=D, dt_bias=dt_bias, dt_softplus=dt_softplus, out_dtype=out_dtype, initial_states=initial_states,
                  return_final_states=return_final_states)
    if use_kernels(backend, x, "ssd_chunk_scan_int8"):
        from qmamba.kernels.triton.ssd_int8 import ssd_chunk_scan_int8_triton

        return ssd_chunk_scan_int8_triton(x, x_scale, qdt, dt_scale, A, B, B_scale, C, C_scale, chunk_size,
                                          float_in=True, **kwargs)
    qx, qB, qC = _codes_of_floats(x, x_scale, B, B_scale, C, C_scale, 2)
    return ssd_chunk_scan_int8_ref(qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, chunk_size, **kwargs)
