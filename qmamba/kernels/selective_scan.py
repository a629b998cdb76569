"""Python side of csrc/selective_scan/selective_scan_int8.cu: the int8 Mamba1 selective scan (prefill) and its
one-token state update, as ``torch.ops.qmamba.selective_scan_int8`` / ``selective_scan_int8_update``.

These functions check their arguments in Python (``check_selective_scan_args`` / ``check_selective_scan_update_args``,
metadata only: see ``qmamba.kernels.checks``), normalize them (dtypes, one-element scales, a missing ``D``) and call
the ops; the contract, shapes and reference are in ``qmamba.ops.int8_selective_scan``. Inputs may have any strides.
Scales should be one-element fp32 tensors on the GPU (what the quantization points hold): Python floats are accepted
but cost a host-to-device copy per call, which a CUDA graph cannot capture.
"""

from __future__ import annotations

import torch

from qmamba.kernels.build import load
from qmamba.kernels.checks import (INT32_LIMIT, fp32_flat, require_channel_scale, require_cuda, require_int8,
                                   require_out_dtype, require_per_tensor_scale, require_shape, shape_of)
from qmamba.ops.int8_selective_scan import (DtProjection, RotatedOutput, check_delta_source, kernel_rotates,
                                           rotated_counters_size)
from qmamba.quant.dual_scale import DualScale, check_dual_mask

MAX_STATE = 256     # csrc kMaxState: N <= 32 lanes x 8 states per lane
MAX_BATCH = 65536   # exclusive: the grid's y dimension (prefill) / batch index range (update)
# the fused dt_proj's int32 accumulator holds R products of at most 128 * 128 (DESIGN §3)
MAX_DT_RANK = INT32_LIMIT // (128 * 128) - 1


def _scale(scale, like: torch.Tensor) -> torch.Tensor:
    """A one-element fp32 tensor on ``like``'s device (arguments checked: the scale is per-tensor)."""
    if not isinstance(scale, torch.Tensor):
        return torch.tensor([float(scale)], dtype=torch.float32, device=like.device)
    return fp32_flat(scale, like.device)


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.dtype is torch.float32 else t.to(dtype=torch.float32)


def _check_params(op: str, dim: int, nstate: int, A, D, qz, z_scale, u_shape, z_ndim: int, delta_bias, out_dtype,
                  scales: dict) -> None:
    """Checks shared by prefill and update: the state size, A / D / delta_bias, the gate, the scales, out_dtype."""
    require_out_dtype(op, out_dtype)
    if not 1 <= nstate <= MAX_STATE:
        raise ValueError(f"{op}: the state size N must be in 1..{MAX_STATE}, got {nstate}; use backend='torch' "
                         "(qmamba.ops.int8_selective_scan)")
    require_shape(op, "A", A, (dim, nstate), "(D, N)")
    if D is not None:
        require_shape(op, "D", D, (dim,), "(D,)")
    if delta_bias is not None:
        require_shape(op, "delta_bias", delta_bias, (dim,), "(D,)")
    if (qz is None) != (z_scale is None):
        raise ValueError(f"{op}: give qz and z_scale together (or neither, for no gate)")
    if qz is not None:
        require_int8(op, "z", qz, z_ndim)
        if shape_of(qz) != u_shape:
            raise ValueError(f"{op}: z must have u's shape {u_shape}, got {shape_of(qz)}")
        scales = dict(scales, z_scale=z_scale)
    for name, s in scales.items():
        require_per_tensor_scale(op, name, s)


def check_dual_u(op: str, qu, u_dual, u_mask, update: bool) -> None:
    """A dual-scale u: its DualScale, its per-tensor outlier scale, and the mask's dtype and shape (prefill
    (batch, D, ceil(L / 8)), update (batch, D))."""
    if u_dual is None:
        check_dual_mask("u", qu, None, u_mask)
        return
    if not isinstance(u_dual, DualScale):
        raise TypeError(f"{op}: u_dual must be a qmamba.quant.dual_scale.DualScale, got {type(u_dual).__name__}")
    require_per_tensor_scale(op, "u_dual.outlier_scale", u_dual.outlier_scale, numbers_ok=False)
    if update:
        check_dual_mask("u", qu.unsqueeze(-1), u_dual, None if u_mask is None else u_mask.unsqueeze(-1))
    else:
        check_dual_mask("u", qu, u_dual, u_mask)


def _dual_op_args(u_dual, u_mask, like: torch.Tensor) -> tuple:
    """(u_encoding, u_knee, u_outlier_scale, u_mask) as the op takes them."""
    if u_dual is None:
        return 0, 0, None, None
    return u_dual.encoding_id, u_dual.knee, _scale(u_dual.outlier_scale, like), u_mask


def check_selective_scan_args(qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D=None, qz=None,
                              z_scale=None, delta_bias=None, out_dtype=torch.float32, initial_state=None,
                              u_dual=None, u_mask=None) -> tuple[int, int, int, int]:
    """Everything ``torch.ops.qmamba.selective_scan_int8`` requires of its arguments (after the wrapper's float32
    conversions), on metadata only (CPU tensors work); raises TypeError / ValueError naming the fix. Returns
    (batch, D, L, N)."""
    op = "selective_scan_int8"
    require_int8(op, "u", qu, 3, "(batch, D, L)")
    batch, dim, length = qu.shape
    require_int8(op, "delta", qdelta, 3, "(batch, D, L)")
    if shape_of(qdelta) != shape_of(qu):
        raise ValueError(f"{op}: delta must have u's shape {shape_of(qu)}, got {shape_of(qdelta)}")
    if isinstance(qB, torch.Tensor) and qB.ndim != 3:
        raise ValueError(f"{op}: B must be (batch, N, L) (Mamba1: no groups), got shape {shape_of(qB)}")
    require_int8(op, "B", qB, 3, "(batch, N, L)")
    require_int8(op, "C", qC, 3, "(batch, N, L)")
    nstate = qB.shape[1]
    if qB.shape[0] != batch or qB.shape[2] != length or shape_of(qC) != shape_of(qB):
        raise ValueError(f"{op}: B and C must be (batch, N, L) = ({batch}, N, {length}), got {shape_of(qB)} and "
                         f"{shape_of(qC)}")
    _check_params(op, dim, nstate, A, D, qz, z_scale, shape_of(qu), 3, delta_bias, out_dtype,
                  dict(u_scale=u_scale, delta_scale=delta_scale, B_scale=B_scale, C_scale=C_scale))
    if initial_state is not None:
        require_shape(op, "initial_state", initial_state, (batch, dim, nstate), "(batch, D, N)")
    check_dual_u(op, qu, u_dual, u_mask, update=False)
    if batch >= MAX_BATCH or dim >= INT32_LIMIT or length >= INT32_LIMIT:
        raise ValueError(f"{op}: sizes out of the kernel's range (batch < {MAX_BATCH}, channels and length < 2^31), "
                         f"got (batch, D, L) = {shape_of(qu)}; split the batch or the sequence")
    return batch, dim, length, nstate


def check_dt_projection(op: str, dt_proj: DtProjection, batch: int, dim: int) -> None:
    """The fused dt_proj's inputs (a ``DtProjection``): dt codes (batch, R), a per-tensor scale, an int8 weight
    (D, R), a weight scale of 1 or D elements, a bias of D elements or None (strides are the wrapper's business)."""
    require_int8(op, "dt_proj.q", dt_proj.q, 2, "(batch, R)", fix="the dt codes: x_proj's output columns for dt_proj")
    rank = dt_proj.q.shape[1]
    if dt_proj.q.shape[0] != batch or rank < 1:
        raise ValueError(f"{op}: dt_proj.q must be the dt codes (batch, R) with batch {batch} and R >= 1, got "
                         f"{shape_of(dt_proj.q)}")
    require_per_tensor_scale(op, "dt_proj.scale", dt_proj.scale)
    require_int8(op, "dt_proj.weight", dt_proj.weight, 2, "(D, R)", fix="dt_proj's int8 weight codes")
    if shape_of(dt_proj.weight) != (dim, rank):
        raise ValueError(f"{op}: dt_proj.weight must be dt_proj's (D, R) = ({dim}, {rank}) weight (D from u, R from "
                         f"dt_proj.q), got {shape_of(dt_proj.weight)}")
    require_channel_scale(op, "dt_proj.weight_scale", dt_proj.weight_scale, dim, "per-output-channel",
                          numbers_ok=False)
    if dt_proj.bias is not None:
        require_shape(op, "dt_proj.bias", dt_proj.bias, (dim,), "(D,)")
    if rank > MAX_DT_RANK:
        raise ValueError(f"{op}: dt_rank R={rank} could overflow the int32 accumulator (needs R <= {MAX_DT_RANK}); "
                         "run dt_proj on its own (qdelta from qmamba.ops.int8_linear.w8a8_linear)")


def check_rotated_output(op: str, rotated: RotatedOutput, batch: int, dim: int, nstate: int) -> None:
    """What the update kernel requires of a ``RotatedOutput`` (see ``kernel_rotates``), on metadata only."""
    if not kernel_rotates(dim, nstate):
        raise ValueError(f"{op}: the update kernel cannot rotate y at D={dim}, N={nstate} (it needs one Hadamard block "
                         "of 8..1024 channels to hold whole update blocks); call it without rotated and "
                         "hadamard_quantize y (qmamba.ops.int8_selective_scan.selective_scan_int8_update does)")
    if not 2 <= int(rotated.bits) <= 8:
        raise ValueError(f"{op}: rotated.bits must be in 2..8, got {rotated.bits}")
    require_per_tensor_scale(op, "rotated.scale", rotated.scale)
    c, n = rotated.counters, rotated_counters_size(batch, dim)
    if c.dtype != torch.int32 or c.numel() != n or not c.is_contiguous():
        raise ValueError(f"{op}: rotated.counters must be a contiguous int32 tensor of {n} zeros (one per sequence and "
                         f"Hadamard block; keep it between calls: the kernel leaves it zero), got {c.dtype} "
                         f"{tuple(c.shape)}")


def check_selective_scan_update_args(state, qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D=None,
                                     qz=None, z_scale=None, delta_bias=None, out_dtype=torch.float32, u_dual=None,
                                     u_mask=None, dt_proj: DtProjection | None = None,
                                     rotated: RotatedOutput | None = None) -> tuple[int, int, int]:
    """Everything ``torch.ops.qmamba.selective_scan_int8_update`` requires of its arguments, on metadata only (CPU
    tensors work); raises TypeError / ValueError naming the fix. Returns (batch, D, N)."""
    op = "selective_scan_int8_update"
    require_int8(op, "u", qu, 2, "(batch, D)")
    batch, dim = qu.shape
    check_delta_source(op, qdelta, dt_proj)
    if dt_proj is not None:
        check_dt_projection(op, dt_proj, batch, dim)
    else:
        require_int8(op, "delta", qdelta, 2, "(batch, D)")
        if shape_of(qdelta) != shape_of(qu):
            raise ValueError(f"{op}: delta must have u's shape (batch, D) {shape_of(qu)}, got {shape_of(qdelta)}")
    require_int8(op, "B", qB, 2, "(batch, N)")
    require_int8(op, "C", qC, 2, "(batch, N)")
    nstate = qB.shape[1]
    if qB.shape[0] != batch or shape_of(qC) != shape_of(qB):
        raise ValueError(f"{op}: B and C must be (batch, N) with batch {batch}, got {shape_of(qB)} and "
                         f"{shape_of(qC)}")
    # the state is updated in place, so the wrapper cannot convert it: it must already be fp32
    require_shape(op, "state", state, (batch, dim, nstate), "(batch, D, N)")
    if state.dtype != torch.float32:
        raise TypeError(f"{op}: state must be float32 (updated in place), got {state.dtype}")
    _check_params(op, dim, nstate, A, D, qz, z_scale, shape_of(qu), 2, delta_bias, out_dtype,
                  dict(u_scale=u_scale, delta_scale=delta_scale, B_scale=B_scale, C_scale=C_scale))
    check_dual_u(op, qu, u_dual, u_mask, update=True)
    if rotated is not None:
        check_rotated_output(op, rotated, batch, dim, nstate)
    if batch >= MAX_BATCH or dim >= INT32_LIMIT:
        raise ValueError(f"{op}: batch must be < {MAX_BATCH} (and channels < 2^31), got {shape_of(qu)}; split the "
                         "batch")
    return batch, dim, nstate


def selective_scan_int8(qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D=None, qz=None, z_scale=None,
                        delta_bias=None, delta_softplus=True, out_dtype=torch.float32, initial_state=None,
                        u_dual: DualScale | None = None, u_mask: torch.Tensor | None = None, states_per_lane: int = 0):
    """Prefill. qu, qdelta, qz (batch, D, L) int8; qB, qC (batch, N, L) int8; A (D, N); D, delta_bias (D,);
    initial_state (batch, D, N) or None; a dual-scale u: u_dual and (mask encoding) u_mask (batch, D, ceil(L / 8))
    uint8, any strides. Returns (y (batch, D, L) in out_dtype, stored channel-last, i.e. a transposed contiguous
    (batch, L, D); last_state (batch, D, N) fp32). ``states_per_lane`` (1, 2, 4 or 8; 0: the kernel picks by the
    GPU's size): how many of a channel's states each thread walks, to test or time each variant at any shape."""
    check_selective_scan_args(qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz, z_scale,
                              delta_bias, out_dtype, initial_state, u_dual, u_mask)
    load()
    # scales are moved to u's device by _scale; the other tensors must already be there
    require_cuda("selective_scan_int8", "u", qu, delta=qdelta, A=A, B=qB, C=qC, D=D, z=qz, delta_bias=delta_bias,
                 initial_state=initial_state, u_mask=u_mask)
    A = _f32(A)
    D = _f32(D) if D is not None else torch.zeros(qu.shape[1], dtype=torch.float32, device=qu.device)
    y, last = torch.ops.qmamba.selective_scan_int8(
        qu, _scale(u_scale, qu), qdelta, _scale(delta_scale, qu), A, qB, _scale(B_scale, qu), qC,
        _scale(C_scale, qu), D, qz, _scale(z_scale, qu) if qz is not None else None, _f32(delta_bias),
        bool(delta_softplus), out_dtype, _f32(initial_state), *_dual_op_args(u_dual, u_mask, qu), int(states_per_lane))
    return y, last


def _dt_proj_op_args(dt_proj: DtProjection | None, like: torch.Tensor) -> tuple:
    """(dt, dt_scale, dt_weight, dt_weight_scale, dt_bias) as the op takes them (all None without dt_proj): dt
    with a contiguous last dim (x_proj's output columns already are: no copy), the weight contiguous, scales and bias
    flat fp32 (no op when they already are)."""
    if dt_proj is None:
        return None, None, None, None, None
    q, w = dt_proj.q, dt_proj.weight
    if q.stride(-1) != 1 and q.shape[-1] != 1:
        q = q.contiguous()
    bias = None if dt_proj.bias is None else fp32_flat(dt_proj.bias, like.device)
    return (q, _scale(dt_proj.scale, like), w if w.is_contiguous() else w.contiguous(),
            fp32_flat(dt_proj.weight_scale, like.device), bias)


def selective_scan_int8_update(state, qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D=None, qz=None,
                               z_scale=None, delta_bias=None, delta_softplus=True, out_dtype=torch.float32,
                               u_dual: DualScale | None = None, u_mask: torch.Tensor | None = None,
                               dt_proj: DtProjection | None = None, rotated: RotatedOutput | None = None):
    """One token. ``state`` (batch, D, N) fp32 is updated in place (it must already be fp32: a converted copy would
    not be the caller's state); qu, qdelta, qz (batch, D) int8; qB, qC (batch, N) int8; a dual-scale u: u_dual and
    (mask encoding) u_mask (batch, D) uint8, the flag in bit 0. ``dt_proj`` instead of qdelta (None): dt_proj fused,
    the kernel computes the delta codes from dt_proj's inputs as its GEMV would (``qmamba.ops.int8_selective_scan``).
    Returns y (batch, D) in out_dtype; with ``rotated`` (where ``kernel_rotates``), (y, out_proj's rotated input
    codes (batch, D) int8), the kernel rotating and quantizing y itself."""
    check_selective_scan_update_args(state, qu, u_scale, qdelta, delta_scale, A, qB, B_scale, qC, C_scale, D, qz,
                                     z_scale, delta_bias, out_dtype, u_dual, u_mask, dt_proj, rotated)
    load()
    fused = {} if dt_proj is None else {"dt_proj.q": dt_proj.q, "dt_proj.weight": dt_proj.weight,
                                        "dt_proj.weight_scale": dt_proj.weight_scale, "dt_proj.bias": dt_proj.bias}
    if rotated is not None:
        fused["rotated.counters"] = rotated.counters
    require_cuda("selective_scan_int8_update", "u", qu, state=state, delta=qdelta, A=A, B=qB, C=qC, D=D, z=qz,
                 delta_bias=delta_bias, u_mask=u_mask, **fused)
    A = _f32(A)
    D = _f32(D) if D is not None else torch.zeros(qu.shape[1], dtype=torch.float32, device=qu.device)
    out = torch.ops.qmamba.selective_scan_int8_update(
        state, qu, _scale(u_scale, qu), qdelta, _scale(delta_scale, qu), A, qB, _scale(B_scale, qu), qC,
        _scale(C_scale, qu), D, qz, _scale(z_scale, qu) if qz is not None else None, _f32(delta_bias),
        bool(delta_softplus), out_dtype, *_dual_op_args(u_dual, u_mask, qu), *_dt_proj_op_args(dt_proj, qu),
        *((None, 8, None) if rotated is None else (_scale(rotated.scale, qu), int(rotated.bits), rotated.counters)))
    return out[0] if rotated is None else (out[0], out[1])
