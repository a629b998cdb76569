"""W8A8 linear (qmamba.ops.int8_linear): the reference against the torch int8 backend's math, the requant epilogue
against quantize(), and the Triton GEMM under TRITON_INTERPRET=1 (CPU, in a subprocess) against the reference.

Tolerances: none. The reference is int8_linear_ref(...).to(out_dtype) bit for bit; the Triton GEMM under the
interpreter equals it bit for bit for fp32 / fp16 / bf16 outputs and int8 codes alike (integer sums, then the same
fp32 ops in the same order; the contract would allow 1 ULP for floats and 1 LSB for codes, but none is needed).
"""

import textwrap

import pytest
import torch

from qmamba.ops.int8_linear import GEMV_MAX_M, w8a8_linear, w8a8_linear_ref
from qmamba.quant.numerics import int8_linear_ref, quantize

OUT_DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _case(lead=(2, 3), K=64, N=48, per_channel=True, with_bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    qx = torch.randint(-128, 128, (*lead, K), dtype=torch.int8, generator=g)
    qw = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
    sx = torch.tensor(0.02)
    sw = (torch.rand(N, generator=g) * 0.01 + 1e-3) if per_channel else torch.tensor(3e-3)
    bias = torch.randn(N, generator=g) if with_bias else None
    return qx, sx, qw, sw, bias


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_ref_is_the_torch_backend(out_dtype, per_channel, with_bias):
    qx, sx, qw, sw, bias = _case(per_channel=per_channel, with_bias=with_bias)
    out = w8a8_linear_ref(qx, sx, qw, sw, bias, out_dtype)
    assert out.shape == (2, 3, 48) and out.dtype == out_dtype
    # the call QuantLinear's int8 path makes, then its .to(dtype)
    expected = int8_linear_ref(qx, sx.reshape(()), qw, sw.reshape(-1) if per_channel else sw.reshape(()),
                               bias).to(out_dtype)
    assert torch.equal(out, expected)


def test_ref_matches_float_definition():
    # an independent formula (float64 sum, then the fp32 epilogue by hand): the reference is not just a wrapper
    qx, sx, qw, sw, bias = _case(per_channel=True)
    acc = (qx.double() @ qw.double().T).float()  # exact: |acc| < 2**24
    expected = acc * (sx * sw) + bias
    assert torch.equal(w8a8_linear_ref(qx, sx, qw, sw, bias), expected)
    # scales multiply first: (acc * sx) * sw rounds differently somewhere
    other = (acc * sx) * sw + bias
    assert not torch.equal(other, expected)


@pytest.mark.parametrize("out_dtype", OUT_DTYPES)
@pytest.mark.parametrize("per_channel", [False, True])
def test_requant_epilogue_is_quantize_of_ref(out_dtype, per_channel):
    qx, sx, qw, sw, bias = _case(per_channel=per_channel)
    y = w8a8_linear_ref(qx, sx, qw, sw, bias, out_dtype)
    # per-column scales: two halves with their own per-tensor scale, as in_proj's x / z halves
    out_scale = torch.cat([torch.full((24,), 0.05), torch.full((24,), 0.011)])
    q = w8a8_linear_ref(qx, sx, qw, sw, bias, out_dtype, out_scale=out_scale)
    assert q.dtype == torch.int8 and q.shape == y.shape
    assert torch.equal(q, quantize(y, out_scale))
    by_hand = torch.round(y.float() * (1.0 / out_scale)).clamp(-128, 127).to(torch.int8)
    assert torch.equal(q, by_hand)
    assert torch.equal(q[..., :24], quantize(y[..., :24], torch.tensor(0.05)))
    assert (q == 127).any() or (q == -128).any()  # the clamp is exercised (acc * scales reaches past 127 * 0.011)


def test_requant_rounds_through_out_dtype():
    # y in bf16 vs fp32 differs, and so can the codes: the epilogue quantizes the rounded activation
    qx, sx, qw, sw, bias = _case(lead=(64,), K=256, N=64, seed=3)
    out_scale = torch.full((64,), 0.0123)
    q32 = w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float32, out_scale)
    q16 = w8a8_linear_ref(qx, sx, qw, sw, bias, torch.bfloat16, out_scale)
    y16 = w8a8_linear_ref(qx, sx, qw, sw, bias, torch.bfloat16)
    assert torch.equal(q16, quantize(y16, out_scale))
    assert not torch.equal(q32, q16)


def test_segment_out_scales_equal_the_per_column_scale():
    """One scale per segment of columns (``out_columns``) gives the codes of the per-column scale it stands for;
    bad segments are refused naming the fix."""
    g = torch.Generator().manual_seed(4)
    qx = torch.randint(-128, 128, (3, 64), dtype=torch.int8, generator=g)
    qw = torch.randint(-128, 128, (40, 64), dtype=torch.int8, generator=g)
    sx, sw = torch.tensor(0.01), torch.rand(40, generator=g) * 1e-3 + 1e-4
    scales, cols = [torch.tensor(0.01), torch.tensor([0.03]), torch.tensor(0.002)], [20, 12, 8]
    per_column = torch.cat([s.reshape(1).expand(c) for s, c in zip(scales, cols)])
    q = w8a8_linear_ref(qx, sx, qw, sw, None, torch.float16, scales, cols)
    assert q.dtype == torch.int8
    assert torch.equal(q, w8a8_linear_ref(qx, sx, qw, sw, None, torch.float16, per_column))
    assert torch.equal(w8a8_linear(qx, sx, qw, sw, None, torch.float16, scales, out_columns=cols), q)
    with pytest.raises(ValueError, match="summing to N=40"):
        w8a8_linear_ref(qx, sx, qw, sw, None, torch.float16, scales, [20, 12, 9])
    with pytest.raises(ValueError, match="one-element tensors"):
        w8a8_linear_ref(qx, sx, qw, sw, None, torch.float16, per_column, cols)
    with pytest.raises(ValueError, match="1..4 positive column counts"):
        w8a8_linear_ref(qx, sx, qw, sw, None, torch.float16, [torch.tensor(0.01)] * 5, [8] * 5)


def test_rejects_bad_arguments():
    qx, sx, qw, sw, bias = _case()
    with pytest.raises(ValueError, match="x_scale"):
        w8a8_linear_ref(qx, torch.ones(3), qw, sw)
    with pytest.raises(ValueError, match="w_scale"):
        w8a8_linear_ref(qx, sx, qw, torch.ones(5))
    with pytest.raises(ValueError, match="out_scale"):
        w8a8_linear_ref(qx, sx, qw, sw, out_scale=torch.tensor(0.1))
    with pytest.raises(ValueError, match="out_dtype"):
        w8a8_linear_ref(qx, sx, qw, sw, out_dtype=torch.int32)
    with pytest.raises(TypeError, match="int8"):
        w8a8_linear_ref(qx.float(), sx, qw, sw)
    with pytest.raises(ValueError, match="K"):
        w8a8_linear_ref(qx[..., :32], sx, qw, sw)


def test_dispatch_on_cpu():
    qx, sx, qw, sw, bias = _case()
    assert torch.equal(w8a8_linear(qx, sx, qw, sw, bias, torch.float16),
                       w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float16))
    with pytest.raises(RuntimeError, match="backend='torch'"):
        w8a8_linear(qx, sx, qw, sw, backend="cuda")
    assert 1 <= GEMV_MAX_M <= 8  # the GEMV kernel handles 1..8 rows


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import itertools
    import torch
    from qmamba.kernels.linear import w8a8_gemm
    from qmamba.ops.int8_linear import w8a8_linear_ref

    failures, n = [], 0
    # (M, K, N): ragged M and N tiles; K=64 divides the 32-wide K tile, K=80 does not (masked K tail)
    shapes = [(5, 64, 48), (37, 80, 40)]
    for (M, K, N), per_channel, with_bias, dtype, requant, split_k in itertools.product(
            shapes, [False, True], [False, True], [torch.float32, torch.float16, torch.bfloat16], [False, True],
            [1, 2]):
        g = torch.Generator().manual_seed(n)
        qx = torch.randint(-128, 128, (M, K), dtype=torch.int8, generator=g)
        qw = torch.randint(-128, 128, (N, K), dtype=torch.int8, generator=g)
        sx = torch.tensor(0.02)
        sw = torch.rand(N, generator=g) * 0.01 + 1e-3 if per_channel else torch.tensor(3e-3)
        bias = torch.randn(N, generator=g) if with_bias else None
        out_scale = torch.rand(N, generator=g) * 0.5 + 0.05 if requant else None
        ref = w8a8_linear_ref(qx, sx, qw, sw, bias, dtype, out_scale)
        out = w8a8_gemm(qx, sx, qw, sw, bias, dtype, out_scale, split_k=split_k)
        n += 1
        if out.dtype != ref.dtype or not torch.equal(out, ref):
            failures.append((M, K, N, per_channel, with_bias, str(dtype), requant, split_k,
                             float((out.float() - ref.float()).abs().max())))
    # leading dims are flattened into rows and restored
    qx = torch.randint(-128, 128, (2, 3, 64), dtype=torch.int8)
    qw = torch.randint(-128, 128, (48, 64), dtype=torch.int8)
    out = w8a8_gemm(qx, torch.tensor(0.01), qw, torch.tensor(0.02), out_dtype=torch.float16)
    assert out.shape == (2, 3, 48), out.shape
    assert torch.equal(out, w8a8_linear_ref(qx, torch.tensor(0.01), qw, torch.tensor(0.02), None, torch.float16))
    # x a column slice of a wider tensor (dt_proj's input: the first columns of x_proj's codes): read at its row
    # stride, no copy made
    wide = torch.randint(-128, 128, (2, 5, 96), dtype=torch.int8)
    qs = wide[..., :64]
    import qmamba.kernels.triton.w8a8_gemm as tkm
    seen, launch = [], tkm.w8a8_gemm
    def spy(x, *a, **k):
        seen.append((x.data_ptr() == qs.data_ptr(), x.stride(0)))
        return launch(x, *a, **k)
    tkm.w8a8_gemm = spy
    out = w8a8_gemm(qs, torch.tensor(0.01), qw, torch.tensor(0.02), out_dtype=torch.float16)
    tkm.w8a8_gemm = launch
    assert seen == [(True, 96)], seen
    assert torch.equal(out, w8a8_linear_ref(qs, torch.tensor(0.01), qw, torch.tensor(0.02), None, torch.float16))

    # every autotune candidate tile (the GPU picks among them), ragged M / N / K, split and not
    import triton
    from qmamba.kernels.triton import w8a8_gemm as tk
    M, K, N = 70, 160, 200
    qx = torch.randint(-128, 128, (M, K), dtype=torch.int8)
    qw = torch.randint(-128, 128, (N, K), dtype=torch.int8)
    sx, sw, bias = torch.tensor(0.02), torch.rand(N) * 0.01 + 1e-3, torch.randn(N)
    out_scale = torch.rand(N) * 0.5 + 0.05
    for config, split_k, out_s in itertools.product(tk._CONFIGS, [1, 3], [None, out_scale]):
        ref = w8a8_linear_ref(qx, sx, qw, sw, bias, torch.bfloat16, out_s)
        out = w8a8_gemm(qx, sx, qw, sw, bias, torch.bfloat16, out_s, split_k=split_k, config=config)
        n += 1
        if not torch.equal(out, ref):
            failures.append((config, split_k, out_s is not None))

    # the autotuner's plumbing (pruning, key, heuristics, launch options), its timer replaced by a stub
    tk._gemm_tuned._do_bench = lambda fn, quantiles: (fn(), [1.0, 1.0, 1.0])[1]
    out = torch.empty(M, N, dtype=torch.float16)
    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), 1)
    tk._gemm_tuned[grid](qx, qw, out, out, sx, sw, bias, sx, M, N, K, tk.m_bucket(M), qx.stride(0), qw.stride(0),
                         out.stride(0), out.stride(1), W_PER_CHANNEL=True, HAS_BIAS=True, REQUANT=False,
                         OUT_DTYPE=tk._TORCH_TO_TL[torch.float16], SPLIT_K=1, GROUP_M=tk.GROUP_M,
                         enable_fp_fusion=False)
    assert torch.equal(out, w8a8_linear_ref(qx, sx, qw, sw, bias, torch.float16)), "autotuned launch"
    assert len(tk._gemm_tuned.cache) == 1

    print("cases", n, "failures", failures)
    assert not failures, failures
""")


def test_triton_gemm_under_interpreter_equals_ref(interpret):
    assert "failures []" in interpret(_INTERPRETER_SCRIPT)
