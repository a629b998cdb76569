"""int8 Mamba1 selective scan reference (qmamba.ops.int8_selective_scan) on CPU:

- against the module path: QuantSelectiveScan in int8 mode inside a calibrated tiny Mamba1 (fp32, bf16, fp16), on
  the codes it recorded                                                                      exact (torch.equal)
- against the float definition (selective_scan_loop_ref in float64 on the dequantized codes)  RTOL_FP32
- strided views (channel-last tensors transposed, as the mixer passes them) == contiguous    exact
- prefill(L) -> last state -> update == prefill(L + 1); prefill in two pieces through initial_state == one piece;
  update steps from an initial state == prefill with that initial state                      RTOL_FP32 (fp32 math,
  different summation order: chunked scan vs step by step)
- errors name what to fix; the dispatcher on CPU is the reference; asking for cuda here raises.
- dt_proj fused into the update (``dt_proj``, a DtProjection): == the update fed the delta codes of dt_proj's W8A8
  GEMV reference requantized in delta's scale                                                exact

Errors are measured relative to the largest magnitude of the reference tensor.
"""

import pytest
import torch

import qmamba
from qmamba.models import MambaLM
from qmamba.ops import selective_scan_loop_ref
from qmamba.ops.int8_linear import w8a8_linear_ref
from qmamba.ops.int8_selective_scan import (DtProjection, selective_scan_int8, selective_scan_int8_ref,
                                            selective_scan_int8_update, selective_scan_int8_update_ref)
from qmamba.qnn import QuantSelectiveScan, calibrate, prepare, set_mode
from qmamba.quant.numerics import quantize

RTOL_FP32 = 2e-5
RTOL_FP16 = 2e-3  # fp16 outputs: one rounding (2^-11) plus fp32 summation-order differences before it


def _max_rel_err(got, want):
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _codes(x):
    """int8 codes of x at an absmax per-tensor scale, and that scale (a 0-d fp32 tensor)."""
    scale = (x.abs().max().float() / 127).clamp_min(1e-8)
    return quantize(x, scale), scale


def _inputs(batch=2, dim=12, n=8, L=20, with_z=True, channel_last=True, seed=0):
    """Codes and fp32 parameters like the mixer's. ``channel_last``: u, delta, z are transposed views of (b, L, d)
    tensors (z a half of the in_proj output) and B, C views of the x_proj output (b, L, r + 2n), as in Mamba1."""
    g = torch.Generator().manual_seed(seed)
    r = 3
    if channel_last:
        xz = torch.randn(batch, L, 2 * dim, generator=g)
        qxz, sxz = _codes(xz)
        qu, su = _codes(torch.randn(batch, L, dim, generator=g))
        qdelta, sdelta = _codes(torch.randn(batch, L, dim, generator=g) * 1.5 - 2.0)  # dt_proj output, bias included
        qdbc, sdbc = _codes(torch.randn(batch, L, r + 2 * n, generator=g))
        qu, qdelta = qu.transpose(1, 2), qdelta.transpose(1, 2)  # (b, d, L), strides (L d, 1, d)
        qz = qxz[..., dim:].transpose(1, 2)
        qB, qC = (t.transpose(1, 2) for t in qdbc[..., r:].split([n, n], dim=-1))  # (b, n, L), strides (.., 1, r+2n)
        sz, sB, sC = sxz, sdbc, sdbc
    else:
        qu, su = _codes(torch.randn(batch, dim, L, generator=g))
        qdelta, sdelta = _codes(torch.randn(batch, dim, L, generator=g) * 1.5 - 2.0)
        qz, sz = _codes(torch.randn(batch, dim, L, generator=g))
        qB, sB = _codes(torch.randn(batch, n, L, generator=g))
        qC, sC = _codes(torch.randn(batch, n, L, generator=g))
    A_log = torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(dim, 1) + 0.1 * torch.randn(dim, n,
                                                                                                          generator=g)
    A = -torch.exp(A_log)
    D = torch.randn(dim, generator=g)
    return dict(qu=qu, u_scale=su, qdelta=qdelta, delta_scale=sdelta, A=A, qB=qB, B_scale=sB, qC=qC, C_scale=sC, D=D,
                qz=qz if with_z else None, z_scale=sz if with_z else None)


def _step(inp, t):
    """The codes of time step t, for the update op: u, delta, z (b, d), B, C (b, n)."""
    out = dict(inp)
    for k in ("qu", "qdelta", "qz", "qB", "qC"):
        if out[k] is not None:
            out[k] = out[k][..., t]
    return out


def _prefix(inp, start, stop):
    out = dict(inp)
    for k in ("qu", "qdelta", "qz", "qB", "qC"):
        if out[k] is not None:
            out[k] = out[k][..., start:stop]
    return out


# ---- the module path (the torch int8 backend) ----------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_reference_is_the_module_int8_path(dtype):
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset("tiny")).eval(), "quamba_w8a8").to(dtype)
    ids = [torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(s)) for s in (1, 2, 3)]
    calibrate(model, ids[:2], progress=False)
    set_mode(model, "int8")
    scans = [m for m in model.modules() if isinstance(m, QuantSelectiveScan)]
    assert scans and all(set(s.quant_points) == {"u", "delta", "B", "C", "z"} for s in scans)
    seen = []

    def hook(module, args, out):  # the codes of this call (recorded by the points) and the part's output
        rec = {k: (p.recorded, p.scale.detach().clone()) for k, p in module.quant_points.items()}
        seen.append((args, out, rec))

    for s in scans:
        for p in s.quant_points.values():
            p.recording = True
        s.register_forward_hook(hook)
    with torch.no_grad():
        model(ids[2])
    assert len(seen) == len(scans)
    for args, out, rec in seen:
        _, _, A_log, _, _, D, _ = args
        kw = dict(qu=rec["u"][0], u_scale=rec["u"][1], qdelta=rec["delta"][0], delta_scale=rec["delta"][1],
                  A=-torch.exp(A_log.float()), qB=rec["B"][0], B_scale=rec["B"][1], qC=rec["C"][0],
                  C_scale=rec["C"][1], D=D, qz=rec["z"][0], z_scale=rec["z"][1])
        y = selective_scan_int8_ref(**kw, out_dtype=out.dtype)
        assert y.dtype == out.dtype == dtype
        assert torch.equal(y, out)
        if dtype != torch.float32:
            # the module rounds its dequantized inputs through the activation dtype; skipping that is visible, so
            # the equality above checks the rounding too
            u32 = selective_scan_int8_ref(**kw, out_dtype=torch.float32).to(dtype)
            assert not torch.equal(u32, out)


@pytest.mark.skipif(not hasattr(QuantSelectiveScan, "step"), reason="QuantSelectiveScan has no one-token step")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_update_reference_is_the_module_int8_step(dtype):
    torch.manual_seed(0)
    model = prepare(MambaLM(qmamba.preset("tiny")).eval(), "quamba_w8a8").to(dtype)
    calibrate(model, [torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))], progress=False)
    set_mode(model, "int8")
    mixer = next(m for m in model.modules() if hasattr(m, "scan") and isinstance(m.scan, QuantSelectiveScan))
    scan, di, n = mixer.scan, mixer.d_inner, mixer.d_state
    g = torch.Generator().manual_seed(2)
    x = {k: torch.randn(3, size, generator=g).to(dtype) for k, size in (("u", di), ("delta", di), ("B", n), ("C", n),
                                                                       ("z", di))}
    state = torch.randn(3, di, n, generator=g)
    want_state = state.clone()
    with torch.no_grad():
        want = scan.step(want_state, x["u"], x["delta"], mixer.A_log, x["B"], x["C"], mixer.D, x["z"])
    codes = {}
    for k, v in x.items():
        scale = scan.quant_points[k].scale.detach()
        codes[f"q{k}"], codes[f"{k}_scale"] = quantize(v, scale), scale
    got = selective_scan_int8_update_ref(state, **codes, A=-torch.exp(mixer.A_log.float()), D=mixer.D, out_dtype=dtype)
    assert got.dtype == want.dtype == dtype
    assert torch.equal(got, want)
    assert torch.equal(state, want_state)


# ---- the float definition ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_z", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_reference_matches_float_loop(with_z, with_bias):
    inp = _inputs(with_z=with_z)
    bias = 0.3 * torch.randn(12) if with_bias else None
    y, last = selective_scan_int8_ref(**inp, delta_bias=bias, return_last_state=True)
    deq = {k: (inp[f"q{k}"].double() * inp[f"{k}_scale"].double()) if inp[f"q{k}"] is not None else None
           for k in ("u", "delta", "B", "C", "z")}
    want, want_last = selective_scan_loop_ref(deq["u"], deq["delta"], inp["A"].double(), deq["B"], deq["C"],
                                              D=inp["D"].double(), z=deq["z"],
                                              delta_bias=bias.double() if bias is not None else None,
                                              delta_softplus=True, return_last_state=True)
    assert y.shape == (2, 12, 20) and y.dtype == torch.float32 and last.shape == (2, 12, 8)
    assert _max_rel_err(y, want) <= RTOL_FP32
    assert _max_rel_err(last, want_last) <= RTOL_FP32
    # the gate and the bias matter (these comparisons can fail)
    other = selective_scan_int8_ref(**dict(inp, qz=None, z_scale=None) if with_z else inp,
                                    delta_bias=None if with_bias else 0.3 * torch.ones(12))
    assert _max_rel_err(other, want) > 1e-2


def test_softplus_off_uses_delta_as_is():
    inp = _inputs()
    inp["qdelta"] = inp["qdelta"].clamp_min(-127).abs()  # positive steps: the recurrence stays bounded
    deq = {k: inp[f"q{k}"].double() * inp[f"{k}_scale"].double() for k in ("u", "delta", "B", "C", "z")}
    want = selective_scan_loop_ref(deq["u"], deq["delta"], inp["A"].double(), deq["B"], deq["C"],
                                   D=inp["D"].double(), z=deq["z"])
    assert _max_rel_err(selective_scan_int8_ref(**inp, delta_softplus=False), want) <= RTOL_FP32
    assert _max_rel_err(selective_scan_int8_ref(**inp, delta_softplus=True), want) > 1e-2


def test_strided_views_equal_contiguous():
    inp = _inputs(channel_last=True)
    assert not inp["qu"].is_contiguous() and not inp["qB"].is_contiguous() and not inp["qz"].is_contiguous()
    dense = {k: (v.contiguous() if isinstance(v, torch.Tensor) and v.dtype == torch.int8 else v)
             for k, v in inp.items()}
    for a, b in zip(selective_scan_int8_ref(**inp, return_last_state=True),
                    selective_scan_int8_ref(**dense, return_last_state=True)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_low_precision_output(out_dtype):
    inp = _inputs()
    y = selective_scan_int8_ref(**inp, out_dtype=out_dtype)
    y32 = selective_scan_int8_ref(**inp)
    assert y.dtype == out_dtype
    assert 0 < _max_rel_err(y, y32) <= (RTOL_FP16 if out_dtype == torch.float16 else 2e-2)


# ---- state: update and initial_state ---------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("with_z", [False, True])
def test_prefill_then_update_equals_longer_prefill(out_dtype, with_z):
    L = 20
    inp = _inputs(L=L, with_z=with_z)
    bias = 0.2 * torch.randn(12)
    full, full_last = selective_scan_int8_ref(**inp, delta_bias=bias, out_dtype=out_dtype, return_last_state=True)
    _, state = selective_scan_int8_ref(**_prefix(inp, 0, L - 1), delta_bias=bias, out_dtype=out_dtype,
                                       return_last_state=True)
    before = state.clone()
    y = selective_scan_int8_update_ref(state, **_step(inp, L - 1), delta_bias=bias, out_dtype=out_dtype)
    assert y.shape == (2, 12) and y.dtype == out_dtype
    assert not torch.equal(state, before)  # updated in place
    assert _max_rel_err(state, full_last) <= RTOL_FP32
    assert _max_rel_err(y, full[..., -1]) <= (RTOL_FP32 if out_dtype == torch.float32 else RTOL_FP16)


def test_updates_from_zero_equal_prefill():
    inp = _inputs(L=15)
    want, want_last = selective_scan_int8_ref(**inp, return_last_state=True)
    state = torch.zeros(2, 12, 8)
    ys = torch.stack([selective_scan_int8_update_ref(state, **_step(inp, t)) for t in range(15)], dim=-1)
    assert _max_rel_err(ys, want) <= RTOL_FP32
    assert _max_rel_err(state, want_last) <= RTOL_FP32


@pytest.mark.parametrize("split", [1, 7, 19])
def test_initial_state_continues_a_prefill(split):
    L = 20
    inp = _inputs(L=L)
    full, full_last = selective_scan_int8_ref(**inp, return_last_state=True)
    y1, h = selective_scan_int8_ref(**_prefix(inp, 0, split), return_last_state=True)
    y2, last = selective_scan_int8_ref(**_prefix(inp, split, L), initial_state=h, return_last_state=True)
    assert _max_rel_err(torch.cat([y1, y2], dim=-1), full) <= RTOL_FP32
    assert _max_rel_err(last, full_last) <= RTOL_FP32


def test_initial_state_matches_update_steps():
    inp = _inputs(L=9, n=5, dim=7)
    h0 = torch.randn(2, 7, 5)
    want, want_last = selective_scan_int8_ref(**inp, initial_state=h0, return_last_state=True,
                                              out_dtype=torch.bfloat16)
    state = h0.clone()
    ys = torch.stack([selective_scan_int8_update_ref(state, **_step(inp, t), out_dtype=torch.bfloat16)
                      for t in range(9)], dim=-1)
    assert _max_rel_err(ys, want) <= 1e-2  # bf16 outputs
    assert _max_rel_err(state, want_last) <= RTOL_FP32
    zero = selective_scan_int8_ref(**inp, out_dtype=torch.bfloat16)
    assert _max_rel_err(zero, want) > 1e-2  # the initial state matters


def test_empty_sequence_passes_the_state_through():
    inp = _prefix(_inputs(), 0, 0)
    h0 = torch.randn(2, 12, 8)
    y, last = selective_scan_int8_ref(**inp, initial_state=h0, return_last_state=True, out_dtype=torch.float16)
    assert y.shape == (2, 12, 0) and y.dtype == torch.float16 and torch.equal(last, h0)
    assert torch.equal(selective_scan_int8_ref(**inp, return_last_state=True)[1], torch.zeros(2, 12, 8))


# ---- dispatch and errors -------------------------------------------------------------------------------------------
def test_dispatchers_on_cpu_are_the_references():
    inp = _inputs()
    for backend in ("auto", "torch"):
        got = selective_scan_int8(**inp, return_last_state=True, backend=backend)
        for a, b in zip(got, selective_scan_int8_ref(**inp, return_last_state=True)):
            assert torch.equal(a, b)
        s1 = torch.randn(2, 12, 8)
        s2 = s1.clone()
        assert torch.equal(selective_scan_int8_update(s1, **_step(inp, 3), backend=backend),
                           selective_scan_int8_update_ref(s2, **_step(inp, 3)))
        assert torch.equal(s1, s2)


def test_cuda_backend_on_cpu_raises():
    inp = _inputs()
    with pytest.raises(RuntimeError, match="backend='torch'"):
        selective_scan_int8(**inp, backend="cuda")
    with pytest.raises(RuntimeError, match="backend='torch'"):
        selective_scan_int8_update(torch.zeros(2, 12, 8), **_step(inp, 0), backend="cuda")
    with pytest.raises(ValueError, match="bogus"):
        selective_scan_int8(**inp, backend="bogus")


def test_kernel_wrapper_without_cuda_says_so():
    from qmamba.kernels import KernelsUnavailable
    from qmamba.kernels import selective_scan as kernel

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(KernelsUnavailable, match="backend='torch'"):
        kernel.selective_scan_int8(**_inputs())


def test_errors_name_the_fix():
    inp = _inputs()
    with pytest.raises(TypeError, match="int8 codes"):
        selective_scan_int8_ref(**dict(inp, qu=inp["qu"].float()))
    with pytest.raises(ValueError, match="per-tensor"):
        selective_scan_int8_ref(**dict(inp, u_scale=torch.ones(12, 1)))
    with pytest.raises(ValueError, match="out_dtype"):
        selective_scan_int8_ref(**inp, out_dtype=torch.float64)
    with pytest.raises(ValueError, match="qz and z_scale together"):
        selective_scan_int8_ref(**dict(inp, z_scale=None))
    with pytest.raises(ValueError, match="no groups"):
        selective_scan_int8_ref(**dict(inp, qB=inp["qB"][:, None], qC=inp["qC"][:, None]))
    with pytest.raises(ValueError, match="initial_state must be"):
        selective_scan_int8_ref(**inp, initial_state=torch.zeros(2, 12, 3))
    step = _step(inp, 0)
    with pytest.raises(TypeError, match="state must be float32"):
        selective_scan_int8_update_ref(torch.zeros(2, 12, 8, dtype=torch.float64), **step)
    with pytest.raises(ValueError, match="state must be"):
        selective_scan_int8_update_ref(torch.zeros(2, 12, 4), **step)
    with pytest.raises(ValueError, match="one token"):
        selective_scan_int8_update_ref(torch.zeros(2, 12, 8), **inp)


# ---- dual-scale u (issue 5) ----------------------------------------------------------------------------------------
def _dual_u(inp, encoding, seed=1):
    """Replace u by a heavy-tailed signal in the dual encoding: s_in from the 95th percentile of |u|, s_out from its
    max, so a few % of the elements are outliers. Returns (inp, u_dual, u_mask)."""
    from qmamba.quant.dual_scale import DualScale, dual_quantize

    g = torch.Generator().manual_seed(seed)
    b, d, L = inp["qu"].shape
    u = (torch.randn(b, L, d, generator=g) * (1 + 6 * (torch.rand(b, L, d, generator=g) < 0.05))).transpose(1, 2)
    T, A = torch.quantile(u.abs().flatten(), 0.95), u.abs().max()
    s_in, s_out = (T / 127, A / 127) if encoding == "mask" else (T / 112, (A - T) / 15)
    qu, mask = dual_quantize(u, s_in, s_out, encoding)
    return dict(inp, qu=qu, u_scale=s_in), DualScale(s_out, encoding), mask


@pytest.mark.parametrize("encoding", ["mask", "piecewise"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
def test_dual_u_is_the_float_scan_on_the_decoded_values(encoding, out_dtype):
    """The reference with a dual-scale u == itself on single-scale codes... of the decoded u: the scan sees exactly
    dual_dequantize(qu, mask, s_in, s_out) rounded through out_dtype, nothing else changes."""
    from qmamba.quant.dual_scale import dequantize_codes

    inp, dual, mask = _dual_u(_inputs(L=24), encoding)
    got, last = selective_scan_int8_ref(**inp, u_dual=dual, u_mask=mask, out_dtype=out_dtype, return_last_state=True)
    u = dequantize_codes(inp["qu"], inp["u_scale"], dual, mask).to(out_dtype).float()
    assert int((u.abs() > 127 * inp["u_scale"]).sum()) > 0  # outliers beyond the inlier range survive
    from qmamba.ops.selective_scan import selective_scan_ref
    deq = {k: (v.float() * inp[k.replace("q", "") + "_scale"]).to(out_dtype).float()
           for k, v in inp.items() if k in ("qdelta", "qB", "qC", "qz")}
    want, want_last = selective_scan_ref(u, deq["qdelta"], inp["A"], deq["qB"], deq["qC"], D=inp["D"], z=deq["qz"],
                                         delta_softplus=True, return_last_state=True)
    assert torch.equal(got, want.to(out_dtype)) and torch.equal(last, want_last)


def test_dual_control_equals_single_scale():
    """mask encoding with s_out == s_in: bit for bit the single-scale scan (prefill and update), clamped outliers
    included."""
    from qmamba.quant.dual_scale import DualScale, dual_quantize, unpack_mask

    inp = _inputs(L=24)
    u = inp["qu"].float() * inp["u_scale"] * 3  # a third of the range clamps at the scale below
    s = inp["u_scale"]
    qu, mask = dual_quantize(u, s, s, "mask")
    assert torch.equal(qu, quantize(u, s)) and int(mask.ne(0).sum()) > 0
    single = dict(inp, qu=qu)
    y1, h1 = selective_scan_int8_ref(**single, return_last_state=True)
    y2, h2 = selective_scan_int8_ref(**single, u_dual=DualScale(s.clone()), u_mask=mask, return_last_state=True)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    st1, st2 = h1.clone(), h1.clone()
    a = selective_scan_int8_update_ref(st1, **_step(single, 3))
    b = selective_scan_int8_update_ref(st2, **_step(single, 3), u_dual=DualScale(s.clone()),
                                       u_mask=unpack_mask(mask, 24)[..., 3].to(torch.uint8))
    assert torch.equal(a, b) and torch.equal(st1, st2)


@pytest.mark.parametrize("encoding", ["mask", "piecewise"])
def test_dual_prefill_then_update_equals_longer_prefill(encoding):
    """The update's mask layout: one flag byte per (batch, channel), bit 0 = bit t % 8 of the prefill's byte t // 8."""
    from qmamba.quant.dual_scale import unpack_mask

    L = 21
    inp, dual, mask = _dual_u(_inputs(L=L), encoding)
    full, full_last = selective_scan_int8_ref(**inp, u_dual=dual, u_mask=mask, return_last_state=True)
    head_mask = None if mask is None else mask[..., : (L - 1 + 7) // 8].clone()
    if head_mask is not None:  # the flags of steps 0..L-2 only (the last byte's bit for step L-1 cleared)
        head_mask[..., -1] &= (1 << ((L - 1) % 8 or 8)) - 1
    _, state = selective_scan_int8_ref(**_prefix(inp, 0, L - 1), u_dual=dual, u_mask=head_mask,
                                       return_last_state=True)
    step_mask = None if mask is None else unpack_mask(mask, L)[..., L - 1].to(torch.uint8)
    y = selective_scan_int8_update_ref(state, **_step(inp, L - 1), u_dual=dual, u_mask=step_mask)
    assert _max_rel_err(y, full[..., -1]) <= RTOL_FP32
    assert _max_rel_err(state, full_last) <= RTOL_FP32
    assert torch.equal(selective_scan_int8(**inp, u_dual=dual, u_mask=mask, backend="auto"), full)


def test_dual_errors_name_the_fix():
    from qmamba.kernels.selective_scan import check_selective_scan_args, check_selective_scan_update_args
    from qmamba.quant.dual_scale import DualScale

    inp, dual, mask = _dual_u(_inputs(L=16), "mask")
    for fn in (selective_scan_int8_ref, check_selective_scan_args):
        with pytest.raises(ValueError, match="needs its packed outlier flags"):
            fn(**inp, u_dual=dual)
        with pytest.raises(ValueError, match="without u_dual"):
            fn(**inp, u_mask=mask)
        with pytest.raises(ValueError, match=r"u_mask must be \(2, 12, 2\)"):
            fn(**inp, u_dual=dual, u_mask=mask[..., :1])
        with pytest.raises(ValueError, match="piecewise encoding carries no mask"):
            fn(**inp, u_dual=DualScale(dual.outlier_scale, "piecewise"), u_mask=mask)
        with pytest.raises(ValueError, match="one element"):
            fn(**inp, u_dual=DualScale(torch.ones(12), "piecewise"))
    step = _step(inp, 0)
    state = torch.zeros(2, 12, 8)
    for fn in (selective_scan_int8_update_ref, check_selective_scan_update_args):
        with pytest.raises(ValueError, match=r"u_mask must be \(2, 12, 1\)"):
            fn(state, **step, u_dual=dual, u_mask=mask)  # the prefill's packed mask is not the token's


# ---- dt_proj fused into the update ---------------------------------------------------------------------------------
def _dt_proj_step(batch=2, dim=12, n=8, r=48, per_channel=False, bias=True, out_dtype=torch.float32, seed=0):
    """One token's update arguments with delta left to dt_proj: (kwargs without qdelta, DtProjection). dt is a column
    slice of an x_proj output (batch, R + 2N) (strided rows, as the mixer passes it), the weight and its scale as a
    converted dt_proj holds them, delta's scale an absmax of dt_proj's output (so the codes span the range and some
    clamp)."""
    g = torch.Generator().manual_seed(seed)
    step = _step(_inputs(batch=batch, dim=dim, n=n, L=1, seed=seed), 0)
    xdbc, s_dt = _codes(torch.randn(batch, r + 2 * n, generator=g))
    q = xdbc[:, :r]
    w = torch.randn(dim, r, generator=g) * r ** -0.5
    w_scale = (w.abs().amax(1) if per_channel else w.abs().max()) / 127
    qw = quantize(w, w_scale[:, None] if per_channel else w_scale)
    b = torch.randn(dim, generator=g) - 4.0 if bias else None  # softplus^-1 of small steps, as Mamba1's dt bias
    proj = DtProjection(q, s_dt, qw, w_scale, b)
    v = w8a8_linear_ref(q, s_dt, qw, w_scale, b, out_dtype)
    step["delta_scale"] = v.abs().max().float() / 140  # the largest codes clamp at 127 / -128
    step["qdelta"] = None
    return step, proj


def _gemv_codes(step, proj, out_dtype):
    """delta's codes as dt_proj's GEMV emits them (its reference, a per-column out_scale)."""
    dim = proj.weight.shape[0]
    return w8a8_linear_ref(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, out_dtype,
                           step["delta_scale"].reshape(1).expand(dim))


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("r", [48, 160])
@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["w_tensor", "w_channel"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_update_with_dt_proj_equals_the_gemv_codes(out_dtype, per_channel, bias, r, batch):
    step, proj = _dt_proj_step(batch=batch, dim=64, r=r, per_channel=per_channel, bias=bias, out_dtype=out_dtype)
    qdelta = _gemv_codes(step, proj, out_dtype)
    assert qdelta.dtype == torch.int8 and qdelta.shape == (batch, 64)
    assert len(qdelta.unique()) > 20 and int((qdelta.int().abs() >= 127).sum()) > 0  # spread codes, some clamped
    state = torch.randn(batch, 64, 8, generator=torch.Generator().manual_seed(7))
    want_state, fused_state, auto_state = state.clone(), state.clone(), state.clone()
    want = selective_scan_int8_update_ref(want_state, **dict(step, qdelta=qdelta), out_dtype=out_dtype)
    got = selective_scan_int8_update_ref(fused_state, **step, out_dtype=out_dtype, dt_proj=proj)
    assert got.dtype == out_dtype and torch.equal(got, want) and torch.equal(fused_state, want_state)
    # the dispatcher on CPU (the torch int8 backend) is the reference
    auto = selective_scan_int8_update(auto_state, **step, out_dtype=out_dtype, dt_proj=proj, backend="auto")
    assert torch.equal(auto, want) and torch.equal(auto_state, want_state)


def test_dt_proj_rounds_through_the_activation_dtype():
    """The delta codes come from dt_proj's output rounded through out_dtype, as the GEMV rounds it: with fp16 they
    differ from the fp32 ones somewhere (so the equality above checks the rounding too)."""
    step, proj = _dt_proj_step(dim=256, r=160, out_dtype=torch.float16, seed=3)
    assert not torch.equal(_gemv_codes(step, proj, torch.float16), _gemv_codes(step, proj, torch.float32))


def test_dt_proj_errors_name_the_fix():
    from qmamba.kernels.selective_scan import check_selective_scan_update_args

    step, proj = _dt_proj_step()
    state = torch.zeros(2, 12, 8)
    qdelta = _gemv_codes(step, proj, torch.float32)
    for fn in (selective_scan_int8_update_ref, check_selective_scan_update_args):
        with pytest.raises(ValueError, match="exactly one of qdelta .* and dt_proj.*got both; pass qdelta=None"):
            fn(state, **dict(step, qdelta=qdelta), dt_proj=proj)
        with pytest.raises(ValueError, match="exactly one of qdelta .* and dt_proj.*got neither"):
            fn(state, **step)
        with pytest.raises(TypeError, match="dt_proj must be a qmamba.ops.int8_selective_scan.DtProjection"):
            fn(state, **step, dt_proj=tuple(proj))
    # shapes: the reference names the tensor (its GEMV reference the linear's), the kernel wrapper's check each field
    bad = {"q batch": (proj._replace(q=proj.q[:1]), r"dt_proj must hold dt codes \(batch, R\)",
                       r"dt_proj.q must be the dt codes \(batch, R\) with batch 2"),
           "q 3-D": (proj._replace(q=proj.q[:, None]), r"dt_proj must hold dt codes \(batch, R\)",
                     r"dt_proj.q must be 2-D \(batch, R\)"),
           "weight D": (proj._replace(weight=proj.weight[:5]), r"weight \(D, R\) with \(batch, D\) = \(2, 12\)",
                        r"dt_proj.weight must be dt_proj's \(D, R\) = \(12, 48\)"),
           "weight R": (proj._replace(weight=proj.weight[:, :40]), r"expected qx \(..., K\) and qw \(N, K\)",
                        r"dt_proj.weight must be dt_proj's \(D, R\) = \(12, 48\)"),
           "weight float": (proj._replace(weight=proj.weight.float()), "int8 codes",
                            "dt_proj.weight must be int8 codes.*dt_proj's int8 weight codes"),
           "weight scale": (proj._replace(weight_scale=torch.ones(5)), "w_scale must be per-tensor",
                            r"dt_proj.weight_scale must have 1 \(per-tensor\) or 12"),
           "scale": (proj._replace(scale=torch.ones(3)), "x_scale must be a one-element tensor",
                     "dt_proj.scale must be a per-tensor scale"),
           "bias": (proj._replace(bias=torch.zeros(5)), "bias must have N=12",
                    r"dt_proj.bias must have shape \(D,\) = \(12,\)")}
    for what, (p, ref_match, check_match) in bad.items():
        exc = TypeError if what == "weight float" else ValueError
        with pytest.raises(exc, match=ref_match):
            selective_scan_int8_update_ref(state, **step, dt_proj=p)
        with pytest.raises(exc, match=check_match):
            check_selective_scan_update_args(state, **step, dt_proj=p)


@pytest.mark.parametrize("dim, n, fused", [(64, 8, True), (1536, 16, True), (12, 8, False), (2048, 16, False)],
                         ids=["64-fused", "130m-fused", "12-hadamard-after", "370m-hadamard-after"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("with_dt_proj", [False, True], ids=["delta", "dt_proj"])
def test_update_rotated_output_is_the_hadamard_quantize_of_y(with_dt_proj, out_dtype, batch, dim, n, fused):
    """``rotated``: (y, hadamard_quantize_ref(y, scale, bits)), bit for bit, through the reference, the dispatcher and
    the kernel path (the csrc ops emulated on the CPU): where the kernel rotates (``kernel_rotates``: one Hadamard block
    of 8..1024 channels holds whole update blocks) one update op, else the update op then the Hadamard op."""
    from qmamba.ops.hadamard import hadamard_transform
    from qmamba.ops.int8_hadamard import hadamard_quantize_ref
    from qmamba.ops.int8_selective_scan import RotatedOutput, kernel_rotates, rotated_counters_size
    from tests.kernel_emulation import emulated_kernels

    assert kernel_rotates(dim, n) == fused
    if with_dt_proj:
        step, proj = _dt_proj_step(batch=batch, dim=dim, n=n, out_dtype=out_dtype, seed=4)
    else:
        step, proj = _step(_inputs(batch=batch, dim=dim, n=n, L=1, seed=4), 0), None
    state = torch.randn(batch, dim, n, generator=torch.Generator().manual_seed(5))
    want_state = state.clone()
    y = selective_scan_int8_update_ref(want_state, **step, out_dtype=out_dtype, dt_proj=proj)
    scale = hadamard_transform(y).abs().max() * 0.6 / 127  # some codes clamp
    want = hadamard_quantize_ref(y, scale, 8)
    assert int((want.int().abs() >= 127).sum()) > 0 and len(want.unique()) > min(20, want.numel() // 2)
    counters = torch.zeros(rotated_counters_size(batch, dim), dtype=torch.int32)
    rotated = RotatedOutput(scale, 8, counters)
    for run in ("ref", "dispatch", "kernel"):
        s, calls = state.clone(), {}
        if run == "ref":
            got = selective_scan_int8_update_ref(s, **step, out_dtype=out_dtype, dt_proj=proj, rotated=rotated)
        elif run == "dispatch":
            got = selective_scan_int8_update(s, **step, out_dtype=out_dtype, dt_proj=proj, rotated=rotated)
        else:
            with emulated_kernels(calls):
                got = selective_scan_int8_update(s, **step, out_dtype=out_dtype, dt_proj=proj, rotated=rotated)
            assert calls == ({"selective_scan_int8_update": 1} if fused else
                             {"selective_scan_int8_update": 1, "hadamard_quantize": 1}), run
        assert torch.equal(got[0], y) and torch.equal(got[1], want) and torch.equal(s, want_state), run
    assert not counters.any()


def test_rotated_output_errors_name_the_fix():
    from qmamba.kernels.selective_scan import check_selective_scan_update_args
    from qmamba.ops.int8_selective_scan import RotatedOutput

    step = _step(_inputs(batch=2, dim=64, n=8, L=1), 0)
    state = torch.zeros(2, 64, 8)
    ok = RotatedOutput(torch.tensor(0.1), 8, torch.zeros(2, dtype=torch.int32))
    check_selective_scan_update_args(state, **step, rotated=ok)
    for bad, match in ((ok._replace(counters=torch.zeros(3, dtype=torch.int32)), r"int32 tensor of 2 zeros.*got"),
                       (ok._replace(counters=torch.zeros(2)), "int32 tensor of 2 zeros"),
                       (ok._replace(bits=9), r"bits must be in 2\.\.8"),
                       (ok._replace(scale=torch.ones(3)), "rotated.scale")):
        with pytest.raises((ValueError, TypeError), match=match):
            check_selective_scan_update_args(state, **step, rotated=bad)
    narrow = _step(_inputs(batch=2, dim=12, n=8, L=1), 0)
    with pytest.raises(ValueError, match="cannot rotate y at D=12.*hadamard_quantize y"):
        check_selective_scan_update_args(torch.zeros(2, 12, 8), **narrow, rotated=ok)
