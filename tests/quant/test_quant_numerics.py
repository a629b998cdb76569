"""The numerics contract (DESIGN.md §3): rint, clamp, fp32 reciprocal, fake-quant == dequantize(quantize), STE / LSQ
gradients, exact integer GEMM.

Tolerances: everything here is exact (torch.equal) except the comparison with an autograd LSQ reference, whose ops
differ (scale grad: rtol 1e-5, atol 1e-6; x grad: assert_close's fp32 defaults, the reference multiplies by (1/s) * s).
"""

import math

import pytest
import torch

from qmamba.quant import (PerChannel, PerGroup, check_scale, dequantize, fake_quantize, int8_linear_ref, int_matmul,
                          int_matmul_ref, qrange, quantize, scale_from_absmax)


def test_qrange():
    assert qrange(8) == (-128, 127)
    assert qrange(4) == (-8, 7)
    assert qrange(2) == (-2, 1)
    for bad in (1, 9, 8.0, True):
        with pytest.raises(ValueError, match="2..8"):
            qrange(bad)


def test_round_half_to_even():
    x = torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5, 0.49999997])
    q = quantize(x, torch.tensor(1.0))
    assert q.dtype == torch.int8
    assert q.tolist() == [0, 2, 2, 0, -2, -2, 4, 0]


def test_clamp_to_range():
    x = torch.tensor([-1000.0, -128.4, -128.6, 126.6, 127.4, 127.6, 1e9])
    assert quantize(x, torch.tensor(1.0)).tolist() == [-128, -128, -128, 127, 127, 127, 127]
    assert quantize(x, torch.tensor(1.0), bits=4).tolist() == [-8, -8, -8, 7, 7, 7, 7]
    assert quantize(torch.tensor([-8.6, -7.5, 6.5, 6.6]), torch.tensor(1.0), bits=4).tolist() == [-8, -8, 6, 7]


def test_multiplies_by_the_fp32_reciprocal():
    # A pair where x / s and x * (1 / s) land on different sides of a .5 tie in fp32.
    x = torch.tensor(-3.832268238067627, dtype=torch.float32)
    s = torch.tensor(0.06440787017345428, dtype=torch.float32)
    by_div, by_mul = torch.round(x / s).item(), torch.round(x * (1.0 / s)).item()
    assert by_div != by_mul  # the case really discriminates
    assert quantize(x, s).item() == by_mul == -59
    assert torch.equal(fake_quantize(x, s), torch.tensor(by_mul) * s)


def test_per_channel_and_per_group_scales_broadcast():
    x = torch.randn(4, 3, 6) * 3
    s_c = torch.rand(3) + 0.01
    q = quantize(x, PerChannel(axis=1).broadcast(s_c, 3))
    for c in range(3):
        assert torch.equal(q[:, c], quantize(x[:, c], s_c[c]))
    s_g = torch.rand(2) + 0.01
    q = quantize(x, PerGroup(3, axis=-1).broadcast(s_g, 3))
    for g in range(2):
        assert torch.equal(q[..., 3 * g:3 * g + 3], quantize(x[..., 3 * g:3 * g + 3], s_g[g]))


def test_scale_checks():
    with pytest.raises(ValueError, match="broadcast"):
        quantize(torch.randn(4, 3), torch.ones(4))  # (4,) against (4, 3): wrong axis
    with pytest.raises(ValueError, match="broadcast"):
        quantize(torch.randn(3), torch.ones(2, 3))  # would grow x
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="calibrate"):
            quantize(torch.randn(3), torch.tensor([1.0, bad, 1.0]))
        with pytest.raises(ValueError, match="my.scale"):
            check_scale(torch.tensor([bad]), "my.scale")
    assert torch.equal(check_scale(torch.tensor([0.5])), torch.tensor([0.5]))


def test_dequantize_and_scale_from_absmax():
    q = torch.tensor([-128, 0, 5, 127], dtype=torch.int8)
    s = torch.tensor(0.1)
    out = dequantize(q, s)
    assert out.dtype == torch.float32 and torch.equal(out, q.float() * s)
    assert torch.equal(scale_from_absmax(torch.tensor([127.0, 0.0])), torch.tensor([1.0, 1e-8 / 127]))
    assert torch.equal(scale_from_absmax(torch.tensor(14.0), bits=4), torch.tensor(2.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quantize_bit_identical(dtype):
    x = (torch.randn(64, 48) * 4).to(dtype)
    for s in (torch.tensor(0.0371), PerChannel(0).broadcast(torch.rand(64) * 0.05 + 1e-3, 2),
              PerGroup(8, -1).broadcast(torch.rand(6) * 0.05 + 1e-3, 2)):
        for bits in (8, 4):
            fq = fake_quantize(x, s, bits)
            assert fq.dtype == dtype
            assert torch.equal(fq, dequantize(quantize(x, s, bits), s).to(dtype))


def test_ste_gradient():
    s = torch.tensor(1.0)
    x = torch.tensor([-130.0, -128.5, -128.0, -3.7, 0.0, 2.5, 127.0, 127.2, 500.0], requires_grad=True)
    up = torch.arange(1.0, 10.0)
    fake_quantize(x, s).backward(up)
    inside = torch.tensor([0, 0, 1, 1, 1, 1, 1, 0, 0], dtype=torch.bool)
    assert torch.equal(x.grad, torch.where(inside, up, torch.zeros_like(up)))
    assert s.grad is None


def test_ste_gradient_bf16_keeps_dtype():
    x = (torch.randn(16, 8) * 50).to(torch.bfloat16).requires_grad_()
    s = torch.tensor(0.5)
    fake_quantize(x, s).sum().backward()
    assert x.grad.dtype == torch.bfloat16
    v = x.detach().float() / 0.5
    assert torch.equal(x.grad, ((v >= -128) & (v <= 127)).to(torch.bfloat16))
    assert 0 < int((x.grad == 0).sum()) < x.numel()  # both sides exercised


def test_lsq_scale_gradient_explicit_formula():
    # Hand-worked: s = 0.5, bits = 4 (qmin -8, qmax 7), v = x / s = [1.2, -20, 14.6, 3.5].
    x = torch.tensor([0.6, -10.0, 7.3, 1.75])
    s = torch.tensor(0.5, requires_grad=True)
    up = torch.tensor([1.0, 2.0, 3.0, 4.0])
    fake_quantize(x, s, bits=4).backward(up)
    d = [1.0 - 1.2, -8.0, 7.0, 4.0 - 3.5]  # rint(v) - v inside, qmin / qmax where clamped
    g = 1.0 / math.sqrt(4 / 1 * 7)
    want = sum(u * di for u, di in zip(up.tolist(), d)) * g
    assert s.grad.item() == pytest.approx(want, rel=1e-5)


def _lsq_reference(x, s, bits):
    """LSQ written with plain autograd: STE via detach, gradient scaling via the (s - s*g).detach() + s*g trick."""
    qmin, qmax = qrange(bits)
    g = 1.0 / math.sqrt(x.numel() / s.numel() * qmax)
    s_g = (s - s * g).detach() + s * g
    v = torch.clamp(x * (1.0 / s_g), qmin, qmax)  # clamp the pre-round value, as LSQ does
    return (v + (torch.round(v) - v).detach()) * s_g


@pytest.mark.parametrize("bits", [8, 4])
def test_lsq_scale_gradient_matches_autograd_reference(bits):
    x = torch.randn(6, 5, 8) * 3
    for stat, gran in ((torch.tensor(0.02), None), (torch.rand(8) * 0.05 + 0.005, PerChannel(-1)),
                       (torch.rand(2) * 0.05 + 0.005, PerGroup(4, -1))):
        s0 = stat if gran is None else gran.broadcast(stat, 3)
        up = torch.randn(6, 5, 8)
        x1, s1 = x.clone().requires_grad_(), s0.clone().requires_grad_()
        fake_quantize(x1, s1, bits).backward(up)
        x2, s2 = x.clone().requires_grad_(), s0.clone().requires_grad_()
        _lsq_reference(x2, s2, bits).backward(up)
        assert s1.grad.shape == s0.shape
        torch.testing.assert_close(s1.grad, s2.grad, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(x1.grad, x2.grad)  # the reference multiplies by (1/s) * s: ~1 ulp
        assert float(s1.grad.abs().sum()) > 0


INT_MM_SHAPES = [((1, 1), 1), ((3, 7), 5), ((16, 8), 8), ((17, 32), 24), ((2, 5, 13), 9), ((33, 64), 16), ((4, 0), 3)]


@pytest.mark.parametrize("a_shape,n", INT_MM_SHAPES)
def test_int_matmul_exact(a_shape, n):
    qa = torch.randint(-128, 128, a_shape, dtype=torch.int8)
    qb = torch.randint(-128, 128, (n, a_shape[-1]), dtype=torch.int8)
    want = (qa.long() @ qb.long().T)
    for fn in (int_matmul, int_matmul_ref):
        got = fn(qa, qb)
        assert got.dtype == torch.int32 and got.shape == (*a_shape[:-1], n)
        assert torch.equal(got.long(), want)


def test_int_matmul_extremes_and_errors():
    K = 4096  # all (-128)*(-128): the largest sum, 2**26, must not saturate or round
    qa = torch.full((2, K), -128, dtype=torch.int8)
    assert int_matmul(qa, qa).unique().tolist() == [K * 128 * 128]
    assert int_matmul_ref(qa, qa).unique().tolist() == [K * 128 * 128]
    with pytest.raises(TypeError, match="int8"):
        int_matmul(qa.float(), qa)
    with pytest.raises(ValueError, match=r"\(N, K\)"):
        int_matmul(qa, qa[:, :10])
    big = torch.zeros(1, 2 ** 17, dtype=torch.int8)
    with pytest.raises(ValueError, match="overflow"):
        int_matmul(big, big)


@pytest.mark.parametrize("per_channel", [False, True])
def test_int8_linear_ref_formula(per_channel):
    qx = torch.randint(-128, 128, (2, 3, 20), dtype=torch.int8)
    qw = torch.randint(-128, 128, (12, 20), dtype=torch.int8)
    sx = torch.tensor(0.013)
    sw = torch.rand(12) * 0.01 + 1e-4 if per_channel else torch.tensor(0.007)
    bias = torch.randn(12)
    acc = (qx.long() @ qw.long().T).to(torch.int32)
    want = acc.float() * (sx * sw) + bias
    got = int8_linear_ref(qx, sx, qw, sw, bias)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert torch.equal(int8_linear_ref(qx, sx, qw, sw), acc.float() * (sx * sw))
    with pytest.raises(ValueError, match="per-output-channel"):
        int8_linear_ref(qx, sx, qw, torch.ones(5))
