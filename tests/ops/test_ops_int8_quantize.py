"""int8 activation quantization (qmamba.ops.int8_quantize), on CPU: the reference against an independent definition
of the numerics contract (numpy fp32: the reciprocal, the product rounded to fp32, round half to even, clamp) and
against ``numerics.quantize`` with the scale broadcast; ties, clamping, non-contiguous inputs; the dispatcher (the
reference on CPU); the Python argument checks of the kernel wrapper (metadata only); and the int8 twins routing every
activation quantization through the dispatcher with their backend, codes unchanged. Everything here is exact.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

import qmamba
from qmamba.kernels import quantize as kquant
from qmamba.models import MambaLM
from qmamba.ops.int8_quantize import quantize_int8, quantize_int8_ref
from qmamba.qnn import QuantTwin, calibrate, convert, prepare, set_mode
from qmamba.qnn import point as point_module
from qmamba.qnn.point import QuantPoint
from qmamba.qnn.modules import QuantSSDScan
from qmamba.quant.granularity import PerChannel, PerGroup, PerTensor
from qmamba.quant.numerics import quantize
from qmamba.quant.recipe import QuantSpec

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def contract_codes(x: torch.Tensor, scale: torch.Tensor, axis: int | None, bits: int) -> torch.Tensor:
    """DESIGN §3 in numpy, independent of torch's kernels: inv = fp32(1 / scale), p = fp32(x * inv), q = clamp(rint(p))
    with rint half to even."""
    xv = x.float().numpy().astype(np.float32)
    s = scale.float().numpy().astype(np.float32).reshape(-1)
    if axis is not None:
        shape = [1] * x.ndim
        shape[axis] = s.size
        s = s.reshape(shape)
    inv = np.float32(1.0) / s  # fp32 / fp32: IEEE division, rounded to fp32
    with np.errstate(over="ignore", invalid="ignore"):
        p = (xv * inv).astype(np.float32)
    q = np.clip(np.rint(p), -(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
    return torch.from_numpy(q.astype(np.int8))


def _x(shape, dtype, seed=0, spread=60.0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*shape, generator=g) * spread
    x.view(-1)[:: 7] *= 4  # outliers that clamp
    return x.to(dtype)


def _scale(n, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, generator=g) * 0.9 + 0.1  # irrational-looking fp32 scales: inexact reciprocals


# ---- the reference ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
def test_per_tensor_matches_the_contract(dtype, bits):
    x = _x((4, 33, 96), dtype)
    s = _scale(1).reshape(())
    q = quantize_int8_ref(x, s, bits=bits)
    assert q.dtype == torch.int8 and q.shape == x.shape
    assert torch.equal(q, contract_codes(x, s, None, bits))
    assert torch.equal(q, quantize(x, s, bits))
    assert torch.equal(q, quantize_int8_ref(x, s.reshape(1, 1, 1), bits=bits))  # any one-element shape
    assert torch.equal(q, quantize_int8_ref(x, float(s), bits=bits))  # a Python number
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    assert int((q == lo).sum()) > 0 and int((q == hi).sum()) > 0  # both ends clamp
    assert int(q.min()) == lo and int(q.max()) == hi


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("axis", [0, 1, 2, 3, -1, -2, -3, -4])
def test_per_channel_matches_the_contract(axis, dtype, bits):
    x = _x((2, 5, 8, 16), dtype)  # (B, L, H, P)
    s = _scale(x.shape[axis])
    q = quantize_int8_ref(x, s, axis, bits)
    a = axis % x.ndim
    assert torch.equal(q, contract_codes(x, s, a, bits))
    shape = [1] * x.ndim
    shape[a] = x.shape[a]
    assert torch.equal(q, quantize(x, s.reshape(shape), bits))  # numerics.quantize with the broadcast scale
    assert torch.equal(q, quantize_int8_ref(x, s.reshape(shape), axis, bits))  # the broadcast shape works too
    # each channel really uses its own scale: a per-tensor quantization with channel 0's scale differs
    assert not torch.equal(q, quantize_int8_ref(x, s[:1], axis, bits))


def test_the_contract_tells_near_misses_apart():
    """The comparisons above can fail: the independent definition tells apart truncation, rounding half away from
    zero and dividing by the scale (instead of multiplying by its fp32 reciprocal), on inputs placed next to the
    rounding boundaries (x * inv within a few ulps of k + 0.5)."""
    s = torch.tensor(0.0123457)  # an inexact reciprocal
    k = torch.arange(-128, 128, dtype=torch.float64)
    x0 = ((k + 0.5) * s.double()).float()
    x = torch.cat([x0, torch.nextafter(x0, x0 + 1), torch.nextafter(x0, x0 - 1)])
    ref = contract_codes(x, s, None, 8)
    assert torch.equal(quantize_int8_ref(x, s), ref)
    division = torch.round(x / s).clamp(-128, 127).to(torch.int8)
    assert int((division != ref).sum()) >= 10
    v = x * (1 / s)
    half_away = (torch.sign(v) * torch.floor(v.abs() + 0.5)).clamp(-128, 127).to(torch.int8)
    assert not torch.equal(half_away, ref)
    assert not torch.equal(torch.trunc(v).clamp(-128, 127).to(torch.int8), ref)


@pytest.mark.parametrize("dtype", DTYPES)
def test_ties_round_half_to_even(dtype):
    """x * inv exactly k + 0.5 (a power-of-two scale: exact reciprocal and product) rounds to the even code."""
    s = torch.tensor(0.125)
    k = torch.arange(-40, 40, dtype=torch.float32)
    x = ((k + 0.5) * 0.125).to(dtype)  # exact in fp16 / bf16 too (few mantissa bits)
    assert torch.equal(x.float() * 8, k + 0.5)
    q = quantize_int8_ref(x, s)
    even = torch.where(torch.remainder(k, 2) == 0, k, k + 1)  # of k and k + 1, the even one
    assert torch.equal(q, even.to(torch.int8))
    assert torch.equal(quantize_int8_ref(torch.tensor([0.5, 1.5, 2.5, -0.5, -1.5, -2.5], dtype=dtype), torch.ones(1)),
                       torch.tensor([0, 2, 2, 0, -2, -2], dtype=torch.int8))


@pytest.mark.parametrize("bits", [8, 4])
def test_clamps_and_infinities(bits):
    lo, hi = -(2 ** (bits - 1)), 2 ** (bits - 1) - 1
    x = torch.tensor([0.0, -0.0, 1e30, -1e30, float("inf"), -float("inf"), 3e38, hi + 0.49, hi + 0.5, lo - 0.5])
    q = quantize_int8_ref(x, torch.tensor(1.0), bits=bits)
    assert q.tolist() == [0, 0, hi, lo, hi, lo, hi, hi, hi, lo]
    tiny = quantize_int8_ref(torch.tensor([1.0, -1.0]), torch.tensor(1e-30), bits=bits)  # inv overflows to inf
    assert tiny.tolist() == [hi, lo]


@pytest.mark.parametrize("dtype", DTYPES)
def test_non_contiguous_inputs(dtype):
    big = _x((3, 7, 40), dtype)
    s, sc = _scale(1).reshape(()), _scale(20)
    for x in (big[..., 5:25], big[..., 20:], _x((3, 20, 7), dtype).transpose(1, 2), big[:, ::2, 3:23],
              big[:1, :1, :20].expand(3, 7, 20), big.reshape(-1)[1:421].reshape(3, 7, 20)):
        assert x.shape[-1] == 20  # all but the last (an odd storage offset) non-contiguous
        assert torch.equal(quantize_int8_ref(x, s), quantize_int8_ref(x.contiguous(), s))
        assert torch.equal(quantize_int8_ref(x, sc, -1), contract_codes(x.contiguous(), sc, 2, 8))


def test_empty_and_scalar_inputs():
    assert quantize_int8_ref(torch.zeros(0, 5), torch.tensor(0.1)).shape == (0, 5)
    assert quantize_int8_ref(torch.zeros(3, 0), torch.ones(0), axis=-1).shape == (3, 0)
    q = quantize_int8_ref(torch.tensor(1.26), torch.tensor([0.1]))
    assert q.shape == () and int(q) == 13


def test_float64_inputs_in_the_reference_only():
    x = _x((5, 9), torch.float64)
    assert torch.equal(quantize_int8_ref(x, torch.tensor(0.3)), quantize(x, torch.tensor(0.3)))
    with pytest.raises(TypeError, match="float32, float16 or bfloat16.*backend='torch'"):
        kquant.check_quantize_int8_args(x, torch.tensor(0.3), -1, 8)


# ---- dispatcher -----------------------------------------------------------------------------------------------------
def test_dispatcher_on_cpu_is_the_reference():
    x, s, sc = _x((2, 9, 12), torch.float16), _scale(1), _scale(9)
    for backend in ("auto", "torch"):
        assert torch.equal(quantize_int8(x, s, backend=backend), quantize_int8_ref(x, s))
        assert torch.equal(quantize_int8(x, sc, 1, 4, backend=backend), quantize_int8_ref(x, sc, 1, 4))
    with pytest.raises(RuntimeError, match="not on a CUDA device"):
        quantize_int8(x, s, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        quantize_int8(x, s, backend="gpu")


# ---- argument checks --------------------------------------------------------------------------------------------
META = torch.device("meta")


@pytest.mark.parametrize("fn", [kquant.check_quantize_int8_args, kquant.quantize_int8, quantize_int8_ref])
@pytest.mark.parametrize("case", [
    (dict(x=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "x must be"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a float tensor, got list"),
    (dict(scale=torch.ones(4)), ValueError, r"scale must have 1 \(per-tensor\) or x.shape\[-1\] = 3"),
    (dict(scale=torch.ones(2), axis=-1), ValueError, r"x.shape\[-1\] = 3 \(per-channel\).*got shape \(2,\)"),
    (dict(scale=torch.ones(3), axis=2), ValueError, "axis=2 is out of range for x of shape"),
    (dict(scale=torch.ones(3), axis=1.0), TypeError, "axis must be an int"),
    (dict(scale=torch.ones(1, dtype=torch.int32)), TypeError, "scale must be a float tensor"),
    (dict(scale="0.1"), TypeError, "scale must be a one-element"),
    (dict(bits=9), ValueError, "bits must be an int in 2..8"),
    (dict(bits=True), ValueError, "bits must be an int in 2..8"),
])
def test_bad_arguments_name_the_fix(fn, case):
    """Raised in Python before anything is built or called (a C++ check firing inside the extension can end the
    process on the GPU machine), by the wrapper, the reference and the check alike."""
    overrides, exc, match = case
    args = dict(x=torch.zeros(2, 3), scale=torch.tensor(0.1), axis=-1, bits=8) | overrides
    with pytest.raises(exc, match=match) as info:
        fn(**args)
    assert type(info.value) is exc


def test_checks_read_metadata_only():
    """Meta tensors hold no values: a check that read one (a host sync on a GPU) would fail here."""
    x = torch.empty(2, 33, 80, 64, device=META, dtype=torch.bfloat16)
    assert kquant.check_quantize_int8_args(x, torch.empty(80, device=META), -2, 8) == 2
    assert kquant.check_quantize_int8_args(x, torch.empty(1, 1, 80, 1, device=META), 2, 4) == 2
    assert kquant.check_quantize_int8_args(x, torch.empty((), device=META), 7, 8) is None  # per-tensor: axis ignored
    assert kquant.check_quantize_int8_args(x, 0.5, None, 8) is None


def test_wrapper_without_a_gpu_says_so():
    if torch.cuda.is_available():
        pytest.skip("a GPU is here: the kernel loads")
    with pytest.raises(RuntimeError, match="backend='torch'"):  # KernelsUnavailable (no GPU / nvcc)
        kquant.quantize_int8(torch.zeros(2, 3), torch.tensor(0.1))


# ---- QuantPoint and the int8 twins ------------------------------------------------------------------------------
def _point(granularity, channels, bits=8):
    p = QuantPoint("t.x", QuantSpec(bits=bits, granularity=granularity), channels)
    with torch.no_grad():
        p.scale.copy_(_scale(p.scale.numel()).reshape(p.scale.shape))
        p.ready.fill_(True)
    return p


@pytest.mark.parametrize("granularity, channels, shape", [
    (PerTensor(), 16, (2, 5, 16)),
    (PerChannel(-1), 16, (2, 5, 16)),
    (PerChannel(1), 6, (2, 6, 7)),       # conv-style (B, D, L)
    (PerChannel(-2), 8, (2, 5, 8, 4)),   # per head (B, L, H, P)
    (PerGroup(4, -1), 16, (3, 16)),
])
@pytest.mark.parametrize("bits", [8, 4])
def test_point_quantize_backends_agree(granularity, channels, shape, bits):
    p = _point(granularity, channels, bits)
    x = _x(shape, torch.float16)
    q_t, s_t = p.quantize(x)  # default: today's numerics.quantize
    assert torch.equal(q_t, quantize(x, p.scale_for(x), bits))
    p.recording = True
    q_a, s_a = p.quantize(x, backend="auto")
    assert torch.equal(q_a, q_t) and torch.equal(s_a, s_t) and p.recorded is q_a
    assert torch.equal(p.codes(x, p.scale_for(x), "auto"), q_t)
    assert torch.equal(p.roundtrip(x, "auto"), p.roundtrip(x))


# Mamba1 per-tensor, Mamba2 per-head x and per-group B / C (two groups), and the QAT recipe (learnable scales)
CASES = [("tiny", {}, "quamba_w8a8"), ("tiny-mamba2", {"ngroups": 2}, "quamba2_w8a8"), ("tiny-mamba2", {}, "qat_w8a8")]


@pytest.mark.parametrize("name, overrides, recipe", CASES)
def test_int8_twins_quantize_activations_through_the_dispatcher(monkeypatch, name, overrides, recipe):
    """forward, prefill and step of an int8 model quantize every activation through ``quantize_int8`` with the twin's
    backend (the fused kernel on a GPU), with the per-channel axis the scale belongs to, but Mamba2's x / B / C,
    which the SSD kernels quantize as they load them; the logits are those of the backend="torch" route
    (``numerics.quantize``) bit for bit."""
    torch.manual_seed(0)
    ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(3))
    model = prepare(MambaLM(qmamba.preset(name, **overrides)).eval(), recipe)
    calibrate(model, [ids], progress=False)
    models = {"int8": set_mode(copy.deepcopy(model), "int8"), "converted": convert(copy.deepcopy(model))}
    calls = []
    real = point_module.quantize_int8

    def spy(x, scale, axis, bits, backend):
        calls.append((tuple(x.shape), scale.numel(), axis, backend))
        assert scale.numel() == 1 or scale.numel() == x.shape[axis]
        return real(x, scale, axis, bits, backend=backend)

    @torch.no_grad()
    def run(m):
        cache = m.allocate_cache(ids.shape[0])
        pre = m.prefill(ids[:, :8], cache)
        steps = [m.step(ids[:, t], cache) for t in range(8, 12)]
        return m(ids), pre, steps

    for m in models.values():
        # producers that hand their consumers codes (conv epilogue, linear epilogue, fused pre-norm) quantize those
        # points inside their own op, not through the dispatcher: off here, so every point goes through it once per
        # run; tests/qnn/test_qnn_codes.py shows those routes give these codes bit for bit
        for mod in m.modules():
            if hasattr(mod, "emit_codes"):
                mod.emit_codes = False
        twins = [t for t in m.modules() if isinstance(t, QuantTwin)]
        # Mamba2's SSD kernels quantize x / B / C themselves as they load them (ssd_*_from_float): not dispatched
        in_kernel = {id(t.q(p)) for t in twins if isinstance(t, QuantSSDScan) and t.q("x").dual is None
                     for p in ("x", "B", "C")}
        acts = [p for t in twins for p in t.quant_points.values() if not p.is_weight and id(p) not in in_kernel]
        n_act = len(acts)
        for t in twins:
            t.backend = "torch"
        ref = run(m)
        monkeypatch.setattr(point_module, "quantize_int8", spy)
        calls.clear()
        run(m)  # backend "torch": the dispatcher is never called
        assert calls == []
        for t in twins:
            t.backend = "auto"
        got = run(m)
        monkeypatch.undo()
        assert {c[3] for c in calls} == {"auto"}
        assert len(calls) >= 3 * n_act  # forward, prefill and every step quantize each activation point once at least
        per_channel = any(not isinstance(p.spec.granularity, PerTensor) for p in acts)
        assert any(c[1] > 1 for c in calls) == per_channel  # per-head / per-group scales go as (C,) vectors
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
        assert all(torch.equal(a, b) for a, b in zip(got[2], ref[2]))
