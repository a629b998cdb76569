"""On a CUDA GPU: the fused W8A8 linear kernels — the Triton GEMM (any M) and the CUDA GEMV (M = 1..8) — against
``w8a8_linear_ref`` at the projection shapes of mamba-130m, mamba-2.8b and mamba2-2.7b, tokens M = B * L for
(B, L) in (1, 1), (8, 1), (1, 33), (1, 1024), (1, 2048) (and (8, 1024) for the largest in_proj shapes).

Tolerances. int8 outputs (requant epilogue): >= 99.9 % identical codes and never more than 1 LSB apart (DESIGN §3).
Float outputs: |out - ref| <= eps(dtype) * (|ref| + max |ref|), i.e. within 1 ULP of the element or, where the bias
cancels the product, 1 ULP of the largest output. The kernels are designed to be bit-exact (integer sums, then the
reference's fp32 ops in the same order, no FMA contraction): ``test_float_outputs_are_bit_exact`` checks that claim
separately, so a failure there alone means a 1-ULP epilogue difference, not wrong sums.

Cost: the GEMM tests go through the autotuner (first run compiles each config, a few minutes; Triton caches).
"""

import math

import pytest
import torch

from qmamba.kernels import linear as klinear
from qmamba.ops.int8_linear import GEMV_MAX_M, w8a8_linear, w8a8_linear_ref

pytest.importorskip("triton", reason="the W8A8 GEMM is a Triton kernel: pip install triton")
from qmamba.kernels.triton import w8a8_gemm as tk  # noqa: E402

pytestmark = pytest.mark.gpu

# (K, N) of the projections: nn.Linear(K, N)
SHAPES = {
    "130m.in_proj": (768, 3072),
    "130m.x_proj": (1536, 80),  # dt_rank 48 + 2 * d_state 16
    "130m.dt_proj": (48, 1536),
    "130m.out_proj": (1536, 768),
    "2.8b.in_proj": (2560, 10240),
    "2.8b.x_proj": (5120, 192),
    "2.8b.dt_proj": (160, 5120),
    "2.8b.out_proj": (5120, 2560),
    "mamba2-2.7b.in_proj": (2560, 10576),  # 2 * 5120 + 2 * ngroups 1 * d_state 128 + nheads 80
    "mamba2-2.7b.out_proj": (5120, 2560),
}
LEADS = [(1, 1), (8, 1), (1, 33), (1, 1024), (1, 2048)]
DECODE_LEADS = [lead for lead in LEADS if math.prod(lead) <= GEMV_MAX_M]


def _inputs(shape_name, lead, per_channel=True, with_bias=True, seed=0):
    """Random codes with realistic scales: outputs of order 1..10, as a layer's activations."""
    K, N = SHAPES[shape_name]
    g = torch.Generator(device="cuda").manual_seed(seed)
    qx = torch.randint(-128, 128, (*lead, K), dtype=torch.int8, device="cuda", generator=g)
    qw = torch.randint(-128, 128, (N, K), dtype=torch.int8, device="cuda", generator=g)
    sx = torch.tensor(0.02, device="cuda")
    base = 0.05 / math.sqrt(K)  # acc ~ sqrt(K) * 74^2: out ~ 5
    sw = ((torch.rand(N, device="cuda", generator=g) + 0.5) * base if per_channel
          else torch.tensor(base, device="cuda"))
    bias = torch.randn(N, device="cuda", generator=g) if with_bias else None
    return qx, sx, qw, sw, bias


def _out_scale(qx, sx, qw, sw, bias):
    """Per-column requant scales: two halves with their own per-tensor scale (as in_proj's x / z halves), codes
    spread over ~[-100, 100] with a few clamped."""
    y = w8a8_linear_ref(qx, sx, qw, sw, bias).reshape(-1, qw.shape[0])
    N = qw.shape[0]
    h = N // 2
    s1 = (y[:, :h].float().std() / 30).clamp_min(1e-6)
    s2 = (y[:, h:].float().std() / 40).clamp_min(1e-6)
    return torch.cat([s1.expand(h), s2.expand(N - h)]).contiguous()


def assert_float_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    o, r = out.float(), ref.float()
    assert torch.isfinite(o).all()
    eps = torch.finfo(ref.dtype).eps
    bound = eps * (r.abs() + r.abs().max())
    bad = (o - r).abs() > bound
    assert not bad.any(), (f"{int(bad.sum())} of {bad.numel()} beyond 1 ULP; max |diff| "
                           f"{float((o - r).abs().max())}")


def assert_codes_agree(q, ref):
    assert q.dtype == torch.int8 and q.shape == ref.shape
    d = (q.int() - ref.int()).abs()
    assert int(d.max()) <= 1, f"codes up to {int(d.max())} LSB apart"
    same = float((d == 0).float().mean())
    assert same >= 0.999, f"only {same:.5%} identical codes"


@pytest.mark.parametrize("lead", LEADS, ids=lambda l: f"B{l[0]}L{l[1]}")
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_gemm_matches_ref(shape_name, lead):
    qx, sx, qw, sw, bias = _inputs(shape_name, lead)
    out = klinear.w8a8_gemm(qx, sx, qw, sw, bias, torch.float16)
    assert out.shape == (*lead, qw.shape[0])
    assert_float_close(out, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float16))
    os_ = _out_scale(qx, sx, qw, sw, bias)
    q = klinear.w8a8_gemm(qx, sx, qw, sw, bias, torch.float16, os_)
    assert_codes_agree(q, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float16, os_))


@pytest.mark.parametrize("shape_name", ["2.8b.in_proj", "mamba2-2.7b.in_proj"])
def test_gemm_large_batch(shape_name):
    qx, sx, qw, sw, bias = _inputs(shape_name, (8, 1024), with_bias=False)
    assert_float_close(klinear.w8a8_gemm(qx, sx, qw, sw, None, torch.bfloat16),
                       w8a8_linear_ref(qx, sx, qw, sw, None, torch.bfloat16))


@pytest.mark.parametrize("out_dtype, requant", [(torch.float32, False), (torch.bfloat16, False),
                                                (torch.bfloat16, True), (torch.float32, True)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape_name, lead", [("2.8b.out_proj", (1, 1024)), ("130m.in_proj", (1, 33)),
                                              ("2.8b.x_proj", (2, 512))])
def test_gemm_out_dtypes_and_scales(shape_name, lead, per_channel, out_dtype, requant):
    qx, sx, qw, sw, bias = _inputs(shape_name, lead, per_channel=per_channel, with_bias=not per_channel)
    os_ = _out_scale(qx, sx, qw, sw, bias) if requant else None
    out = klinear.w8a8_gemm(qx, sx, qw, sw, bias, out_dtype, os_)
    ref = w8a8_linear_ref(qx, sx, qw, sw, bias, out_dtype, os_)
    if requant:
        assert_codes_agree(out, ref)
    else:
        assert_float_close(out, ref)


@pytest.mark.parametrize("split_k", [1, 3])
@pytest.mark.parametrize("config", tk._CONFIGS, ids=str)
@pytest.mark.parametrize("shape_name", ["2.8b.dt_proj", "130m.x_proj", "mamba2-2.7b.in_proj"])
def test_gemm_every_config(shape_name, config, split_k):
    """Each autotune candidate, with ragged tiles: K=160 (not a multiple of 64 / 128), N=80, N=10576 (not a
    multiple of 256), M=1000 (not a multiple of 64 / 128); split_k 3 leaves the last split short."""
    qx, sx, qw, sw, bias = _inputs(shape_name, (1000,))
    os_ = _out_scale(qx, sx, qw, sw, bias)
    out = klinear.w8a8_gemm(qx, sx, qw, sw, bias, torch.bfloat16, split_k=split_k, config=config)
    assert_float_close(out, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.bfloat16))
    q = klinear.w8a8_gemm(qx, sx, qw, sw, bias, torch.bfloat16, os_, split_k=split_k, config=config)
    assert_codes_agree(q, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.bfloat16, os_))


@pytest.mark.parametrize("lead", DECODE_LEADS, ids=lambda l: f"B{l[0]}L{l[1]}")
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_gemv_matches_ref(shape_name, lead):
    qx, sx, qw, sw, bias = _inputs(shape_name, lead)
    out = klinear.w8a8_gemv(qx, sx, qw, sw, bias, torch.float16)
    assert out.shape == (*lead, qw.shape[0])
    assert_float_close(out, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float16))
    os_ = _out_scale(qx, sx, qw, sw, bias)
    q = klinear.w8a8_gemv(qx, sx, qw, sw, bias, torch.float16, os_)
    assert_codes_agree(q, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float16, os_))


@pytest.mark.parametrize("M", range(1, 9))
@pytest.mark.parametrize("shape_name", ["2.8b.out_proj", "130m.dt_proj"])
def test_gemv_every_row_count(shape_name, M):
    """Every M of 1..8 (kernels are compiled for 1, 2, 4, 8 rows; the others mask rows)."""
    qx, sx, qw, sw, bias = _inputs(shape_name, (M,), seed=M)
    assert_float_close(klinear.w8a8_gemv(qx, sx, qw, sw, bias, torch.bfloat16),
                       w8a8_linear_ref(qx, sx, qw, sw, bias, torch.bfloat16))


@pytest.mark.parametrize("out_dtype, requant", [(torch.float32, False), (torch.bfloat16, False),
                                                (torch.bfloat16, True), (torch.float32, True)])
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("shape_name", ["2.8b.in_proj", "2.8b.x_proj"])
def test_gemv_out_dtypes_and_scales(shape_name, per_channel, out_dtype, requant):
    qx, sx, qw, sw, bias = _inputs(shape_name, (8, 1), per_channel=per_channel, with_bias=per_channel)
    os_ = _out_scale(qx, sx, qw, sw, bias) if requant else None
    out = klinear.w8a8_gemv(qx, sx, qw, sw, bias, out_dtype, os_)
    ref = w8a8_linear_ref(qx, sx, qw, sw, bias, out_dtype, os_)
    if requant:
        assert_codes_agree(out, ref)
    else:
        assert_float_close(out, ref)


SEGMENTS = {  # the decode step's linears emitting their consumers' codes: column counts per consumer
    "2.8b.in_proj": [5120, 5120],          # conv1d input, scan z
    "2.8b.x_proj": [160, 16, 16],          # dt_proj input, scan B, scan C
    "2.8b.dt_proj": [5120],                # scan delta (one per-tensor scale)
    "130m.x_proj": [48, 16, 16],
    "130m.in_proj": [1000, 536, 1000, 536],  # four segments, bounds off the 4-row blocks
}


@pytest.mark.parametrize("lead", [(1,), (8,)], ids=lambda l: f"B{l[0]}")
@pytest.mark.parametrize("shape_name", list(SEGMENTS))
def test_gemv_segment_out_scales(shape_name, lead):
    """One one-element scale per segment of columns (``out_columns``): the same codes as the per-column scale
    they stand for, bit for bit (same epilogue, only where the scale is read differs), and >= 99.9 % / 1 LSB
    against the reference."""
    qx, sx, qw, sw, bias = _inputs(shape_name, lead)
    cols = SEGMENTS[shape_name]
    y = w8a8_linear_ref(qx, sx, qw, sw, bias).reshape(-1, qw.shape[0]).float()
    scales = [(seg.std() / (25 + 5 * i)).clamp_min(1e-6) for i, seg in enumerate(y.split(cols, dim=-1))]
    per_column = torch.cat([s.reshape(1).expand(c) for s, c in zip(scales, cols)]).contiguous()
    q = klinear.w8a8_gemv(qx, sx, qw, sw, bias, torch.float16, scales, cols)
    assert torch.equal(q, klinear.w8a8_gemv(qx, sx, qw, sw, bias, torch.float16, per_column))
    assert_codes_agree(q, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float16, scales, cols))
    assert torch.equal(w8a8_linear(qx, sx, qw, sw, bias, torch.float16, scales, backend="cuda", out_columns=cols), q)
    with pytest.raises(ValueError, match="summing to N"):
        klinear.w8a8_gemv(qx, sx, qw, sw, bias, torch.float16, scales, [c + 1 for c in cols])


@pytest.mark.parametrize("shape_name", ["2.8b.in_proj", "130m.dt_proj", "2.8b.x_proj"])
def test_float_outputs_are_bit_exact(shape_name):
    """The design claim behind the tolerances: both kernels reproduce the reference's fp32 epilogue exactly."""
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        qx, sx, qw, sw, bias = _inputs(shape_name, (1, 33))
        assert torch.equal(klinear.w8a8_gemm(qx, sx, qw, sw, bias, dtype),
                           w8a8_linear_ref(qx, sx, qw, sw, bias, dtype)), f"GEMM {dtype}"
        qx = qx[:, :5]
        assert torch.equal(klinear.w8a8_gemv(qx, sx, qw, sw, bias, dtype),
                           w8a8_linear_ref(qx, sx, qw, sw, bias, dtype)), f"GEMV {dtype}"


def test_dispatch_routes_and_views():
    qx, sx, qw, sw, bias = _inputs("130m.out_proj", (2, 40))
    for x in (qx[:, :1], qx[:1, :8], qx):  # GEMV (M = 2: non-contiguous view), GEMV (M = 8), GEMM (M = 80)
        assert torch.equal(w8a8_linear(x, sx, qw, sw, bias, torch.float16, backend="cuda"),
                           w8a8_linear_ref(x, sx, qw, sw, bias, torch.float16))
    # K = 40 is no multiple of 16: one token goes to the GEMM
    g = torch.Generator(device="cuda").manual_seed(1)
    qx40 = torch.randint(-128, 128, (1, 40), dtype=torch.int8, device="cuda", generator=g)
    qw40 = torch.randint(-128, 128, (64, 40), dtype=torch.int8, device="cuda", generator=g)
    sw40 = torch.full((64,), 1e-3, device="cuda")
    assert torch.equal(w8a8_linear(qx40, sx, qw40, sw40, out_dtype=torch.float16),
                       w8a8_linear_ref(qx40, sx, qw40, sw40, out_dtype=torch.float16))
    # the GEMV's limits are caught by its Python check (klinear.check_gemv_args) before the op is called: a C++
    # TORCH_CHECK firing inside the extension is a backstop only, never reached here
    with pytest.raises(ValueError, match="multiple of 16"):
        klinear.w8a8_gemv(qx40, sx, qw40, sw40)
    with pytest.raises(ValueError, match="1..8 rows"):
        klinear.w8a8_gemv(qx.reshape(80, -1)[:9], sx, qw, sw)
    with pytest.raises(ValueError, match="w_scale must have 1"):
        klinear.w8a8_gemv(qx[:, :1], sx, qw, sw[:-1])
    with pytest.raises(RuntimeError, match="w_scale is on cpu"):
        klinear.w8a8_gemv(qx[:, :1], sx, qw, sw.cpu())


def test_gemv_in_cuda_graph():
    """No host sync and no value-dependent launch: the decode GEMV replays in a CUDA graph with new inputs."""
    qx, sx, qw, sw, bias = _inputs("2.8b.out_proj", (4, 1))
    os_ = _out_scale(qx, sx, qw, sw, bias)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        klinear.w8a8_gemv(qx, sx, qw, sw, bias, torch.float16, os_)  # warm-up (builds / loads the kernels)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = klinear.w8a8_gemv(qx, sx, qw, sw, bias, torch.float16)
        q = klinear.w8a8_gemv(qx, sx, qw, sw, bias, torch.float16, os_)
    qx.copy_(torch.randint_like(qx, -128, 128))
    sx.fill_(0.025)  # scales are read on the device at replay, not baked in at capture
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float16))
    assert_codes_agree(q, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float16, os_))


def test_gemm_in_cuda_graph_after_warmup():
    qx, sx, qw, sw, bias = _inputs("130m.in_proj", (1, 33))
    klinear.w8a8_gemm(qx, sx, qw, sw, bias, torch.float16)  # autotunes outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = klinear.w8a8_gemm(qx, sx, qw, sw, bias, torch.float16)
    qx.copy_(torch.randint_like(qx, -128, 128))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float16))
