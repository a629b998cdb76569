"""Python side of csrc/selective_scan/selective_scan_int8.cu: the int8 Mamba1 selective scan (prefill) and its
one-token state update, as ``torch.ops.qmamba.selective_scan_int8`` / ``selective_scan_int8_update``.

These functions only normalize arguments (dtypes, one-element scales, a missing ``D``) and call the ops; the
contract, shapes and reference are in ``qmamba.ops.int8_selective_scan``. Inputs may have any strides. Scales should
be one-element fp32 tensors on the GPU (what the quantization points hold): Python floats are accepted but cost a
host-to-device copy per call, which a CUDA graph cannot capture.
"""

from __future__ import annotations

import torch

from qmamba.kernels.build import load

_OUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scale(scale, like: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor):
        return torch.tensor([float(scale)], dtype=torch.float32, device=like.device)
    if scale.numel() != 1:
        raise ValueError(f"selective_scan_int8: {name} must be a per-tensor scale (one element), got shape "
                         f"{tuple(scale.shape)}")
    return scale.reshape(1).to(device=like.device, dtype=torch.float32)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.to(dtype=torch.float32)


def _check(out_dtype, qz, z_scale):
    if out_dtype not in _OUT_DTYPES:
        raise ValueError(f"selective_scan_int8: out_dtype must be one of {_OUT_DTYPES}, got {out_dtype}")
    if (qz is None) != (z_scale is None):
        raise ValueError("selective_scan_int8: give qz and z_scale together (or neither, for no gate)")


def selective_scan_int8(qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D=None, qz=None, z_scale=None,
                        delta_bias=None, delta_softplus=True, out_dtype=torch.float32, initial_state=None):
    """Prefill. qu, qdelta, qz (batch, D, L) int8; qB, qC (batch, N, L) int8; A (D, N); D, delta_bias (D,);
    initial_state (batch, D, N) or None. Returns (y (batch, D, L) in out_dtype, stored channel-last, i.e. a
    transposed contiguous (batch, L, D); last_state (batch, D, N) fp32)."""
    load()
    _check(out_dtype, qz, z_scale)
    A = _f32(A)
    D = _f32(D) if D is not None else torch.zeros(qu.shape[1], dtype=torch.float32, device=qu.device)
    y, last = torch.ops.qmamba.selective_scan_int8(
        qu, _scale(u_scale, qu, "u_scale"), qdelta, _scale(delta_scale, qu, "delta_scale"), A,
        qB, _scale(B_scale, qu, "B_scale"), qC, _scale(C_scale, qu, "C_scale"), D,
        qz, _scale(z_scale, qu, "z_scale") if qz is not None else None, _f32(delta_bias), bool(delta_softplus),
        out_dtype, _f32(initial_state))
    return y, last


def selective_scan_int8_update(state, qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D=None, qz=None,
                               z_scale=None, delta_bias=None, delta_softplus=True, out_dtype=torch.float32):
    """One token. ``state`` (batch, D, N) fp32 is updated in place (it must already be fp32: a converted copy would
    not be the caller's state); qu, qdelta, qz (batch, D) int8; qB, qC (batch, N) int8. Returns y (batch, D) in
    out_dtype."""
    load()
    _check(out_dtype, qz, z_scale)
    if state.dtype != torch.float32:
        raise TypeError(f"selective_scan_int8_update: state must be float32 (updated in place), got {state.dtype}")
    A = _f32(A)
    D = _f32(D) if D is not None else torch.zeros(qu.shape[1], dtype=torch.float32, device=qu.device)
    return torch.ops.qmamba.selective_scan_int8_update(
        state, qu, _scale(u_scale, qu, "u_scale"), qdelta, _scale(delta_scale, qu, "delta_scale"), A,
        qB, _scale(B_scale, qu, "B_scale"), qC, _scale(C_scale, qu, "C_scale"), D,
        qz, _scale(z_scale, qu, "z_scale") if qz is not None else None, _f32(delta_bias), bool(delta_softplus),
        out_dtype)
