"""The fused fake-quant (qmamba.kernels.fake_quant, Triton) against numerics' torch fake-quant: the layouts it takes,
the dispatch of ``fake_quantize(backend=...)`` on a CPU machine, the twins handing their backend on, and the kernels
themselves under TRITON_INTERPRET=1 (CPU, in a subprocess): single-scale and dual-scale (mask, piecewise) forward
values and STE gradients bit for bit (the sign of a zero too), a learned per-channel scale's gradient bit for bit,
a learned per-tensor scale's gradient to fp32 rounding (another summation order)."""

from __future__ import annotations

import textwrap

import pytest
import torch

from qmamba.kernels.fake_quant import scale_layout, supported
from qmamba.quant.numerics import fake_quantize


@pytest.mark.parametrize("x_shape, s_shape, want", [
    ((4, 6), (), (1, 1)),
    ((4, 6), (1, 1), (1, 1)),
    ((4, 6), (4, 1), (6, 4)),          # per-output-channel weight
    ((2, 3, 5), (1, 1, 5), (1, 5)),    # per-channel activation, last axis
    ((2, 3, 5), (5,), (1, 5)),
    ((2, 3, 5), (1, 3, 1), (5, 3)),
    ((2, 3, 5), (2, 3, 1), None),      # two axes: not taken
    ((2, 3, 5), (1, 1, 1, 5), None),   # more dims than x
])
def test_scale_layout(x_shape, s_shape, want):
    x, s = torch.zeros(x_shape), torch.ones(s_shape)
    assert scale_layout(x, s) == want
    assert supported(x, s) == (want is not None)
    assert not supported(x.to(torch.int8), s)


def test_unsupported_says_why():
    from qmamba.kernels.fake_quant import unsupported

    x = torch.zeros(2, 3, 5)
    assert unsupported(x, torch.ones(()), torch.ones(1, 1, 5) * 0 + 1) is not None  # two layouts
    assert "float64" in unsupported(x.double(), torch.ones(()))
    assert "not a float" in unsupported(x, torch.ones((), dtype=torch.int32))
    assert "more than one axis" in unsupported(x, torch.ones(2, 3, 1))
    assert "one layout" in unsupported(x, torch.ones(()), torch.ones(5))
    assert unsupported(x, torch.ones(5), torch.ones(1, 1, 5)) is None


def test_dispatch_on_cpu():
    x = torch.randn(3, 8)
    s = torch.tensor(0.05)
    assert torch.equal(fake_quantize(x, s, backend="auto"), fake_quantize(x, s))  # no GPU: the torch ops
    with pytest.raises(RuntimeError, match="backend='cuda'.*not on a CUDA device"):
        fake_quantize(x, s, backend="cuda")
    with pytest.raises(ValueError, match="backend must be"):
        fake_quantize(x, s, backend="triton")
    from qmamba.quant.dual_scale import dual_fake_quantize

    s_out = torch.tensor(0.2)
    assert torch.equal(dual_fake_quantize(x, s, s_out, "piecewise", 112, backend="auto"),
                       dual_fake_quantize(x, s, s_out, "piecewise", 112))
    with pytest.raises(RuntimeError, match="dual_fake_quantize: backend='cuda'.*not on a CUDA device"):
        dual_fake_quantize(x, s, s_out, "mask", backend="cuda")


def test_twins_hand_their_backend_to_fake_quant():
    from qmamba import MambaLM, preset
    from qmamba.qnn import prepare, set_mode
    from qmamba.qnn.modules import QuantLinear
    from qmamba.quant.recipe import load_recipe

    torch.manual_seed(0)
    model = prepare(MambaLM(preset("tiny")), load_recipe("quamba_w8a8"))
    lin = next(m for m in model.modules() if isinstance(m, QuantLinear))
    for qp in lin.quant_points.values():  # calibrated enough for a fakequant call
        qp.scale = torch.full_like(qp.scale, 0.05)
        qp.ready.fill_(True)
    set_mode(model, "fakequant")
    x = torch.randn(2, 4, lin.in_features)
    lin.backend = "torch"
    lin(x)
    lin.backend = "cuda"  # on a CPU tensor: the fused path is refused, by fake_quantize itself
    with pytest.raises(RuntimeError, match="fake_quantize: backend='cuda'"):
        lin(x)


_INTERPRETER_SCRIPT = textwrap.dedent("""
    import os
    os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
    import itertools, math
    import torch
    from qmamba.kernels.fake_quant import FusedFakeQuantize
    from qmamba.quant.numerics import _FakeQuantize

    INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}

    def same(a, b):  # bit for bit (the sign of a zero too); NaN == NaN whatever its payload
        if a.dtype != b.dtype or a.shape != b.shape:
            return False
        a, b = a.contiguous(), b.contiguous()
        bits = a.view(INT_OF[a.dtype]) == b.view(INT_OF[b.dtype])
        return bool((bits | (a.isnan() & b.isnan())).all())

    failures, n = [], 0
    # (x shape, scale shape): per-tensor; per-row (weights); per-last-axis; a middle axis. 150 / 210 elements leave
    # a ragged tail of the 64-element interpreter block
    layouts = [((5, 30), ()), ((5, 30), (5, 1)), ((2, 7, 15), (1, 1, 15)), ((2, 7, 15), (1, 7, 1))]
    for (xs, ss), dtype, bits, learn in itertools.product(layouts, [torch.float32, torch.float16, torch.bfloat16],
                                                         [8, 4], [False, True]):
        g = torch.Generator().manual_seed(n)
        qmax = 2 ** (bits - 1) - 1
        scale = (torch.rand(ss, generator=g) * 0.05 + 0.01) if ss else torch.tensor(0.03)
        # values around the range, exact ties (k + 0.5) * s, the range ends, beyond them, zeros, inf and NaN
        x = torch.randn(xs, generator=g) * scale * qmax * 0.7
        flat = x.view(-1)
        s_b = scale.expand(xs).reshape(-1) if ss else scale.expand(flat.shape)
        flat[:8] = (torch.arange(8) - 4 + 0.5) * s_b[:8]
        flat[8:12] = torch.tensor([qmax + 0.5, -qmax - 1.5, qmax + 3.0, -qmax - 7.0]) * s_b[8:12]
        flat[12:16] = torch.tensor([0.0, -0.0, float("inf"), float("-inf")])
        flat[16] = float("nan") if not learn else 0.3 * s_b[16]  # a learned scale's sum would be NaN: compare values
        x = x.to(dtype)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        sr = scale.clone().requires_grad_(learn)
        sf = scale.clone().requires_grad_(learn)
        yr = _FakeQuantize.apply(xr, sr.reshape(ss) if ss else sr, bits)
        yf = FusedFakeQuantize.apply(xf, sf.reshape(ss) if ss else sf, bits)
        n += 1
        if not same(yr, yf):
            failures.append(("forward", xs, ss, str(dtype), bits, learn))
            continue
        go = torch.randn(xs, generator=g).to(dtype)
        yr.backward(go)
        yf.backward(go)
        if not same(xr.grad, xf.grad):
            failures.append(("grad_x", xs, ss, str(dtype), bits, learn))
        if learn:
            gr, gf = sr.grad, sf.grad
            if ss:  # per-channel learned scale: the reference backward, bit for bit
                ok = same(gr, gf)
            else:  # fp32 summation order only: within 1e-6 of the sum of |terms| (cancellation makes it small)
                v = x.float() * (1.0 / scale.float())
                d_s = torch.where(v < -qmax - 1, -qmax - 1.0, torch.where(v > qmax, float(qmax), torch.round(v) - v))
                bound = (go.float() * d_s).abs().sum() / math.sqrt(x.numel() * qmax) * 1e-6
                ok = bool(torch.isfinite(gr)) and abs(float(gr) - float(gf)) <= float(bound)
            if not ok:
                failures.append(("grad_scale", xs, ss, str(dtype), bits, float((gr - gf).abs().max())))

    # the learned per-tensor scale's gradient on finite data (no NaN), a larger tensor: many program sums
    # (seeded; the sums differ in fp32 order only, so the bound is the one above: 1e-6 of the sum of |terms|)
    g = torch.Generator().manual_seed(3000)
    x = (torch.randn(3000, generator=g) * 2.0).requires_grad_()
    s1, s2 = torch.tensor(0.02, requires_grad=True), torch.tensor(0.02, requires_grad=True)
    go = torch.randn(3000, generator=g)
    _FakeQuantize.apply(x, s1, 8).backward(go)
    gx_ref = x.grad.clone(); x.grad = None
    FusedFakeQuantize.apply(x, s2, 8).backward(go)
    n += 1
    v = x.detach() * (1.0 / 0.02)
    d_s = torch.where(v < -128, -128.0, torch.where(v > 127, 127.0, torch.round(v) - v))
    bound = float((go * d_s).abs().sum() / math.sqrt(3000 * 127) * 1e-6)
    if not (torch.equal(gx_ref, x.grad) and abs(float(s1.grad) - float(s2.grad)) <= bound):
        failures.append(("lsq 3000", float(s1.grad), float(s2.grad), bound))
    # a non-contiguous x keeps its shape (the kernel reads a contiguous copy)
    xt = torch.randn(6, 10).t()
    out = FusedFakeQuantize.apply(xt, torch.tensor(0.01), 8)
    assert out.shape == (10, 6) and torch.equal(out, _FakeQuantize.apply(xt, torch.tensor(0.01), 8))

    # dual-scale (mask / piecewise, an even and an odd knee), per-tensor and per-axis scales
    from qmamba.kernels.fake_quant import FusedDualFakeQuantize
    from qmamba.quant.dual_scale import _DualFakeQuantize
    for (xs, ss), dtype, (enc, knee) in itertools.product(
            [((5, 30), ()), ((2, 7, 15), (1, 1, 15)), ((4, 40), (4, 1))],
            [torch.float32, torch.float16, torch.bfloat16],
            [("mask", 112), ("piecewise", 112), ("piecewise", 97)]):
        g = torch.Generator().manual_seed(n)
        s_in = (torch.rand(ss, generator=g) * 0.02 + 0.01) if ss else torch.tensor(0.015)
        s_out = s_in * (torch.rand(ss, generator=g) * 4 + 2) if ss else torch.tensor(0.07)
        lim = 127 if enc == "mask" else knee
        x = torch.randn(xs, generator=g) * s_in * lim * 0.6
        flat = x.view(-1)
        si = s_in.expand(xs).reshape(-1) if ss else s_in.expand(flat.shape)
        so = s_out.expand(xs).reshape(-1) if ss else s_out.expand(flat.shape)
        # ties at the inlier limit, just past it, outliers up to and beyond the outlier range, the top's clamp
        flat[:4] = torch.tensor([lim + 0.5, -lim - 0.5, lim - 0.5, -lim + 0.5]) * si[:4]
        flat[4:8] = torch.tensor([lim + 0.6, -lim - 3.0, 300.0, -2000.0]) * si[4:8]
        flat[8:12] = torch.tensor([(127 - knee) * 0.9, -(127 - knee) * 1.5, 0.5, -1e6]) * so[8:12] + \\
            torch.tensor([1.0, -1.0, 1.0, -1.0]) * knee * si[8:12]
        flat[12:18] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), -1e-7])
        x = x.to(dtype)
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr = _DualFakeQuantize.apply(xr, s_in.float(), s_out.float(), enc, knee)
        yf = FusedDualFakeQuantize.apply(xf, s_in.float(), s_out.float(), enc, knee)
        n += 1
        if not same(yr, yf):
            bad = (~((yr.float() == yf.float()) | (yr.isnan() & yf.isnan()))).nonzero()[:3].tolist()
            failures.append(("dual forward", xs, ss, str(dtype), enc, knee, bad))
            continue
        go = torch.randn(xs, generator=g).to(dtype)
        yr.backward(go)
        yf.backward(go)
        if not same(xr.grad, xf.grad):
            failures.append(("dual grad_x", xs, ss, str(dtype), enc, knee))
    # the control (mask, s_in == s_out) through the fused kernels equals single-scale fake-quant bit for bit
    x = torch.randn(6, 50) * 2
    s = torch.tensor(0.01)
    n += 1
    if not same(FusedDualFakeQuantize.apply(x, s, s, "mask", 112), _FakeQuantize.apply(x, s, 8)):
        failures.append(("control",))
    # x read where it lies (no copy): a slice of the last dim (in_proj's halves), its transpose (conv1d's (B, D, L)),
    # a transposed contiguous tensor, a middle slice; per-tensor (learned or not) and per-channel scales; the
    # gradient arriving contiguous, in x's layout, or transposed otherwise. Values, gradients and the output's
    # layout (dense in x's memory order, as torch's elementwise ops make it) as the reference's
    from qmamba.kernels.fake_quant import memory_layout

    def same_layout(a, b):  # the strides of every dim that moves an address (a size-1 dim's stride is arbitrary)
        return all(sa == sb for sa, sb, d in zip(a.stride(), b.stride(), a.shape) if d != 1)

    base = torch.randn(2, 9, 40, generator=torch.Generator().manual_seed(7)) * 0.4
    views = {"slice": lambda t: t[..., :24], "slice_t": lambda t: t[..., 8:32].transpose(1, 2),
             "t": lambda t: t.transpose(0, 2), "mid": lambda t: t[:, 2:7], "column": lambda t: t[:, :, 3:4]}
    for (name, view), dtype, mode, gl in itertools.product(views.items(), [torch.float32, torch.bfloat16],
                                                           ["tensor", "learn", "channel"], ["contig", "same", "t"]):
        xb = base.to(dtype)
        xv = view(xb)
        assert memory_layout(xv) is not None and not xv.is_contiguous(), name
        scale = torch.tensor(0.01) if mode != "channel" else \
            (torch.rand(xv.shape[-1], generator=torch.Generator().manual_seed(1)) * 0.01 + 0.005).reshape(1, 1, -1)
        res = []
        for fn in (_FakeQuantize.apply, FusedFakeQuantize.apply):
            xg = xb.clone().requires_grad_()
            sg = scale.clone().requires_grad_(mode == "learn")
            y = fn(view(xg), sg, 8)
            go = torch.randn(y.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
            if gl == "same":
                go = torch.empty_like(y).copy_(go)
            elif gl == "t":
                go = go.transpose(0, 1).contiguous().transpose(0, 1)
            y.backward(go)
            res.append((y, xg.grad, sg.grad))
        n += 1
        (yr, gr, sr_), (yf, gf, sf) = res
        if not (same(yr, yf) and same_layout(yr, yf)):
            failures.append(("strided forward", name, str(dtype), mode, gl, yr.stride(), yf.stride()))
        elif not same(gr, gf):
            failures.append(("strided grad_x", name, str(dtype), mode, gl))
        elif mode == "learn" and not abs(float(sr_) - float(sf)) <= 1e-6 * max(1.0, abs(float(sr_))):
            failures.append(("strided grad_scale", name, str(dtype), gl, float(sr_), float(sf)))
    for (name, view), enc in itertools.product(views.items(), ["mask", "piecewise"]):
        res = []
        for fn in (_DualFakeQuantize.apply, FusedDualFakeQuantize.apply):
            xg = (base * 3).clone().requires_grad_()
            y = fn(view(xg), torch.tensor(0.005), torch.tensor(0.03), enc, 112)
            y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(5)))
            res.append((y, xg.grad))
        n += 1
        if not (same(res[0][0], res[1][0]) and same_layout(res[0][0], res[1][0]) and same(res[0][1], res[1][1])):
            failures.append(("strided dual", name, enc))

    # a weight's fake-quant in its own per-row absmax scale, the scale made inside the kernel: rows shorter than a
    # block, several blocks with a tail, conv1d's (C, 1, W); an all-zero row (the eps floor), a NaN row, inf, -0
    from qmamba.kernels.fake_quant import FusedAbsmaxFakeQuantize, absmax_rows
    from qmamba.quant.granularity import PerChannel
    from qmamba.quant.numerics import scale_from_absmax
    per_row = PerChannel(axis=0)
    for xs, dtype, bits in itertools.product([(5, 30), (5, 150), (6, 1, 4)],
                                             [torch.float32, torch.float16, torch.bfloat16], [8, 4]):
        g = torch.Generator().manual_seed(n)
        x = torch.randn(xs, generator=g) * 0.05
        rows = x.view(xs[0], -1)
        rows[1] = 0.0
        rows[2, 0], rows[2, 1] = -0.0, rows[2, 1] * 40  # one large element: every other code small
        if dtype == torch.float32:
            rows[3, 1] = float("nan")
            rows[4, 2] = float("inf")
        x = x.to(dtype)
        assert absmax_rows(x, per_row) == x.numel() // xs[0]
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        scale = per_row.broadcast(scale_from_absmax(per_row.absmax(x.detach()), bits), x.dim())
        yr = _FakeQuantize.apply(xr, scale, bits)
        yf = FusedAbsmaxFakeQuantize.apply(xf, bits, 1e-8)
        n += 1
        if not same(yr, yf):
            bad = (~((yr.float() == yf.float()) | (yr.isnan() & yf.isnan()))).nonzero()[:3].tolist()
            failures.append(("absmax forward", xs, str(dtype), bits, bad))
            continue
        go = torch.randn(xs, generator=g).to(dtype)
        yr.backward(go)
        yf.backward(go)
        if not same(xr.grad, xf.grad):
            failures.append(("absmax grad_x", xs, str(dtype), bits))
    print("cases", n, "failures", failures)
    assert not failures, failures
""")


def test_fused_fake_quant_under_interpreter_equals_torch(interpret):
    assert "failures []" in interpret(_INTERPRETER_SCRIPT)
