"""On a CUDA GPU: the fused Hadamard rotation + int8 quantize kernel (csrc/hadamard/hadamard_quantize.cu) against
``hadamard_quantize_ref`` (= quantize(hadamard_transform(x), scale)) run on the same GPU.

Widths: out_proj's input d_inner 1536 (mamba-130m, blocks of 512) and 5120 (mamba-2.8b / mamba2-2.7b, 5 x 1024),
768 (3 x 256), 2048 and 8192 (one block of 8192, the kernel's largest); tokens B x L = 1 x 1, 8 x 1 (decode),
1 x 33, 1 x 2048, 8 x 1024 (prefill); fp32 / fp16 / bf16 inputs. Then every block size 1 .. 8192 on a few rows,
other bit widths, strided / misaligned / non-contiguous inputs, round-half-even ties, a CUDA graph, the dispatcher
and the int8 QuantLinear (forward, step, step in a CUDA graph).

Tolerance: none — the codes must be identical (torch.equal). The kernel performs the same separately rounded fp32
operations as torch in the same order (exact upcast; each butterfly add / subtract; one multiply by the fp32 scalar
float(1 / sqrt(b)); one multiply by 1 / scale computed with an IEEE division; rint; clamp), with no FMA contraction
(__fadd_rn / __fsub_rn / __fmul_rn), so there is no rounding freedom left. A mismatch is a bug, not noise.
"""

import pytest
import torch
from torch import nn

import qmamba.qnn.modules as qmodules
from qmamba.kernels import hadamard as khad
from qmamba.ops import hadamard_transform
from qmamba.ops.int8_hadamard import hadamard_quantize, hadamard_quantize_ref

pytestmark = pytest.mark.gpu

WIDTHS = {"d_model-130m": 768, "d_inner-130m": 1536, "2048": 2048, "d_inner-2.8b": 5120, "8192": 8192}
TOKENS = [(1, 1), (8, 1), (1, 33), (1, 2048), (8, 1024)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _acts(lead, n, dtype=torch.float32, seed=0):
    """out_proj-like activations: unit noise with a few outlier channels (x 40)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*lead, n, device="cuda", generator=g)
    x[..., : max(1, n // 97)] *= 40.0
    return x.to(dtype)


def _scale(x, frac=0.5, qmax=127):
    """A per-tensor fp32 scale on the GPU that clamps the largest rotated values (a percentile-style scale)."""
    return (hadamard_transform(x).abs().amax() * frac / qmax).clamp_min(1e-6).reshape(1)


def assert_same_codes(got, want):
    assert got.dtype == torch.int8 and got.shape == want.shape, (got.dtype, tuple(got.shape), tuple(want.shape))
    if not torch.equal(got, want):
        d = (got.int() - want.int()).abs()
        raise AssertionError(f"{int((d != 0).sum())} of {d.numel()} codes differ, up to {int(d.max())} LSB")


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("tokens", TOKENS, ids=lambda t: f"B{t[0]}xL{t[1]}")
@pytest.mark.parametrize("width", list(WIDTHS))
def test_matches_ref(width, tokens, dtype):
    n = WIDTHS[width]
    x = _acts(tokens, n, DTYPES[dtype], seed=n + tokens[1])
    s = _scale(x)
    got = khad.hadamard_quantize(x, s)
    want = hadamard_quantize_ref(x, s)
    assert_same_codes(got, want)
    assert got.shape == (*tokens, n)
    assert int(((want == 127) | (want == -128)).sum()) > 0  # the clamp is exercised
    assert int((want != 0).sum()) > want.numel() // 2  # and most codes carry information


@pytest.mark.parametrize("n", [1, 2, 4, 8, 16, 24, 48, 96, 160, 320, 2560, 5376, 4096, 3 * 8192])
@pytest.mark.parametrize("rows", [1, 37])
def test_every_block_size(n, rows):
    """Blocks of 1 .. 8192 elements (every thread layout: one thread, CTAs shared by several small blocks with an idle
    tail — 37 rows —, shuffles only, shuffles + shared memory); 160 is dt_rank of mamba-2.8b, 5376 conv_dim of
    mamba2-2.7b."""
    x = _acts((rows,), n, torch.float16, seed=n)
    s = _scale(x)
    assert_same_codes(khad.hadamard_quantize(x, s), hadamard_quantize_ref(x, s))


@pytest.mark.parametrize("bits", [2, 4, 7])
def test_other_bit_widths(bits):
    x = _acts((33,), 5120, seed=bits)
    qmax = 2 ** (bits - 1) - 1
    s = _scale(x, qmax=qmax)
    got = khad.hadamard_quantize(x, s, bits)
    assert_same_codes(got, hadamard_quantize_ref(x, s, bits))
    assert int(got.max()) == qmax and int(got.min()) >= -qmax - 1


def test_strided_misaligned_and_noncontiguous_inputs():
    big = _acts((40,), 6000, torch.float16, seed=1)
    s = _scale(big[:, :5120])
    cases = {
        "row stride, aligned": big[:, :5120],                    # vector loads with a row stride
        "misaligned start": big[:, 3:3 + 5120],                  # data pointer not 16-byte aligned: scalar loads
        "odd row stride": _acts((40,), 5121, torch.float16)[:, :5120],   # rows not 16-byte aligned
        "column view": big[:, :5120].t().contiguous().t(),      # last dim strided: the wrapper copies
        "unmergeable lead dims": _acts((8, 5), 1536, torch.bfloat16).transpose(0, 1),  # (5, 8, 1536) view
    }
    for name, x in cases.items():
        got = khad.hadamard_quantize(x, s)
        want = hadamard_quantize_ref(x, s)
        assert got.shape == x.shape, name
        assert torch.equal(got, want), name


def test_round_half_even_ties_and_clamp():
    """A one-hot row a * e_0 rotates to a / 32 everywhere (b = 1024); with scale 1/32 the value before rounding is
    exactly a: ties must round to even (never away from zero), and beyond the range clamp."""
    a = torch.tensor([0.5, 1.5, 2.5, -0.5, -2.5, 126.5, 127.5, -128.5, 1e30, -1e30, 0.0], device="cuda")
    x = torch.zeros(a.numel(), 1024, device="cuda")
    x[:, 0] = a
    s = torch.tensor([1 / 32], device="cuda")
    got = khad.hadamard_quantize(x, s)
    want = torch.tensor([0, 2, 2, 0, -2, 126, 127, -128, 127, -128, 0], device="cuda", dtype=torch.int8)
    assert torch.equal(got, want[:, None].expand(-1, 1024))
    assert torch.equal(got, hadamard_quantize_ref(x, s))


def test_rsqrt_constant_is_torch_fp32_scalar():
    """For blocks with odd log2 (512, 2048, 8192) 1/sqrt(b) is not a power of two: the kernel must multiply by the
    fp32 rounding of the double, as torch does (not by an rsqrtf nor in double). A constant 1 ulp off moves about
    2 in a million unclamped codes across a rounding boundary: 2048 rows of 8192 unclamped codes would show ~30."""
    for n in (512, 2048, 8192):
        x = _acts((2048,), n, seed=n)
        s = _scale(x, frac=1.0)  # no clamping: every code carries its rounding
        assert_same_codes(khad.hadamard_quantize(x, s), hadamard_quantize_ref(x, s))


def test_empty_and_scale_forms():
    x = _acts((0, 4), 1536)
    assert khad.hadamard_quantize(x, torch.ones(1, device="cuda")).shape == (0, 4, 1536)
    x = _acts((3, 5), 768)
    s = _scale(x)
    want = hadamard_quantize_ref(x, s)
    for form in (s.reshape(()), s.reshape(1, 1, 1), s.double(), s.cpu(), float(s)):
        assert torch.equal(khad.hadamard_quantize(x, form), want)


def test_in_cuda_graph():
    """No host sync and no value-dependent launch: decode (1 x 5120) and prefill (33 x 1536) captured, replayed with
    new inputs and scales written in place."""
    xs = [_acts((1,), 5120, torch.float16, seed=1), _acts((33,), 1536, torch.bfloat16, seed=2)]
    ss = [_scale(x) for x in xs]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up: builds / loads the kernels outside the capture
        for x, s in zip(xs, ss):
            khad.hadamard_quantize(x, s)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outs = [khad.hadamard_quantize(x, s) for x, s in zip(xs, ss)]
    for i, (x, s) in enumerate(zip(xs, ss)):
        x.copy_(_acts(tuple(x.shape[:-1]), x.shape[-1], x.dtype, seed=10 + i))
        s.copy_(_scale(x, frac=0.3))
    graph.replay()
    torch.cuda.synchronize()
    for out, x, s in zip(outs, xs, ss):
        assert_same_codes(out, hadamard_quantize_ref(x, s))


def test_dispatcher():
    x = _acts((2, 9), 5120, torch.float16)
    s = _scale(x)
    want = hadamard_quantize_ref(x, s)
    for backend in ("auto", "cuda", "torch"):
        assert torch.equal(hadamard_quantize(x, s, backend=backend), want), backend
    wide = _acts((3,), 16384)  # blocks of 16384: beyond the kernel
    sw = _scale(wide)
    assert torch.equal(hadamard_quantize(wide, sw), hadamard_quantize_ref(wide, sw))  # auto: the reference
    with pytest.raises(ValueError, match="up to 8192"):
        hadamard_quantize(wide, sw, backend="cuda")


def test_kernel_errors_name_the_fix():
    """Bad arguments stop in the wrapper's Python checks, before the op (a C++ TORCH_CHECK is a backstop only)."""
    x = _acts((2,), 1536)
    with pytest.raises(ValueError, match="per-tensor"):
        khad.hadamard_quantize(x, torch.ones(2, device="cuda"))
    with pytest.raises(ValueError, match="bits"):
        khad.hadamard_quantize(x, torch.ones(1, device="cuda"), bits=16)
    with pytest.raises(TypeError, match="float32, float16 or bfloat16"):
        khad.hadamard_quantize(x.double(), torch.ones(1, device="cuda"))
    with pytest.raises(RuntimeError, match="CUDA tensor"):
        khad.hadamard_quantize(x.cpu(), torch.ones(1))


# ---- the int8 QuantLinear ------------------------------------------------------------------------------------------
class Net(nn.Module):
    def __init__(self, k, n):
        super().__init__()
        self.lin = nn.Linear(k, n, bias=True)


def _rotated_int8_linear(k=1536, n=768):
    from qmamba.qnn import freeze_scales_, observing, prepare, set_mode
    from qmamba.quant.recipe import QuantSpec, Recipe

    torch.manual_seed(0)
    net = Net(k, n)
    prepare(net, Recipe("r", (("lin.input", QuantSpec(rotation="hadamard")), ("lin.weight", QuantSpec()))))
    net = net.cuda()  # fp32: the kernel's dtypes are covered above; this is about the module's paths
    with torch.no_grad(), observing(net):
        net.lin(_acts((4, 64), k, seed=3))
    freeze_scales_(net)
    set_mode(net, "int8")
    return net.lin


@pytest.fixture
def codes_spy(monkeypatch):
    seen = []
    real = qmodules.hadamard_quantize

    def spy(x, scale, bits=8, backend="auto"):
        out = real(x, scale, bits, backend=backend)
        seen.append((backend, out))
        return out

    monkeypatch.setattr(qmodules, "hadamard_quantize", spy)
    return seen


def test_quantlinear_forward_and_step_use_the_kernel(codes_spy):
    """The rotated int8 linear on the GPU: kernel codes == torch-backend codes in forward (prefill) and step (decode);
    outputs equal up to the W8A8 kernels' own contract (they are bit-identical to their reference; checked elsewhere,
    so a loose bound here keeps this test about the rotation)."""
    lin = _rotated_int8_linear()
    x = _acts((2, 33), 1536, seed=4)
    out = {}
    with torch.no_grad():
        for backend in ("cuda", "torch"):
            lin.backend = backend
            out[backend] = (lin(x), lin.step(x[:, -1]))
    assert [b for b, _ in codes_spy] == ["cuda", "cuda", "torch", "torch"]
    assert torch.equal(codes_spy[0][1], codes_spy[2][1])  # forward codes (2, 33, 1536)
    assert torch.equal(codes_spy[1][1], codes_spy[3][1])  # step codes (2, 1536)
    for a, b in zip(out["cuda"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3)


def test_quantlinear_step_in_cuda_graph():
    """The int8 step (fused rotation + quantize, then the W8A8 GEMV) is capturable and replays with new tokens."""
    lin = _rotated_int8_linear()
    lin.backend = "cuda"
    x = _acts((1,), 1536, seed=5)
    with torch.no_grad():
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            lin.step(x)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = lin.step(x)
        x.copy_(_acts((1,), 1536, seed=6))
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(y, lin.step(x))


@pytest.mark.parametrize("width", [768, 1536, 2048, 5120, 8192])
@pytest.mark.parametrize("tokens", [(1, 33), (8, 1024)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_transform_matches_torch(width, tokens, dtype):
    """The Triton Walsh-Hadamard transform of fakequant mode (qmamba.kernels.triton.hadamard): forward bit for bit,
    backward equal in value, against the torch ops on the same GPU."""
    g = torch.Generator(device="cuda").manual_seed(width)
    x = torch.randn(*tokens, width, device="cuda", generator=g).to(dtype)
    go = torch.randn(*tokens, width, device="cuda", generator=g)
    res = []
    for backend in ("torch", "cuda"):
        xi = x.clone().requires_grad_()
        y = hadamard_transform(xi, backend)
        y.backward(go)
        res.append((y, xi.grad))
    (y0, g0), (y1, g1) = res
    assert y0.dtype == y1.dtype == torch.float32
    assert torch.equal(y0.view(torch.int32), y1.view(torch.int32))
    assert g1.dtype == dtype and torch.equal(g0, g1)
