"""Fused Hadamard rotation + int8 quantize (qmamba.ops.int8_hadamard) on CPU:

- the reference is ``quantize(hadamard_transform(x), scale)`` for every width / dtype / bits / scale form, and within
  1 LSB of quantizing x @ H computed in float64 against a Sylvester matrix built here (an independent definition);
- the dispatcher runs the reference on CPU, and ``backend="cuda"`` there is one clear error;
- the kernel wrapper's Python checks (qmamba.kernels.hadamard) reject what the C++ op would, on metadata only, before
  anything is built or loaded;
- the int8 QuantLinear with a rotated input goes through the fused op in forward and step, with today's codes and
  outputs, and keeps observing / probing / recording semantics.
"""

import math

import pytest
import torch
from torch import nn

import qmamba.qnn.modules as qmodules
from qmamba.kernels import hadamard as khad
from qmamba.kernels.build import CSRC
from qmamba.ops import hadamard_transform
from qmamba.ops.hadamard import hadamard_block
from qmamba.ops.int8_hadamard import hadamard_quantize, hadamard_quantize_ref
from qmamba.qnn import freeze_scales_, observing, prepare, set_mode
from qmamba.quant.numerics import qrange, quantize
from qmamba.quant.recipe import QuantSpec, Recipe

META = torch.device("meta")


def _acts(lead, n, dtype=torch.float32, seed=0):
    """Activations with a few outlier channels (what out_proj's input looks like)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(*lead, n, generator=g) * 0.7
    x[..., : max(1, n // 97)] *= 40.0
    return x.to(dtype)


def _scale(x, frac=0.5, bits=8):
    """A per-tensor scale that clamps the largest rotated values (as a percentile observer would)."""
    return (hadamard_transform(x).abs().amax() * frac / qrange(bits)[1]).reshape(())


def sylvester(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


# ---- reference ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n", [1, 8, 24, 96, 768, 1536, 5120])
@pytest.mark.parametrize("bits", [8, 4])
def test_ref_is_quantize_of_the_rotation(n, dtype, bits):
    x = _acts((2, 5), n, dtype, seed=n)
    s = _scale(x, bits=bits)
    got = hadamard_quantize_ref(x, s, bits)
    assert got.dtype == torch.int8 and got.shape == x.shape
    assert torch.equal(got, quantize(hadamard_transform(x), s, bits))
    qmin, qmax = qrange(bits)
    if n > 1:
        assert bool(((got == qmax) | (got == qmin)).any())  # the scale clamps: the clamp path is exercised


@pytest.mark.parametrize("n", [64, 96, 1536])
def test_ref_matches_a_float64_dense_rotation(n):
    """Independent definition: x @ blockdiag(H_b) in float64, then the contract's quantize. Rounding-boundary
    cases may land 1 LSB apart (fp32 butterflies vs a float64 matmul), nothing more, and rarely."""
    b = hadamard_block(n)
    x = _acts((16, 8), n, seed=n)
    s = _scale(x, frac=0.9)
    dense = torch.block_diag(*[sylvester(b)] * (n // b))
    want = torch.clamp(torch.round(x.double() @ dense / s.double()), -128, 127).to(torch.int8)
    got = hadamard_quantize_ref(x, s)
    d = (got.int() - want.int()).abs()
    assert int(d.max()) <= 1
    assert int((d != 0).sum()) <= 0.001 * d.numel()
    assert int((got != 0).sum()) > 0.9 * got.numel()  # not a trivial all-zero comparison


def test_ref_scale_forms_agree():
    x = _acts((3, 4), 48)
    s = _scale(x)
    want = hadamard_quantize_ref(x, s)
    for form in (s.reshape(1), s.reshape(1, 1, 1), s.reshape(1, 1, 1, 1, 1), float(s)):
        assert torch.equal(hadamard_quantize_ref(x, form), want)
    assert not torch.equal(hadamard_quantize_ref(x, s * 2), want)


def test_ref_argument_errors():
    x = _acts((2,), 16)
    with pytest.raises(TypeError, match="float tensor"):
        hadamard_quantize_ref(x.to(torch.int8), 0.1)
    with pytest.raises(ValueError, match="n >= 1"):
        hadamard_quantize_ref(torch.zeros(()), 0.1)
    with pytest.raises(ValueError, match="per-tensor"):
        hadamard_quantize_ref(x, torch.ones(16))
    with pytest.raises(ValueError, match="bits"):
        hadamard_quantize_ref(x, 0.1, bits=9)
    with pytest.raises(ValueError, match="finite and > 0"):  # quantize's CPU value check
        hadamard_quantize_ref(x, torch.tensor(0.0))


# ---- dispatcher ---------------------------------------------------------------------------------------------------
def test_dispatcher_on_cpu_is_the_reference():
    x = _acts((2, 7), 1536, torch.bfloat16)
    s = _scale(x)
    want = hadamard_quantize_ref(x, s)
    assert torch.equal(hadamard_quantize(x, s), want)
    assert torch.equal(hadamard_quantize(x, s, backend="torch"), want)
    with pytest.raises(RuntimeError, match="backend='cuda'.*CUDA device"):
        hadamard_quantize(x, s, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        hadamard_quantize(x, s, backend="triton")


# ---- kernel wrapper checks (metadata only) -------------------------------------------------------------------------
def _kargs(**over):
    a = dict(x=torch.empty(4, 5120, device=META, dtype=torch.float16), scale=torch.tensor(0.1), bits=8)
    a.update(over)
    return a


@pytest.mark.parametrize("over, exc, match", [
    (dict(x=torch.empty(4, 64, dtype=torch.int8)), TypeError, "x must be float32, float16 or bfloat16"),
    (dict(x=[1.0, 2.0]), TypeError, "x must be a float tensor"),
    (dict(x=torch.empty((), device=META)), ValueError, r"x must be \(\.\.\., n\) with n >= 1"),
    (dict(x=torch.empty(3, 0, device=META)), ValueError, r"n >= 1"),
    (dict(x=torch.empty(2, 16384, device=META)), ValueError, "up to 8192 elements.*blocks of 16384.*backend='torch'"),
    (dict(x=torch.empty(2, 3 * 16384, device=META)), ValueError, "blocks of 16384"),
    (dict(bits=9), ValueError, "bits must be an int in 2..8"),
    (dict(bits=8.0), ValueError, "bits must be an int"),
    (dict(bits=True), ValueError, "bits must be an int"),
    (dict(scale=torch.ones(2)), ValueError, "scale must be a per-tensor scale"),
    (dict(scale="0.1"), TypeError, "scale must be a one-element tensor"),
    (dict(x=torch.empty(1 << 21, 1 << 10, 3, device=META)), ValueError, "grid limit"),
])
def test_kernel_checks_reject(over, exc, match):
    with pytest.raises(exc, match=match) as info:
        khad.check_hadamard_quantize_args(**_kargs(**over))
    assert type(info.value) is exc


@pytest.mark.parametrize("shape, n, b", [((4, 5120), 5120, 1024), ((2, 3, 1536), 1536, 512), ((1, 8192), 8192, 8192),
                                         ((7, 24), 24, 8), ((5, 1), 1, 1), ((0, 768), 768, 256)])
def test_kernel_checks_accept(shape, n, b):
    for scale in (torch.tensor(0.1), torch.ones(1, 1, 1), 0.25):
        assert khad.check_hadamard_quantize_args(torch.empty(*shape, device=META), scale, 8) == (n, b)


def test_kernel_wrapper_checks_before_loading():
    """A bad argument is a Python error even where the kernels cannot load (here: no GPU)."""
    with pytest.raises(ValueError, match="bits"):
        khad.hadamard_quantize(torch.zeros(2, 64), torch.tensor(0.1), bits=1)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        khad.hadamard_quantize(torch.zeros(2, 64, dtype=torch.float64), torch.tensor(0.1))


def test_kernel_limit_matches_the_dispatcher():
    from qmamba.ops import int8_hadamard

    assert int8_hadamard.MAX_KERNEL_BLOCK == khad.MAX_BLOCK == 8192
    assert "constexpr int kMaxBlock = 8192;" in (CSRC / "hadamard" / "hadamard_block.cuh").read_text()


# ---- QuantLinear integration ---------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, k=96, n=24):
        super().__init__()
        self.lin = nn.Linear(k, n, bias=True)


def _int8_net(rotation="hadamard", k=96):
    torch.manual_seed(0)
    net = Net(k)
    prepare(net, Recipe("r", (("lin.input", QuantSpec(rotation=rotation)), ("lin.weight", QuantSpec()))))
    with torch.no_grad(), observing(net):
        net.lin(_acts((4, 16), k, seed=3))
    freeze_scales_(net)
    set_mode(net, "int8")
    return net, net.lin


@pytest.fixture
def spy(monkeypatch):
    calls = []
    real = qmodules.hadamard_quantize

    def counting(x, scale, bits=8, backend="auto"):
        calls.append((tuple(x.shape), backend))
        return real(x, scale, bits, backend=backend)

    monkeypatch.setattr(qmodules, "hadamard_quantize", counting)
    return calls


def _two_step(lin, x):
    """Today's int8 math: rotate in torch, then the point's quantize, then the int8 linear."""
    qi, qw = lin.quant_points["input"], lin.quant_points["weight"]
    hx = hadamard_transform(x)
    sx = qi.scale_for(hx)
    qx = quantize(hx, sx, qi.spec.bits)
    return qx, lin._int8_linear(qx, sx, *lin._int8_weight(qw), x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quantlinear_forward_uses_the_fused_op_with_the_same_codes(spy, dtype):
    net, lin = _int8_net()
    x = _acts((2, 9), 96, dtype, seed=5)
    qi = lin.quant_points["input"]
    qi.recording = True
    with torch.no_grad():
        y = lin(x)
    want_codes, want = _two_step(lin, x)
    assert spy == [((2, 9, 96), "auto")]
    assert torch.equal(qi.recorded, want_codes)
    assert y.dtype == dtype and torch.equal(y, want)


def test_quantlinear_watching_keeps_the_two_step_path(spy):
    """A probe (or an observer) must see the rotated tensor itself: that path computes it in torch, same codes."""
    net, lin = _int8_net()
    x = _acts((2, 9), 96, seed=6)
    qi = lin.quant_points["input"]
    seen = []
    qi.probe = lambda point, t: seen.append(t)
    with torch.no_grad():
        y = lin(x)
    assert spy == []
    assert len(seen) == 1 and torch.equal(seen[0], hadamard_transform(x))
    assert torch.equal(y, _two_step(lin, x)[1])


def test_quantlinear_step_uses_the_fused_op_and_equals_forward(spy):
    net, lin = _int8_net()
    x = _acts((3,), 96, seed=7)  # one token of 3 sequences: (B, K)
    with torch.no_grad():
        y_step = lin.step(x)
        y_fwd = lin(x.unsqueeze(1)).squeeze(1)
    assert spy == [((3, 96), "auto"), ((3, 1, 96), "auto")]
    assert torch.equal(y_step, y_fwd)
    assert torch.equal(y_step, _two_step(lin, x)[1])


def test_unrotated_quantlinear_does_not_rotate(spy):
    net, lin = _int8_net(rotation=None)
    with torch.no_grad():
        lin(_acts((2, 4), 96))
        lin.step(_acts((2,), 96))
    assert spy == []
