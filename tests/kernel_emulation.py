"""The int8 model's GPU path, run on a CPU: every kernel wrapper of ``qmamba.kernels`` is taken as on a GPU, each
``torch.ops.qmamba`` op is computed by its torch reference from the op's own positional arguments (checked against
csrc's schema, ``qmamba.kernels.schemas``; results in the op's layout), and the Triton kernels run in Triton's
interpreter (``TRITON_INTERPRET=1`` must be set before triton is imported: use the ``interpret`` fixture).

What this catches that the dry count (benchmarks/host_ops.py) cannot: a wrapper that hands an op its arguments in
the wrong order or scale, or misreads its results; what it cannot: the CUDA kernels themselves (tests/gpu/).
"""

from __future__ import annotations

import contextlib

import torch

from qmamba.kernels.schemas import op_schemas
from qmamba.kernels.stand_ins import gpu_path_on_cpu
from qmamba.quant.dual_scale import DualScale

ENCODINGS = {1: "mask", 2: "piecewise"}


def _dual(encoding: int, knee: int, outlier_scale) -> DualScale | None:
    return None if encoding == 0 else DualScale(outlier_scale, ENCODINGS[encoding], knee)


def _conv_duals(n: int, index: int, encoding: int, knee: int, outlier_scale) -> list:
    """The conv ref's out_duals from the op's dual arguments: none, or the one dual-scale output at ``index``."""
    if index < 0:
        return []
    duals = [None] * n
    duals[index] = _dual(encoding, knee, outlier_scale)
    return duals


def _channel_last(t: torch.Tensor) -> torch.Tensor:
    """(B, D, L) values stored as (B, L, D), as the conv and scan kernels store them."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def _conv_outputs(result, n_codes: int, dual_index: int, encoding: int, update: bool) -> list:
    codes, masks = result if isinstance(result, tuple) else (result, None)
    if n_codes == 0:
        return [codes if update else _channel_last(codes)]
    outs = [c if update else _channel_last(c) for c in codes]
    if dual_index >= 0 and ENCODINGS[encoding] == "mask":
        outs.append(masks[dual_index] if update else _channel_last(masks[dual_index]))
    return outs


def quantize_int8(x, scale, axis, bits):
    from qmamba.ops.int8_quantize import quantize_int8_ref

    return quantize_int8_ref(x, scale, axis, bits)


def hadamard_quantize(x, scale, bits):
    from qmamba.ops.int8_hadamard import hadamard_quantize_ref

    return hadamard_quantize_ref(x, scale, bits)


def conv1d_int8(x, x_scale, w, w_scale, bias, silu, out_dtype, out_scales, dual_index, dual_encoding, dual_knee,
                dual_outlier_scale):
    from qmamba.ops.int8_conv1d import conv1d_int8_ref

    duals = _conv_duals(len(out_scales), dual_index, dual_encoding, dual_knee, dual_outlier_scale)
    result = conv1d_int8_ref(x, x_scale, w, w_scale, bias, silu, out_dtype, list(out_scales), duals)
    return _conv_outputs(result, len(out_scales), dual_index, dual_encoding, update=False)


def conv1d_int8_update(x, conv_state, x_scale, w, w_scale, bias, silu, out_dtype, out_scales, dual_index,
                       dual_encoding, dual_knee, dual_outlier_scale):
    from qmamba.ops.int8_conv1d import conv1d_int8_update_ref

    duals = _conv_duals(len(out_scales), dual_index, dual_encoding, dual_knee, dual_outlier_scale)
    result = conv1d_int8_update_ref(x, conv_state, x_scale, w, w_scale, bias, silu, out_dtype, list(out_scales),
                                    duals)
    return _conv_outputs(result, len(out_scales), dual_index, dual_encoding, update=True)


def add_rmsnorm_quant(hidden, residual, weight, eps, in_scale, residual_in_fp32):
    from qmamba.ops.int8_norm import add_rmsnorm_quant_ref

    codes, res = add_rmsnorm_quant_ref(hidden, residual, weight, eps, in_scale, residual_in_fp32)
    d = hidden.shape[-1]
    return [codes.reshape(-1, d), res.reshape(-1, d)]  # the kernel's (T, d) rows


def w8a8_gemv(x, x_scale, w, w_scale, bias, out_dtype, out_scale, out_bounds):
    from qmamba.ops.int8_linear import w8a8_linear_ref

    n = w.shape[0]
    if not out_scale:
        return w8a8_linear_ref(x, x_scale, w, w_scale, bias, out_dtype)
    if len(out_scale) == 1 and n > 1 and out_scale[0].numel() == n:  # one scale per column
        return w8a8_linear_ref(x, x_scale, w, w_scale, bias, out_dtype, out_scale[0])
    edges = [0, *out_bounds, n]  # one one-element scale per segment of columns (one segment: all of them)
    return w8a8_linear_ref(x, x_scale, w, w_scale, bias, out_dtype, list(out_scale),
                           [b - a for a, b in zip(edges, edges[1:])])


def w8a8_gemv_conv_update(x, x_scale, w, w_scale, bias, out_dtype, out_scale, out_bounds, conv_columns, conv_state,
                          conv_w, conv_w_scale, conv_bias, silu, conv_out_scales, dual_index, dual_encoding, dual_knee,
                          dual_outlier_scale):
    from qmamba.ops.int8_conv1d import w8a8_gemv_conv1d_update_ref
    from qmamba.ops.int8_linear import GemvInputs

    edges = [0, *out_bounds, w.shape[0]]  # the op takes segment scales only (the first: the conv input's)
    proj = GemvInputs(x, x_scale, w, w_scale, bias, list(out_scale), [b - a for a, b in zip(edges, edges[1:])])
    assert proj.out_columns[0] == conv_columns
    duals = _conv_duals(len(conv_out_scales), dual_index, dual_encoding, dual_knee, dual_outlier_scale)
    codes, result = w8a8_gemv_conv1d_update_ref(proj, conv_state, conv_w, conv_w_scale, conv_bias, silu, out_dtype,
                                                list(conv_out_scales), duals)
    return [codes, *_conv_outputs(result, len(conv_out_scales), dual_index, dual_encoding, update=True)]


def selective_scan_int8(u, u_scale, delta, delta_scale, A, B, B_scale, C, C_scale, D, z, z_scale, delta_bias,
                        delta_softplus, out_dtype, initial_state, u_encoding, u_knee, u_outlier_scale, u_mask,
                        states_per_lane):
    from qmamba.ops.int8_selective_scan import selective_scan_int8_ref

    y, last = selective_scan_int8_ref(u, u_scale, delta, delta_scale, A, B, B_scale, C, C_scale, D, z, z_scale,
                                      delta_bias, delta_softplus, out_dtype, True, initial_state,
                                      _dual(u_encoding, u_knee, u_outlier_scale), u_mask)
    return [_channel_last(y), last.float()]


def selective_scan_int8_update(state, u, u_scale, delta, delta_scale, A, B, B_scale, C, C_scale, D, z, z_scale,
                               delta_bias, delta_softplus, out_dtype, u_encoding, u_knee, u_outlier_scale, u_mask,
                               dt, dt_scale, dt_weight, dt_weight_scale, dt_bias, out_scale, out_bits,
                               out_counters):
    from qmamba.ops.int8_selective_scan import DtProjection, RotatedOutput, selective_scan_int8_update_ref

    # dt given (delta None): dt_proj fused, its inputs as the reference takes them; out_scale: y rotated too
    dt_proj = None if dt is None else DtProjection(dt, dt_scale, dt_weight, dt_weight_scale, dt_bias)
    rotated = None if out_scale is None else RotatedOutput(out_scale, out_bits, out_counters)
    out = selective_scan_int8_update_ref(state, u, u_scale, delta, delta_scale, A, B, B_scale, C, C_scale, D, z,
                                         z_scale, delta_bias, delta_softplus, out_dtype,
                                         _dual(u_encoding, u_knee, u_outlier_scale), u_mask, dt_proj, rotated)
    return [out] if rotated is None else list(out)


OPS = {"quantize_int8": quantize_int8, "hadamard_quantize": hadamard_quantize, "conv1d_int8": conv1d_int8,
       "conv1d_int8_update": conv1d_int8_update, "add_rmsnorm_quant": add_rmsnorm_quant, "w8a8_gemv": w8a8_gemv,
       "w8a8_gemv_conv_update": w8a8_gemv_conv_update,
       "selective_scan_int8": selective_scan_int8, "selective_scan_int8_update": selective_scan_int8_update}


@contextlib.contextmanager
def emulated_kernels(calls: dict):
    """Inside: the int8 twins take qmamba's kernel paths on CPU tensors (``qmamba.kernels.stand_ins``), the csrc ops
    are ``OPS`` (each call schema-checked and counted in ``calls``); the Triton kernels run for real (in the
    interpreter); mamba_ssm's float norms stay torch (``qmamba.ops.norm``). Everything restored on exit."""
    # conv1d_silu: a test helper of the conv kernel; set_launch_overlap: a host switch, no kernel (emulated or not,
    # kernels run one after the other)
    missing = set(op_schemas()) - {"conv1d_silu", "set_launch_overlap"} - set(OPS)
    assert not missing, f"no emulation for csrc ops {sorted(missing)}"
    with gpu_path_on_cpu(OPS, calls):
        yield
