"""On a CUDA GPU: the int8 causal conv1d kernels (csrc/conv1d/conv1d_int8.cu) — prefill and one-token update —
against ``conv1d_int8_ref`` / ``conv1d_int8_update_ref`` run on the same GPU, at the conv shapes of mamba-130m
(D = d_inner 1536), mamba-2.8b (D = 5120) and mamba2-2.7b (D = conv_dim 5376), with x the strided slice of the
in_proj output each model passes (Mamba1: x of [x, z], Mamba2: xBC of [z, xBC, dt]); L in 1, 33, 1024, 2048 and
batch 1 and 8 (all 24 combinations: the largest, 8 x 2048 x 5376, needs about 3 GB for the reference).

Tolerances. int8 outputs: >= 99.9 % identical codes and never more than 1 LSB apart (DESIGN §3). Float outputs:
|out - ref| <= eps(dtype) * (|ref| + max |ref|) (1 ULP of the element, or of the largest output where bias and
product cancel). The kernels are designed to be bit-exact (integer sums, then the reference's fp32 ops in the same
order with no FMA contraction, torch's CUDA SiLU formula): ``test_outputs_are_bit_exact`` checks that claim alone,
so a failure there alone means a 1-ULP epilogue difference, not wrong sums. The update and the state are compared
exactly; prefill-then-update against a longer prefill (both kernels) is exact by construction.
"""

import pytest
import torch

from qmamba.kernels import conv1d as kconv
from qmamba.ops.int8_conv1d import (conv1d_int8, conv1d_int8_initial_state, conv1d_int8_ref, conv1d_int8_update,
                                    conv1d_int8_update_ref)

pytestmark = pytest.mark.gpu

# D (conv channels), width of the in_proj output, offset of the conv input in it
MODELS = {
    "mamba-130m": (1536, 2 * 1536, 0),
    "mamba-2.8b": (5120, 2 * 5120, 0),
    "mamba2-2.7b": (5376, 10576, 5120),  # [z 5120, xBC 5376 = 5120 + 2 * 128, dt 80]
}
LENGTHS = [1, 33, 1024, 2048]


def _inputs(model, B, L, K=4, per_channel=True, with_bias=True, seed=0):
    """x as the model passes it: (B, D, L) view of the in_proj output (B, L, width), strides (L*width, 1, width).
    Realistic scales: acc ~ 1e4, s_x * s_w ~ 6e-5 -> outputs of order 1, as conv activations."""
    D, width, off = MODELS[model]
    g = torch.Generator(device="cuda").manual_seed(seed)
    proj = torch.randint(-128, 128, (B, L, width), dtype=torch.int8, device="cuda", generator=g)
    qx = proj[..., off:off + D].transpose(1, 2)
    qw = torch.randint(-128, 128, (D, 1, K), dtype=torch.int8, device="cuda", generator=g)
    sx = torch.tensor(0.02, device="cuda")
    sw = ((torch.rand(D, device="cuda", generator=g) + 0.5) * 0.003 if per_channel
          else torch.tensor(0.003, device="cuda"))
    bias = torch.randn(D, device="cuda", generator=g) * 0.3 if with_bias else None
    return qx, sx, qw, sw, bias


def _out_scales(qx, sx, qw, sw, bias, silu=True):
    """Two consumers' scales, as after QAT: min-max of the output, and a tighter one that clamps (percentile)."""
    y = conv1d_int8_ref(qx, sx, qw, sw, bias, silu, torch.float32)
    s = (y.abs().amax() / 127).clamp_min(1e-6)
    return [s, s * 0.6]


def assert_float_close(out, ref):
    assert out.dtype == ref.dtype and out.shape == ref.shape
    o, r = out.float(), ref.float()
    assert torch.isfinite(o).all()
    eps = torch.finfo(ref.dtype).eps
    bad = (o - r).abs() > eps * (r.abs() + r.abs().max())
    assert not bad.any(), f"{int(bad.sum())} of {bad.numel()} beyond 1 ULP; max |diff| {float((o - r).abs().max())}"


def assert_codes_agree(q, ref):
    assert q.dtype == torch.int8 and q.shape == ref.shape
    d = (q.int() - ref.int()).abs()
    assert int(d.max()) <= 1, f"codes up to {int(d.max())} LSB apart"
    same = float((d == 0).float().mean())
    assert same >= 0.999, f"only {same:.5%} identical codes"


def assert_channel_last(t):
    """(B, D, L) stored as a contiguous (B, L, D): strides (L * D, 1, D) (size-1 dims may carry any stride)."""
    assert t.transpose(1, 2).is_contiguous(), f"expected channel-last (B, D, L), got strides {t.stride()}"


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("model", list(MODELS))
def test_prefill_matches_ref(model, L, B):
    qx, sx, qw, sw, bias = _inputs(model, B, L)
    out = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16)
    assert_channel_last(out)
    assert_float_close(out, conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.float16))
    del out
    scales = _out_scales(qx, sx, qw, sw, bias)
    codes = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, scales)
    refs = conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.float16, scales)
    assert len(codes) == 2
    for c, r in zip(codes, refs):
        assert_channel_last(c)
        assert_codes_agree(c, r)
    assert int((refs[1] == 127).sum() + (refs[1] == -128).sum()) > 0  # the tight scale clamps


@pytest.mark.parametrize("K", [2, 3, 4])
@pytest.mark.parametrize("bias_silu", [(True, True), (False, False), (True, False)], ids=str)
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_prefill_options(out_dtype, per_channel, bias_silu, K):
    with_bias, silu = bias_silu
    qx, sx, qw, sw, bias = _inputs("mamba-130m", 2, 33, K=K, per_channel=per_channel, with_bias=with_bias)
    assert_float_close(kconv.conv1d_int8(qx, sx, qw, sw, bias, silu, out_dtype),
                       conv1d_int8_ref(qx, sx, qw, sw, bias, silu, out_dtype))
    scales = _out_scales(qx, sx, qw, sw, bias, silu)
    for c, r in zip(kconv.conv1d_int8(qx, sx, qw, sw, bias, silu, out_dtype, scales),
                    conv1d_int8_ref(qx, sx, qw, sw, bias, silu, out_dtype, scales)):
        assert_codes_agree(c, r)


def _layout(name, B, D, L, g):
    """x (B, D, L) int8 in layouts that take the kernel's other load paths."""
    if name == "contiguous":  # channel stride L: one channel per thread
        return torch.randint(-128, 128, (B, D, L), dtype=torch.int8, device="cuda", generator=g)
    if name == "channel_last":  # strides (L*D, 1, D): four channels per thread
        return torch.randint(-128, 128, (B, L, D), dtype=torch.int8, device="cuda", generator=g).transpose(1, 2)
    if name == "misaligned":  # channel stride 1 but the base is not 4-byte aligned
        return torch.randint(-128, 128, (B, L, D + 1), dtype=torch.int8, device="cuda",
                             generator=g)[..., 1:].transpose(1, 2)
    if name == "odd_channels":  # D not a multiple of 4
        return torch.randint(-128, 128, (B, L, D - 2), dtype=torch.int8, device="cuda", generator=g).transpose(1, 2)
    raise ValueError(name)


@pytest.mark.parametrize("L", [1, 7, 300])
@pytest.mark.parametrize("layout", ["contiguous", "channel_last", "misaligned", "odd_channels"])
def test_prefill_layouts(layout, L):
    g = torch.Generator(device="cuda").manual_seed(1)
    qx = _layout(layout, 3, 520, L, g)
    D = qx.shape[1]
    qw = torch.randint(-128, 128, (D, 4), dtype=torch.int8, device="cuda", generator=g)
    sx, sw = torch.tensor(0.02, device="cuda"), torch.full((D,), 0.003, device="cuda")
    bias = torch.randn(D, device="cuda", generator=g)
    out = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.bfloat16)
    assert_channel_last(out)
    assert_float_close(out, conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.bfloat16))


@pytest.mark.parametrize("n_outs", [1, 3, 4])
def test_prefill_many_consumers(n_outs):
    qx, sx, qw, sw, bias = _inputs("mamba-130m", 1, 100)
    base = _out_scales(qx, sx, qw, sw, bias)[0]
    scales = [base * (0.5 + 0.25 * i) for i in range(n_outs)]
    codes = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float32, scales)
    refs = conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.float32, scales)
    assert len(codes) == n_outs
    for c, r in zip(codes, refs):
        assert_codes_agree(c, r)


def test_outputs_are_bit_exact():
    """The design claim behind the tolerances: the epilogue reproduces the reference's fp32 ops exactly."""
    for model in MODELS:
        qx, sx, qw, sw, bias = _inputs(model, 2, 257)
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            assert torch.equal(kconv.conv1d_int8(qx, sx, qw, sw, bias, True, dtype),
                               conv1d_int8_ref(qx, sx, qw, sw, bias, True, dtype)), f"{model} {dtype}"
        scales = _out_scales(qx, sx, qw, sw, bias)
        for c, r in zip(kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.bfloat16, scales),
                        conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.bfloat16, scales)):
            assert torch.equal(c, r), f"{model} codes"


def test_conv_silu_is_exact():
    """The prefill epilogue's SiLU skips the IEEE division's per-element slow-path branch (csrc ``silu_fast``: the
    division's fast path where it rounds correctly, the IEEE ``silu`` elsewhere). Claim: it equals torch's fp32 SiLU
    bit for bit on every fp32 bit pattern (NaN gives NaN)."""
    chunk = 1 << 28
    bad, examples = 0, []
    for start in range(-(1 << 31), 1 << 31, chunk):
        x = torch.arange(start, start + chunk, dtype=torch.int32, device="cuda").view(torch.float32)
        got, want = kconv.conv1d_silu(x), torch.nn.functional.silu(x)
        same = (got.view(torch.int32) == want.view(torch.int32)) | (got.isnan() & want.isnan())
        n = int((~same).sum())
        if n:
            bad += n
            idx = (~same).nonzero()[:3, 0]
            examples += [(float(x[i]), float(got[i]), float(want[i])) for i in idx]
        del x, got, want, same
    assert bad == 0, f"{bad} fp32 values differ from torch's SiLU, e.g. (x, kernel, torch): {examples[:6]}"


def _update_inputs(model, B, K=4, seed=3):
    D, width, off = MODELS[model]
    qx, sx, qw, sw, bias = _inputs(model, B, 1, K=K, seed=seed)
    g = torch.Generator(device="cuda").manual_seed(seed + 1)
    x = torch.randint(-128, 128, (B, width), dtype=torch.int8, device="cuda", generator=g)[:, off:off + D]
    state = torch.randint(-128, 128, (B, D, K), dtype=torch.int8, device="cuda", generator=g)
    return x, state, sx, qw, sw, bias


@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("model", list(MODELS))
def test_update_matches_ref(model, B):
    x, state, sx, qw, sw, bias = _update_inputs(model, B)
    scales = [torch.tensor(0.01, device="cuda"), torch.tensor(0.006, device="cuda")]
    for out_scales in ([], scales):
        k_state, r_state = state.clone(), state.clone()
        out = kconv.conv1d_int8_update(x, k_state, sx, qw, sw, bias, True, torch.float16, out_scales)
        ref = conv1d_int8_update_ref(x, r_state, sx, qw, sw, bias, True, torch.float16, out_scales)
        assert torch.equal(k_state, r_state)
        if out_scales:
            assert len(out) == 2
            for c, r in zip(out, ref):
                assert_codes_agree(c, r)
        else:
            assert out.shape == (B, x.shape[1])
            assert_float_close(out, ref)


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("state_layout", ["slice", "transposed"])
def test_update_strided_state_and_options(state_layout, K):
    B, D = 4, 1536
    x, _, sx, qw, sw, bias = _update_inputs("mamba-130m", B, K=K)
    g = torch.Generator(device="cuda").manual_seed(7)
    if state_layout == "slice":
        state = torch.randint(-128, 128, (B, D, K + 3), dtype=torch.int8, device="cuda", generator=g)[..., 1:K + 1]
    else:
        state = torch.randint(-128, 128, (B, K, D), dtype=torch.int8, device="cuda", generator=g).transpose(1, 2)
    ref_state = state.clone()
    for dtype, silu, b in ((torch.float32, False, None), (torch.bfloat16, True, bias)):
        out = kconv.conv1d_int8_update(x, state, sx, qw, sw.mean().reshape(1), b, silu, dtype)
        ref = conv1d_int8_update_ref(x, ref_state, sx, qw, sw.mean().reshape(1), b, silu, dtype)
        assert torch.equal(state, ref_state)
        assert_float_close(out, ref)


@pytest.mark.parametrize("model", list(MODELS))
def test_prefill_then_update_equals_longer_prefill(model):
    """The kernels' decode contract: prefill L0 tokens, build the state from their codes, update token by token:
    every output equals the prefill of the whole sequence at that step, exactly."""
    L0, n = 33, 6
    qx, sx, qw, sw, bias = _inputs(model, 2, L0 + n)
    scales = _out_scales(qx, sx, qw, sw, bias)
    full = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.bfloat16)
    full_codes = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.bfloat16, scales)
    state = conv1d_int8_initial_state(qx[..., :L0], 4)
    state_codes = state.clone()
    for t in range(L0, L0 + n):
        out = kconv.conv1d_int8_update(qx[..., t], state, sx, qw, sw, bias, True, torch.bfloat16)
        codes = kconv.conv1d_int8_update(qx[..., t], state_codes, sx, qw, sw, bias, True, torch.bfloat16, scales)
        assert torch.equal(out, full[..., t])
        assert all(torch.equal(c, f[..., t]) for c, f in zip(codes, full_codes))
    assert torch.equal(state, conv1d_int8_initial_state(qx, 4))


def test_dispatch_uses_the_kernel_on_cuda():
    qx, sx, qw, sw, bias = _inputs("mamba-130m", 2, 40)
    out = conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16)  # backend "auto"
    assert_channel_last(out)  # the reference would return x's layout
    assert torch.equal(out, conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.float16))
    state = conv1d_int8_initial_state(qx, 4)
    ref_state = state.clone()
    out = conv1d_int8_update(qx[..., 0], state, sx, qw, sw, bias, backend="cuda")
    assert torch.equal(out, conv1d_int8_update_ref(qx[..., 0], ref_state, sx, qw, sw, bias))
    assert torch.equal(state, ref_state)


def test_in_cuda_graph():
    """No host sync and no value-dependent launch: both kernels replay in a CUDA graph with new inputs and scales."""
    qx, sx, qw, sw, bias = _inputs("mamba-2.8b", 1, 33)
    x, state, *_ = _update_inputs("mamba-2.8b", 1)
    os_ = [torch.tensor(0.01, device="cuda")]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up (builds / loads the kernels)
        kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, os_)
        kconv.conv1d_int8_update(x, state.clone(), sx, qw, sw, bias, True, torch.float16, os_)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        (prefill_codes,) = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, os_)
        (step_codes,) = kconv.conv1d_int8_update(x, state, sx, qw, sw, bias, True, torch.float16, os_)
    qx.copy_(torch.randint_like(qx, -128, 128))
    x.copy_(torch.randint_like(x, -128, 128))
    state.copy_(torch.randint_like(state, -128, 128))
    ref_state = state.clone()
    sx.fill_(0.025)  # scales are read on the device at replay, not baked in at capture
    os_[0].fill_(0.012)
    graph.replay()
    torch.cuda.synchronize()
    assert_codes_agree(prefill_codes, conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.float16, os_)[0])
    assert_codes_agree(step_codes, conv1d_int8_update_ref(x, ref_state, sx, qw, sw, bias, True, torch.float16,
                                                          os_)[0])
    assert torch.equal(state, ref_state)


def test_kernel_errors_name_the_fix():
    """Bad arguments are caught by the wrappers' Python checks (kconv.check_conv1d_args / check_conv1d_update_args),
    before the op is called: a C++ TORCH_CHECK firing inside the extension is a backstop only, never reached here."""
    qx, sx, qw, sw, bias = _inputs("mamba-130m", 1, 8, K=4)
    D = qx.shape[1]
    qw5 = torch.randint(-128, 128, (D, 5), dtype=torch.int8, device="cuda")
    with pytest.raises(ValueError, match="K = 5"):
        kconv.conv1d_int8(qx, sx, qw5, sw, bias)
    with pytest.raises(ValueError, match="out_dtype"):
        kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.int32)
    with pytest.raises(ValueError, match="at most 4"):
        kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, [sx] * 5)
    with pytest.raises(ValueError, match="conv_state"):
        kconv.conv1d_int8_update(qx[..., 0], torch.zeros(1, D, 3, dtype=torch.int8, device="cuda"), sx, qw, sw, bias)
    with pytest.raises(TypeError, match="conv_state must be int8"):
        kconv.conv1d_int8_update(qx[..., 0], torch.zeros(1, D, 4, device="cuda"), sx, qw, sw, bias)
    with pytest.raises(TypeError, match="x must be int8"):
        kconv.conv1d_int8(qx.float(), sx, qw, sw, bias)
    with pytest.raises(ValueError, match="bias must have D"):
        kconv.conv1d_int8(qx, sx, qw, sw, bias[:-1])
    with pytest.raises(ValueError, match=r"\(D, K\) or \(D, 1, K\)"):
        kconv.conv1d_int8(qx, sx, qw.reshape(D // 2, 2, 4), sw, bias)
    # devices: qx must be on the GPU (the other tensors are moved to it), and the in-place state must be there too
    with pytest.raises(RuntimeError, match="must be a CUDA tensor"):
        kconv.conv1d_int8(qx.cpu(), sx, qw, sw, bias)
    with pytest.raises(RuntimeError, match="conv_state is on cpu"):
        kconv.conv1d_int8_update(qx[..., 0], torch.zeros(1, D, 4, dtype=torch.int8), sx, qw, sw, bias)


# ---- in_proj's W8A8 GEMV with the update fused (csrc/linear/gemv_int8.cu w8a8_gemv_conv_update) -------------------
# (d_model, d_inner) of the Mamba1 models: in_proj d_model -> 2 * d_inner, the conv on the first d_inner columns
FUSED_MODELS = {"mamba-130m": (768, 1536), "mamba-2.8b": (2560, 5120)}


def _fused_inputs(model, B, out_dtype, per_channel=True, with_bias=True, dual=None, seed=0):
    """in_proj's GEMV inputs (GemvInputs) with realistic scales (in_proj outputs of order 1, conv outputs too), a
    random conv state, the conv's weight / scales / bias, two consumer scales (the second dual-scale if ``dual``)."""
    from qmamba.ops.int8_linear import GemvInputs
    from qmamba.quant.dual_scale import DualScale

    d_model, D = FUSED_MODELS[model]
    g = torch.Generator(device="cuda").manual_seed(seed)
    i8 = lambda *s: torch.randint(-128, 128, s, dtype=torch.int8, device="cuda", generator=g)  # noqa: E731
    rand = lambda *s: torch.rand(*s, device="cuda", generator=g)  # noqa: E731
    N = 2 * D
    w_scale = (rand(N) + 0.5) * 1e-4 if per_channel else torch.tensor([1e-4], device="cuda")
    proj = GemvInputs(i8(B, d_model), torch.tensor(0.02, device="cuda"), i8(N, d_model), w_scale,
                      rand(N) - 0.5 if with_bias else None,
                      [torch.tensor(0.03, device="cuda"), torch.tensor(0.025, device="cuda")], [D, D])
    conv_w = i8(D, 4)
    conv_ws = (rand(D) + 0.5) * 1e-2 if per_channel else torch.tensor([1e-2], device="cuda")
    conv_bias = rand(D) - 0.5 if with_bias else None
    out_scales = [torch.tensor(0.02, device="cuda"), torch.tensor(0.015, device="cuda")]
    duals = [] if dual is None else [None, DualScale(torch.tensor(0.1, device="cuda"), dual)]
    return proj, i8(B, D, 4), conv_w, conv_ws, conv_bias, out_scales, duals


def _two_kernels(proj, state, conv_w, conv_ws, conv_bias, out_dtype, out_scales, duals):
    """The w8a8_gemv kernel, then the conv1d_int8_update kernel on its first segment."""
    from qmamba.kernels import linear as klinear

    codes = klinear.w8a8_gemv(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, out_dtype,
                              proj.out_scale, proj.out_columns)
    D = proj.out_columns[0]
    return codes, kconv.conv1d_int8_update(codes[:, :D], state, proj.out_scale[0], conv_w, conv_ws, conv_bias, True,
                                           out_dtype, out_scales, duals)


def _fused_flat(result) -> list:
    codes, conv = result
    if isinstance(conv, tuple):
        conv = list(conv[0]) + [m for m in conv[1] if m is not None]
    return [codes, *(conv if isinstance(conv, list) else [conv])]


@pytest.mark.parametrize("dual", [None, "mask", "piecewise"])
@pytest.mark.parametrize("per_channel", [False, True], ids=["per-tensor", "per-channel"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("model", list(FUSED_MODELS))
def test_gemv_with_fused_update_equals_the_two_kernels(model, B, out_dtype, per_channel, dual):
    """The fused kernel == w8a8_gemv then conv1d_int8_update, bit for bit: in_proj's codes (both segments), the
    conv's codes (and a dual-scale consumer's codes and flags) and the state; and == the CPU-side reference run on the
    GPU (the same math, torch ops)."""
    from qmamba.ops.int8_conv1d import w8a8_gemv_conv1d_update_ref

    proj, state, conv_w, conv_ws, conv_bias, out_scales, duals = _fused_inputs(model, B, out_dtype, per_channel,
                                                                               dual=dual)
    s_two, s_ref = state.clone(), state.clone()
    for step in range(3):  # a few steps: the shifted state feeds the next
        fused = _fused_flat(kconv.w8a8_gemv_conv_update(proj, state, conv_w, conv_ws, conv_bias, True, out_dtype,
                                                        out_scales, duals))
        two = _fused_flat(_two_kernels(proj, s_two, conv_w, conv_ws, conv_bias, out_dtype, out_scales, duals))
        ref = _fused_flat(w8a8_gemv_conv1d_update_ref(proj, s_ref, conv_w, conv_ws, conv_bias, True, out_dtype,
                                                      out_scales, duals))
        assert len(fused) == len(two) == len(ref)
        for a, b, c in zip(fused, two, ref):
            assert torch.equal(a, b) and torch.equal(a, c), step
        assert torch.equal(state, s_two) and torch.equal(state, s_ref), step
        proj = proj._replace(q=torch.roll(proj.q, 1, dims=-1))


def test_gemv_with_fused_update_without_bias_and_float_output():
    proj, state, conv_w, conv_ws, _, _, _ = _fused_inputs("mamba-130m", 4, torch.float16, with_bias=False)
    s_two = state.clone()
    fused = _fused_flat(kconv.w8a8_gemv_conv_update(proj, state, conv_w, conv_ws, None, True, torch.float16))
    two = _fused_flat(_two_kernels(proj, s_two, conv_w, conv_ws, None, torch.float16, [], []))
    assert all(torch.equal(a, b) for a, b in zip(fused, two))
    assert torch.equal(state, s_two)


@pytest.mark.parametrize("model", list(FUSED_MODELS))
def test_gemv_with_fused_update_in_cuda_graph(model):
    """Captured in a CUDA graph, replays advance the state and give the two kernels' results, bit for bit."""
    proj, state, conv_w, conv_ws, conv_bias, out_scales, _ = _fused_inputs(model, 8, torch.float16)
    s_two = state.clone()
    args = lambda s: (proj, s, conv_w, conv_ws, conv_bias, True, torch.float16, out_scales)  # noqa: E731
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    warm = state.clone()
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graphs asks
        kconv.w8a8_gemv_conv_update(*args(warm))
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = kconv.w8a8_gemv_conv_update(*args(state))
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        two = _two_kernels(*args(s_two)[:5], torch.float16, out_scales, [])
        assert all(torch.equal(a, b) for a, b in zip(_fused_flat(out), _fused_flat(two)))
        assert torch.equal(state, s_two)


def test_gemv_with_fused_update_errors():
    proj, state, conv_w, conv_ws, conv_bias, out_scales, _ = _fused_inputs("mamba-130m", 2, torch.float16)
    with pytest.raises(ValueError, match=r"conv_state must be int8 codes \(M, D, K\)"):
        kconv.w8a8_gemv_conv_update(proj, state[:1], conv_w, conv_ws, conv_bias, True, torch.float16, out_scales)
    with pytest.raises(RuntimeError, match="conv_state is on cpu"):
        kconv.w8a8_gemv_conv_update(proj, state.cpu(), conv_w, conv_ws, conv_bias, True, torch.float16, out_scales)
    # the op itself: the conv's columns must be the first segment
    from qmamba.kernels import linear as klinear

    x, xs, w, ws, b, scales, bounds = klinear.gemv_op_args(proj.q, proj.scale, proj.weight, proj.weight_scale,
                                                           proj.bias, proj.out_scale, proj.out_columns)
    with pytest.raises(RuntimeError, match="conv_columns .* must be the column count of the first out_scale segment"):
        torch.ops.qmamba.w8a8_gemv_conv_update(x, xs, w, ws, b, torch.float16, scales, bounds, 100, state, conv_w,
                                               conv_ws, conv_bias, True, out_scales, -1, 0, 0, None)
