"""int8 Mamba2 SSD: the references against the torch int8 backend (QuantSSDScan) and an fp64 loop written out from
the codes; the decode step against the prefill; the Triton kernels under TRITON_INTERPRET=1 (in a subprocess, so the
interpreter never leaks into other tests).

Tolerances (max |error| over max |reference|):
    REF_RTOL     fp32 references vs the fp64 loop, and step-after-prefill vs prefill (fp32 summation order)
    INTERP_RTOL  Triton kernels (fp32 math, ieee dots) vs the fp32 references, fp32 output
    BF16_RTOL    the same with bf16 output (one bf16 rounding, 2**-8 relative, of an element <= the max)
The reference vs the module is exact (torch.equal): it is the same computation.
"""

import importlib.util
import json
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F

from qmamba.models.parts import SSDScan
from qmamba.ops.int8_ssd import (ssd_chunk_scan_int8, ssd_chunk_scan_int8_ref, ssd_step_int8,
                                 ssd_step_int8_ref)
from qmamba.qnn.modules import QuantSSDScan
from qmamba.quant.granularity import PerChannel, PerTensor
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
    """The inputs at time index / slice t."""
    return {k: (v[:, t] if k in ("qx", "qdt", "qB", "qC") else v) for k, v in inp.items()}


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


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="triton is not installed")
def test_triton_kernels_under_interpreter_match_reference():
    root = str(__import__("pathlib").Path(__file__).resolve().parents[2])
    proc = subprocess.run([sys.executable, "-c", _INTERP_SCRIPT], cwd=root, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")][-1]
    results = json.loads(line[len("RESULT "):])
    assert len(results) == 13
    for name, (err_y, err_state, dtype) in results.items():
        tol = BF16_RTOL if dtype == "torch.bfloat16" else INTERP_RTOL
        assert err_y <= tol, (name, err_y)
        assert err_state <= INTERP_RTOL, (name, err_state)
