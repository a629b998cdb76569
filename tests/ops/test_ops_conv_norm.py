"""Causal depthwise conv1d and (gated) RMSNorm references against their written-out definitions."""

import pytest
import torch
import torch.nn.functional as F

from qmamba.ops import causal_conv1d, causal_conv1d_ref, gated_rms_norm, gated_rms_norm_ref, rms_norm, rms_norm_ref

RTOL_F64, ATOL_F64 = 1e-12, 1e-12  # float64 in, float64 conv
RTOL_FP32, ATOL_FP32 = 1e-5, 1e-6  # norms compute in fp32 whatever the input dtype
RTOL_BF16, ATOL_BF16 = 1.6e-2, 1e-2


def _conv_loop(x, weight, bias, activation):
    """out[:, c, t] = bias[c] + sum_i weight[c, i] * x[:, c, t - (k - 1) + i], x = 0 before t = 0."""
    b, d, L = x.shape
    k = weight.shape[1]
    out = torch.zeros_like(x)
    for t in range(L):
        for i in range(k):
            s = t - (k - 1) + i
            if s >= 0:
                out[:, :, t] += weight[:, i] * x[:, :, s]
        if bias is not None:
            out[:, :, t] += bias
    return F.silu(out) if activation in ("silu", "swish") else out


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize("L", [1, 3, 10])
@pytest.mark.parametrize("with_bias", [False, True])
@pytest.mark.parametrize("activation", [None, "silu", "swish"])
def test_causal_conv1d_matches_loop(k, L, with_bias, activation):
    x = torch.randn(2, 5, L, dtype=torch.float64)
    w = torch.randn(5, k, dtype=torch.float64)
    bias = torch.randn(5, dtype=torch.float64) if with_bias else None
    out = causal_conv1d_ref(x, w, bias, activation)
    assert out.shape == x.shape and out.dtype == x.dtype
    torch.testing.assert_close(out, _conv_loop(x, w, bias, activation), rtol=RTOL_F64, atol=ATOL_F64)


def test_causal_conv1d_is_causal():
    x = torch.randn(2, 6, 20, dtype=torch.float64)
    w, bias = torch.randn(6, 4, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    base = causal_conv1d_ref(x, w, bias, "silu")
    for t in (0, 7, 19):
        x2 = x.clone()
        x2[:, :, t] += 10.0
        out = causal_conv1d_ref(x2, w, bias, "silu")
        torch.testing.assert_close(out[..., :t], base[..., :t], rtol=0, atol=0)
        assert (out[..., t] - base[..., t]).abs().min() > 0  # and step t itself does see it


def test_causal_conv1d_bf16_keeps_dtype():
    x = torch.randn(1, 4, 9).bfloat16()
    w, bias = torch.randn(4, 4), torch.randn(4)  # fp32 weights, as a model in autocast has
    out = causal_conv1d_ref(x, w, bias, "silu")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _conv_loop(x.double(), w.double(), bias.double(), "silu").float(),
                               rtol=RTOL_BF16, atol=ATOL_BF16)


def test_causal_conv1d_bad_activation_and_backend():
    x, w = torch.randn(1, 2, 3), torch.randn(2, 4)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_ref(x, w, activation="relu")
    with pytest.raises(RuntimeError, match=r"qmamba\[cuda\]"):
        causal_conv1d(x, w, backend="cuda")
    with pytest.raises(ValueError, match="bogus"):
        causal_conv1d(x, w, backend="bogus")
    torch.testing.assert_close(causal_conv1d(x, w, backend="auto"), causal_conv1d_ref(x, w), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------- norms


def _rms(x, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps)


@pytest.mark.parametrize("eps", [1e-5, 1e-6])
def test_rms_norm_matches_formula(eps):
    x = 3 * torch.randn(2, 7, 16)
    w = torch.randn(16)
    out = rms_norm_ref(x, w, eps)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, _rms(x.double(), eps).float() * w, rtol=RTOL_FP32, atol=ATOL_FP32)
    # the result has unit root-mean-square before the weight
    unit = rms_norm_ref(x, torch.ones(16), eps)
    torch.testing.assert_close(unit.pow(2).mean(-1), torch.ones(2, 7), rtol=1e-4, atol=0)


def test_rms_norm_bf16_in_bf16_out():
    x = torch.randn(3, 32).bfloat16()
    w = torch.randn(32)
    out = rms_norm_ref(x, w)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), (_rms(x.double(), 1e-5) * w.double()).float(), rtol=RTOL_BF16,
                               atol=ATOL_BF16)


def _gated_formula(x, w, z, eps, group_size, norm_before_gate):
    x, z, w = x.double(), None if z is None else z.double(), w.double()
    gate = None if z is None else z * torch.sigmoid(z)
    if gate is not None and not norm_before_gate:
        x = x * gate
    d = x.shape[-1]
    gs = group_size or d
    parts = [_rms(x[..., i:i + gs], eps) for i in range(0, d, gs)]
    y = torch.cat(parts, dim=-1) * w
    if gate is not None and norm_before_gate:
        y = y * gate
    return y


@pytest.mark.parametrize("group_size", [None, 4, 8, 16])
@pytest.mark.parametrize("norm_before_gate", [False, True])
@pytest.mark.parametrize("with_z", [False, True])
def test_gated_rms_norm_matches_formula(group_size, norm_before_gate, with_z):
    x = 2 * torch.randn(2, 5, 16)
    z = torch.randn(2, 5, 16) if with_z else None
    w = torch.randn(16)
    out = gated_rms_norm_ref(x, w, z, eps=1e-6, group_size=group_size, norm_before_gate=norm_before_gate)
    assert out.shape == x.shape and out.dtype == torch.float32
    want = _gated_formula(x, w, z, 1e-6, group_size, norm_before_gate).float()
    torch.testing.assert_close(out, want, rtol=RTOL_FP32, atol=ATOL_FP32)


def test_gated_rms_norm_gate_order_matters():
    x, z, w = torch.randn(4, 8), torch.randn(4, 8), torch.ones(8)
    before = gated_rms_norm_ref(x, w, z, norm_before_gate=True)
    after = gated_rms_norm_ref(x, w, z, norm_before_gate=False)
    assert (before - after).abs().max() > 1e-2


def test_gated_rms_norm_groups_are_independent():
    # scaling one group's inputs leaves the normalized output of every group unchanged (per-group statistics)
    x, w = torch.randn(3, 12), torch.randn(12)
    x2 = x.clone()
    x2[:, 4:8] *= 50.0
    torch.testing.assert_close(gated_rms_norm_ref(x2, w, group_size=4), gated_rms_norm_ref(x, w, group_size=4),
                               rtol=1e-4, atol=1e-5)
    # with one group over the whole row, the other groups do change
    assert (gated_rms_norm_ref(x2, w)[:, :4] - gated_rms_norm_ref(x, w)[:, :4]).abs().max() > 1e-2


def test_gated_rms_norm_bf16_and_bad_group():
    x, z, w = torch.randn(2, 16).bfloat16(), torch.randn(2, 16).bfloat16(), torch.randn(16)
    out = gated_rms_norm_ref(x, w, z, group_size=8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _gated_formula(x, w, z, 1e-6, 8, False).float(), rtol=RTOL_BF16,
                               atol=ATOL_BF16)
    with pytest.raises(ValueError, match="group_size"):
        gated_rms_norm_ref(torch.randn(2, 10), torch.ones(10), group_size=4)


def test_norm_dispatchers_on_cpu():
    x, z, w = torch.randn(2, 8), torch.randn(2, 8), torch.randn(8)
    torch.testing.assert_close(rms_norm(x, w, backend="auto"), rms_norm_ref(x, w), rtol=0, atol=0)
    torch.testing.assert_close(gated_rms_norm(x, w, z, group_size=4, backend="torch"),
                               gated_rms_norm_ref(x, w, z, group_size=4), rtol=0, atol=0)
    for fn, args in ((rms_norm, (x, w)), (gated_rms_norm, (x, w, z))):
        with pytest.raises(RuntimeError, match=r"qmamba\[cuda\]"):
            fn(*args, backend="cuda")
        with pytest.raises(ValueError, match="bogus"):
            fn(*args, backend="bogus")
