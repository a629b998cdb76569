"""in_proj's W8A8 GEMV with the conv1d decode update fused (``qmamba.ops.int8_conv1d.w8a8_gemv_conv1d_update``):
the reference, the dispatcher and the kernel wrapper (through the op's emulation, tests/kernel_emulation.py) equal,
bit for bit, the GEMV's reference then the update's reference (codes, conv state and the conv's outputs); bad
arguments are refused with a message naming the fix."""

import pytest
import torch

from qmamba.kernels import conv1d as kconv
from qmamba.ops.int8_conv1d import (conv1d_int8_update_ref, w8a8_gemv_conv1d_update,
                                    w8a8_gemv_conv1d_update_ref)
from qmamba.ops.int8_linear import GemvInputs, w8a8_linear_ref
from qmamba.quant.dual_scale import DualScale
from tests.kernel_emulation import emulated_kernels


def _case(batch, d_model, d_inner, per_channel, with_bias, seed=0, K=4, n_codes=2, dual=None):
    """in_proj's GEMV inputs (conv segment, then z), a conv state, the conv's weight / scales / bias and its
    consumer scales; outliers in a few channels so a dual-scale consumer uses its outlier scale."""
    g = torch.Generator().manual_seed(seed)
    i8 = lambda *s: torch.randint(-128, 128, s, generator=g, dtype=torch.int8)  # noqa: E731
    n = 2 * d_inner
    w_scale = (torch.rand(n, generator=g) + 0.5) * 2e-3 if per_channel else torch.tensor(1.3e-3)
    proj = GemvInputs(i8(batch, d_model), torch.tensor(0.021), i8(n, d_model), w_scale,
                      torch.randn(n, generator=g) if with_bias else None,
                      [torch.tensor(0.04), torch.tensor(0.03)], [d_inner, d_inner])
    conv_w = i8(d_inner, K)
    conv_w[::7] = 127  # large outputs: codes that clamp, and outliers for a dual-scale consumer
    conv_ws = (torch.rand(d_inner, generator=g) + 0.5) * 1e-2 if per_channel else torch.tensor(8e-3)
    conv_bias = torch.randn(d_inner, generator=g) if with_bias else None
    out_scales = [torch.tensor(0.02), torch.tensor(0.05), torch.tensor(0.011), torch.tensor(0.07)][:n_codes]
    duals = [] if dual is None else [DualScale(torch.tensor(0.3), dual)] + [None] * (n_codes - 1)
    return proj, i8(batch, d_inner, K), conv_w, conv_ws, conv_bias, out_scales, duals


def _unfused(proj, state, conv_w, conv_ws, conv_bias, out_dtype, out_scales, duals):
    """The GEMV's reference, then the update's reference on its first segment."""
    codes = w8a8_linear_ref(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, out_dtype,
                            proj.out_scale, proj.out_columns)
    d = proj.out_columns[0]
    return codes, conv1d_int8_update_ref(codes[:, :d], state, proj.out_scale[0], conv_w, conv_ws, conv_bias, True,
                                         out_dtype, out_scales, duals)


def _flat(result) -> list:
    codes, conv = result
    if isinstance(conv, tuple):  # (codes, masks)
        conv = list(conv[0]) + [m for m in conv[1] if m is not None]
    return [codes, *(conv if isinstance(conv, list) else [conv])]


def _assert_same(a, b):
    fa, fb = _flat(a), _flat(b)
    assert len(fa) == len(fb)
    for x, y in zip(fa, fb):
        assert x.dtype == y.dtype and x.shape == y.shape and torch.equal(x, y)


SHAPES = [(1, 64, 48), (8, 64, 48), (1, 768, 1536), (8, 768, 1536)]  # small; mamba-130m's in_proj (768 -> 2x1536)


@pytest.mark.parametrize("batch,d_model,d_inner", SHAPES)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("with_bias", [False, True], ids=["no-bias", "bias"])
@pytest.mark.parametrize("n_codes", [1, 2])
def test_fused_equals_gemv_then_update(batch, d_model, d_inner, out_dtype, per_channel, with_bias, n_codes):
    """Reference, dispatcher (CPU: the reference) and kernel wrapper (the op emulated by its reference, so what is
    checked is the wrapper's hand-off) == GEMV ref then update ref: codes of all segments, conv outputs, state."""
    proj, state, conv_w, conv_ws, conv_bias, out_scales, duals = _case(batch, d_model, d_inner, per_channel,
                                                                       with_bias, n_codes=n_codes)
    s0 = state.clone()
    want = _unfused(proj, s0, conv_w, conv_ws, conv_bias, out_dtype, out_scales, duals)
    for run in ("ref", "dispatch", "kernel"):
        s = state.clone()
        args = (proj, s, conv_w, conv_ws, conv_bias, True, out_dtype, out_scales)
        if run == "ref":
            got = w8a8_gemv_conv1d_update_ref(*args)
        elif run == "dispatch":
            got = w8a8_gemv_conv1d_update(*args, backend="auto")
        else:
            calls = {}
            with emulated_kernels(calls):
                got = kconv.w8a8_gemv_conv_update(*args)
            assert calls == {"w8a8_gemv_conv_update": 1}
        _assert_same(got, want)
        assert torch.equal(s, s0), run
    assert not torch.equal(s0, state)  # the update did shift the state


@pytest.mark.parametrize("encoding", ["mask", "piecewise"])
@pytest.mark.parametrize("batch", [1, 8])
def test_fused_dual_scale_consumer(encoding, batch):
    """A dual-scale consumer (Mamba1's scan.u) comes out of the same per-channel code: codes and flags as the
    update's, through the reference and the kernel wrapper."""
    proj, state, conv_w, conv_ws, conv_bias, out_scales, duals = _case(batch, 64, 48, True, True, dual=encoding)
    s0 = state.clone()
    want = _unfused(proj, s0, conv_w, conv_ws, conv_bias, torch.float16, out_scales, duals)
    assert isinstance(want[1], tuple)
    for kernel in (False, True):
        s = state.clone()
        args = (proj, s, conv_w, conv_ws, conv_bias, True, torch.float16, out_scales, duals)
        if kernel:
            with emulated_kernels({}):
                got = kconv.w8a8_gemv_conv_update(*args)
        else:
            got = w8a8_gemv_conv1d_update_ref(*args)
        _assert_same(got, want)
        assert torch.equal(s, s0)


def test_fused_float_conv_output():
    """No consumer scales: the conv's float output in out_dtype, as the update returns it."""
    proj, state, conv_w, conv_ws, conv_bias, _, _ = _case(2, 64, 48, False, True)
    s0 = state.clone()
    want = _unfused(proj, s0, conv_w, conv_ws, conv_bias, torch.float16, [], [])
    with emulated_kernels({}):
        got = kconv.w8a8_gemv_conv_update(proj, state, conv_w, conv_ws, conv_bias, True, torch.float16)
    _assert_same(got, want)


def _valid():
    proj, state, conv_w, conv_ws, conv_bias, out_scales, _ = _case(2, 64, 48, True, True)
    return dict(proj=proj, conv_state=state, qw=conv_w, w_scale=conv_ws, bias=conv_bias, out_dtype=torch.float16,
                out_scales=out_scales)


def _proj(**fields):
    return lambda a: dict(proj=a["proj"]._replace(**fields))


WRAPPER_CASES = [  # (overrides as functions of the valid arguments, exception, message)
    (lambda a: dict(proj=tuple(a["proj"])), TypeError, "proj must be a qmamba.ops.int8_linear.GemvInputs"),
    (_proj(q=torch.zeros(2, 64)), TypeError, r"proj.q must be int8 codes.*quantize in_proj's input first"),
    (_proj(q=torch.zeros(2, 1, 64, dtype=torch.int8)), ValueError, r"proj.q must be 2-D"),
    (_proj(out_columns=None), ValueError, r"proj needs segment scales \(out_scale, out_columns\)"),
    (_proj(out_columns=[40, 40]), ValueError, "out_columns must be .* summing to N=96"),
    (_proj(q=torch.zeros(9, 64, dtype=torch.int8)), ValueError, r"1..8 rows"),
    (lambda a: dict(qw=torch.zeros(40, 4, dtype=torch.int8)), ValueError, r"qw must be \(D, K\).*D = 48"),
    (lambda a: dict(qw=torch.zeros(48, 5, dtype=torch.int8), conv_state=torch.zeros(2, 48, 5, dtype=torch.int8)),
     ValueError, r"1 <= K <= 4"),
    (lambda a: dict(w_scale=torch.ones(5)), ValueError, "w_scale"),
    (lambda a: dict(bias=torch.ones(5)), ValueError, "bias"),
    (lambda a: dict(conv_state=a["conv_state"][:1]), ValueError,
     r"conv_state must be int8 codes \(M, D, K\) = \(2, 48, 4\).*conv1d_int8_initial_state"),
    (lambda a: dict(conv_state=a["conv_state"].float()), TypeError, "conv_state must be int8 codes"),
    (lambda a: dict(out_scales=[torch.ones(1)] * 5), ValueError, "at most 4 out_scales"),
    (lambda a: dict(out_dtype=torch.int32), ValueError, "out_dtype"),
]


@pytest.mark.parametrize("make,exc,match", WRAPPER_CASES)
def test_wrapper_check_rejects(make, exc, match):
    a = _valid()
    a.update(make(a))
    with pytest.raises(exc, match=match):
        kconv.check_gemv_conv_update_args(**a)


def test_wrapper_check_accepts_and_reads_metadata_only():
    a = _valid()
    assert kconv.check_gemv_conv_update_args(**a) == (48, 4)
    meta = {k: (v.to("meta") if isinstance(v, torch.Tensor) else v) for k, v in a.items()}
    p = a["proj"]
    meta["proj"] = GemvInputs(*(t.to("meta") if isinstance(t, torch.Tensor) else t for t in p[:5]),
                              [s.to("meta") for s in p.out_scale], p.out_columns)
    meta["out_scales"] = [s.to("meta") for s in a["out_scales"]]
    assert kconv.check_gemv_conv_update_args(**meta) == (48, 4)


def test_reference_errors_name_the_fix():
    a = _valid()
    args = lambda **o: {**dict(proj=a["proj"], conv_state=a["conv_state"], qw=a["qw"], w_scale=a["w_scale"],  # noqa
                                bias=a["bias"]), **o}
    with pytest.raises(TypeError, match="proj must be a qmamba.ops.int8_linear.GemvInputs"):
        w8a8_gemv_conv1d_update_ref(**args(proj=tuple(a["proj"])))
    with pytest.raises(ValueError, match=r"proj.q must be the input codes of one token \(M, K\)"):
        w8a8_gemv_conv1d_update_ref(**args(proj=a["proj"]._replace(q=a["proj"].q[None])))
    with pytest.raises(ValueError, match="proj.out_columns must list the column count of each out_scale segment"):
        w8a8_gemv_conv1d_update_ref(**args(proj=a["proj"]._replace(out_columns=None)))
    with pytest.raises(ValueError, match=r"conv_state must be int8 of shape \(B, D, K\)"):
        w8a8_gemv_conv1d_update_ref(**args(conv_state=a["conv_state"][:1]))
    with pytest.raises(ValueError, match=r"qw must be \(D, K\) or \(D, 1, K\) with D = 48"):
        w8a8_gemv_conv1d_update_ref(**args(qw=a["qw"][:40]))
