"""int8 Mamba2 SSD: the references against the torch int8 backend (QuantSSDScan) and an fp64 loop written out from
the codes; the decode step against the prefill; the Triton kernels under TRITON_INTERPRET=1 (in a subprocess, so the
interpreter never leaks into other tests). Dual-scale x (issue 5): the reference is the float scan on
``dequantize_codes`` values (exact), the mask encoding with s_out == s_in is single scale bit for bit (the control,
references and kernels), and the kernels match the reference for both encodings on x with real outliers.

Tolerances (max |error| over max |reference|):
    REF_RTOL     fp32 references vs the fp64 loop, and step-after-prefill vs prefill (fp32 summation order)
    INTERP_RTOL  Triton kernels (fp32 math, ieee dots) vs the fp32 references, fp32 output
    BF16_RTOL    the same with bf16 output (one bf16 rounding, 2**-8 relative, of an element <= the max)
The reference vs the module is exact (torch.equal): it is the same computation.
"""

import importlib.util
import json
import textwrap

import pytest
import torch
import torch.nn.functional as F

from qmamba.models.parts import SSDScan
from qmamba.ops.int8_ssd import (ssd_chunk_scan_int8, ssd_chunk_scan_int8_ref, ssd_step_int8,
                                 ssd_step_int8_from_float, ssd_step_int8_ref)
from qmamba.ops.ssd import ssd_chunk_scan_ref
from qmamba.qnn.modules import QuantSSDScan
from qmamba.quant.dual_scale import DualScale, dequantize_codes, dual_quantize, outlier_share, unpack_mask
from qmamba.quant.granularity import PerChannel, PerTensor
from qmamba.quant.numerics import dequantize, quantize
from qmamba.quant.recipe import QuantSpec

REF_RTOL = 2e-5
INTERP_RTOL = 2e-5
BF16_RTOL = 1e-2


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _codes(*shape, std=40.0):
    """int8 codes shaped like real activations: roughly normal, with some clipped tails."""
    return torch.round(torch.randn(shape) * std).clamp(-128, 127).to(torch.int8)


def _inputs(b=2, L=37, h=4, p=8, g=2, n=16, per_head=True, D="h", bias=True):
    """Codes and realistic scales: dt before bias in ~(-2.5, 2.5), dt_bias as mamba_ssm initializes it (softplus
    of it in [1e-3, 0.1]), A = -exp(A_log) with A_log = log(U[1, 16])."""
    dt0 = torch.exp(torch.empty(h).uniform_(-6.9, -2.3))
    return dict(
        qx=_codes(b, L, h, p), x_scale=(0.01 + 0.04 * torch.rand(h)) if per_head else torch.tensor(0.03),
        qdt=_codes(b, L, h), dt_scale=torch.tensor(0.02),
        A=-torch.empty(h).uniform_(1, 16), qB=_codes(b, L, g, n),
        B_scale=(0.01 + 0.02 * torch.rand(g)) if per_head else torch.tensor(0.02),
        qC=_codes(b, L, g, n), C_scale=(0.01 + 0.02 * torch.rand(g)) if per_head else torch.tensor(0.02),
        D={None: None, "h": torch.randn(h), "hp": torch.randn(h, p)}[D],
        dt_bias=(dt0 + torch.log(-torch.expm1(-dt0))) if bias else None)


def _at(inp: dict, t) -> dict:
    """The inputs at time index / slice t (x_mask too, when there is one)."""
    return {k: (v[:, t] if k in ("qx", "qdt", "qB", "qC") or (k == "x_mask" and v is not None) else v)
            for k, v in inp.items()}


def _dual_x(shape, per_head=True, encoding="mask", knee=112, s_out_equals_s_in=False):
    """Dual-scale x with real outliers: x (.., h, p) normal with a std per head (one std for ``per_head=False``) and
    0.3 % of the elements spiked x8; the threshold T = 2.5 std leaves ~1.5 % of the elements above it (beyond
    127 * s_in for "mask", above the knee for "piecewise"), A = max |x| (per head, or of the tensor). Scales as the
    observers set them: mask s_in = T / 127, s_out = A / 127; piecewise s_in = T / K, s_out = (A - T) / (127 - K).
    Returns dict(qx, x_scale, x_dual, x_mask) (x_mask None for "piecewise") and the outlier share."""
    h = shape[-2]
    std = (0.5 + torch.rand(h)) if per_head else torch.full((h,), 0.8)
    x = torch.randn(shape) * std[:, None]
    x = torch.where(torch.rand(shape) < 0.003, x * 8, x)
    A = x.abs().movedim(-2, 0).reshape(h, -1).amax(1) if per_head else x.abs().amax().expand(h)
    T = 2.5 * std
    A = torch.maximum(A, 3 * std)  # a tiny x may have no element far beyond T: keep s_out > 0 for piecewise
    s_in, s_out = (T / 127, A / 127) if encoding == "mask" else (T / knee, (A - T) / (127 - knee))
    if s_out_equals_s_in:
        s_out = s_in
    if not per_head:
        s_in, s_out = s_in[0], s_out[0]
    b = (lambda s: s[:, None]) if per_head else (lambda s: s)  # broadcast against (.., h, p)
    qx, mask = dual_quantize(x, b(s_in), b(s_out), encoding, knee)
    share = outlier_share(x, b(s_in), encoding, knee)
    return dict(qx=qx, x_scale=s_in, x_dual=DualScale(s_out.clone(), encoding, knee), x_mask=mask), share


def _outliers(inp: dict) -> torch.Tensor:
    """Bool (qx's shape): the codes read at the outlier scale."""
    dual, qx = inp["x_dual"], inp["qx"]
    if dual.encoding == "mask":
        return unpack_mask(inp["x_mask"], qx.shape[-1])
    return qx.int().abs() > dual.knee


def _dual_inputs(b=2, L=37, h=4, p=8, g=2, n=16, per_head=True, D="h", encoding="mask", knee=112, **kw):
    """``_inputs`` with x replaced by dual-scale codes (``_dual_x``)."""
    inp = _inputs(b, L, h, p, g, n, per_head=per_head, D=D)
    return dict(inp, **_dual_x((b, L, h, p), per_head, encoding, knee, **kw)[0])


def _loop64(qx, x_scale, qdt, dt_scale, A, qB, B_scale, qC, C_scale, D=None, dt_bias=None, dt_softplus=True,
            initial_states=None):
    """The definition in fp64, token by token, written out from the codes: y (b, L, h, p), final state."""
    b, L, h, p = qx.shape
    g = qB.shape[2]
    x = qx.double() * x_scale.double().reshape(-1)[None, None, :, None].expand(1, 1, h, 1)
    dt = qdt.double() * dt_scale.double().reshape(-1)
    B = (qB.double() * B_scale.double().reshape(-1)[:, None].expand(g, 1)).repeat_interleave(h // g, dim=2)
    C = (qC.double() * C_scale.double().reshape(-1)[:, None].expand(g, 1)).repeat_interleave(h // g, dim=2)
    if dt_bias is not None:
        dt = dt + dt_bias.double()
    if dt_softplus:
        dt = F.softplus(dt)
    S = torch.zeros(b, h, p, qB.shape[3], dtype=torch.float64)
    if initial_states is not None:
        S = initial_states.double().clone()
    ys = []
    for t in range(L):
        S = torch.exp(dt[:, t] * A.double())[..., None, None] * S + \
            (dt[:, t, :, None] * x[:, t])[..., None] * B[:, t, :, None, :]
        y = (S * C[:, t, :, None, :]).sum(-1)
        if D is not None:
            y = y + x[:, t] * (D.double()[:, None] if D.dim() == 1 else D.double())
        ys.append(y)
    return torch.stack(ys, dim=1), S


# ---- the reference is the torch int8 backend ---------------------------------------------------------------------
def _twin(h, g, chunk, per_head):
    gran = PerChannel(axis=-2) if per_head else PerTensor()
    specs = {"x": QuantSpec(granularity=gran), "dt": QuantSpec(), "B": QuantSpec(granularity=gran),
             "C": QuantSpec(granularity=gran)}
    twin = QuantSSDScan.from_float(SSDScan(chunk, h, g), "scan", specs)
    twin.qmode, twin.backend = "int8", "torch"
    return twin


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("L,chunk,g", [(37, 16, 2), (32, 8, 1), (5, 16, 4)])
def test_ref_is_exactly_the_torch_int8_backend(per_head, L, chunk, g):
    b, h, p, n = 2, 4, 8, 16
    twin = _twin(h, g, chunk, per_head)
    x, B, C = torch.randn(b, L, h, p) * torch.rand(h)[:, None], torch.randn(b, L, g, n), torch.randn(b, L, g, n)
    dt = torch.randn(b, L, h)
    A_log, D, dt_bias = torch.log(torch.empty(h).uniform_(1, 16)), torch.randn(h), torch.rand(h) - 4
    with torch.no_grad():
        for point, t in (("x", x), ("dt", dt), ("B", B), ("C", C)):
            qp = twin.quant_points[point]
            absmax = qp.spec.granularity.absmax(t) * 0.9  # clip a little: the clamp path runs too
            qp.scale.copy_(absmax / 127)
            qp.ready.fill_(True)
            qp.recording = True
        y_module = twin(x, dt, A_log, B, C, D, dt_bias)
    codes = {k: qp.recorded for k, qp in twin.quant_points.items()}
    scales = {k: qp.scale for k, qp in twin.quant_points.items()}
    y = ssd_chunk_scan_int8_ref(codes["x"], scales["x"], codes["dt"], scales["dt"], -torch.exp(A_log),
                                codes["B"], scales["B"], codes["C"], scales["C"], chunk, D=D, dt_bias=dt_bias)
    assert y.dtype == torch.float32 and y.shape == (b, L, h, p)
    assert torch.equal(y, y_module)
    # and the codes matter: the float scan differs
    with torch.no_grad():
        assert not torch.equal(y, SSDScan.forward(twin, x, dt, A_log, B, C, D, dt_bias))


@pytest.mark.parametrize("per_head,g", [(True, 2), (False, 1)])
def test_step_ref_is_exactly_the_torch_int8_backend_step(per_head, g):
    b, h, p, n = 3, 4, 8, 16
    twin = _twin(h, g, 16, per_head)
    x, dt, B, C = torch.randn(b, h, p), torch.randn(b, h), torch.randn(b, g, n), torch.randn(b, g, n)
    A_log, D, dt_bias = torch.log(torch.empty(h).uniform_(1, 16)), torch.randn(h), torch.rand(h) - 4
    with torch.no_grad():
        for point, t in (("x", x), ("dt", dt), ("B", B), ("C", C)):
            qp = twin.quant_points[point]
            qp.scale.copy_(qp.spec.granularity.absmax(t.unsqueeze(1)) * 0.9 / 127)
            qp.ready.fill_(True)
        codes = {k: twin._step_codes(k, t, 1) for k, t in (("x", x), ("dt", dt), ("B", B), ("C", C))}
        state_module = torch.randn(b, h, p, n)
        state_ref = state_module.clone()
        y_module = twin.step(state_module, x, dt, A_log, B, C, D, dt_bias)
    (qx, sx), (qdt, sdt), (qB, sB), (qC, sC) = codes["x"], codes["dt"], codes["B"], codes["C"]
    assert qx.dtype == torch.int8 and qx.shape == (b, h, p)
    y = ssd_step_int8_ref(state_ref, qx, sx, qdt, sdt, -torch.exp(A_log), qB, sB, qC, sC, D=D, dt_bias=dt_bias)
    assert torch.equal(y, y_module)
    assert torch.equal(state_ref, state_module)


# ---- the reference against the definition ------------------------------------------------------------------------
@pytest.mark.parametrize("chunk,L", [(16, 37), (8, 32), (64, 37), (4, 1)])
@pytest.mark.parametrize("per_head,D", [(True, "h"), (False, "hp"), (True, None)])
def test_ref_matches_fp64_loop(chunk, L, per_head, D):
    inp = _inputs(L=L, per_head=per_head, D=D)
    init = torch.randn(2, 4, 8, 16)
    y, final = ssd_chunk_scan_int8_ref(**inp, chunk_size=chunk, initial_states=init, return_final_states=True)
    y64, S64 = _loop64(**inp, initial_states=init)
    assert final.dtype == torch.float32 and final.shape == (2, 4, 8, 16)
    assert _rel(y, y64) <= REF_RTOL
    assert _rel(final, S64) <= REF_RTOL


def test_ref_without_softplus_and_bias():
    inp = _inputs(bias=False)
    inp["qdt"] = inp["qdt"].clamp(-127, 127).abs()  # no softplus: dt must already be a step >= 0
    y = ssd_chunk_scan_int8_ref(**inp, chunk_size=16, dt_softplus=False)
    assert _rel(y, _loop64(**inp, dt_softplus=False)[0]) <= REF_RTOL


def test_ref_out_dtype():
    inp = _inputs()
    y32 = ssd_chunk_scan_int8_ref(**inp, chunk_size=16)
    y16 = ssd_chunk_scan_int8_ref(**inp, chunk_size=16, out_dtype=torch.bfloat16)
    assert y16.dtype == torch.bfloat16 and torch.equal(y16, y32.to(torch.bfloat16))


# ---- decode step ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("L0", [0, 16, 21])
@pytest.mark.parametrize("per_head,D", [(True, "h"), (False, "hp")])
def test_prefill_then_steps_equals_longer_prefill(L0, per_head, D):
    L, chunk = 29, 8
    inp = _inputs(L=L, per_head=per_head, D=D)
    y_all, final_all = ssd_chunk_scan_int8_ref(**inp, chunk_size=chunk, return_final_states=True)
    if L0:
        y0, state = ssd_chunk_scan_int8_ref(**_at(inp, slice(0, L0)), chunk_size=chunk, return_final_states=True)
        ys = [y0]
    else:
        state, ys = torch.zeros(2, 4, 8, 16), []
    for t in range(L0, L):
        ys.append(ssd_step_int8_ref(state, **_at(inp, t)).unsqueeze(1))
    assert _rel(torch.cat(ys, dim=1), y_all) <= REF_RTOL
    assert _rel(state, final_all) <= REF_RTOL
    assert _rel(state, _loop64(**inp)[1]) <= REF_RTOL


def test_step_updates_state_in_place_and_matches_one_token_loop():
    inp = _inputs(L=1, D="hp")
    init = torch.randn(2, 4, 8, 16)
    state = init.clone()
    ptr = state.data_ptr()
    y = ssd_step_int8_ref(state, **_at(inp, 0), out_dtype=torch.bfloat16)
    y64, S64 = _loop64(**inp, initial_states=init)
    assert state.data_ptr() == ptr and not torch.equal(state, init)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 4, 8)
    assert _rel(state, S64) <= REF_RTOL
    assert _rel(y, y64[:, 0]) <= BF16_RTOL


# ---- argument checks and dispatch -----------------------------------------------------------------------------------
def test_bad_arguments_say_what_to_fix():
    inp = _inputs()
    with pytest.raises(ValueError, match="x_scale"):
        ssd_chunk_scan_int8_ref(**dict(inp, x_scale=torch.ones(3)), chunk_size=16)
    with pytest.raises(ValueError, match="B_scale"):
        ssd_chunk_scan_int8_ref(**dict(inp, B_scale=torch.ones(4)), chunk_size=16)
    with pytest.raises(TypeError, match="int8"):
        ssd_chunk_scan_int8_ref(**dict(inp, qx=inp["qx"].float()), chunk_size=16)
    with pytest.raises(ValueError, match="divide"):
        ssd_chunk_scan_int8_ref(**dict(inp, qB=_codes(2, 37, 3, 16), qC=_codes(2, 37, 3, 16)), chunk_size=16)
    with pytest.raises(ValueError, match="fp32"):
        ssd_step_int8_ref(torch.zeros(2, 4, 8, 16, dtype=torch.float64), **_at(inp, 0))


def test_dispatchers_on_cpu_use_the_reference():
    inp = _inputs()
    ref = ssd_chunk_scan_int8_ref(**inp, chunk_size=16)
    assert torch.equal(ssd_chunk_scan_int8(**inp, chunk_size=16, backend="auto"), ref)
    s1, s2 = torch.zeros(2, 4, 8, 16), torch.zeros(2, 4, 8, 16)
    assert torch.equal(ssd_step_int8(s1, **_at(inp, 0), backend="auto"), ssd_step_int8_ref(s2, **_at(inp, 0)))
    assert torch.equal(s1, s2)
    with pytest.raises(RuntimeError, match="CUDA"):
        ssd_chunk_scan_int8(**inp, chunk_size=16, backend="cuda")
    with pytest.raises(RuntimeError, match="CUDA"):
        ssd_step_int8(s1, **_at(inp, 0), backend="cuda")


# ---- dual-scale x: references ------------------------------------------------------------------------------------
def _float_scan_inputs(inp: dict, lead: int) -> dict:
    """fp32 values of the codes as the references dequantize them (x through ``dequantize_codes``); ``lead``: the dims
    before the head / group axis (2 for the scan, 1 for the step)."""
    h, g = inp["qx"].shape[lead], inp["qB"].shape[lead]
    bc = lambda s, k, trail: s.reshape(()) if s.numel() == 1 else s.reshape((1,) * lead + (k,) + (1,) * trail)
    dual = inp["x_dual"]
    return dict(
        x=dequantize_codes(inp["qx"], bc(inp["x_scale"], h, 1),
                           DualScale(bc(dual.outlier_scale, h, 1), dual.encoding, dual.knee), inp["x_mask"]),
        dt=dequantize(inp["qdt"], bc(inp["dt_scale"], h, 0)), B=dequantize(inp["qB"], bc(inp["B_scale"], g, 1)),
        C=dequantize(inp["qC"], bc(inp["C_scale"], g, 1)))


@pytest.mark.parametrize("encoding,knee", [("mask", 112), ("piecewise", 112), ("piecewise", 100)])
@pytest.mark.parametrize("per_head", [True, False])
def test_dual_x_has_real_outliers(encoding, knee, per_head):
    _, share = _dual_x((2, 37, 4, 8), per_head, encoding, knee)
    assert 0.005 <= share <= 0.03, share


@pytest.mark.parametrize("encoding,knee", [("mask", 112), ("piecewise", 112), ("piecewise", 100)])
@pytest.mark.parametrize("per_head,L,chunk", [(True, 37, 16), (False, 32, 8)])
def test_dual_ref_is_the_float_scan_on_dequantized_codes(encoding, knee, per_head, L, chunk):
    inp = _dual_inputs(L=L, per_head=per_head, encoding=encoding, knee=knee)
    init = torch.randn(2, 4, 8, 16)
    assert _outliers(inp).any()
    y, final = ssd_chunk_scan_int8_ref(**inp, chunk_size=chunk, initial_states=init, return_final_states=True)
    f = _float_scan_inputs(inp, 2)
    y_f, final_f = ssd_chunk_scan_ref(f["x"], f["dt"], inp["A"], f["B"], f["C"], chunk, D=inp["D"],
                                      dt_bias=inp["dt_bias"], dt_softplus=True, initial_states=init,
                                      return_final_states=True)
    assert torch.equal(y, y_f) and torch.equal(final, final_f)
    # the outlier scale matters: reading the same codes at s_in alone is far off
    single = dict(inp, x_dual=None, x_mask=None)
    assert _rel(ssd_chunk_scan_int8_ref(**single, chunk_size=chunk), y) > 1e-2


@pytest.mark.parametrize("encoding", ["mask", "piecewise"])
@pytest.mark.parametrize("per_head,g", [(True, 2), (False, 1)])
def test_dual_step_ref_is_the_float_step_on_dequantized_codes(encoding, per_head, g):
    full = _dual_inputs(L=9, g=g, per_head=per_head, encoding=encoding, D="hp")
    t = int(_outliers(full).any(-1).any(-1).any(0).nonzero()[0])  # a token with outliers in it
    inp = _at(full, t)
    A_log = torch.log(-inp["A"])
    inp["A"] = -torch.exp(A_log)  # exactly what SSDScan.step forms from A_log
    state = torch.randn(2, 4, 8, 16)
    state_f = state.clone()
    y = ssd_step_int8_ref(state, **inp)
    f = _float_scan_inputs(inp, 1)
    y_f = SSDScan(16, 4, g).step(state_f, f["x"], f["dt"], A_log, f["B"], f["C"], inp["D"], inp["dt_bias"])
    assert torch.equal(y, y_f) and torch.equal(state, state_f)


@pytest.mark.parametrize("per_head", [True, False])
def test_dual_mask_with_equal_scales_is_single_scale_bit_for_bit(per_head):
    """The control: s_out == s_in reads every code at s_in, whatever its flag, so results are those of x_dual=None."""
    inp = _dual_inputs(per_head=per_head, encoding="mask", s_out_equals_s_in=True)
    assert inp["x_mask"].any()  # flags set: the mask path really runs
    single = dict(inp, x_dual=None, x_mask=None)
    kw = dict(chunk_size=16, initial_states=torch.randn(2, 4, 8, 16), return_final_states=True)
    for got, want in zip(ssd_chunk_scan_int8_ref(**inp, **kw), ssd_chunk_scan_int8_ref(**single, **kw)):
        assert torch.equal(got, want)
    s1 = torch.randn(2, 4, 8, 16)
    s2 = s1.clone()
    assert torch.equal(ssd_step_int8_ref(s1, **_at(inp, 3)), ssd_step_int8_ref(s2, **_at(single, 3)))
    assert torch.equal(s1, s2)


@pytest.mark.parametrize("encoding", ["mask", "piecewise"])
def test_dual_prefill_then_steps_equals_longer_prefill(encoding):
    L, L0, chunk = 29, 21, 8
    inp = _dual_inputs(L=L, encoding=encoding, D="hp")
    y_all, final_all = ssd_chunk_scan_int8_ref(**inp, chunk_size=chunk, return_final_states=True)
    y0, state = ssd_chunk_scan_int8_ref(**_at(inp, slice(0, L0)), chunk_size=chunk, return_final_states=True)
    ys = [y0] + [ssd_step_int8_ref(state, **_at(inp, t)).unsqueeze(1) for t in range(L0, L)]
    assert _rel(torch.cat(ys, dim=1), y_all) <= REF_RTOL
    assert _rel(state, final_all) <= REF_RTOL


def _dual_bad_cases(inp: dict):
    """(kwargs to change, exception, message) for dual-scale x inputs that do not go together."""
    mask_dual, pw_dual = inp["x_dual"], DualScale(inp["x_dual"].outlier_scale, "piecewise", 112)
    good_mask = inp["x_mask"]
    return [
        (dict(x_dual=None), ValueError, "x_mask given without x_dual"),
        (dict(x_mask=None), ValueError, "packed outlier flags"),
        (dict(x_mask=good_mask[..., :-1]), ValueError, "x_mask must be"),
        (dict(x_mask=good_mask.to(torch.int8)), TypeError, "uint8"),
        (dict(x_dual=pw_dual), ValueError, "piecewise encoding carries no mask"),
        (dict(x_dual=mask_dual.outlier_scale), TypeError, "DualScale"),
        (dict(x_dual=DualScale(torch.ones(3), "mask")), ValueError, "x_dual.outlier_scale"),
    ]


def test_dual_bad_arguments_say_what_to_fix():
    inp = _dual_inputs(p=12)
    assert inp["x_mask"].shape == (2, 37, 4, 2)
    for change, exc, msg in _dual_bad_cases(inp):
        with pytest.raises(exc, match=msg):
            ssd_chunk_scan_int8_ref(**dict(inp, **change), chunk_size=16)
        with pytest.raises(exc, match=msg):
            ssd_step_int8_ref(torch.zeros(2, 4, 12, 16), **_at(dict(inp, **change), 0))
    # a prefill mask is not a step mask
    with pytest.raises(ValueError, match="x_mask must be"):
        ssd_step_int8_ref(torch.zeros(2, 4, 12, 16), **dict(_at(inp, 0), x_mask=inp["x_mask"]))


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_dual_bad_arguments_to_the_kernels_fail_before_launch():
    """The Triton wrappers check dual-scale x as the references do (no launch: these run without the interpreter)."""
    from qmamba.kernels.triton.ssd_int8 import ssd_chunk_scan_int8_triton, ssd_step_int8_triton

    inp = _dual_inputs(p=12)
    for change, exc, msg in _dual_bad_cases(inp):
        with pytest.raises(exc, match=msg):
            ssd_chunk_scan_int8_triton(**dict(inp, **change), chunk_size=16)
        with pytest.raises(exc, match=msg):
            ssd_step_int8_triton(torch.zeros(2, 4, 12, 16), **_at(dict(inp, **change), 0))


def test_dual_dispatchers_on_cpu_use_the_reference():
    inp = _dual_inputs(encoding="mask")
    ref = ssd_chunk_scan_int8_ref(**inp, chunk_size=16)
    assert torch.equal(ssd_chunk_scan_int8(**inp, chunk_size=16, backend="auto"), ref)
    s1, s2 = torch.zeros(2, 4, 8, 16), torch.zeros(2, 4, 8, 16)
    assert torch.equal(ssd_step_int8(s1, **_at(inp, 0), backend="auto"), ssd_step_int8_ref(s2, **_at(inp, 0)))
    assert torch.equal(s1, s2)


# ---- Triton kernels under the interpreter ----------------------------------------------------------------------
_INTERP_SCRIPT = textwrap.dedent('''
    import os, json, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    sys.path.insert(0, os.getcwd())
    from tests.ops.test_ops_int8_ssd import _inputs, _at, _codes, _rel
    from qmamba.kernels.triton.ssd_int8 import ssd_chunk_scan_int8_triton, ssd_step_int8_triton
    from qmamba.ops.int8_ssd import ssd_chunk_scan_int8_ref, ssd_step_int8_ref

    torch.manual_seed(0)
    out = {}
    b, h, p, n = 2, 4, 8, 16
    scan_cases = {  # name: (L, chunk, groups, per_head, D, init, options)
        "per_head_D_init": (37, 16, 2, True, "h", True, {}),
        "per_tensor_Dhp": (37, 16, 2, False, "hp", False, {}),
        "no_D_no_softplus": (37, 16, 1, True, None, True, {"dt_softplus": False}),
        "L_multiple_of_chunk": (32, 16, 1, True, "h", False, {}),
        "chunk_12_not_pow2": (37, 12, 2, True, "h", True, {}),
        "L_1": (1, 16, 2, True, "h", True, {}),
        "bf16_out": (37, 16, 2, True, "h", True, {"out_dtype": torch.bfloat16}),
    }
    for name, (L, chunk, g, per_head, D, init, opts) in scan_cases.items():
        inp = _inputs(b, L, h, p, g, n, per_head=per_head, D=D, bias=opts.get("dt_softplus", True))
        if not opts.get("dt_softplus", True):
            inp["qdt"] = inp["qdt"].clamp(-127, 127).abs()
        s0 = torch.randn(b, h, p, n) if init else None
        kw = dict(chunk_size=chunk, initial_states=s0, return_final_states=True, **opts)
        y, fin = ssd_chunk_scan_int8_triton(**inp, **kw)
        yr, finr = ssd_chunk_scan_int8_ref(**inp, **kw)
        assert y.shape == yr.shape and y.dtype == yr.dtype and y.is_contiguous(), name
        out["scan/" + name] = (_rel(y, yr), _rel(fin, finr), str(y.dtype))

    # strided views, as Mamba2 splits x / B / C out of the conv output and dt out of in_proj
    L, chunk, g = 37, 16, 2
    inp = _inputs(b, L, h, p, g, n)
    xbc = torch.zeros(b, L, h * p + 2 * g * n + 5, dtype=torch.int8)
    xbc[..., :h * p] = inp["qx"].reshape(b, L, h * p)
    xbc[..., h * p:h * p + g * n] = inp["qB"].reshape(b, L, g * n)
    xbc[..., h * p + g * n:h * p + 2 * g * n] = inp["qC"].reshape(b, L, g * n)
    zdt = torch.zeros(b, L, h + 3, dtype=torch.int8)
    zdt[..., 3:] = inp["qdt"]
    views = dict(inp, qx=xbc[..., :h * p].view(b, L, h, p), qB=xbc[..., h * p:h * p + g * n].view(b, L, g, n),
                 qC=xbc[..., h * p + g * n:h * p + 2 * g * n].view(b, L, g, n), qdt=zdt[..., 3:])
    assert not views["qx"].is_contiguous() and not views["qdt"].is_contiguous()
    y = ssd_chunk_scan_int8_triton(**views, chunk_size=chunk)
    out["scan/strided_views"] = (_rel(y, ssd_chunk_scan_int8_ref(**inp, chunk_size=chunk)), 0.0, str(y.dtype))

    # decode steps: kernel vs reference, states evolving side by side (one state a strided view of a cache)
    step_cases = {"per_head_D": (2, True, "h", {}), "per_tensor_Dhp": (1, False, "hp", {}),
                  "no_D": (4, True, None, {}), "bf16_out": (2, True, "h", {"out_dtype": torch.bfloat16})}
    for name, (g, per_head, D, opts) in step_cases.items():
        inp = _inputs(b, 3, h, p, g, n, per_head=per_head, D=D)
        cache = torch.randn(b, h, p, n + 3)
        S = cache[..., :n]
        Sr = S.clone()
        worst_y = worst_s = 0.0
        for t in range(3):
            y = ssd_step_int8_triton(S, **_at(inp, t), **opts)
            yr = ssd_step_int8_ref(Sr, **_at(inp, t), **opts)
            assert y.dtype == yr.dtype and y.shape == (b, h, p)
            worst_y, worst_s = max(worst_y, _rel(y, yr)), max(worst_s, _rel(S, Sr))
        assert torch.equal(cache[..., :n], S)  # in place, through the view
        out["step/" + name] = (worst_y, worst_s, str(y.dtype))

    # kernels end to end: prefill 21 tokens, then 8 decode steps == prefill of 29
    inp = _inputs(b, 29, h, p, 2, n, D="hp")
    y_all, fin_all = ssd_chunk_scan_int8_triton(**inp, chunk_size=8, return_final_states=True)
    y0, S = ssd_chunk_scan_int8_triton(**_at(inp, slice(0, 21)), chunk_size=8, return_final_states=True)
    ys = [y0] + [ssd_step_int8_triton(S, **_at(inp, t)).unsqueeze(1) for t in range(21, 29)]
    out["prefill_then_steps"] = (_rel(torch.cat(ys, 1), y_all), _rel(S, fin_all), "torch.float32")
    print("RESULT " + json.dumps(out))
''')


def test_triton_kernels_under_interpreter_match_reference(interpret):
    stdout = interpret(_INTERP_SCRIPT)
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 13
    for name, (err_y, err_state, dtype) in results.items():
        tol = BF16_RTOL if dtype == "torch.bfloat16" else INTERP_RTOL
        assert err_y <= tol, (name, err_y)
        assert err_state <= INTERP_RTOL, (name, err_state)


_INTERP_DUAL_SCRIPT = textwrap.dedent('''
    import os, json, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    sys.path.insert(0, os.getcwd())
    from tests.ops.test_ops_int8_ssd import _dual_inputs, _outliers, _at, _rel
    from qmamba.kernels.triton.ssd_int8 import ssd_chunk_scan_int8_triton, ssd_step_int8_triton
    from qmamba.ops.int8_ssd import ssd_chunk_scan_int8_ref, ssd_step_int8_ref

    torch.manual_seed(0)
    out = {}  # name: (err y, err state, |dual - single-scale reference| / |reference| of y)
    b, h, g, n = 2, 4, 2, 16

    def strided_mask(m, step):
        """The same flags in a wider buffer, L and h swapped in memory: a mask view with odd strides."""
        if step:  # (b, h, nbytes) inside (h, b, nbytes + 3)
            buf = torch.zeros(m.shape[1], m.shape[0], m.shape[2] + 3, dtype=torch.uint8)
            view = buf[..., 1:1 + m.shape[2]].transpose(0, 1)
        else:  # (b, L, h, nbytes) inside (b, h, L, nbytes + 3)
            buf = torch.zeros(m.shape[0], m.shape[2], m.shape[1], m.shape[3] + 3, dtype=torch.uint8)
            view = buf[..., 1:1 + m.shape[3]].transpose(1, 2)
        view.copy_(m)
        assert not view.is_contiguous() and torch.equal(view, m)
        return view

    scan_cases = {  # name: (encoding, knee, per_head, p, L, chunk, D, strided mask)
        "mask/per_head/p8/L37": ("mask", 112, True, 8, 37, 16, "h", False),
        "piecewise/per_head/p8/L37": ("piecewise", 112, True, 8, 37, 16, "h", False),
        "mask/per_tensor/p12/L37/Dhp": ("mask", 112, False, 12, 37, 16, "hp", False),
        "piecewise/per_tensor/p12/L32/knee100": ("piecewise", 100, False, 12, 32, 16, "hp", False),
        "mask/per_head/p12/L5/no_D": ("mask", 112, True, 12, 5, 16, None, False),
        "mask/per_head/p12/L37/strided_mask": ("mask", 112, True, 12, 37, 16, "h", True),
    }
    for name, (enc, knee, per_head, p, L, chunk, D, strided) in scan_cases.items():
        inp = _dual_inputs(b, L, h, p, g, n, per_head=per_head, D=D, encoding=enc, knee=knee)
        if enc == "piecewise":
            inp["qx"].view(-1)[::29] = -128  # the one code whose |q| needs more than int8
        assert _outliers(inp).any(), name
        kin = dict(inp, x_mask=strided_mask(inp["x_mask"], False)) if strided else inp
        # no initial state for L < chunk: a random one would drown the 5 tokens' x in y
        kw = dict(chunk_size=chunk, initial_states=torch.randn(b, h, p, n) if L > chunk else None,
                  return_final_states=True)
        y, fin = ssd_chunk_scan_int8_triton(**kin, **kw)
        yr, finr = ssd_chunk_scan_int8_ref(**inp, **kw)
        ys, _ = ssd_chunk_scan_int8_ref(**dict(inp, x_dual=None, x_mask=None), **kw)
        out["scan/" + name] = (_rel(y, yr), _rel(fin, finr), _rel(ys, yr))

    step_cases = {  # name: (encoding, knee, per_head, p, strided mask)
        "mask/per_head/p8": ("mask", 112, True, 8, False),
        "piecewise/per_tensor/p12": ("piecewise", 112, False, 12, False),
        "piecewise/per_head/p8/knee100": ("piecewise", 100, True, 8, False),
        "mask/per_tensor/p12/strided_mask": ("mask", 112, False, 12, True),
    }
    for name, (enc, knee, per_head, p, strided) in step_cases.items():
        inp = _dual_inputs(b, 4, h, p, g, n, per_head=per_head, D="hp", encoding=enc, knee=knee)
        if enc == "piecewise":
            inp["qx"].view(-1)[::29] = -128
        assert _outliers(inp).any(), name
        S = torch.randn(b, h, p, n)
        Sr, Ss = S.clone(), S.clone()
        worst_y = worst_s = 0.0
        diff = 0.0
        for t in range(4):
            kin = _at(inp, t)
            if strided:
                kin["x_mask"] = strided_mask(kin["x_mask"], True)
            y = ssd_step_int8_triton(S, **kin)
            yr = ssd_step_int8_ref(Sr, **_at(inp, t))
            ys = ssd_step_int8_ref(Ss, **dict(_at(inp, t), x_dual=None, x_mask=None))
            worst_y, worst_s = max(worst_y, _rel(y, yr)), max(worst_s, _rel(S, Sr))
            diff = max(diff, _rel(ys, yr))
        out["step/" + name] = (worst_y, worst_s, diff)

    # kernels end to end with dual x: prefill 21 tokens, then 8 decode steps == prefill of 29
    inp = _dual_inputs(b, 29, h, 12, g, n, D="hp", encoding="mask")
    y_all, fin_all = ssd_chunk_scan_int8_triton(**inp, chunk_size=8, return_final_states=True)
    y0, S = ssd_chunk_scan_int8_triton(**_at(inp, slice(0, 21)), chunk_size=8, return_final_states=True)
    ys = [y0] + [ssd_step_int8_triton(S, **_at(inp, t)).unsqueeze(1) for t in range(21, 29)]
    yr, finr = ssd_chunk_scan_int8_ref(**inp, chunk_size=8, return_final_states=True)
    ysingle = ssd_chunk_scan_int8_ref(**dict(inp, x_dual=None, x_mask=None), chunk_size=8)
    out["prefill_then_steps"] = (max(_rel(torch.cat(ys, 1), y_all), _rel(y_all, yr)),
                                 max(_rel(S, fin_all), _rel(fin_all, finr)), _rel(ysingle, yr))

    # the control in the kernels: mask with s_out == s_in is the single-scale kernel bit for bit
    inp = _dual_inputs(b, 37, h, 12, g, n, encoding="mask", s_out_equals_s_in=True)
    assert inp["x_mask"].any()
    single = dict(inp, x_dual=None, x_mask=None)
    s0 = torch.randn(b, h, 12, n)
    y, fin = ssd_chunk_scan_int8_triton(**inp, chunk_size=16, initial_states=s0, return_final_states=True)
    ys, fins = ssd_chunk_scan_int8_triton(**single, chunk_size=16, initial_states=s0, return_final_states=True)
    S1, S2 = s0.clone(), s0.clone()
    yt1, yt2 = ssd_step_int8_triton(S1, **_at(inp, 5)), ssd_step_int8_triton(S2, **_at(single, 5))
    out["control_bit_exact"] = [bool(torch.equal(y, ys) and torch.equal(fin, fins)),
                                bool(torch.equal(yt1, yt2) and torch.equal(S1, S2))]
    print("RESULT " + json.dumps(out))
''')


def test_triton_dual_x_under_interpreter_matches_reference(interpret):
    """Both encodings, prefill (L not a multiple of the chunk, L < chunk, headdim 12: a partly used mask byte) and
    decode steps, per-head and per-tensor scales, a strided mask, x with real outliers; and the control bit-exact."""
    stdout = interpret(_INTERP_DUAL_SCRIPT)
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT "):])
    assert results.pop("control_bit_exact") == [True, True]
    assert len(results) == 11
    for name, (err_y, err_state, dual_vs_single) in results.items():
        assert err_y <= INTERP_RTOL, (name, err_y)
        assert err_state <= INTERP_RTOL, (name, err_state)
        # the outlier scale was read (x_dual matters), far beyond the tolerance
        assert dual_vs_single > 50 * INTERP_RTOL, (name, dual_vs_single)


# ---- the decode step from the conv's float x / B / C (ssd_step_int8_from_float) ----------------------------------
def _xbc_step_inputs(b=2, h=4, p=8, g=2, n=16, per_head=True, dtype=torch.float16, seed=0):
    """Codes-path inputs plus float x / B / C whose codes are those codes: x = (q + u) * s with u in (-0.5, 0.5), and
    a few exact ties (q + 0.5) * s, values beyond the clamp range, a zero and a negative zero."""
    torch.manual_seed(seed)
    inp = _at(_inputs(b, 1, h, p, g, n, per_head=per_head), 0)
    out = dict(inp)
    for k, sk, ch in (("qx", "x_scale", h), ("qB", "B_scale", g), ("qC", "C_scale", g)):
        q = inp[k].float()
        s = inp[sk].reshape(-1)
        s = (s.reshape(1, ch, 1) if s.numel() > 1 else s.reshape(()))
        v = (q + torch.empty(q.shape).uniform_(-0.45, 0.45)) * s
        flat = v.view(-1)
        flat[:3] = (torch.tensor([3.5, -7.5, 200.0]) * s.reshape(-1)[0])
        flat[3:5] = torch.tensor([0.0, -0.0])
        out[k] = v.to(dtype)
    return out


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_step_from_float_ref_is_quantize_then_step(per_head, dtype):
    inp = _xbc_step_inputs(per_head=per_head, dtype=dtype)
    S1 = torch.randn(2, 4, 8, 16)
    S2 = S1.clone()
    got = ssd_step_int8_from_float(S1, inp["qx"], inp["x_scale"], inp["qdt"], inp["dt_scale"], inp["A"], inp["qB"],
                                   inp["B_scale"], inp["qC"], inp["C_scale"], D=inp["D"], dt_bias=inp["dt_bias"],
                                   backend="torch")
    codes = _xbc_codes(inp, 1)
    assert torch.equal(got, ssd_step_int8_ref(S2, **codes))
    assert torch.equal(S1, S2)
    with pytest.raises(TypeError, match="float activation"):
        ssd_step_int8_from_float(S1, codes["qx"], inp["x_scale"], inp["qdt"], inp["dt_scale"], inp["A"], inp["qB"],
                                 inp["B_scale"], inp["qC"], inp["C_scale"])


def _xbc_scan_inputs(b=2, L=37, h=4, p=8, g=2, n=16, per_head=True, dtype=torch.float16, seed=0):
    """``_xbc_step_inputs`` over L tokens, x / B / C as strided views of one xBC row (as Mamba2 splits them)."""
    torch.manual_seed(seed)
    inp = _inputs(b, L, h, p, g, n, per_head=per_head)
    xbc = torch.zeros(b, L, h * p + 2 * g * n + 3, dtype=dtype)
    views = {"qx": xbc[..., :h * p].view(b, L, h, p), "qB": xbc[..., h * p:h * p + g * n].view(b, L, g, n),
             "qC": xbc[..., h * p + g * n:h * p + 2 * g * n].view(b, L, g, n)}
    for k, sk, ch in (("qx", "x_scale", h), ("qB", "B_scale", g), ("qC", "C_scale", g)):
        s = inp[sk].reshape(-1)
        s = s.reshape(1, 1, ch, 1) if s.numel() > 1 else s.reshape(())
        v = (inp[k].float() + torch.empty(inp[k].shape).uniform_(-0.45, 0.45)) * s
        v.view(-1)[:2] = torch.tensor([200.0, -0.0]) * s.reshape(-1)[0]
        views[k].copy_(v.to(dtype))
    return dict(inp, **views)


@pytest.mark.parametrize("per_head", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunk_scan_from_float_ref_is_quantize_then_scan(per_head, dtype):
    from qmamba.ops.int8_ssd import ssd_chunk_scan_int8_from_float

    inp = _xbc_scan_inputs(per_head=per_head, dtype=dtype)
    args = {k: inp[k] for k in ("x_scale", "qdt", "dt_scale", "A", "B_scale", "C_scale", "D", "dt_bias")}
    y, fin = ssd_chunk_scan_int8_from_float(inp["qx"], args.pop("x_scale"), args.pop("qdt"), args.pop("dt_scale"),
                                            args.pop("A"), inp["qB"], args.pop("B_scale"), inp["qC"],
                                            args.pop("C_scale"), 16, return_final_states=True, backend="torch",
                                            **args)
    y_ref, fin_ref = ssd_chunk_scan_int8_ref(**_xbc_codes(inp, 2), chunk_size=16, return_final_states=True)
    assert torch.equal(y, y_ref) and torch.equal(fin, fin_ref)


def _xbc_codes(inp: dict, lead: int) -> dict:
    """``inp`` with its float x / B / C replaced by their ``numerics.quantize`` codes (channel axis after ``lead``)."""
    def shaped(s, ch):
        return s.reshape((1,) * lead + (ch, 1)) if s.numel() > 1 else s.reshape(())

    h, g = inp["qx"].shape[lead], inp["qB"].shape[lead]
    return dict(inp, qx=quantize(inp["qx"], shaped(inp["x_scale"], h)),
                qB=quantize(inp["qB"], shaped(inp["B_scale"], g)), qC=quantize(inp["qC"], shaped(inp["C_scale"], g)))


_INTERP_FLOAT_IN_SCRIPT = textwrap.dedent('''
    import os, json, sys
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import torch
    sys.path.insert(0, os.getcwd())
    from tests.ops.test_ops_int8_ssd import _xbc_codes, _xbc_scan_inputs, _xbc_step_inputs
    from qmamba.kernels.triton.ssd_int8 import ssd_chunk_scan_int8_triton, ssd_step_int8_triton

    same = {}
    for per_head in (True, False):
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            inp = _xbc_step_inputs(per_head=per_head, dtype=dtype)
            S1 = torch.randn(2, 4, 8, 16)
            S2 = S1.clone()
            y1 = ssd_step_int8_triton(S1, **inp, float_in=True)
            y2 = ssd_step_int8_triton(S2, **_xbc_codes(inp, 1))
            same[f"step/{per_head}/{dtype}"] = bool(torch.equal(y1, y2) and torch.equal(S1, S2))
            inp = _xbc_scan_inputs(per_head=per_head, dtype=dtype)
            y1, f1 = ssd_chunk_scan_int8_triton(**inp, chunk_size=16, return_final_states=True, float_in=True)
            y2, f2 = ssd_chunk_scan_int8_triton(**_xbc_codes(inp, 2), chunk_size=16, return_final_states=True)
            same[f"scan/{per_head}/{dtype}"] = bool(torch.equal(y1, y2) and torch.equal(f1, f2))
    print("RESULT " + json.dumps(same))
''')


def test_triton_kernels_quantize_float_inputs_as_quantize_does(interpret):
    """Under the interpreter: the step and chunk kernels fed the float x / B / C (float_in; the scan's as strided
    views of one xBC row) give, bit for bit, what they give fed their ``numerics.quantize`` codes (ties to even,
    clamped values, signed zeros included)."""
    stdout = interpret(_INTERP_FLOAT_IN_SCRIPT)
    line = [ln for ln in stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 12 and all(results.values()), results
