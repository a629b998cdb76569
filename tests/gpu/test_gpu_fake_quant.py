"""On a CUDA GPU: the fused Triton fake-quant (qmamba.kernels.fake_quant) against numerics' torch fake-quant, alone
on large tensors of every float dtype and scale layout (and the dual-scale encodings), and inside a QAT step of a
prepared model.

Tolerances: forward values, STE gradients and learned per-channel scales' gradients bit for bit; a learned per-tensor
scale's gradient within 1e-6 of the sum of its |terms| (fp32 summation order: program sums added by torch vs
sum_to_size). In the model step (float ops on the torch reference, only the fake-quant path switched), a learned
scale's rounding reaches nothing else within one backward: logits and parameter gradients bit for bit, scale
gradients to 1e-4 relative."""

import math

import pytest
import torch
import torch.nn.functional as F

from qmamba import MambaLM, preset, set_backend
from qmamba.quant import numerics
from qmamba.quant.numerics import fake_quantize, qrange
from qmamba.qnn import calibrate, prepare, quant_points, set_mode

pytestmark = pytest.mark.gpu

LAYOUTS = [((8, 1024, 2560), ()), ((10240, 2560), (10240, 1)), ((8, 1024, 160), (1, 1, 160)),
           ((3, 1000, 7), (1, 1000, 1))]


_INT_OF = {torch.float32: torch.int32, torch.float16: torch.int16, torch.bfloat16: torch.int16}


def _bits_equal(a, b):
    """Bit for bit (the sign of a zero too), NaN == NaN."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    a, b = a.contiguous(), b.contiguous()
    return bool(((a.view(_INT_OF[a.dtype]) == b.view(_INT_OF[b.dtype])) | (a.isnan() & b.isnan())).all())


def _bound(x, scale, go, bits):
    qmin, qmax = qrange(bits)
    v = x.float() * (1.0 / scale.float())
    d_s = torch.where(v < qmin, float(qmin), torch.where(v > qmax, float(qmax), torch.round(v) - v))
    return float((go.float() * d_s).abs().sum() / math.sqrt(x.numel() / scale.numel() * qmax) * 1e-6)


@pytest.mark.parametrize("x_shape, s_shape", LAYOUTS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("learn", [False, True])
def test_fused_fake_quant_equals_torch(x_shape, s_shape, dtype, learn):
    g = torch.Generator(device="cuda").manual_seed(0)
    scale = (torch.rand(s_shape, device="cuda", generator=g) * 0.05 + 0.01) if s_shape else \
        torch.tensor(0.03, device="cuda")
    x = (torch.randn(x_shape, device="cuda", generator=g) * 3.0).to(dtype)
    x.view(-1)[:4] = torch.tensor([float("inf"), float("-inf"), 0.0, -0.0], device="cuda", dtype=dtype)
    go = torch.randn(x_shape, device="cuda", generator=g).to(dtype)
    outs, grads = [], []
    for backend in ("torch", "cuda"):
        xi = x.clone().requires_grad_()
        si = scale.clone().requires_grad_(learn)
        y = fake_quantize(xi, si, 8, backend=backend)
        y.backward(go)
        outs.append(y)
        grads.append((xi.grad, si.grad))
    assert _bits_equal(outs[0], outs[1])
    assert _bits_equal(grads[0][0], grads[1][0])
    if learn:
        if s_shape and math.prod(s_shape) > 1:
            assert _bits_equal(grads[0][1], grads[1][1])
        else:
            assert abs(float(grads[0][1]) - float(grads[1][1])) <= _bound(x, scale, go, 8)


@pytest.mark.parametrize("view", ["half", "half_t", "t"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("learn", [False, True])
def test_fused_fake_quant_reads_strided_x(view, dtype, learn):
    """x read where it lies (in_proj's half of (8, 1024, 2 * 5120), its (B, D, L) transpose, a transposed
    contiguous tensor): values, STE gradient and the output layout as the torch ops'; a learned scale's gradient within
    the summation-order bound. The gradient arrives contiguous (another layout than x's for the transposes)."""
    g = torch.Generator(device="cuda").manual_seed(0)
    base = (torch.randn(8, 1024, 10240, device="cuda", generator=g) * 3.0).to(dtype)
    pick = {"half": lambda t: t[..., :5120], "half_t": lambda t: t[..., 5120:].transpose(1, 2),
            "t": lambda t: t[:, :, :64].contiguous().transpose(0, 2)}[view]
    scale = torch.tensor(0.03, device="cuda")
    outs = []
    for backend in ("torch", "cuda"):
        xb = base.clone().requires_grad_()
        si = scale.clone().requires_grad_(learn)
        y = fake_quantize(pick(xb), si, 8, backend=backend)
        go = torch.randn(y.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(1)).to(dtype)
        y.backward(go)
        outs.append((y, xb.grad, si.grad, go))
    (yr, gr, sr_, go), (yf, gf, sf, _) = outs
    assert _bits_equal(yr, yf)
    assert all(a == b for a, b, d in zip(yr.stride(), yf.stride(), yr.shape) if d != 1)
    assert _bits_equal(gr, gf)
    if learn:
        assert abs(float(sr_) - float(sf)) <= _bound(pick(base), scale, go, 8)


@pytest.mark.parametrize("w_shape", [(10240, 2560), (2560, 5120), (192, 5120), (5120, 160), (5120, 1, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_absmax_fake_quant_equals_torch(w_shape, dtype):
    """A weight's fake-quant in its own per-row absmax scale, made inside the kernel: values and STE gradient bit
    for bit against the torch ops (absmax, scale_from_absmax, fake_quantize)."""
    from qmamba.quant.granularity import PerChannel
    from qmamba.quant.numerics import fake_quantize_absmax

    g = torch.Generator(device="cuda").manual_seed(0)
    w = (torch.randn(w_shape, device="cuda", generator=g) * 0.02).to(dtype)
    rows = w.view(w_shape[0], -1)
    rows[0] = 0.0
    rows[1, :2] = torch.tensor([-0.0, 3.0], dtype=dtype)
    if dtype == torch.float32:
        rows[2, 3] = float("nan")
    go = torch.randn(w_shape, device="cuda", generator=g).to(dtype)
    outs = []
    for backend in ("torch", "cuda"):
        wi = w.clone().requires_grad_()
        y = fake_quantize_absmax(wi, PerChannel(axis=0), 8, backend=backend)
        y.backward(go)
        outs.append((y, wi.grad))
    assert _bits_equal(outs[0][0], outs[1][0])
    assert _bits_equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("x_shape, s_shape", [((8, 1024, 5120), ()), ((8, 1024, 80, 64), (1, 1, 80, 1))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("encoding", ["mask", "piecewise"])
def test_fused_dual_fake_quant_equals_torch(x_shape, s_shape, dtype, encoding):
    from qmamba.quant.dual_scale import dual_fake_quantize

    g = torch.Generator(device="cuda").manual_seed(0)
    s_in = (torch.rand(s_shape, device="cuda", generator=g) * 0.01 + 0.01) if s_shape else \
        torch.tensor(0.015, device="cuda")
    s_out = s_in * 5
    x = (torch.randn(x_shape, device="cuda", generator=g) * 0.6).to(dtype)
    x.view(-1)[:1000] *= 8  # outliers
    go = torch.randn(x_shape, device="cuda", generator=g).to(dtype)
    outs = []
    for backend in ("torch", "cuda"):
        xi = x.clone().requires_grad_()
        y = dual_fake_quantize(xi, s_in, s_out, encoding, 112, backend=backend)
        y.backward(go)
        outs.append((y, xi.grad))
    assert _bits_equal(outs[0][0], outs[1][0])
    assert _bits_equal(outs[0][1], outs[1][1])


def test_qat_step_fused_equals_torch(monkeypatch):
    torch.manual_seed(0)
    model = MambaLM(preset("tiny", d_model=128, n_layer=2)).cuda()
    prepare(model, "qat_w8a8")
    ids = torch.randint(0, 256, (4, 129), device="cuda")
    calibrate(model, [ids[:, :-1]], progress=False)
    set_mode(model, "fakequant")
    # every float op on the torch reference (deterministic: mamba_ssm's backward adds with atomics), and only the
    # fake-quant path switched between the two runs
    set_backend(model, "torch")
    results = []
    for fused in (False, True):
        monkeypatch.setattr(numerics, "use_fused_fake_quant",
                            lambda backend, x, op, layout_problem, fused=fused: fused and layout_problem() is None)
        model.zero_grad(set_to_none=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(ids[:, :-1])
        F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten()).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (l0, g0), (l1, g1) = results
    assert _bits_equal(l0, l1)
    assert g0.keys() == g1.keys()
    scale_names = {n for n, _ in model.named_parameters() if n.endswith(".scale")}
    for n in g0:
        if n in scale_names:
            assert torch.allclose(g0[n], g1[n], rtol=1e-4, atol=1e-7), n
        else:
            assert _bits_equal(g0[n], g1[n]), n
    assert quant_points(model)
