"""Triton fake-quant: the forward and backward of ``qmamba.quant.numerics.fake_quantize`` in one pass each.

    x: (...) float, read in its memory order as rows of COLS contiguous elements X_RS apart (a slice of the last dim
       of a contiguous tensor, and any transpose of one, without a copy); out, the STE's flags and grad_x dense in
       that order; scale: one element (per-tensor) or one per index of a single axis of x
    forward    v = x.float() * (1 / s)          the reciprocal in IEEE fp32 (``div_rn``), the product rounded to fp32
               out = clamp(rint(v), qmin, qmax) * s, rounded to x's dtype
               inside = qmin <= v <= qmax       (int8 0 / 1, saved for the backward when the scale is not learned)
    backward   grad_x = grad where inside, else 0                                   (straight-through estimator)
               LSQ (learned per-tensor scale): grad_s = sum(grad * (rint(v) - v | qmin | qmax)) * g, summed per
               program in fp32, times g there, and the program sums added by torch (another summation order than
               the reference's ``sum_to_size``: grad_s agrees to fp32 rounding, everything else bit for bit)

exactly the ops of ``numerics._FakeQuantize`` in the same order (DESIGN.md §3), where torch needs about ten kernels
and as many fp32 passes over the tensor for each direction. rint is written as the add / subtract of 1.5 * 2**23
after the clamp (exact for |v| <= 2**22; libdevice's rint has no interpreter twin), and NaN propagates through the
clamp as it does in torch. CPU tests run these kernels under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from qmamba.kernels.triton.w8a8_gemm import _RINT_MAGIC, _round_to_bf16

BLOCK = 1024         # elements per program (4 warps, 8 per thread)
INTERPRET_BLOCK = 64  # the interpreter runs programs one by one in numpy: small blocks keep the tests' tails covered


@triton.jit
def _at(offs, COLS, RS, STRIDED: tl.constexpr):
    """Where element ``offs`` of the memory-ordered tensor lies: rows of COLS contiguous elements, RS apart."""
    if STRIDED:
        return (offs // COLS) * RS + offs % COLS
    return offs


@triton.jit
def _scale_at(s_ptr, offs, mask, INNER, NS, PER_TENSOR: tl.constexpr):
    """The fp32 scale of each element: s[0], or s[(offset // INNER) % NS] (one per index of the scale's axis)."""
    if PER_TENSOR:
        return tl.zeros(offs.shape, tl.float32) + tl.load(s_ptr).to(tl.float32)
    return tl.load(s_ptr + (offs // INNER) % NS, mask=mask, other=1.0).to(tl.float32)


@triton.jit
def _codes(v, QMIN: tl.constexpr, QMAX: tl.constexpr):
    """clamp(rint(v), qmin, qmax) in fp32 (= rint(clamp(v)): the bounds are integers); NaN stays NaN, and a value
    that rounds to zero keeps its sign (torch.round(-0.3) is -0.0; the magic-number add would give +0.0)."""
    c = tl.minimum(tl.maximum(v, QMIN, propagate_nan=tl.PropagateNan.ALL), QMAX, propagate_nan=tl.PropagateNan.ALL)
    r = (c + _RINT_MAGIC) - _RINT_MAGIC
    return tl.where(r == 0.0, c * 0.0, r)


@triton.jit
def _fake_quant_fwd_kernel(x_ptr, s_ptr, out_ptr, inside_ptr, n, INNER, NS, COLS, X_RS,
                           PER_TENSOR: tl.constexpr, QMIN: tl.constexpr, QMAX: tl.constexpr, STRIDED: tl.constexpr,
                           WRITE_INSIDE: tl.constexpr, OUT_BF16: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    x = tl.load(x_ptr + _at(offs, COLS, X_RS, STRIDED), mask=mask, other=0.0).to(tl.float32)
    s = _scale_at(s_ptr, offs, mask, INNER, NS, PER_TENSOR)
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    v = x * inv
    out = _codes(v, QMIN, QMAX) * s
    if OUT_BF16:
        out = _round_to_bf16(out)  # the interpreter's fp32 -> bf16 cast truncates; the GPU's rounds: now exact
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_INSIDE:
        tl.store(inside_ptr + offs, ((v >= QMIN) & (v <= QMAX)).to(tl.int8), mask=mask)


@triton.jit
def _ste_bwd_kernel(g_ptr, inside_ptr, gx_ptr, n, COLS, G_RS, STRIDED: tl.constexpr, BLOCK_SIZE: tl.constexpr):
    """grad_x = grad where the saved ``inside`` flag is set, else 0 (grad already in x's dtype)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    g = tl.load(g_ptr + _at(offs, COLS, G_RS, STRIDED), mask=mask, other=0.0)
    inside = tl.load(inside_ptr + offs, mask=mask, other=0)
    tl.store(gx_ptr + offs, tl.where(inside != 0, g, tl.zeros_like(g)), mask=mask)


@triton.jit
def _lsq_bwd_kernel(x_ptr, s_ptr, g_ptr, gx_ptr, part_ptr, n, gain, COLS, X_RS, G_RS,
                    QMIN: tl.constexpr, QMAX: tl.constexpr, STRIDED: tl.constexpr, WRITE_GX: tl.constexpr,
                    BLOCK_SIZE: tl.constexpr):
    """Per-tensor learned scale: grad_x as the STE (recomputing v from x) and this program's share of the scale's
    LSQ gradient, sum(grad * d out / d s) * gain (the LSQ g, fp32), into part_ptr[program]."""
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    x = tl.load(x_ptr + _at(offs, COLS, X_RS, STRIDED), mask=mask, other=0.0).to(tl.float32)
    s = tl.zeros(offs.shape, tl.float32) + tl.load(s_ptr).to(tl.float32)
    inv = tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), s)
    v = x * inv
    g = tl.load(g_ptr + _at(offs, COLS, G_RS, STRIDED), mask=mask, other=0.0)
    below = v < QMIN
    above = v > QMAX
    if WRITE_GX:
        inside = (v >= QMIN) & (v <= QMAX)
        tl.store(gx_ptr + offs, tl.where(inside, g, tl.zeros_like(g)), mask=mask)
    # inside the range rint(v) - v (|v| <= 128 there, so the magic-number rint is exact); qmin / qmax where clamped
    d_s = tl.where(below, QMIN, tl.where(above, QMAX, ((v + _RINT_MAGIC) - _RINT_MAGIC) - v))
    contrib = tl.where(mask, g.to(tl.float32) * d_s, 0.0)
    tl.store(part_ptr + pid, tl.sum(contrib, axis=0) * gain)


@triton.jit
def _absmax_fake_quant_fwd_kernel(x_ptr, out_ptr, inside_ptr, K, EPS: tl.constexpr, QMIN: tl.constexpr,
                                  QMAX: tl.constexpr, WRITE_INSIDE: tl.constexpr, OUT_BF16: tl.constexpr,
                                  BLOCK_K: tl.constexpr):
    """A weight's fake-quant with its own per-row scale (one program per row of K contiguous elements): s =
    max(absmax(row), EPS) / QMAX in IEEE fp32 (``scale_from_absmax``), then the forward above with that s. A NaN in
    the row makes s NaN, as torch's amax does."""
    row = tl.program_id(0).to(tl.int64) * K
    m = tl.zeros((BLOCK_K,), tl.float32)
    nan = tl.zeros((BLOCK_K,), tl.int32)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        a = tl.abs(tl.load(x_ptr + row + k, mask=k < K, other=0.0).to(tl.float32))
        m = tl.maximum(m, a)
        nan = nan | (a != a).to(tl.int32)
    amax = tl.max(m, axis=0)
    amax = tl.where(tl.max(nan, axis=0) != 0, float("nan"), amax)
    s = tl.math.div_rn(tl.maximum(amax, EPS, propagate_nan=tl.PropagateNan.ALL), QMAX * 1.0)
    inv = tl.math.div_rn(1.0, s)
    for k0 in range(0, K, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        mask = k < K
        v = tl.load(x_ptr + row + k, mask=mask, other=0.0).to(tl.float32) * inv
        out = _codes(v, QMIN, QMAX) * s
        if OUT_BF16:
            out = _round_to_bf16(out)
        tl.store(out_ptr + row + k, out.to(out_ptr.dtype.element_ty), mask=mask)
        if WRITE_INSIDE:
            tl.store(inside_ptr + row + k, ((v >= QMIN) & (v <= QMAX)).to(tl.int8), mask=mask)


# ---- dual-scale fake-quant (qmamba.quant.dual_scale._DualFakeQuantize: the mask and piecewise encodings) ----------
@triton.jit
def _rint_any(v):
    """rint(v) for any fp32 v, zero keeping its sign: the magic-number add where |v| <= 2**22, v itself beyond (the
    callers only compare such a value against the code range, which it exceeds either way, or clamp it)."""
    r = (v + _RINT_MAGIC) - _RINT_MAGIC
    r = tl.where(r == 0.0, v * 0.0, r)
    return tl.where(tl.abs(v) <= 4194304.0, r, v)


@triton.jit
def _dual_fake_quant_fwd_kernel(x_ptr, s_in_ptr, s_out_ptr, out_ptr, inside_ptr, n, INNER, NS, COLS, X_RS,
                                PER_TENSOR: tl.constexpr, PIECEWISE: tl.constexpr, KNEE: tl.constexpr,
                                STRIDED: tl.constexpr, WRITE_INSIDE: tl.constexpr, OUT_BF16: tl.constexpr,
                                BLOCK_SIZE: tl.constexpr):
    """dual_dequantize(dual_quantize(x)) in x's dtype, and the STE's inside flags: the module docstring's ops of
    qmamba/quant/dual_scale.py in the same order (KNEE as a float constexpr: products with it are fp32 products)."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK_SIZE + tl.arange(0, BLOCK_SIZE)
    mask = offs < n
    x = tl.load(x_ptr + _at(offs, COLS, X_RS, STRIDED), mask=mask, other=0.0).to(tl.float32)
    s_in = _scale_at(s_in_ptr, offs, mask, INNER, NS, PER_TENSOR)
    s_out = _scale_at(s_out_ptr, offs, mask, INNER, NS, PER_TENSOR)
    one = tl.full(s_in.shape, 1.0, tl.float32)
    inv_in = tl.math.div_rn(one, s_in)
    inv_out = tl.math.div_rn(one, s_out)
    vi = x * inv_in  # pre-rint inlier code
    r = _rint_any(vi)
    if PIECEWISE:
        flag = tl.abs(r) > KNEE
        kn = KNEE * s_in
        u = (tl.abs(x) - kn) * inv_out  # pre-rint distance above the knee, in s_out steps
        top = tl.where(x >= 0.0, 127.0, 128.0)
        o = tl.minimum(tl.maximum(_rint_any(u) + KNEE, KNEE), top)
        q = tl.where(flag, tl.where(x >= 0.0, o, -o), r)
        inside = (flag == 0) | (u + KNEE <= top)
        a = tl.abs(q)
        outer = kn + (a - KNEE) * s_out
        out = tl.where(a > KNEE, tl.where(q < 0.0, -outer, outer), q * s_in)
    else:
        flag = tl.abs(r) > 127.0
        vo = x * inv_out  # pre-clamp outlier code
        q = tl.where(flag, _codes(vo, -128.0, 127.0), r)
        inside = tl.where(flag, (vo >= -128.0) & (vo <= 127.0), (vi >= -128.0) & (vi <= 127.0))
        out = q * tl.where(flag, s_out, s_in)
    if OUT_BF16:
        out = _round_to_bf16(out)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_INSIDE:
        tl.store(inside_ptr + offs, inside.to(tl.int8), mask=mask)
