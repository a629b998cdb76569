"""On a CUDA GPU: the fused int8 quantize kernel (csrc/quantize/quantize_int8.cu, ``torch.ops.qmamba.quantize_int8``)
against ``quantize_int8_ref`` (= ``numerics.quantize``) run on the same GPU.

Tolerance: none. Both compute the same fp32 ops (1 / scale, one rounded product, round half to even, clamp), so codes
must be bit-identical (torch.equal), stricter than DESIGN §3's 99.9 % / 1 LSB.

Shapes: the activations every int8 model quantizes, per-tensor, of widths 768 / 1536 (mamba-130m d_model / d_inner),
5120 (d_inner of mamba-2.8b and mamba2-2.7b), 5376 (mamba2-2.7b conv_dim), 10240 (mamba-2.8b in_proj out), as
(B, L, width) for (B, L) in (1, 1), (8, 1), (1, 33), (8, 33), (1, 1024), (8, 1024), (1, 2048) (batch 8 up to L = 1024
to keep the time modest; this covers (1, 5120), (8, 5376) and (2048, 10240)), fp32 / fp16 / bf16; mamba2-2.7b's
per-head x (B, L, H, P) = (2, 33, 80, 64) per-channel along axis -2 and its decode token (B, 1, 80, 64); other axes;
bits 8 and 4; slices of a wider projection (the strided row path), misaligned and odd-sized tensors (the one-element
path and the tail), a transposed view (copied first), ties, infinities, a CUDA graph, and more than 2**31 elements.
"""

import pytest
import torch

from qmamba.kernels import quantize as kquant
from qmamba.ops.int8_quantize import quantize_int8, quantize_int8_ref
from qmamba.qnn.point import QuantPoint
from qmamba.quant.granularity import PerChannel, PerGroup, PerTensor
from qmamba.quant.recipe import QuantSpec

pytestmark = pytest.mark.gpu

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
WIDTHS = [768, 1536, 5120, 5376, 10240]
TOKENS = [(1, 1), (8, 1), (1, 33), (8, 33), (1, 1024), (8, 1024), (1, 2048)]


def _x(shape, dtype, seed=0, spread=3.0):
    """An activation with a few outlier channels (as Mamba's have)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    x = torch.randn(*shape, device="cuda", generator=g) * spread
    if x.ndim >= 1 and x.shape[-1] > 8:
        x[..., :4] *= 30
    return x.to(dtype)


def _per_tensor_scale(x, bits=8):
    """A percentile-style scale: half the absmax spans the codes, so the outliers clamp."""
    return (x.float().abs().amax() * 0.5 / (2 ** (bits - 1) - 1)).clamp_min(1e-6).reshape(())


def _per_channel_scale(x, axis, bits=8, seed=1):
    a = axis % x.ndim
    g = torch.Generator(device="cuda").manual_seed(seed)
    absmax = x.float().abs().movedim(a, 0).reshape(x.shape[a], -1).amax(1)
    jitter = 0.4 + torch.rand(x.shape[a], device="cuda", generator=g)  # some channels clamp, some do not
    return (absmax * jitter / (2 ** (bits - 1) - 1)).clamp_min(1e-6)  # (C,)


def _check(x, scale, axis=-1, bits=8):
    q = kquant.quantize_int8(x, scale, axis, bits)
    ref = quantize_int8_ref(x, scale, axis, bits)
    assert q.dtype == torch.int8 and q.shape == x.shape and q.is_contiguous() and q.device == x.device
    if not torch.equal(q, ref):
        d = (q.int() - ref.int()).abs()
        raise AssertionError(f"{int((d != 0).sum())} of {d.numel()} codes differ (max {int(d.max())} LSB) for x "
                             f"{tuple(x.shape)} strides {x.stride()} {x.dtype}, scale {tuple(scale.shape)}, axis "
                             f"{axis}, bits {bits}")
    return q


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("B, L", TOKENS)
@pytest.mark.parametrize("width", WIDTHS)
def test_per_tensor_model_shapes(width, B, L, dtype):
    x = _x((B, L, width), DTYPES[dtype], seed=width + L)
    q = _check(x, _per_tensor_scale(x))
    assert int((q == 127).sum() + (q == -128).sum()) > 0  # the outliers clamp
    _check(x.reshape(B * L, width), _per_tensor_scale(x))  # 2-D (tokens, width), as the linears see it


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("shape, axis", [
    ((2, 33, 80, 64), -2),   # mamba2-2.7b x per head (B, L, H, P)
    ((2, 33, 80, 64), 2),
    ((1, 1, 80, 64), -2),    # its decode token (L = 1 put back by QuantTwin._step_codes)
    ((8, 1, 80, 64), -2),
    ((2, 33, 2, 128), -2),   # B / C per SSD group (two groups)
    ((2, 5120, 33), 1),      # conv layout (B, D, L), per channel
    ((8, 5120), -1),         # per channel along the last axis: every element its own scale
    ((3, 33, 80, 64), 0),
    ((2, 33, 80, 63), -1),   # odd inner size: channel runs cross the 16-byte vectors
])
def test_per_channel(shape, axis, bits, dtype):
    x = _x(shape, DTYPES[dtype], seed=len(shape) + shape[-1])
    _check(x, _per_channel_scale(x, axis, bits), axis, bits)
    _check(x, _per_tensor_scale(x, bits), axis, bits)  # a one-element scale: axis ignored


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_layouts(dtype):
    """Slices of a wider projection (read in place as strided rows, 16-byte loads where aligned), misaligned and
    odd-sized tensors (one element per load, the tail), broadcast rows (stride 0), a transposed view (copied)."""
    dt = DTYPES[dtype]
    proj = _x((2, 33, 10576), dt, seed=5)  # mamba2-2.7b in_proj output: z, xBC, dt
    xz = _x((2, 33, 10240), dt, seed=6)    # mamba-2.8b in_proj output
    views = {
        "z": proj[..., :5120], "x": proj[..., 5120:10240], "B": proj[..., 10240:10368], "dt": proj[..., 10496:],
        "misaligned": proj[..., 3:1027], "odd width": proj[..., 7:20], "token": proj[:, 5, 5120:10240],
        "heads": proj[..., 5120:10240].unflatten(-1, (80, 64)), "every other token": proj[:, ::2, :5120],
        "conv input (B, D, L)": xz.transpose(1, 2)[:, :5120], "offset 1": xz.reshape(-1)[1:1 + 7 * 37].view(7, 37),
        "tail": xz.reshape(-1)[:7 * 13].view(7, 13), "broadcast": xz[0, :1].expand(16, 10240),
        "one element": xz[0, 0, :1], "0-dim": xz[0, 0, 3], "empty": xz[:, :0],
    }
    for name, x in views.items():
        s = _per_tensor_scale(x) if x.numel() else torch.tensor(0.1, device="cuda")
        _check(x, s)
        _check(x.contiguous(), s)
        if x.ndim >= 1 and x.numel():
            _check(x, _per_channel_scale(x, -1), -1)
    heads = views["heads"]
    _check(heads, _per_channel_scale(heads, -2), -2)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_ties_clamps_and_infinities(dtype):
    dt = DTYPES[dtype]
    k = torch.arange(-40, 40, dtype=torch.float32, device="cuda")
    x = ((k + 0.5) * 0.125).to(dt)  # x * (1 / 0.125) = k + 0.5 exactly: half to even
    q = _check(x, torch.tensor(0.125, device="cuda"))
    assert torch.equal(q, torch.where(torch.remainder(k, 2) == 0, k, k + 1).to(torch.int8))
    heads = ((k + 0.5).reshape(1, 2, 40) * torch.tensor([0.125, 0.25], device="cuda").reshape(1, 2, 1)).to(dt)
    _check(heads, torch.tensor([0.125, 0.25], device="cuda"), 1)  # per-channel ties
    big = torch.tensor([0.0, -0.0, 1e4, -1e4, float("inf"), -float("inf"), 127.49, 127.5, -128.5, 3.0], device="cuda")
    for bits in (8, 4):
        _check(big.to(dt), torch.tensor(1.0, device="cuda"), bits=bits)
        _check(big[2:].to(dt), torch.tensor(1e-30, device="cuda"), bits=bits)  # inv = inf (no 0 * inf: NaN)
        if dt == torch.float32:
            _check(torch.tensor([3e38, -3e38], device="cuda"), torch.tensor(1e-3, device="cuda"), bits=bits)


def test_in_cuda_graph_and_without_host_sync():
    """No host sync and no value-dependent launch: captured once, replayed with new inputs and scales (read on the
    device at replay), through the wrapper, the dispatcher and QuantPoint.codes (what every decode step calls)."""
    x = _x((8, 5376), torch.float16)
    xh = _x((8, 1, 80, 64), torch.bfloat16, seed=3)
    s, sh = _per_tensor_scale(x), _per_channel_scale(xh, -2)
    point = QuantPoint("t.x", QuantSpec(granularity=PerChannel(-2)), 80)
    point.to("cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (builds / loads the kernels)
        kquant.quantize_int8(x, s)
        point.codes(xh, sh.reshape(1, 1, 80, 1), "auto")
    torch.cuda.current_stream().wait_stream(stream)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        kquant.quantize_int8(x, s)
        quantize_int8(xh, sh, -2, 4, backend="cuda")
        point.codes(xh, sh.reshape(1, 1, 80, 1), "auto")
    finally:
        torch.cuda.set_sync_debug_mode(0)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        q1 = kquant.quantize_int8(x, s)
        q2 = quantize_int8(xh, sh, -2, 4, backend="cuda")
        q3 = point.codes(xh, sh.reshape(1, 1, 80, 1), "auto")
    x.copy_(_x((8, 5376), torch.float16, seed=11))
    xh.copy_(_x((8, 1, 80, 64), torch.bfloat16, seed=12))
    s.fill_(0.05)
    sh.mul_(0.7)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(q1, quantize_int8_ref(x, s))
    assert torch.equal(q2, quantize_int8_ref(xh, sh, -2, 4))
    assert torch.equal(q3, quantize_int8_ref(xh, sh, -2, 8))


def test_dispatch_and_quant_point_use_the_kernel(monkeypatch):
    calls = []
    real = kquant.quantize_int8

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(kquant, "quantize_int8", spy)
    x = _x((2, 33, 80, 64), torch.bfloat16)
    s = _per_tensor_scale(x)
    assert torch.equal(quantize_int8(x, s), quantize_int8_ref(x, s))  # "auto" on a GPU: the kernel
    assert len(calls) == 1
    assert torch.equal(quantize_int8(x, s, backend="torch"), quantize_int8_ref(x, s))
    assert len(calls) == 1
    for gran, channels in ((PerTensor(), 64), (PerChannel(-2), 80), (PerChannel(-1), 64), (PerGroup(16, -2), 80)):
        p = QuantPoint("t.x", QuantSpec(granularity=gran), channels).to("cuda")
        with torch.no_grad():
            p.scale.copy_((0.05 + torch.rand(p.scale.shape, device="cuda")) * 0.3)
            p.ready.fill_(True)
        q_k, s_k = p.quantize(x, backend="cuda")
        q_t, s_t = p.quantize(x)  # "torch": numerics.quantize
        assert torch.equal(q_k, q_t) and torch.equal(s_k, s_t)
    assert len(calls) == 5


def test_arguments_are_checked_in_python():
    """Bad arguments raise Python errors from the wrapper's checks before the op runs (a C++ check firing inside the
    extension can end the process on some images); scales of other dtypes / devices are converted."""
    x = _x((4, 64), torch.float16)
    with pytest.raises(TypeError, match="x must be float32, float16 or bfloat16"):
        kquant.quantize_int8(x.double(), torch.tensor(0.1, device="cuda"))
    with pytest.raises(ValueError, match=r"x.shape\[-1\] = 64"):
        kquant.quantize_int8(x, torch.ones(63, device="cuda"))
    with pytest.raises(ValueError, match="axis=2 is out of range"):
        kquant.quantize_int8(x, torch.ones(64, device="cuda"), 2)
    with pytest.raises(ValueError, match="bits must be an int in 2..8"):
        kquant.quantize_int8(x, torch.tensor(0.1, device="cuda"), -1, 9)
    with pytest.raises(RuntimeError, match="x must be a CUDA tensor"):
        kquant.quantize_int8(x.cpu(), torch.tensor(0.1))
    s = torch.tensor(0.0371)
    _check(x, s)  # a CPU scale is moved to the GPU
    _check(x, s.half().cuda())  # an fp16 scale is cast as .float() casts it
    _check(x, 0.0371)  # a Python number


def test_more_than_2_31_elements():
    """The 64-bit index path: 2**31 + 4096 elements, read from one broadcast row (stride 0), per-tensor and per
    channel; about 5 GB of GPU memory."""
    if torch.cuda.mem_get_info()[0] < 12 * 2 ** 30:
        pytest.skip("needs ~12 GB of free GPU memory")
    row = _x((1, 4096), torch.float16)
    x = row.expand(2 ** 19 + 1, 4096)
    assert x.numel() > 2 ** 31
    for scale, axis in ((_per_tensor_scale(row), -1), (_per_channel_scale(row, -1), -1)):
        q = kquant.quantize_int8(x, scale, axis)
        assert q.shape == x.shape and q.is_contiguous()
        first = quantize_int8_ref(row, scale, axis)
        assert torch.equal(q[:1], first) and torch.equal(q[-1:], first)
        assert bool((q == first).all())
        del q
