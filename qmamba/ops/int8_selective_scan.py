"""Mamba1 selective scan on int8 inputs (the int8 model's scan part): prefill and the one-token state update.

The inputs are int8 codes with per-tensor fp32 scales; ``A`` (D, N), ``D`` (D,) and ``delta_bias`` (D,) stay fp32.
The math is the torch int8 backend's (``qmamba.qnn.QuantSelectiveScan`` in int8 mode), op for op:

    x = dequantize(qx, sx).to(out_dtype)        for x in u, delta, B, C, z   (QuantPoint.roundtrip; exact in fp32)
    y = selective_scan_ref(u, delta, A, B, C, D, z, delta_bias, delta_softplus)    (fp32 math, y in out_dtype)

i.e. ``delta = softplus(delta + delta_bias)``, ``h[t] = exp(delta[t] A) h[t-1] + (delta[t] u[t]) B[t]``,
``y[t] = (sum_n C[t, n] h[t, n] + u[t] D) * silu(z[t])``. ``out_dtype`` is the activation dtype of the model: the
module rounds its dequantized inputs through it, so the reference does too (a no-op for float32).

Shapes (any strides; u, delta, z come as transposed views of channel-last (B, L, D) tensors, B / C as views of the
x_proj output (B, L, R + 2N)):
    prefill:  qu, qdelta, qz (batch, D, L) int8    qB, qC (batch, N, L) int8    initial_state (batch, D, N) fp32
              -> y (batch, D, L) in out_dtype [, last_state (batch, D, N) fp32]
    update:   state (batch, D, N) fp32, updated in place    qu, qdelta, qz (batch, D)    qB, qC (batch, N)
              -> y (batch, D) in out_dtype

Dual-scale u (issue 5, ``qmamba.quant.dual_scale``): ``u_dual`` (a ``DualScale``: outlier scale, encoding, knee) and,
for the mask encoding, ``u_mask``, the packed outlier flags: (batch, D, ceil(L / 8)) uint8 for the prefill (packed along
L, as ``dual_quantize`` packs u's last dim), (batch, D) for the update (one byte per element, the flag in bit 0: the
token's (batch, D, 1) mask with the time dim dropped). u is then ``dual_dequantize(qu, u_mask, su, s_out).to(out_dtype)``
instead of ``dequantize(qu, su).to(out_dtype)``; nothing else changes. u_dual=None: single-scale codes.

dt_proj fused into the update (``dt_proj``, a ``DtProjection``, instead of ``qdelta``): Mamba1's delta is dt_proj's
output, so the update may take dt_proj's inputs and compute the delta codes itself, one kernel fewer per layer and
decode step. With dt_proj = (q (batch, R) int8, scale per-tensor, weight (D, R) int8, weight_scale 1 or D, bias (D,)
or None) the delta codes are those of the W8A8 GEMV with its requant epilogue in delta's scale,

    qdelta = w8a8_linear_ref(q, scale, weight, weight_scale, bias, out_dtype, out_scale=delta_scale per column)

(``qmamba.ops.int8_linear``: the GEMV's bit-exact twin; out_dtype, the activation dtype, is the dtype the GEMV
rounds its output through before requantizing), and the step runs on them unchanged: bit for bit the unfused pair.

out_proj's rotated input made by the update (``rotated``, a ``RotatedOutput``): Mamba1's y feeds out_proj, whose int8
input is ``hadamard_quantize(y, scale, bits)`` (``qmamba.ops.int8_hadamard``). Given ``rotated``, the update returns
(y, those codes): on a GPU one kernel (the last block of each Hadamard block of channels rotates it, with the Hadamard
kernel's own device code), one kernel fewer per layer and decode step, bit for bit the unfused pair. ``counters``: an
int32 tensor of ``rotated_counters_size(batch, D)`` zeros the caller keeps (the kernel counts blocks in it and leaves it
zero); unused by the reference.

``selective_scan_int8`` / ``selective_scan_int8_update`` dispatch to the CUDA kernels (csrc/selective_scan/) where
``backend`` allows (``qmamba.ops.backend.use_kernels``), else to the references here.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from qmamba.ops.backend import use_kernels
from qmamba.ops.hadamard import hadamard_block
from qmamba.ops.int8_hadamard import hadamard_quantize, hadamard_quantize_ref
from qmamba.ops.int8_linear import w8a8_linear_ref
from qmamba.ops.selective_scan import _finish, selective_scan_ref
from qmamba.quant.dual_scale import DualScale, check_dual_mask, dequantize_codes
from qmamba.quant.numerics import dequantize

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class DtProjection(NamedTuple):
    """dt_proj's one-token W8A8 GEMV inputs, for the update to compute the delta codes itself (dt_proj fused; see
    the module docstring): ``q`` the dt codes (batch, R) int8 (x_proj's output columns for dt_proj, any row stride),
    ``scale`` their per-tensor scale, ``weight`` dt_proj's int8 weight (D, R), ``weight_scale`` its scale (1 or D
    elements), ``bias`` dt_proj's bias (D,) (read as fp32) or None."""

    q: torch.Tensor
    scale: torch.Tensor
    weight: torch.Tensor
    weight_scale: torch.Tensor
    bias: torch.Tensor | None = None


class RotatedOutput(NamedTuple):
    """out_proj's rotated input, made by the update (see the module docstring): ``scale`` its per-tensor scale,
    ``bits`` its bits, ``counters`` int32 zeros (``rotated_counters_size``) kept by the caller for the kernel."""
    scale: torch.Tensor
    bits: int
    counters: torch.Tensor


UPDATE_THREADS = 128  # the CUDA update's block (csrc/selective_scan: kUpdateThreads)


def rotated_counters_size(batch: int, dim: int) -> int:
    """Elements of a ``RotatedOutput.counters``: one per (sequence, Hadamard block of channels)."""
    return batch * (dim // hadamard_block(dim))


def kernel_rotates(dim: int, nstate: int) -> bool:
    """Whether the CUDA update rotates y itself at this width and state size: one of its blocks (128 threads,
    next_pow2(N) lanes a channel, at most 32) lies in one Hadamard block of 8 .. 1024 channels. Else
    ``selective_scan_int8_update`` runs the update, then the Hadamard kernel."""
    lanes = min(32, 1 << max(nstate - 1, 0).bit_length())
    b = hadamard_block(dim)
    return 8 <= b <= 8 * UPDATE_THREADS and b >= UPDATE_THREADS // lanes


def check_delta_source(op: str, qdelta, dt_proj) -> None:
    """Exactly one of the delta codes and the fused dt_proj's inputs, the latter a ``DtProjection``."""
    if (qdelta is None) == (dt_proj is None):
        got = "both" if dt_proj is not None else "neither"
        raise ValueError(f"{op}: give exactly one of qdelta (the delta codes) and dt_proj (a DtProjection: dt_proj's "
                         f"inputs, the update computes the delta codes), got {got}; pass qdelta=None with dt_proj")
    if dt_proj is not None and not isinstance(dt_proj, DtProjection):
        raise TypeError(f"{op}: dt_proj must be a qmamba.ops.int8_selective_scan.DtProjection(q, scale, weight, "
                        f"weight_scale, bias), got {type(dt_proj).__name__}")


def dt_proj_codes(dt_proj: DtProjection, delta_scale, out_dtype: torch.dtype) -> torch.Tensor:
    """The delta codes (batch, D) int8 the fused update computes: dt_proj's W8A8 GEMV requantized in delta's scale,
    by its reference (which is the GEMV bit for bit; w8a8_linear_ref checks the shapes and names the fix)."""
    if dt_proj.q.dim() != 2:
        raise ValueError(f"selective_scan_int8_update: dt_proj.q must be the dt codes of one token (batch, R), got "
                         f"shape {tuple(dt_proj.q.shape)}")
    dim = dt_proj.weight.shape[0]
    x_scale = torch.as_tensor(dt_proj.scale, dtype=torch.float32)
    out_scale = torch.as_tensor(delta_scale, dtype=torch.float32)
    if out_scale.numel() != 1:
        raise ValueError(f"selective_scan_int8: delta_scale must be per-tensor (one element), got shape "
                         f"{tuple(out_scale.shape)}")
    return w8a8_linear_ref(dt_proj.q, x_scale, dt_proj.weight, dt_proj.weight_scale, dt_proj.bias, out_dtype,
                           [out_scale.reshape(())], [dim])


def _deq(q: torch.Tensor, scale, dtype: torch.dtype, name: str) -> torch.Tensor:
    """fp32 values of ``dequantize(q, scale).to(dtype)``: what the module's scan sees after ``.float()``."""
    if q.dtype != torch.int8:
        raise TypeError(f"selective_scan_int8: {name} must hold int8 codes, got {q.dtype} (quantize it first)")
    if isinstance(scale, torch.Tensor) and scale.numel() != 1:
        raise ValueError(f"selective_scan_int8: {name}_scale must be per-tensor (one element), got shape "
                         f"{tuple(scale.shape)}")
    if isinstance(scale, torch.Tensor):
        scale = scale.reshape(())
    return dequantize(q, scale).to(dtype).float()


def _deq_u(qu, u_scale, dtype, u_dual: DualScale | None, u_mask, update: bool) -> torch.Tensor:
    """fp32 values of u rounded through ``dtype``: ``_deq`` for single-scale codes, the dual-scale decode otherwise.
    ``update``: qu is one token (batch, D) and u_mask (batch, D) holds one flag byte per element."""
    if u_dual is None:
        check_dual_mask("u", qu, None, u_mask)
        return _deq(qu, u_scale, dtype, "u")
    if qu.dtype != torch.int8:
        raise TypeError(f"selective_scan_int8: u must hold int8 codes, got {qu.dtype} (quantize it first)")
    for name, sc in (("u_scale", u_scale), ("u_dual.outlier_scale", getattr(u_dual, "outlier_scale", None))):
        if isinstance(sc, torch.Tensor) and sc.numel() != 1:
            raise ValueError(f"selective_scan_int8: {name} must be per-tensor (one element), got shape "
                             f"{tuple(sc.shape)}")
    q = qu.unsqueeze(-1) if update else qu  # the token's time dim back: its flags are packed along it
    m = u_mask.unsqueeze(-1) if (update and u_mask is not None) else u_mask
    check_dual_mask("u", q, u_dual, m)
    dual = DualScale(u_dual.outlier_scale.reshape(()), u_dual.encoding, u_dual.knee)
    v = dequantize_codes(q, torch.as_tensor(u_scale).reshape(()), dual, m)
    return (v[..., 0] if update else v).to(dtype).float()


def _check_common(out_dtype, qz, z_scale):
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"selective_scan_int8: out_dtype must be one of {_OUT_DTYPES} (the activation dtype), "
                         f"got {out_dtype}")
    if (qz is None) != (z_scale is None):
        raise ValueError("selective_scan_int8: give qz and z_scale together (or neither, for no gate)")


def _delta(qdelta, delta_scale, delta_bias, delta_softplus, out_dtype):
    """delta as ``selective_scan_ref``'s ``_prepare`` computes it: ``softplus(delta.float() + delta_bias.float())``."""
    delta = _deq(qdelta, delta_scale, out_dtype, "delta")
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return delta


def selective_scan_int8_ref(qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz=None, z_scale=None,
                            delta_bias=None, delta_softplus=True, out_dtype=torch.float32, return_last_state=False,
                            initial_state=None, u_dual: DualScale | None = None, u_mask: torch.Tensor | None = None):
    """Pure-torch int8 selective scan (prefill): the module's math, see the module docstring.

    Without ``initial_state`` the result is bit-identical to ``QuantSelectiveScan`` in int8 mode on the same codes.
    ``initial_state`` (batch, D, N) enters before step 0: its decayed contribution ``prod_{s<=t} exp(delta[s] A) h0``
    is added to the zero-state scan (an extra (batch, D, L, N) fp32 tensor; meant for tests and short sequences).
    Returns y (batch, D, L) in ``out_dtype``, and the last state (batch, D, N) fp32 when ``return_last_state``.
    """
    _check_common(out_dtype, qz, z_scale)
    if qB.dim() != 3 or qC.dim() != 3:
        raise ValueError(f"selective_scan_int8: B and C must be (batch, N, L) (Mamba1 has no groups), got "
                         f"{tuple(qB.shape)} and {tuple(qC.shape)}")
    u = _deq_u(qu, u_scale, out_dtype, u_dual, u_mask, update=False)  # (b, d, L)
    delta = _delta(qdelta, delta_scale, delta_bias, delta_softplus, out_dtype)  # (b, d, L), after softplus
    B = _deq(qB, B_scale, out_dtype, "B")  # (b, n, L)
    C = _deq(qC, C_scale, out_dtype, "C")
    z = _deq(qz, z_scale, out_dtype, "z") if qz is not None else None
    A = A.float()
    D = D.float() if D is not None else None
    h0 = initial_state.float() if initial_state is not None else None
    batch, dim, n = u.shape[0], u.shape[1], A.shape[-1]
    if h0 is not None and h0.shape != (batch, dim, n):
        raise ValueError(f"selective_scan_int8: initial_state must be (batch, D, N) = {(batch, dim, n)}, got "
                         f"{tuple(h0.shape)}")
    if u.shape[-1] == 0:  # nothing to scan: the state passes through
        y = torch.empty(u.shape, dtype=out_dtype, device=u.device)
        last = h0.clone() if h0 is not None else torch.zeros(batch, dim, n, device=u.device)
    elif h0 is None:
        # the module's call: its own softplus / bias on the same fp32 values give the same delta
        y, last = selective_scan_ref(u, delta, A, B, C, D=D, z=z, return_last_state=True)
        y = y.to(out_dtype)
    else:
        y, last = selective_scan_ref(u, delta, A, B, C, return_last_state=True)  # zero start, fp32, no D / gate
        decay = torch.cumprod(torch.exp(delta[..., None] * A[:, None, :]), dim=2)  # (b, d, L, n)
        carried = decay * h0[:, :, None, :]  # (b, d, L, n): what h0 adds to every state
        y = y + (carried * C.transpose(1, 2)[:, None]).sum(-1)
        last = last + carried[:, :, -1]
        y = _finish(y, u, D, z, out_dtype)
    return (y, last) if return_last_state else y


def selective_scan_int8_update_ref(state, qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz=None,
                                   z_scale=None, delta_bias=None, delta_softplus=True, out_dtype=torch.float32,
                                   u_dual: DualScale | None = None, u_mask: torch.Tensor | None = None,
                                   dt_proj: DtProjection | None = None, rotated: RotatedOutput | None = None):
    """One step of the recurrence (decode): ``state`` (batch, D, N) fp32 becomes ``exp(delta A) state +
    (delta u) B`` in place; returns y (batch, D) in ``out_dtype``. The module's int8 step (``QuantSelectiveScan.step``:
    dequantize to the activation dtype, then the float part's ``step``) op for op. Prefill with the last state then
    this step equals the prefill of the longer sequence (up to fp32 summation order). ``dt_proj`` (qdelta None): the
    delta codes made from dt_proj's inputs first (``dt_proj_codes``), then the same step. ``rotated``: returns (y,
    ``hadamard_quantize_ref(y, rotated.scale, rotated.bits)``)."""
    _check_common(out_dtype, qz, z_scale)
    check_delta_source("selective_scan_int8_update", qdelta, dt_proj)
    if state.dtype != torch.float32:
        raise TypeError(f"selective_scan_int8_update: state must be float32 (it is updated in place), got "
                        f"{state.dtype}")
    if qu.dim() != 2 or qB.dim() != 2 or qC.dim() != 2:
        raise ValueError(f"selective_scan_int8_update: u, delta, z must be (batch, D) and B, C (batch, N) (one token), "
                         f"got u {tuple(qu.shape)}, B {tuple(qB.shape)}, C {tuple(qC.shape)}")
    if state.shape != (qu.shape[0], qu.shape[1], qB.shape[1]):
        raise ValueError(f"selective_scan_int8_update: state must be (batch, D, N) = "
                         f"{(qu.shape[0], qu.shape[1], qB.shape[1])}, got {tuple(state.shape)}")
    if dt_proj is not None:
        if dt_proj.q.dim() != 2 or dt_proj.q.shape[0] != qu.shape[0] or tuple(dt_proj.weight.shape[:1]) != qu.shape[1:]:
            raise ValueError(f"selective_scan_int8_update: dt_proj must hold dt codes (batch, R) and a weight (D, R) "
                             f"with (batch, D) = {tuple(qu.shape)}, got q {tuple(dt_proj.q.shape)} and weight "
                             f"{tuple(dt_proj.weight.shape)}")
        qdelta = dt_proj_codes(dt_proj, delta_scale, out_dtype)
    u = _deq_u(qu, u_scale, out_dtype, u_dual, u_mask, update=True)  # (b, d)
    delta = _delta(qdelta[..., None], delta_scale, delta_bias, delta_softplus, out_dtype)[..., 0]  # (b, d)
    B = _deq(qB, B_scale, out_dtype, "B")  # (b, n)
    C = _deq(qC, C_scale, out_dtype, "C")
    z = _deq(qz, z_scale, out_dtype, "z") if qz is not None else None
    A = A.float()
    dA = torch.exp(delta[..., None] * A)  # (b, d, n)
    state.mul_(dA).add_((delta * u)[..., None] * B[:, None, :])  # SelectiveScan.step's ops, in its order
    y = (state * C[:, None, :]).sum(-1)  # (b, d)
    y = _finish(y[..., None], u[..., None], D.float() if D is not None else None,
                z[..., None] if z is not None else None, out_dtype)[..., 0]
    return y if rotated is None else (y, hadamard_quantize_ref(y, rotated.scale, rotated.bits))


def selective_scan_int8(qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz=None, z_scale=None,
                        delta_bias=None, delta_softplus=True, out_dtype=torch.float32, return_last_state=False,
                        initial_state=None, backend: str = "auto", u_dual: DualScale | None = None,
                        u_mask: torch.Tensor | None = None):
    """int8 selective scan (prefill) through the CUDA kernel where ``backend`` allows, else the reference.
    Same arguments and result as ``selective_scan_int8_ref``. The kernel's y is channel-last ((batch, L, D) memory)."""
    if use_kernels(backend, qu, "selective_scan_int8"):
        from qmamba.kernels import selective_scan as kernel

        y, last = kernel.selective_scan_int8(qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz,
                                             z_scale, delta_bias, delta_softplus, out_dtype, initial_state,
                                             u_dual=u_dual, u_mask=u_mask)
        return (y, last) if return_last_state else y
    return selective_scan_int8_ref(qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz, z_scale,
                                   delta_bias, delta_softplus, out_dtype, return_last_state, initial_state,
                                   u_dual=u_dual, u_mask=u_mask)


def selective_scan_int8_update(state, qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz=None,
                               z_scale=None, delta_bias=None, delta_softplus=True, out_dtype=torch.float32,
                               backend: str = "auto", u_dual: DualScale | None = None,
                               u_mask: torch.Tensor | None = None, dt_proj: DtProjection | None = None,
                               rotated: RotatedOutput | None = None):
    """One-token int8 scan step through the CUDA kernel where ``backend`` allows, else the reference; ``state``
    is updated in place either way. ``dt_proj`` (qdelta None): dt_proj fused; ``rotated``: (y, out_proj's rotated
    input codes), made by the update kernel where ``kernel_rotates``, else by the Hadamard kernel after it (the same
    codes); see the module docstring."""
    if use_kernels(backend, qu, "selective_scan_int8_update"):
        from qmamba.kernels import selective_scan as kernel

        fused = rotated if rotated is not None and kernel_rotates(qu.shape[1], qB.shape[1]) else None
        out = kernel.selective_scan_int8_update(state, qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale,
                                                D, qz, z_scale, delta_bias, delta_softplus, out_dtype,
                                                u_dual=u_dual, u_mask=u_mask, dt_proj=dt_proj, rotated=fused)
        if rotated is None or fused is not None:
            return out
        return out, hadamard_quantize(out, rotated.scale, rotated.bits, backend=backend)
    return selective_scan_int8_update_ref(state, qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D,
                                          qz, z_scale, delta_bias, delta_softplus, out_dtype, u_dual=u_dual,
                                          u_mask=u_mask, dt_proj=dt_proj, rotated=rotated)
