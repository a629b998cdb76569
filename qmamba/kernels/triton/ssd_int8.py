"""Triton kernels of the int8 Mamba2 SSD: the chunked scan (prefill) and its one-token decode step.

They read int8 codes of x, dt, B, C and dequantize in-kernel (``q * scale`` in fp32, DESIGN §3); all math is fp32, so
results match ``qmamba.ops.int8_ssd``'s references to fp32 rounding (the summation order differs; decays are
differences of cumulative log-decays, as in mamba_ssm). The dots run on tensor cores without giving that up:
C_i . B_j is a dot of the int8 codes (int32, exact) times the two scales, and every fp32 dot uses
``DOT_PRECISION = "tf32x3"`` (each operand split into a TF32 head and tail, three TF32 products: ~fp32 accuracy, where
one TF32 dot would round each operand to 10 mantissa bits). ``"ieee"`` (fp32 FMA units, no tensor cores) is what the
first int8 Mamba2-2.7b prefill ran with (742 ms against mamba_ssm's 66 ms, RESULTS.md).

Prefill, chunk length T, nc = ceil(L / T) chunks (the last one padded: masked loads, nothing stored past L):
    1. ``_dt_cumsum_kernel``     dt = softplus(dt + dt_bias) and a_cum = cumsum_t(dt A) per chunk   -> (b, h, nc, T)
    2. ``_chunk_state_kernel``   state each chunk adds at its end: sum_j exp(a_end - a_j) dt_j x_j B_j^T  (p x n)
    3. ``_state_passing_kernel`` states entering each chunk, sequentially over chunks (+ initial state), in place of
                                 the chunk states; the state after the last chunk is the final state
    4. ``_chunk_scan_kernel``    y_i = exp(a_i) C_i S_entering + sum_{j<=i} (C_i . B_j) exp(a_i - a_j) dt_j x_j + D x_i
Decode: ``_step_kernel``, one program per (batch, head, block of headdim), its state tile (P_blk, n) in registers,
updated in place.

Dual-scale x (issue 5, ``qmamba.quant.dual_scale``): every read of qx (the chunk-state kernel, the chunk-scan
kernel's intra-chunk term and its D x term, the step kernel) goes through one helper, ``_x_values``, picked by the
constexpr ``X_ENC`` (0 single scale, 1 mask, 2 piecewise; ``DualScale.encoding_id``) with s_in the per-head
``x_scale`` and s_out the per-head outlier scale (one element: head stride 0):
    X_ENC 0    q * s_in                              (the code of the single-scale kernels, nothing else is read)
    X_ENC 1    byte = mask[..., p // 8], flag = (byte >> (p % 8)) & 1;   q * (flag ? s_out : s_in)
    X_ENC 2    a = |q| as int32 (-128 -> 128);   a <= KNEE: q * s_in
               else outer = KNEE * s_in + (a - KNEE) * s_out,  q < 0 ? -outer : outer
The ops are ``dual_scale``'s fp32 ops, but the compiler may contract the piecewise ``(a - KNEE) * s_out + KNEE * s_in``
into one FMA (one rounding instead of two), so an outlier's value can differ from the reference by 1 ulp; the kernels
match the references only to fp32 rounding anyway (summation order). The mask encoding is exact: one product.
The mask (uint8, flags packed 8 a byte along headdim, bit j of byte i = element 8i + j) is read with its own strides.

Strides are passed for every input, so views (x, B, C split out of the conv output) need no copy. Scales are tensors
(never read on the host) and nothing depends on values at launch, so the decode step can be captured in a CUDA graph.
Runs under ``TRITON_INTERPRET=1`` on CPU tensors (tests).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qmamba.kernels.checks import fp32_flat
from qmamba.kernels.triton.launch import on_device_of
from qmamba.kernels.triton.fake_quant import _codes as _clamp_rint
from qmamba.quant.dual_scale import DualScale, check_dual_mask

# every fp32 tl.dot: three TF32 tensor-core products per dot, ~fp32 accurate (see the top of this file)
DOT_PRECISION = tl.constexpr("tf32x3")
# the largest d_state whose (rows x d_state) C tile the scan kernel keeps whole in registers
MAX_D_STATE = 256


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20): x above 20, else log1p(exp(x)), log1p accurate for tiny exp(x) (Kahan)."""
    u = tl.exp(tl.minimum(x, 20.0))
    w = 1.0 + u
    log1p = tl.where(w == 1.0, u, tl.log(w) * (u / tl.where(w == 1.0, 1.0, w - 1.0)))
    return tl.where(x > 20.0, x, log1p)


@triton.jit
def _quantize_codes(v, s):
    """int8 codes (as fp32 integers) of fp32 v in scale s: clamp(rint(v * (1 / s)), -128, 127) with the reciprocal
    in IEEE fp32 (``div_rn``) and the product rounded to fp32 (the clamp between it and the rint's add keeps them
    from fusing): ``numerics.quantize``'s codes, by the fused fake-quant's ``_codes``."""
    return _clamp_rint(v * tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s), -128.0, 127.0)


@triton.jit
def _codes_in(v, s, FLOAT_IN: tl.constexpr):
    """Loaded codes as int8; FLOAT_IN: ``v`` is the float activation and its codes are made here
    (``_quantize_codes``, the quantize kernel's codes)."""
    if FLOAT_IN:
        v = _quantize_codes(v.to(tl.float32), s).to(tl.int8)
    return v


@triton.jit
def _x_values(q, s_in, s_out, m_rows, p, s_m_p, ld_mask, X_ENC: tl.constexpr, KNEE: tl.constexpr):
    """fp32 values of loaded int8 codes ``q`` of x (module docstring, "Dual-scale x"). ``p``: each element's index in
    the last (headdim) dim, broadcast like ``q``; ``m_rows``: pointers to the first mask byte of each element's row;
    ``ld_mask``: the mask ``q`` was loaded with. X_ENC 0 uses neither ``s_out`` nor the mask: ``q * s_in``."""
    if X_ENC == 1:  # mask: bit p % 8 of byte p // 8 of the row flags an outlier
        byte = tl.load(m_rows + (p // 8) * s_m_p, mask=ld_mask, other=0).to(tl.int32)
        flag = ((byte >> (p % 8)) & 1) != 0
        x = q.to(tl.float32) * tl.where(flag, s_out, s_in)
    elif X_ENC == 2:  # piecewise: codes above the knee step by s_out from KNEE * s_in
        a = tl.abs(q.to(tl.int32))  # -128 -> 128
        outer = KNEE * s_in + (a - KNEE).to(tl.float32) * s_out
        x = tl.where(a > KNEE, tl.where(q < 0, -outer, outer), q.to(tl.float32) * s_in)
    else:
        x = q.to(tl.float32) * s_in
    return x


@triton.jit
def _x_outlier_scale(s_out_ptr, h, s_xo_h, X_ENC: tl.constexpr):
    """This head's outlier scale; single scale (X_ENC 0) reads nothing (a placeholder ``_x_values`` never uses)."""
    if X_ENC != 0:
        s_out = tl.load(s_out_ptr + h * s_xo_h)
    else:
        s_out = 1.0
    return s_out


@triton.jit
def _dt_cumsum_kernel(qdt_ptr, dt_scale_ptr, dt_bias_ptr, A_ptr, dt_out_ptr, acum_ptr,
                      L, H, nchunks, chunk_size,
                      s_dt_b, s_dt_l, s_dt_h, s_dts_h,
                      HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_H: tl.constexpr):
    pid = tl.program_id(0)  # b * nchunks + c
    pid_h = tl.program_id(1)
    b = pid // nchunks
    c = pid % nchunks
    t = tl.arange(0, BLOCK_T)
    hh = pid_h * BLOCK_H + tl.arange(0, BLOCK_H)
    l = c * chunk_size + t
    in_chunk = t < chunk_size
    valid = in_chunk & (l < L)
    hmask = hh < H
    q = tl.load(qdt_ptr + b.to(tl.int64) * s_dt_b + l[:, None] * s_dt_l + hh[None, :] * s_dt_h,
                mask=valid[:, None] & hmask[None, :], other=0).to(tl.float32)  # (T, H_blk)
    dt = q * tl.load(dt_scale_ptr + hh * s_dts_h, mask=hmask, other=1.0)[None, :]
    if HAS_DT_BIAS:
        dt = dt + tl.load(dt_bias_ptr + hh, mask=hmask, other=0.0)[None, :]
    if DT_SOFTPLUS:
        dt = _softplus(dt)
    # padded steps: no input and no decay, so a_cum stays at the last real step's value to the chunk's end
    dt = tl.where(valid[:, None] & hmask[None, :], dt, 0.0)
    a = dt * tl.load(A_ptr + hh, mask=hmask, other=0.0)[None, :]
    acum = tl.cumsum(a, axis=0)
    off = ((b * H + hh[None, :]).to(tl.int64) * nchunks + c) * chunk_size + t[:, None]  # (b, h, nc, T) layout
    smask = in_chunk[:, None] & hmask[None, :]
    tl.store(dt_out_ptr + off, dt, mask=smask)
    tl.store(acum_ptr + off, acum, mask=smask)


@triton.jit
def _chunk_state_kernel(qx_ptr, x_scale_ptr, x_out_ptr, x_mask_ptr, qB_ptr, B_scale_ptr, dt_ptr, acum_ptr, states_ptr,
                        L, H, P, N, nchunks, chunk_size, heads_per_group,
                        s_x_b, s_x_l, s_x_h, s_x_p, s_xs_h, s_xo_h,
                        s_m_b, s_m_l, s_m_h, s_m_p,
                        s_B_b, s_B_l, s_B_g, s_B_n, s_Bs_g,
                        X_ENC: tl.constexpr, KNEE: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                        FLOAT_IN: tl.constexpr):
    pid = tl.program_id(0)  # (b * nchunks + c) * H + h: heads of one chunk run side by side and share B
    pid_p = tl.program_id(1)
    pid_n = tl.program_id(2)
    h = pid % H
    c = (pid // H) % nchunks
    b = pid // (H * nchunks)
    g = h // heads_per_group
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    pmask = p < P
    nmask = n < N
    x_scale = tl.load(x_scale_ptr + h * s_xs_h)
    x_out = _x_outlier_scale(x_out_ptr, h, s_xo_h, X_ENC)
    B_scale = tl.load(B_scale_ptr + g * s_Bs_g)
    row = ((b * H + h).to(tl.int64) * nchunks + c) * chunk_size  # this (b, h, c) in the (b, h, nc, T) buffers
    a_end = tl.load(acum_ptr + row + chunk_size - 1)
    x_base = qx_ptr + b.to(tl.int64) * s_x_b + h * s_x_h
    m_base = x_mask_ptr + b.to(tl.int64) * s_m_b + h * s_m_h
    B_base = qB_ptr + b.to(tl.int64) * s_B_b + g * s_B_g
    acc = tl.zeros((BLOCK_P, BLOCK_N), dtype=tl.float32)
    for k in range(0, chunk_size, BLOCK_K):
        t = k + tl.arange(0, BLOCK_K)
        l = c * chunk_size + t
        valid = (t < chunk_size) & (l < L)
        xmask = pmask[:, None] & valid[None, :]
        xT = _x_values(_codes_in(tl.load(x_base + p[:, None] * s_x_p + l[None, :] * s_x_l, mask=xmask, other=0),
                                 x_scale, FLOAT_IN),
                       x_scale, x_out, m_base + l[None, :] * s_m_l, p[:, None], s_m_p, xmask, X_ENC, KNEE)  # (P_blk, K)
        dt = tl.load(dt_ptr + row + t, mask=valid, other=0.0)
        ac = tl.load(acum_ptr + row + t, mask=valid, other=0.0)
        xT = (xT * dt[None, :]) * tl.exp(a_end - ac)[None, :]  # discretized input, decayed to the chunk's end
        Bv = _codes_in(tl.load(B_base + l[:, None] * s_B_l + n[None, :] * s_B_n, mask=valid[:, None] & nmask[None, :],
                               other=0), B_scale, FLOAT_IN).to(tl.float32) * B_scale  # (K, N_blk)
        acc += tl.dot(xT, Bv, input_precision=DOT_PRECISION)
    off = pid.to(tl.int64) * (P * N) + p[:, None] * N + n[None, :]  # (b, nc, h, p, n) layout
    tl.store(states_ptr + off, acc, mask=pmask[:, None] & nmask[None, :])


@triton.jit
def _state_passing_kernel(states_ptr, acum_ptr, init_ptr, final_ptr,
                          H, N, PN, nchunks, chunk_size,
                          s_i_b, s_i_h, s_i_p, s_i_n,
                          HAS_INIT: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)  # b * H + h
    pid_e = tl.program_id(1)
    b = pid // H
    h = pid % H
    e = pid_e * BLOCK + tl.arange(0, BLOCK)  # flat (p, n) index
    emask = e < PN
    if HAS_INIT:
        s = tl.load(init_ptr + b.to(tl.int64) * s_i_b + h * s_i_h + (e // N) * s_i_p + (e % N) * s_i_n,
                    mask=emask, other=0.0).to(tl.float32)
    else:
        s = tl.zeros((BLOCK,), dtype=tl.float32)
    for c in range(nchunks):
        ptr = states_ptr + ((b * nchunks + c).to(tl.int64) * H + h) * PN + e
        chunk_state = tl.load(ptr, mask=emask, other=0.0)
        tl.store(ptr, s, mask=emask)  # the buffer now holds the state entering chunk c
        decay = tl.exp(tl.load(acum_ptr + (pid.to(tl.int64) * nchunks + c) * chunk_size + chunk_size - 1))
        s = decay * s + chunk_state
    tl.store(final_ptr + pid.to(tl.int64) * PN + e, s, mask=emask)


@triton.jit
def _chunk_scan_kernel(qx_ptr, x_scale_ptr, x_out_ptr, x_mask_ptr, qB_ptr, B_scale_ptr, qC_ptr, C_scale_ptr, D_ptr,
                       dt_ptr, acum_ptr, states_ptr, y_ptr,
                       L, H, P, N, nchunks, chunk_size, heads_per_group,
                       s_x_b, s_x_l, s_x_h, s_x_p, s_xs_h, s_xo_h,
                       s_m_b, s_m_l, s_m_h, s_m_p,
                       s_B_b, s_B_l, s_B_g, s_B_n, s_Bs_g,
                       s_C_b, s_C_l, s_C_g, s_C_n, s_Cs_g,
                       s_D_h, s_D_p,
                       s_y_b, s_y_l, s_y_h, s_y_p,
                       HAS_D: tl.constexpr, X_ENC: tl.constexpr, KNEE: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                       FLOAT_IN: tl.constexpr):
    pid = tl.program_id(0)  # (b * nchunks + c) * H + h
    pid_m = tl.program_id(1)
    pid_p = tl.program_id(2)
    h = pid % H
    c = (pid // H) % nchunks
    b = pid // (H * nchunks)
    g = h // heads_per_group
    m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)  # output rows (positions in the chunk)
    lm = c * chunk_size + m
    valid_m = (m < chunk_size) & (lm < L)
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < P
    n = tl.arange(0, BLOCK_N)  # all of d_state (>= 32: the int8 dot's least K)
    nmask = n < N
    x_scale = tl.load(x_scale_ptr + h * s_xs_h)
    x_out = _x_outlier_scale(x_out_ptr, h, s_xo_h, X_ENC)
    B_scale = tl.load(B_scale_ptr + g * s_Bs_g)
    C_scale = tl.load(C_scale_ptr + g * s_Cs_g)
    row = ((b * H + h).to(tl.int64) * nchunks + c) * chunk_size
    x_base = qx_ptr + b.to(tl.int64) * s_x_b + h * s_x_h
    m_base = x_mask_ptr + b.to(tl.int64) * s_m_b + h * s_m_h
    B_base = qB_ptr + b.to(tl.int64) * s_B_b + g * s_B_g
    acum_m = tl.load(acum_ptr + row + m, mask=m < chunk_size, other=0.0)
    qCv = _codes_in(tl.load(qC_ptr + b.to(tl.int64) * s_C_b + g * s_C_g + lm[:, None] * s_C_l + n[None, :] * s_C_n,
                            mask=valid_m[:, None] & nmask[None, :], other=0), C_scale, FLOAT_IN)  # (M, N) int8 codes
    Cv = qCv.to(tl.float32) * C_scale

    # the state entering the chunk, decayed to each row: exp(a_cum[i]) C_i . S
    St = tl.load(states_ptr + pid.to(tl.int64) * (P * N) + p[None, :] * N + n[:, None],
                 mask=nmask[:, None] & pmask[None, :], other=0.0)  # (N, P_blk) = S^T
    acc = tl.dot(Cv, St, input_precision=DOT_PRECISION) * tl.exp(acum_m)[:, None]  # (M, P_blk)

    # inside the chunk, causal: columns up to this row block's last row
    hi = tl.minimum((pid_m + 1) * BLOCK_M, chunk_size)
    for k in range(0, hi, BLOCK_K):
        t = k + tl.arange(0, BLOCK_K)
        lt = c * chunk_size + t
        valid_k = (t < chunk_size) & (lt < L)
        qBt = _codes_in(tl.load(B_base + lt[None, :] * s_B_l + n[:, None] * s_B_n,
                                mask=nmask[:, None] & valid_k[None, :], other=0), B_scale, FLOAT_IN)  # (N, K) = B^T
        # C_i . B_j of the codes, exact in int32 (int8 tensor cores), then the two scales
        cb = tl.dot(qCv, qBt, out_dtype=tl.int32).to(tl.float32) * (C_scale * B_scale)  # (M, K)
        acum_k = tl.load(acum_ptr + row + t, mask=t < chunk_size, other=0.0)
        dt_k = tl.load(dt_ptr + row + t, mask=t < chunk_size, other=0.0)
        causal = m[:, None] >= t[None, :]
        # above the diagonal the difference is positive and could overflow: those entries are dropped anyway
        decay = tl.exp(tl.where(causal, acum_m[:, None] - acum_k[None, :], 0.0))
        cb = tl.where(causal, cb * decay * dt_k[None, :], 0.0)
        xmask = valid_k[:, None] & pmask[None, :]
        xk = _x_values(_codes_in(tl.load(x_base + lt[:, None] * s_x_l + p[None, :] * s_x_p, mask=xmask, other=0),
                                 x_scale, FLOAT_IN),
                       x_scale, x_out, m_base + lt[:, None] * s_m_l, p[None, :], s_m_p, xmask, X_ENC, KNEE)  # (K, P_blk)
        acc += tl.dot(cb, xk, input_precision=DOT_PRECISION)

    if HAS_D:
        xmask = valid_m[:, None] & pmask[None, :]
        xm = _x_values(_codes_in(tl.load(x_base + lm[:, None] * s_x_l + p[None, :] * s_x_p, mask=xmask, other=0),
                                 x_scale, FLOAT_IN),
                       x_scale, x_out, m_base + lm[:, None] * s_m_l, p[None, :], s_m_p, xmask, X_ENC, KNEE)  # (M, P_blk)
        acc += xm * tl.load(D_ptr + h * s_D_h + p * s_D_p, mask=pmask, other=0.0)[None, :]
    y_off = b.to(tl.int64) * s_y_b + lm[:, None] * s_y_l + h * s_y_h + p[None, :] * s_y_p
    tl.store(y_ptr + y_off, acc.to(y_ptr.dtype.element_ty), mask=valid_m[:, None] & pmask[None, :])


@triton.jit
def _step_kernel(state_ptr, qx_ptr, x_scale_ptr, x_out_ptr, x_mask_ptr, qdt_ptr, dt_scale_ptr, dt_bias_ptr, A_ptr,
                 qB_ptr, B_scale_ptr, qC_ptr, C_scale_ptr, D_ptr, y_ptr,
                 P, N, heads_per_group,
                 s_S_b, s_S_h, s_S_p, s_S_n,
                 s_x_b, s_x_h, s_x_p, s_xs_h, s_xo_h,
                 s_m_b, s_m_h, s_m_p,
                 s_dt_b, s_dt_h, s_dts_h,
                 s_B_b, s_B_g, s_B_n, s_Bs_g,
                 s_C_b, s_C_g, s_C_n, s_Cs_g,
                 s_D_h, s_D_p,
                 s_y_b, s_y_h, s_y_p,
                 HAS_D: tl.constexpr, HAS_DT_BIAS: tl.constexpr, DT_SOFTPLUS: tl.constexpr,
                 X_ENC: tl.constexpr, KNEE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr,
                 FLOAT_IN: tl.constexpr):
    b = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    pid_p = tl.program_id(2)
    g = h // heads_per_group
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n = tl.arange(0, BLOCK_N)
    pmask = p < P
    nmask = n < N
    dt = tl.load(qdt_ptr + b * s_dt_b + h * s_dt_h).to(tl.float32) * tl.load(dt_scale_ptr + h * s_dts_h)
    if HAS_DT_BIAS:
        dt = dt + tl.load(dt_bias_ptr + h)
    if DT_SOFTPLUS:
        dt = _softplus(dt)
    dA = tl.exp(dt * tl.load(A_ptr + h))
    xs = tl.load(x_scale_ptr + h * s_xs_h)
    Bs = tl.load(B_scale_ptr + g * s_Bs_g)
    Cs = tl.load(C_scale_ptr + g * s_Cs_g)
    x_in = tl.load(qx_ptr + b * s_x_b + h * s_x_h + p * s_x_p, mask=pmask, other=0)
    B_in = tl.load(qB_ptr + b * s_B_b + g * s_B_g + n * s_B_n, mask=nmask, other=0)
    C_in = tl.load(qC_ptr + b * s_C_b + g * s_C_g + n * s_C_n, mask=nmask, other=0)
    # FLOAT_IN: x, B, C are the conv's float output, their codes made here as the quantize kernel makes them
    x_in, B_in, C_in = _codes_in(x_in, xs, FLOAT_IN), _codes_in(B_in, Bs, FLOAT_IN), _codes_in(C_in, Cs, FLOAT_IN)
    x = _x_values(x_in, xs, _x_outlier_scale(x_out_ptr, h, s_xo_h, X_ENC),
                  x_mask_ptr + b * s_m_b + h * s_m_h, p, s_m_p, pmask, X_ENC, KNEE)  # (P_blk,)
    Bv = B_in.to(tl.float32) * Bs  # (N,)
    Cv = C_in.to(tl.float32) * Cs
    s_ptr = state_ptr + b * s_S_b + h * s_S_h + p[:, None] * s_S_p + n[None, :] * s_S_n
    smask = pmask[:, None] & nmask[None, :]
    S = tl.load(s_ptr, mask=smask, other=0.0)  # (P_blk, N)
    S = S * dA + (dt * x)[:, None] * Bv[None, :]
    tl.store(s_ptr, S, mask=smask)
    y = tl.sum(S * Cv[None, :], axis=1)
    if HAS_D:
        y += x * tl.load(D_ptr + h * s_D_h + p * s_D_p, mask=pmask, other=0.0)
    tl.store(y_ptr + b * s_y_b + h * s_y_h + p * s_y_p, y.to(y_ptr.dtype.element_ty), mask=pmask)


# ---- Python wrappers -------------------------------------------------------------------------------------------------
def _pow2(n: int, lo: int = 16) -> int:
    """Smallest power of two >= max(n, lo); tl.dot needs every tile dim >= 16."""
    return max(lo, triton.next_power_of_2(int(n)))


def _codes(name: str, q: torch.Tensor, ndim: int, shape_doc: str, device) -> None:
    if q.dtype != torch.int8 or q.dim() != ndim:
        raise ValueError(f"{name} must be int8 codes {shape_doc}, got {q.dtype} {tuple(q.shape)}")
    if q.device != device:
        raise ValueError(f"{name} is on {q.device} but qx is on {device}: move all inputs to one device")


def _float_inputs(name: str, t: torch.Tensor, ndim: int, shape_doc: str, device) -> None:
    """``_codes`` for the float activations of ``float_in`` (the kernel quantizes them)."""
    if t.dtype not in (torch.float32, torch.float16, torch.bfloat16) or t.dim() != ndim:
        raise ValueError(f"{name} must be a float32 / float16 / bfloat16 activation {shape_doc} with float_in, got "
                         f"{t.dtype} {tuple(t.shape)}")
    if t.device != device:
        raise ValueError(f"{name} is on {t.device} but qx is on {device}: move all inputs to one device")


def _scale_arg(name: str, scale: torch.Tensor, channels: int, what: str, device) -> tuple[torch.Tensor, int]:
    """(fp32 1-D scale, stride per channel): stride 0 reads one per-tensor scale for every channel."""
    if not isinstance(scale, torch.Tensor) or scale.numel() not in (1, channels):
        shape = tuple(scale.shape) if isinstance(scale, torch.Tensor) else type(scale).__name__
        raise ValueError(f"{name} must be an fp32 tensor with one element or {channels} (one per {what}), got {shape}")
    s = fp32_flat(scale, device)
    return s, (1 if s.numel() > 1 else 0)


def _x_dual_args(qx: torch.Tensor, x_dual: DualScale | None, x_mask: torch.Tensor | None, x_s: torch.Tensor,
                 s_xs: int, H: int, device) -> tuple:
    """(s_out, its head stride, mask, its strides, X_ENC, KNEE) for the kernels. Single scale (``x_dual`` None): the
    inlier scale and qx stand in for the pointers X_ENC 0 never reads, with zero mask strides."""
    check_dual_mask("x", qx, x_dual, x_mask)
    if x_dual is None:
        return x_s, s_xs, qx, (0,) * qx.dim(), 0, 0
    s_out, s_xo = _scale_arg("x_dual.outlier_scale", x_dual.outlier_scale, H, "head", device)
    if x_dual.encoding == "mask":
        if x_mask.device != device:
            raise ValueError(f"x_mask is on {x_mask.device} but qx is on {device}: move all inputs to one device")
        return s_out, s_xo, x_mask, x_mask.stride(), x_dual.encoding_id, 0
    return s_out, s_xo, qx, (0,) * qx.dim(), x_dual.encoding_id, x_dual.knee


def _vec_arg(name: str, v: torch.Tensor | None, H: int, device) -> torch.Tensor | None:
    if v is None:
        return None
    if v.shape != (H,):
        raise ValueError(f"{name} must be ({H},) (one per head), got {tuple(v.shape)}")
    return fp32_flat(v, device)


def _D_arg(D: torch.Tensor | None, H: int, P: int, device):
    """(fp32 D, stride over heads, stride over headdim) for D (H,) or (H, P); a dummy when D is None."""
    if D is None:
        return torch.empty(1, dtype=torch.float32, device=device), 0, 0
    if D.shape not in ((H,), (H, P)):
        raise ValueError(f"D must be ({H},) or ({H}, {P}), got {tuple(D.shape)}")
    Df = fp32_flat(D, device) if D.dim() == 1 else D.to(device=device, dtype=torch.float32).contiguous()
    return (Df, 1, 0) if Df.dim() == 1 else (Df, Df.stride(0), Df.stride(1))


def ssd_chunk_scan_int8_triton(qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, chunk_size, D=None,
                               dt_bias=None, dt_softplus=True, out_dtype=torch.float32, initial_states=None,
                               return_final_states=False, x_dual: DualScale | None = None,
                               x_mask: torch.Tensor | None = None, float_in: bool = False):
    """The Triton int8 SSD scan; arguments and results as ``qmamba.ops.int8_ssd.ssd_chunk_scan_int8_ref``:
    qx (b, L, h, p), qdt (b, L, h), qB / qC (b, L, g, n) int8 (any strides); x_scale (h,) or one element, dt_scale
    one element or (h,), B_scale / C_scale (g,) or one element; A, dt_bias (h,); D (h,) or (h, p);
    initial_states (b, h, p, n); dual-scale x: ``x_dual`` (outlier scale (h,) or one element) and, for the mask
    encoding, ``x_mask`` (b, L, h, ceil(p / 8)) uint8 (any strides). Returns y (b, L, h, p) contiguous in
    ``out_dtype`` [, final state fp32 (b, h, p, n)]. ``float_in``: qx, qB, qC are the float activations and the
    kernels make their codes as they load them (``_codes_in``; single-scale x): ``ssd_chunk_scan_int8_from_float``.
    """
    device = qx.device
    inputs = _float_inputs if float_in else _codes
    inputs("qx", qx, 4, "(batch, L, heads, headdim)", device)
    Bsz, L, H, P = qx.shape
    _codes("qdt", qdt, 3, f"(batch, L, heads) = {(Bsz, L, H)}", device)
    inputs("qB", qB, 4, "(batch, L, groups, d_state)", device)
    inputs("qC", qC, 4, "(batch, L, groups, d_state)", device)
    if float_in and x_dual is not None:
        raise ValueError("ssd_chunk_scan_int8_triton: float_in quantizes a single-scale x; pass a dual-scale x as "
                         "codes")
    G, N = qB.shape[2], qB.shape[3]
    if qdt.shape != (Bsz, L, H) or qB.shape != qC.shape or qB.shape[:2] != (Bsz, L) or H % G:
        raise ValueError(f"shapes do not fit: qx {tuple(qx.shape)}, qdt {tuple(qdt.shape)} (want {(Bsz, L, H)}), "
                         f"qB {tuple(qB.shape)}, qC {tuple(qC.shape)} (want (batch, L, groups, d_state) with groups "
                         f"dividing {H} heads)")
    if N > MAX_D_STATE:
        raise ValueError(f"ssd_chunk_scan_int8_triton keeps d_state whole in registers and supports d_state <= "
                         f"{MAX_D_STATE}, got {N}; use backend='torch'")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    x_s, s_xs = _scale_arg("x_scale", x_scale, H, "head", device)
    x_o, s_xo, x_m, s_m, X_ENC, KNEE = _x_dual_args(qx, x_dual, x_mask, x_s, s_xs, H, device)
    dt_s, s_dts = _scale_arg("dt_scale", dt_scale, H, "head", device)
    B_s, s_Bs = _scale_arg("B_scale", B_scale, G, "group", device)
    C_s, s_Cs = _scale_arg("C_scale", C_scale, G, "group", device)
    A_f = _vec_arg("A", A, H, device)
    bias = _vec_arg("dt_bias", dt_bias, H, device)
    D_f, s_D_h, s_D_p = _D_arg(D, H, P, device)
    if initial_states is not None:
        if initial_states.shape != (Bsz, H, P, N):
            raise ValueError(f"initial_states must be (batch, heads, headdim, d_state) = {(Bsz, H, P, N)}, got "
                             f"{tuple(initial_states.shape)}")
        initial_states = initial_states.to(device=device, dtype=torch.float32)

    T = chunk_size
    nchunks = triton.cdiv(L, T)
    y = torch.empty(Bsz, L, H, P, dtype=out_dtype, device=device)
    final = torch.empty(Bsz, H, P, N, dtype=torch.float32, device=device)
    if L == 0:
        if initial_states is None:
            final.zero_()
        else:
            final.copy_(initial_states)
        return (y, final) if return_final_states else y
    f32 = dict(dtype=torch.float32, device=device)
    dt_c = torch.empty(Bsz, H, nchunks, T, **f32)  # softplus'd dt, 0 on padded steps
    acum = torch.empty(Bsz, H, nchunks, T, **f32)  # cumulative log-decay inside each chunk
    states = torch.empty(Bsz, nchunks, H, P, N, **f32)  # chunk states, then the states entering each chunk
    dummy = D_f  # any fp32 tensor for pointers a constexpr flag leaves unread

    with on_device_of(qx):
        BLOCK_H = 16
        _dt_cumsum_kernel[(Bsz * nchunks, triton.cdiv(H, BLOCK_H))](
            qdt, dt_s, bias if bias is not None else dummy, A_f, dt_c, acum,
            L, H, nchunks, T,
            qdt.stride(0), qdt.stride(1), qdt.stride(2), s_dts,
            HAS_DT_BIAS=bias is not None, DT_SOFTPLUS=bool(dt_softplus), BLOCK_T=_pow2(T, 1), BLOCK_H=BLOCK_H)

        BP, BN, BK = min(64, _pow2(P)), min(64, _pow2(N)), min(64, _pow2(T))
        _chunk_state_kernel[(Bsz * nchunks * H, triton.cdiv(P, BP), triton.cdiv(N, BN))](
            qx, x_s, x_o, x_m, qB, B_s, dt_c, acum, states,
            L, H, P, N, nchunks, T, H // G,
            *qx.stride(), s_xs, s_xo,
            *s_m,
            *qB.stride(), s_Bs,
            X_ENC=X_ENC, KNEE=KNEE, BLOCK_P=BP, BLOCK_N=BN, BLOCK_K=BK, FLOAT_IN=bool(float_in))

        init = initial_states if initial_states is not None else final
        BLOCK = min(1024, _pow2(P * N))
        _state_passing_kernel[(Bsz * H, triton.cdiv(P * N, BLOCK))](
            states, acum, init, final,
            H, N, P * N, nchunks, T,
            *init.stride(),
            HAS_INIT=initial_states is not None, BLOCK=BLOCK)

        BM, BK, BP = min(64, _pow2(T)), min(32, _pow2(T)), min(64, _pow2(P))
        _chunk_scan_kernel[(Bsz * nchunks * H, triton.cdiv(T, BM), triton.cdiv(P, BP))](
            qx, x_s, x_o, x_m, qB, B_s, qC, C_s, D_f, dt_c, acum, states, y,
            L, H, P, N, nchunks, T, H // G,
            *qx.stride(), s_xs, s_xo,
            *s_m,
            *qB.stride(), s_Bs,
            *qC.stride(), s_Cs,
            s_D_h, s_D_p,
            *y.stride(),
            HAS_D=D is not None, X_ENC=X_ENC, KNEE=KNEE, BLOCK_M=BM, BLOCK_K=BK, BLOCK_P=BP, BLOCK_N=_pow2(N, 32),
            FLOAT_IN=bool(float_in))
    return (y, final) if return_final_states else y


def ssd_step_int8_triton(state, qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, D=None, dt_bias=None,
                         dt_softplus=True, out_dtype=torch.float32, x_dual: DualScale | None = None,
                         x_mask: torch.Tensor | None = None, float_in: bool = False):
    """The Triton int8 SSD decode step; as ``qmamba.ops.int8_ssd.ssd_step_int8_ref``: updates ``state`` (fp32
    (b, h, p, n), any strides) in place from qx (b, h, p), qdt (b, h), qB / qC (b, g, n) int8 (dual-scale x:
    ``x_dual`` and, for the mask encoding, ``x_mask`` (b, h, ceil(p / 8)) uint8); returns y (b, h, p) in
    ``out_dtype``. ``float_in``: qx, qB, qC are the float activations (fp32 / fp16 / bf16, any strides) and the
    kernel makes their codes as it loads them (``_quantize_codes``; single-scale x): ``ssd_step_int8_from_float``.
    No host sync (nothing reads tensor values on the host): capturable in a CUDA graph."""
    device = qx.device
    inputs = _float_inputs if float_in else _codes
    inputs("qx", qx, 3, "(batch, heads, headdim)", device)
    Bsz, H, P = qx.shape
    _codes("qdt", qdt, 2, f"(batch, heads) = {(Bsz, H)}", device)
    inputs("qB", qB, 3, "(batch, groups, d_state)", device)
    inputs("qC", qC, 3, "(batch, groups, d_state)", device)
    if float_in and x_dual is not None:
        raise ValueError("ssd_step_int8_triton: float_in quantizes a single-scale x; pass a dual-scale x as codes")
    G, N = qB.shape[1], qB.shape[2]
    if qdt.shape != (Bsz, H) or qB.shape != qC.shape or qB.shape[0] != Bsz or H % G:
        raise ValueError(f"shapes do not fit: qx {tuple(qx.shape)}, qdt {tuple(qdt.shape)} (want {(Bsz, H)}), "
                         f"qB {tuple(qB.shape)}, qC {tuple(qC.shape)} (want (batch, groups, d_state) with groups "
                         f"dividing {H} heads)")
    if state.dtype != torch.float32 or state.shape != (Bsz, H, P, N) or state.device != device:
        raise ValueError(f"state must be fp32 (batch, heads, headdim, d_state) = {(Bsz, H, P, N)} on {device} (it "
                         f"is updated in place), got {state.dtype} {tuple(state.shape)} on {state.device}")
    x_s, s_xs = _scale_arg("x_scale", x_scale, H, "head", device)
    x_o, s_xo, x_m, s_m, X_ENC, KNEE = _x_dual_args(qx, x_dual, x_mask, x_s, s_xs, H, device)
    dt_s, s_dts = _scale_arg("dt_scale", dt_scale, H, "head", device)
    B_s, s_Bs = _scale_arg("B_scale", B_scale, G, "group", device)
    C_s, s_Cs = _scale_arg("C_scale", C_scale, G, "group", device)
    A_f = _vec_arg("A", A, H, device)
    bias = _vec_arg("dt_bias", dt_bias, H, device)
    D_f, s_D_h, s_D_p = _D_arg(D, H, P, device)
    y = torch.empty(Bsz, H, P, dtype=out_dtype, device=device)
    # small P blocks: batch-1 decode still spreads over many programs
    BP = min(16, triton.next_power_of_2(P))
    with on_device_of(qx):
        _step_kernel[(Bsz, H, triton.cdiv(P, BP))](
            state, qx, x_s, x_o, x_m, qdt, dt_s, bias if bias is not None else D_f, A_f, qB, B_s, qC, C_s, D_f, y,
            P, N, H // G,
            *state.stride(),
            *qx.stride(), s_xs, s_xo,
            *s_m,
            *qdt.stride(), s_dts,
            *qB.stride(), s_Bs,
            *qC.stride(), s_Cs,
            s_D_h, s_D_p,
            *y.stride(),
            HAS_D=D is not None, HAS_DT_BIAS=bias is not None, DT_SOFTPLUS=bool(dt_softplus),
            X_ENC=X_ENC, KNEE=KNEE, BLOCK_P=BP, BLOCK_N=triton.next_power_of_2(N), FLOAT_IN=bool(float_in))
    return y
