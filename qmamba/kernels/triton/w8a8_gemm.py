"""Triton W8A8 GEMM with the dequant (and optional requant) epilogue fused: the prefill path of ``w8a8_linear``.

    x: (M, K) int8 codes, per-tensor scale s_x (one-element fp32 tensor)
    w: (N, K) int8 codes, row-major as nn.Linear stores it; per-tensor or per-output-channel (N,) fp32 scale s_w
    acc[m, n] = sum_k x[m, k] * w[n, k]                           int32 (tl.dot int8 x int8 -> int32: exact)
    out[m, n] = float(acc) * (s_x * s_w[n]) (+ bias[n])           fp32, each op rounded on its own (no FMA)
    y         = out rounded to OUT_DTYPE                          the activation dtype (``.to(dtype)``)
    requant:  q[m, n] = clamp(rint(float(y) * (1 / out_scale[n])), -128, 127)   int8, 1 / out_scale in IEEE fp32

exactly the ops of ``qmamba.ops.int8_linear.w8a8_linear_ref`` in the same order, so outputs are bit-identical to it
(the integer sum is exact in any order; the fp32 epilogue is compiled with ``enable_fp_fusion=False`` so
``acc * s + bias`` is not contracted into an FMA, and the reciprocal uses ``div_rn``, not the approximate ``/``).

No weight repacking: w (N, K) is K-major, which is what Hopper's int8 wgmma wants for its B operand.

Small M x N with a long K (x_proj: N = 192, K = 5120) leaves most SMs idle, so the reduction over K can be split
(``SPLIT_K`` > 1): each split writes its int32 partial sums to a (SPLIT_K, M, N) buffer and a second kernel adds them
(integer adds: still exact and deterministic) and runs the same epilogue.

Configs are autotuned on CUDA per (M bucket, N, K, SPLIT_K) and the choice is cached on disk by Triton; under
``TRITON_INTERPRET=1`` (CPU tensors, tests) one small fixed config runs instead.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from qmamba.kernels.triton.launch import interpreting, on_device_of

# 1.5 * 2**23: for |v| <= 2**22, (v + C) - C is v rounded half-to-even in fp32 (rint), written out because
# libdevice's rint has no interpreter twin; the two adds are never folded (no fast-math reassociation in Triton).
_RINT_MAGIC = tl.constexpr(12582912.0)

_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}
OUT_DTYPES = tuple(_TORCH_TO_TL)

GROUP_M = 8  # program ids walk GROUP_M row tiles per column tile, so a wave shares weight tiles in L2

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) for H100 / H200: smem per stage (BM + BN) * BK bytes
_CONFIGS = [
    (128, 256, 128, 8, 3),  # 144 KB of stages: large prefill
    (128, 256, 64, 8, 4),
    (128, 128, 128, 8, 4),
    (128, 128, 64, 4, 4),
    (64, 128, 128, 4, 4),   # small M or few tiles
    (64, 128, 64, 4, 3),
]
# one config for the interpreter (and the smallest legal tl.dot tile: keeps the CPU test quick)
INTERPRET_CONFIG = (32, 32, 32, 4, 1)


def _triton_configs():
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in _CONFIGS]


def _prune(configs, named_args, **kwargs):
    """Drop tiles much larger than the problem (they only add masked work); always keep at least one."""
    M, N, K, split = named_args["M"], named_args["N"], named_args["K"], kwargs.get("SPLIT_K", 1)
    k_per_split = triton.cdiv(K, split)
    keep = [c for c in configs
            if not (c.kwargs["BLOCK_M"] > 64 and M <= 64)
            and not (c.kwargs["BLOCK_N"] > 128 and N <= 128)
            and not (c.kwargs["BLOCK_K"] > 64 and k_per_split <= 64)]
    return keep or [min(configs, key=lambda c: c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] * c.kwargs["BLOCK_K"])]


def m_bucket(M: int) -> int:
    """The autotune key for M: the next power of two in [64, 8192], so prefill lengths share a few tunings."""
    return min(max(triton.next_power_of_2(M), 64), 8192)


def _bench(fn, quantiles):
    # shorter than Triton's default (25 ms warmup, 100 ms reps): a handful of configs per key, keys per shape
    import triton.testing

    return triton.testing.do_bench(fn, warmup=5, rep=25, quantiles=quantiles)


@triton.jit
def _round_to_bf16(v):
    """fp32 -> nearest bf16 value (ties to even), kept in fp32: the rounding torch's ``.to(torch.bfloat16)`` does.
    Written in integer ops because the interpreter's fp32 -> bf16 cast truncates (the GPU's rounds to nearest)."""
    u = v.to(tl.uint32, bitcast=True)
    u = (u + (0x7FFF + ((u >> 16) & 1))) & 0xFFFF0000
    return u.to(tl.float32, bitcast=True)


@triton.jit
def _epilogue(acc, offs_m, offs_n, M, N, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
              stride_om, stride_on,
              W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, REQUANT: tl.constexpr, OUT_DTYPE: tl.constexpr):
    """acc (BM, BN) int32 -> fp32 dequant (+ bias) -> OUT_DTYPE -> stored, or requantized to int8 and stored."""
    mask_n = offs_n < N
    sx = tl.load(x_scale_ptr)
    if W_PER_CHANNEL:
        scale = (sx * tl.load(w_scale_ptr + offs_n, mask=mask_n, other=1.0))[None, :]  # s_x * s_w first (§3)
    else:
        scale = sx * tl.load(w_scale_ptr)
    out = acc.to(tl.float32) * scale
    if HAS_BIAS:
        out = out + tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if OUT_DTYPE == tl.bfloat16:
        out = _round_to_bf16(out)  # then the cast below is exact
    y = out.to(OUT_DTYPE)  # round through the activation dtype, as the torch backend's .to(dtype)
    mask = (offs_m[:, None] < M) & mask_n[None, :]
    ptrs = out_ptr + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    if REQUANT:
        o_scale = tl.load(out_scale_ptr + offs_n, mask=mask_n, other=1.0)
        inv = tl.math.div_rn(tl.full(o_scale.shape, 1.0, tl.float32), o_scale)  # IEEE 1 / scale, as torch computes it
        v = y.to(tl.float32) * inv[None, :]
        v = tl.minimum(tl.maximum(v, -128.0), 127.0)  # clamp first: rint of the integer bounds is themselves
        v = (v + _RINT_MAGIC) - _RINT_MAGIC
        tl.store(ptrs, v.to(tl.int8), mask=mask)
    else:
        tl.store(ptrs, y, mask=mask)


@triton.jit(do_not_specialize=["M", "M_BUCKET"])  # M only bounds rows: one compile for every prompt length
def _w8a8_gemm_kernel(x_ptr, w_ptr, out_ptr, part_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr,
                      M, N, K, M_BUCKET, stride_xm, stride_wn, stride_om, stride_on,
                      W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, REQUANT: tl.constexpr,
                      OUT_DTYPE: tl.constexpr, SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
                      BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Grid (tiles of M x N, SPLIT_K). x and w are contiguous along K (unit stride: 16-byte vector loads).
    M_BUCKET is only an autotune key."""
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BLOCK_M)
    num_n = tl.cdiv(N, BLOCK_N)
    per_group = GROUP_M * num_n
    first_m = (pid // per_group) * GROUP_M
    group_m = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % per_group) % group_m
    pid_n = (pid % per_group) // group_m

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # rows / columns past the edge load row 0 (valid memory) instead of masking every load; never stored
    rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    k_tiles = tl.cdiv(K, BLOCK_K * SPLIT_K)  # K tiles of this split
    offs_k = pid_k * k_tiles * BLOCK_K + tl.arange(0, BLOCK_K)
    a_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :]  # (BM, BK)
    b_ptrs = w_ptr + cols[None, :] * stride_wn + offs_k[:, None]  # (BK, BN): w^T, K-major in memory
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for kt in range(0, k_tiles):
        if EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_left = K - kt * BLOCK_K
            a = tl.load(a_ptrs, mask=offs_k[None, :] < k_left, other=0)
            b = tl.load(b_ptrs, mask=offs_k[:, None] < k_left, other=0)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
        a_ptrs += BLOCK_K
        b_ptrs += BLOCK_K

    if SPLIT_K == 1:
        _epilogue(acc, offs_m, offs_n, M, N, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
                  stride_om, stride_on, W_PER_CHANNEL, HAS_BIAS, REQUANT, OUT_DTYPE)
    else:
        # partial sums of split pid_k: rows pid_k * M + offs_m of the (SPLIT_K * M, N) buffer
        p_ptrs = part_ptr + (offs_m.to(tl.int64)[:, None] + pid_k * M) * N + offs_n[None, :]
        tl.store(p_ptrs, acc, mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


@triton.jit
def _split_k_epilogue_kernel(part_ptr, out_ptr, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr,
                             M, N, stride_om, stride_on,
                             W_PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr, REQUANT: tl.constexpr,
                             OUT_DTYPE: tl.constexpr, SPLIT_K: tl.constexpr,
                             BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sum the SPLIT_K int32 partials (M, N) of the GEMM kernel, then the same epilogue."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    rows = offs_m.to(tl.int64)[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for s in range(0, SPLIT_K):  # integer adds: exact in any order
        acc += tl.load(part_ptr + (rows + s * M) * N + offs_n[None, :], mask=mask, other=0)
    _epilogue(acc, offs_m, offs_n, M, N, x_scale_ptr, w_scale_ptr, bias_ptr, out_scale_ptr, out_ptr,
              stride_om, stride_on, W_PER_CHANNEL, HAS_BIAS, REQUANT, OUT_DTYPE)


def _even_k(args):
    return args["K"] % (args["BLOCK_K"] * args["SPLIT_K"]) == 0


_gemm_fixed = triton.heuristics({"EVEN_K": _even_k})(_w8a8_gemm_kernel)
_gemm_tuned = triton.autotune(configs=_triton_configs(), key=["M_BUCKET", "N", "K", "SPLIT_K"],
                              prune_configs_by={"early_config_prune": _prune}, do_bench=_bench,
                              cache_results=True)(_gemm_fixed)


_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def default_split_k(M: int, N: int, K: int, device: torch.device) -> int:
    """Split the K reduction when 128 x 128 tiles would fill less than half the SMs and K is long: a power of two
    (few compiled variants), each split keeping >= 512 of K."""
    if device.type != "cuda":
        return 1
    tiles = triton.cdiv(M, 128) * triton.cdiv(N, 128)
    sms = _sm_count(device)
    if 2 * tiles >= sms:
        return 1
    split = 1
    while split < 16 and tiles * split * 2 <= sms and K // (split * 2) >= 512:
        split *= 2
    return split


def w8a8_gemm(x: torch.Tensor, x_scale: torch.Tensor, w: torch.Tensor, w_scale: torch.Tensor,
              bias: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32,
              out_scale: torch.Tensor | None = None, split_k: int | None = None,
              config: tuple[int, int, int, int, int] | None = None) -> torch.Tensor:
    """The fused W8A8 GEMM on 2-D inputs (``qmamba.kernels.linear.w8a8_gemm`` is the user-facing wrapper).

    x (M, K) int8 with rows at any stride, each contiguous, and w (N, K) int8 contiguous; x_scale: one-element fp32;
    w_scale: fp32, 1 or N elements; bias: (N,) float or None; out_scale: (N,) fp32 or None. Returns (M, N)
    ``out_dtype``, or int8 codes when ``out_scale`` is given (rounded through ``out_dtype`` first). ``split_k``: None
    picks one by shape;
    ``config`` (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) skips the autotuner (tests, experiments).
    """
    M, K = x.shape
    N = w.shape[0]
    if out_dtype not in _TORCH_TO_TL:
        raise ValueError(f"w8a8_gemm: out_dtype must be one of {OUT_DTYPES}, got {out_dtype}")
    requant = out_scale is not None
    out = torch.empty((M, N), dtype=torch.int8 if requant else out_dtype, device=x.device)
    if M == 0 or N == 0:
        return out
    if K == 0:  # no products: acc = 0, the epilogue still applies (bias, requant)
        x, w, K = x.new_zeros((M, 16)), w.new_zeros((N, 16)), 16
    if split_k is None:
        split_k = default_split_k(M, N, K, x.device)
    if split_k < 1:
        raise ValueError(f"w8a8_gemm: split_k must be >= 1, got {split_k}")
    w_per_channel = w_scale.numel() > 1
    part = (torch.empty((split_k, M, N), dtype=torch.int32, device=x.device) if split_k > 1
            else out)  # unused pointer when not splitting
    # unused optional pointers get a valid tensor: Triton needs a pointer, the constexpr flag keeps it unread
    args = (x, w, out, part, x_scale, w_scale, bias if bias is not None else x_scale,
            out_scale if requant else x_scale, M, N, K, m_bucket(M), x.stride(0), w.stride(0), out.stride(0),
            out.stride(1))
    flags = dict(W_PER_CHANNEL=w_per_channel, HAS_BIAS=bias is not None, REQUANT=requant,
                 OUT_DTYPE=_TORCH_TO_TL[out_dtype], SPLIT_K=split_k, GROUP_M=GROUP_M)
    if config is None and (interpreting() or not x.is_cuda):
        config = INTERPRET_CONFIG
    with on_device_of(x):
        if config is None:
            def grid(meta):
                return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), split_k)
            _gemm_tuned[grid](*args, **flags, enable_fp_fusion=False)
        else:
            bm, bn, bk, nw, ns = config
            grid = (triton.cdiv(M, bm) * triton.cdiv(N, bn), split_k)
            _gemm_fixed[grid](*args, **flags, BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=bk, num_warps=nw, num_stages=ns,
                              enable_fp_fusion=False)
        if split_k > 1:
            bm, bn = 32, 128
            _split_k_epilogue_kernel[(triton.cdiv(M, bm), triton.cdiv(N, bn))](
                part, out, x_scale, w_scale, bias if bias is not None else x_scale, out_scale if requant else x_scale,
                M, N, out.stride(0), out.stride(1), W_PER_CHANNEL=w_per_channel, HAS_BIAS=bias is not None,
                REQUANT=requant, OUT_DTYPE=_TORCH_TO_TL[out_dtype], SPLIT_K=split_k, BLOCK_M=bm, BLOCK_N=bn,
                num_warps=4, enable_fp_fusion=False)
    return out
