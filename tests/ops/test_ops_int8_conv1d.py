"""Int8 causal conv1d references (qmamba.ops.int8_conv1d) against the torch int8 backend of QuantCausalConv1d and
its consumers' quantizers (exact: the same fp32 ops), and the one-token update against the prefill (exact).

Tolerances: bit-exact (torch.equal) wherever the reference is compared with the module's own math. One exception:
update vs prefill with SiLU. CPU torch evaluates F.silu with vector code on full vector lanes and scalar code on the
tail, which differ by up to 1 ulp, so the same value can come out 1 ulp apart in a (B, D) and a (B, D, L) tensor;
there the float outputs agree within SILU_CPU_RTOL (an ulp or two of the output dtype) and the codes within 1 LSB.
(CUDA's torch SiLU is the same scalar code for every element: the GPU tests compare exactly.)"""

import pytest
import torch

import qmamba
from qmamba.kernels.conv1d import channel_scale, per_tensor_scale
from qmamba.models import MambaLM
from qmamba.ops.int8_conv1d import (conv1d_int8, conv1d_int8_initial_state, conv1d_int8_ref, conv1d_int8_update,
                                    conv1d_int8_update_ref)
from qmamba.qnn import calibrate, prepare, set_mode
from qmamba.quant.numerics import quantize

SILU_CPU_RTOL = {torch.float32: 3e-7, torch.bfloat16: 8e-3}


def _ids(seed, batch=2, L=19):
    return torch.randint(0, 256, (batch, L), generator=torch.Generator().manual_seed(seed))


def _int8_model(name, recipe):
    model = prepare(MambaLM(qmamba.preset(name)).eval(), recipe)
    calibrate(model, [_ids(10), _ids(11)], progress=False)
    return set_mode(model, "int8")


def _capture(module):
    """Forward hook storing the module's input and output."""
    seen = {}

    def hook(mod, args, out):  # out: the float output, or (Mamba1's mixer) a list of Codes, one per consumer
        seen["x"], seen["out"] = args[0].detach(), out

    module.register_forward_hook(hook)
    return seen


def _module_args(conv, x):
    """The int8 codes and scales the module computes with, as the reference takes them."""
    qx, sx = conv.q("input").quantize(x)
    qw, sw = conv._int8_weight(conv.q("weight"))
    return qx, sx, qw, sw


@pytest.mark.parametrize("name, recipe", [("tiny", "quamba_w8a8"), ("tiny", "qat_w8a8"),
                                          ("tiny-mamba2", "quamba2_w8a8")])
def test_ref_matches_module_in_a_model(name, recipe):
    """Inside a calibrated int8 model: the float output equals QuantCausalConv1d's, and (Mamba1) the codes for the
    two consumers' scales equal the codes the conv hands x_proj.input and scan.u (qmamba.qnn.codes), which they
    record."""
    model = _int8_model(name, recipe)
    mixer = model.backbone.layers[1].mixer
    mixer.in_proj.emit_codes = False  # in_proj hands the conv its float output, to see
    seen = _capture(mixer.conv1d)
    consumers = [mixer.x_proj.q("input"), mixer.scan.q("u")] if name == "tiny" else []
    for p in consumers:
        p.recording = True
    if consumers:  # the two scales agree after PTQ (one observer per tensor); QAT moves them apart
        with torch.no_grad():
            consumers[1].scale.mul_(1.3)
    with torch.no_grad():
        model(_ids(3))
    x, model_out = seen["x"], seen["out"]
    qx, sx, qw, sw = _module_args(mixer.conv1d, x)
    assert sw.numel() == (qw.shape[0] if recipe == "qat_w8a8" else 1)  # per-channel and per-tensor both covered
    out = conv1d_int8_ref(qx, sx, qw, sw, mixer.conv1d.bias, silu=True, out_dtype=x.dtype)
    with torch.no_grad():
        assert torch.equal(out, mixer.conv1d(x))  # no consumers named: the float output
    if not consumers:
        assert torch.equal(out, model_out)
    else:
        codes = conv1d_int8_ref(qx, sx, qw, sw, mixer.conv1d.bias, True, x.dtype, [p.scale for p in consumers])
        assert len(codes) == 2
        assert [c.q.data_ptr() for c in model_out] == [p.recorded.data_ptr() for p in consumers]
        x_proj_in, scan_u = (p.recorded for p in consumers)
        assert all(c.dtype == torch.int8 for c in codes)
        assert torch.equal(codes[0], x_proj_in.transpose(1, 2))  # x_proj sees (B, L, D), ours are (B, D, L)
        assert torch.equal(codes[1], scan_u)  # the scan takes u as (B, D, L)
        assert not torch.equal(codes[0], codes[1])  # the two scales differ, so a mixed-up scale would show


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_ref_matches_module_dtypes(dtype, with_bias):
    """The module run directly on fp16 / bf16 activations rounds its output through that dtype; so does the ref."""
    model = _int8_model("tiny", "qat_w8a8")
    conv = model.backbone.layers[0].mixer.conv1d
    if not with_bias:
        conv.bias = None
    x = (torch.randn(3, conv.in_channels, 21) * 2).to(dtype)
    with torch.no_grad():
        expected = conv(x)
    qx, sx, qw, sw = _module_args(conv, x)
    out = conv1d_int8_ref(qx, sx, qw, sw, conv.bias, silu=True, out_dtype=dtype)
    assert out.dtype == dtype and torch.equal(out, expected)
    scale = torch.tensor(0.02)
    (codes,) = conv1d_int8_ref(qx, sx, qw, sw, conv.bias, True, dtype, [scale])
    assert torch.equal(codes, quantize(expected, scale))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_ref_matches_module_step(dtype):
    """QuantCausalConv1d.step in int8 mode (its decode path) against the update reference, state included."""
    model = _int8_model("tiny", "qat_w8a8")
    conv = model.backbone.layers[0].mixer.conv1d
    B, D, K = 3, conv.in_channels, conv.weight.shape[-1]
    state = torch.randint(-128, 128, (B, D, K), dtype=torch.int8)
    ref_state = state.clone()
    for _ in range(3):
        x = (torch.randn(B, D) * 2).to(dtype)
        with torch.no_grad():
            expected = conv.step(x, state)
        qx, sx, qw, sw = _module_args(conv, x)
        out = conv1d_int8_update_ref(qx, ref_state, sx, qw, sw, conv.bias, silu=True, out_dtype=dtype)
        assert torch.equal(out, expected) and torch.equal(ref_state, state)


def _random_case(B=2, D=6, L=11, K=4, per_channel=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    qx = torch.randint(-128, 128, (B, D, L), dtype=torch.int8, generator=g)
    qw = torch.randint(-128, 128, (D, 1, K), dtype=torch.int8, generator=g)
    sx = torch.tensor(0.03)
    sw = torch.rand(D, generator=g) * 0.004 + 0.001 if per_channel else torch.tensor([0.003])
    bias = torch.randn(D, generator=g) * 0.1
    return qx, sx, qw, sw, bias


def _loop(qx, sx, qw, sw, bias, silu):
    """The definition written out: exact integer sums, then the fp32 epilogue per element."""
    B, D, L = qx.shape
    K = qw.shape[-1]
    w = qw.reshape(D, K).tolist()
    x = qx.tolist()
    acc = torch.zeros(B, D, L, dtype=torch.int32)
    for b in range(B):
        for c in range(D):
            for t in range(L):
                acc[b, c, t] = sum(w[c][i] * x[b][c][t - (K - 1) + i] for i in range(K) if t - (K - 1) + i >= 0)
    out = acc.float() * (sx.float().reshape(()) * sw.float().reshape(-1, 1))
    out = out + bias.float()[:, None]
    return torch.nn.functional.silu(out) if silu else out


@pytest.mark.parametrize("K", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("silu", [True, False])
def test_ref_matches_definition(K, silu):
    qx, sx, qw, sw, bias = _random_case(K=K, seed=K)
    out = conv1d_int8_ref(qx, sx, qw, sw, bias, silu=silu)
    assert torch.equal(out, _loop(qx, sx, qw, sw, bias, silu))


def test_ref_extreme_codes_do_not_overflow():
    qx = torch.full((1, 2, 8), -128, dtype=torch.int8)
    qw = torch.full((2, 4), -128, dtype=torch.int8)
    out = conv1d_int8_ref(qx, torch.tensor(1.0), qw, torch.tensor(1.0), silu=False)
    assert out[0, 0, -1].item() == 4 * 128 * 128 and out[0, 0, 0].item() == 128 * 128


def test_ref_any_strides():
    """Mamba1 passes a transposed slice of in_proj's output: (B, D, L) with strides (L * 2D, 1, 2D)."""
    B, D, L = 2, 6, 13
    qx, sx, qw, sw, bias = _random_case(B, D, L)
    xz = torch.randint(-128, 128, (B, L, 2 * D), dtype=torch.int8)
    xz[..., :D] = qx.transpose(1, 2)
    strided = xz[..., :D].transpose(1, 2)
    assert strided.stride() == (L * 2 * D, 1, 2 * D)
    assert torch.equal(conv1d_int8_ref(strided, sx, qw, sw, bias), conv1d_int8_ref(qx, sx, qw, sw, bias))


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("L0", [1, 2, 5])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("silu", [False, True])
def test_update_continues_prefill(K, L0, out_dtype, silu):
    """Prefill of L0 tokens, then one update per token, gives the prefill of the whole sequence: the state and the
    integer sums exactly; the outputs exactly without SiLU, within SILU_CPU_RTOL with it (CPU torch only)."""
    qx, sx, qw, sw, bias = _random_case(L=L0 + 6, K=K, seed=K + L0)
    scales = [torch.tensor(0.02), torch.tensor(0.035)]
    full = conv1d_int8_ref(qx, sx, qw, sw, bias, silu, out_dtype)
    full_codes = conv1d_int8_ref(qx, sx, qw, sw, bias, silu, out_dtype, scales)
    state = conv1d_int8_initial_state(qx[..., :L0], K)
    state_codes = state.clone()
    for t in range(L0, qx.shape[-1]):
        out = conv1d_int8_update_ref(qx[..., t], state, sx, qw, sw, bias, silu, out_dtype)
        codes = conv1d_int8_update_ref(qx[..., t], state_codes, sx, qw, sw, bias, silu, out_dtype, scales)
        assert out.shape == (qx.shape[0], qx.shape[1]) and out.dtype == out_dtype
        assert torch.equal(state, conv1d_int8_initial_state(qx[..., : t + 1], K))  # the state after t holds t-K+1..t
        assert torch.equal(state_codes, state)
        if not silu:
            assert torch.equal(out, full[..., t])
            assert all(torch.equal(c, f[..., t]) for c, f in zip(codes, full_codes))
        else:
            torch.testing.assert_close(out.float(), full[..., t].float(), rtol=SILU_CPU_RTOL[out_dtype], atol=0)
            assert all((c.int() - f[..., t].int()).abs().max() <= 1 for c, f in zip(codes, full_codes))


def test_update_from_empty_state_is_first_step():
    qx, sx, qw, sw, bias = _random_case(L=1)
    state = torch.zeros(qx.shape[0], qx.shape[1], 4, dtype=torch.int8)
    out = conv1d_int8_update_ref(qx[..., 0], state, sx, qw, sw, bias)
    assert torch.equal(out, conv1d_int8_ref(qx, sx, qw, sw, bias)[..., 0])


def test_update_per_tensor_weight_scale():
    qx, sx, qw, sw, bias = _random_case(L=7, per_channel=False)
    state = conv1d_int8_initial_state(qx[..., :6], 4)
    out = conv1d_int8_update_ref(qx[..., 6], state, sx, qw, sw, bias)
    assert torch.equal(out, conv1d_int8_ref(qx, sx, qw, sw, bias)[..., 6])


def test_initial_state_zero_pads_short_prompts():
    qx = torch.tensor([[[5, -7]]], dtype=torch.int8)  # (1, 1, 2)
    assert conv1d_int8_initial_state(qx, 4).tolist() == [[[0, 0, 5, -7]]]
    qx = torch.arange(6, dtype=torch.int8).reshape(1, 1, 6)
    assert conv1d_int8_initial_state(qx, 4).tolist() == [[[2, 3, 4, 5]]]
    assert conv1d_int8_initial_state(qx[..., :0], 3).tolist() == [[[0, 0, 0]]]


def test_dispatch_on_cpu_is_the_ref():
    qx, sx, qw, sw, bias = _random_case()
    assert torch.equal(conv1d_int8(qx, sx, qw, sw, bias), conv1d_int8_ref(qx, sx, qw, sw, bias))
    s1, s2 = conv1d_int8_initial_state(qx, 4), conv1d_int8_initial_state(qx, 4)
    assert torch.equal(conv1d_int8_update(qx[..., 0], s1, sx, qw, sw, bias, backend="torch"),
                       conv1d_int8_update_ref(qx[..., 0], s2, sx, qw, sw, bias))
    assert torch.equal(s1, s2)


def test_errors_name_the_fix():
    qx, sx, qw, sw, bias = _random_case()
    with pytest.raises(TypeError, match="int8 codes"):
        conv1d_int8_ref(qx.float(), sx, qw, sw)
    with pytest.raises(TypeError, match="qw must hold int8"):
        conv1d_int8_ref(qx, sx, qw.float(), sw)
    with pytest.raises(ValueError, match=r"\(D, K\) or \(D, 1, K\)"):
        conv1d_int8_ref(qx, sx, qw[:3], sw)
    with pytest.raises(ValueError, match="w_scale"):
        conv1d_int8_ref(qx, sx, qw, sw[:2])
    with pytest.raises(ValueError, match="x_scale"):
        conv1d_int8_ref(qx, torch.ones(2), qw, sw)
    with pytest.raises(ValueError, match="bias"):
        conv1d_int8_ref(qx, sx, qw, sw, bias[:2])
    with pytest.raises(ValueError, match="out_dtype"):
        conv1d_int8_ref(qx, sx, qw, sw, out_dtype=torch.int32)
    with pytest.raises(ValueError, match=r"out_scales\[1\]"):
        conv1d_int8_ref(qx, sx, qw, sw, out_scales=[torch.tensor(0.1), torch.ones(3)])
    with pytest.raises(ValueError, match="conv1d_int8_initial_state"):
        conv1d_int8_update_ref(qx[..., 0], torch.zeros(2, 6, 3, dtype=torch.int8), sx, qw, sw)
    with pytest.raises(TypeError, match=r"\(B, D\)"):
        conv1d_int8_update_ref(qx, torch.zeros(2, 6, 4, dtype=torch.int8), sx, qw, sw)
    with pytest.raises(RuntimeError, match="not on a CUDA device"):
        conv1d_int8(qx, sx, qw, sw, backend="cuda")
    with pytest.raises(RuntimeError, match="not on a CUDA device"):
        conv1d_int8_update(qx[..., 0], conv1d_int8_initial_state(qx, 4), sx, qw, sw, backend="cuda")
    with pytest.raises(ValueError, match="bogus"):
        conv1d_int8(qx, sx, qw, sw, backend="bogus")


def test_kernel_argument_normalization():
    """The CUDA wrapper's scale handling (runs anywhere: no kernel is called)."""
    s = per_tensor_scale(0.5, torch.device("cpu"), "x_scale")
    assert s.dtype == torch.float32 and s.numel() == 1 and s.dim() <= 1 and s.item() == 0.5
    t = torch.tensor([[0.25]], dtype=torch.float64)
    assert per_tensor_scale(t, torch.device("cpu"), "x_scale").shape == (1,)
    s32 = torch.tensor(0.25)  # already flat fp32 on the device: passed as it is, no op dispatched
    assert per_tensor_scale(s32, torch.device("cpu"), "x_scale") is s32
    w5 = torch.ones(5)
    assert channel_scale(w5, 5, torch.device("cpu"), "w_scale") is w5
    with pytest.raises(ValueError, match="x_scale must be a per-tensor"):
        per_tensor_scale(torch.ones(3), torch.device("cpu"), "x_scale")
    assert channel_scale(torch.ones(5, 1, 1), 5, torch.device("cpu"), "w_scale").shape == (5,)
    assert channel_scale(torch.ones(1, 1, 1), 5, torch.device("cpu"), "w_scale").shape == (1,)
    with pytest.raises(ValueError, match="w_scale must have 1"):
        channel_scale(torch.ones(4), 5, torch.device("cpu"), "w_scale")


# ---- a dual-scale output (issue 5: Mamba1's scan.u) ----------------------------------------------------------------
@pytest.mark.parametrize("encoding", ["mask", "piecewise"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dual_output_is_dual_quantize_of_the_float_output(encoding, out_dtype):
    from qmamba.quant.dual_scale import DualScale, dual_quantize

    qx, sx, qw, sw, bias = _random_case(L=21)
    y = conv1d_int8_ref(qx, sx, qw, sw, bias, True, out_dtype)
    s0 = y.float().abs().max() / 127
    s_in, s_out = s0 * 0.3, s0 * 1.1
    dual = DualScale(s_out, encoding)
    (c0, cu), (m0, mu) = conv1d_int8_ref(qx, sx, qw, sw, bias, True, out_dtype, [s0, s_in], [None, dual])
    want_q, want_m = dual_quantize(y, s_in, s_out, encoding)
    assert m0 is None and torch.equal(c0, quantize(y, s0)) and torch.equal(cu, want_q)
    assert (mu is None) == (encoding == "piecewise")
    if mu is not None:
        assert torch.equal(mu, want_m) and mu.shape == (2, 6, 3) and int(mu.ne(0).sum()) > 0
    else:
        assert int((cu.int().abs() > 112).sum()) > 0


@pytest.mark.parametrize("encoding", ["mask", "piecewise"])
def test_dual_update_continues_the_prefill(encoding):
    """The update's codes and flag (one byte per (b, d), bit 0) are the prefill's at the new step."""
    from qmamba.quant.dual_scale import DualScale, unpack_mask

    qx, sx, qw, sw, bias = _random_case(L=13)
    y = conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.float32)
    s_in = y.abs().max() / 127 * 0.3
    dual = DualScale(y.abs().max() / 127, encoding)
    (pc,), (pm,) = conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.float32, [s_in], [dual])
    state = conv1d_int8_initial_state(qx[..., :12], 4)
    (uc,), (um,) = conv1d_int8_update(qx[..., 12], state, sx, qw, sw, bias, True, torch.float32, [s_in],
                                      backend="torch", out_duals=[dual])
    assert torch.equal(uc, pc[..., 12])
    if encoding == "mask":
        assert um.shape == (2, 6) and torch.equal(um.bool(), unpack_mask(pm, 13)[..., 12])
    else:
        assert um is None


def test_dual_output_errors_name_the_fix():
    from qmamba.kernels.conv1d import check_conv1d_args
    from qmamba.quant.dual_scale import DualScale

    qx, sx, qw, sw, bias = _random_case()
    s = torch.tensor(0.1)
    for fn in (conv1d_int8_ref, check_conv1d_args):
        with pytest.raises(ValueError, match="one entry .* per out_scale"):
            fn(qx, sx, qw, sw, bias, out_scales=[s, s], out_duals=[DualScale(s)])
        with pytest.raises(ValueError, match="at most one dual-scale output"):
            fn(qx, sx, qw, sw, bias, out_scales=[s, s], out_duals=[DualScale(s), DualScale(s)])
        with pytest.raises(TypeError, match="DualScale or None"):
            fn(qx, sx, qw, sw, bias, out_scales=[s], out_duals=[s])
        with pytest.raises(ValueError, match="per-tensor"):
            fn(qx, sx, qw, sw, bias, out_scales=[s], out_duals=[DualScale(torch.ones(6))])
