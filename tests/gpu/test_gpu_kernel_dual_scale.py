"""On a CUDA GPU: dual-scale SSM input (issue 5) in the Mamba1 CUDA kernels — the conv1d kernel emitting u in the
dual encoding (codes + packed flags for "mask", codes above the knee for "piecewise"), and the selective scan reading
it (prefill and one-token update) — against the references in ``qmamba.ops`` (``conv1d_int8_ref`` with
``out_duals``, ``selective_scan_int8_ref`` with ``u_dual``), which are the ``torch`` int8 backend.

Shapes: the conv / scan shapes of mamba-130m (d_inner 1536) and mamba-2.8b (d_inner 5120), d_state 16, L in 1, 33,
1024, 2048, batch 1 and 8, both encodings, u with real outliers (about 0.5 % beyond the inlier range).

Tolerances. int8 outputs (codes): >= 99.9 % identical and never more than 1 LSB apart where the flags agree; flags
(mask encoding) >= 99.9 % identical (DESIGN §3; the kernels are designed bit-exact: ``test_dual_outputs_are_bit_exact``
checks that claim alone). Float outputs (the scan's y and state): as tests/gpu/test_gpu_kernel_selective_scan.py,
|got - want| <= RTOL * |want| + 1e-4 * max |want|, RTOL 1e-3 (fp32) / 4e-3 (fp16). The decoded u itself is compared
exactly (``test_scan_decodes_u_exactly``: with C = 0, D = 1 and no gate, y is u rounded through the output dtype).
"""

import pytest
import torch
import torch.nn.functional as F

from qmamba.kernels import conv1d as kconv
from qmamba.ops.int8_conv1d import conv1d_int8_ref, conv1d_int8_update_ref
from qmamba.ops.int8_selective_scan import selective_scan_int8, selective_scan_int8_ref, selective_scan_int8_update_ref
from qmamba.quant.dual_scale import DualScale, dequantize_codes, dual_quantize, unpack_mask
from qmamba.quant.numerics import quantize

pytestmark = pytest.mark.gpu

MODELS = {"mamba-130m": 1536, "mamba-2.8b": 5120}  # d_inner
LENGTHS = [1, 33, 1024, 2048]
ENCODINGS = ["mask", "piecewise"]
KNEE = 112
NSTATE = 16
RTOL = {torch.float32: 1e-3, torch.float16: 4e-3}
ATOL_FRAC = 1e-4


@pytest.fixture(scope="module")
def kernel():
    from qmamba import kernels
    from qmamba.kernels import selective_scan

    kernels.load()
    return selective_scan


def _dual_scales(v: torch.Tensor, encoding: str, alpha: float = 0.995):
    """(s_in, DualScale) as the DualScaleObserver sets them: threshold T = the alpha quantile of |v|, outlier range
    A = max |v| (mask: s_in = T / 127, s_out = A / 127; piecewise: s_in = T / knee, s_out = (A - T) / (127 - knee))."""
    a = v.detach().float().abs().flatten()
    a = a[torch.randperm(a.numel(), device=a.device)[:1 << 20]]  # quantile() is limited to 2^24 elements
    T, A = torch.quantile(a, alpha).clamp_min(1e-6), v.detach().float().abs().max()
    if encoding == "mask":
        s_in, s_out = T / 127, A / 127
    else:
        s_in, s_out = T / KNEE, ((A - T) / (127 - KNEE)).clamp_min(1e-6)
    return s_in.reshape(()), DualScale(s_out.reshape(()).float(), encoding, KNEE)


def _assert_codes_agree(q, ref, flags=None, ref_flags=None):
    assert q.dtype == torch.int8 and q.shape == ref.shape
    agree = torch.ones_like(q, dtype=torch.bool) if flags is None else flags == ref_flags
    if flags is not None:
        assert float(agree.float().mean()) >= 0.999, f"only {float(agree.float().mean()):.5%} identical flags"
    d = (q.int() - ref.int()).abs()
    assert int(d[agree].max()) <= 1, f"codes up to {int(d[agree].max())} LSB apart"
    same = float(((d == 0) & agree).float().mean())
    assert same >= 0.999, f"only {same:.5%} identical codes"


def _assert_close(got, want, rtol, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs()
    bad = err > rtol * want.abs() + ATOL_FRAC * want.abs().max()
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} out of tolerance, max abs error "
                           f"{err.max().item():.3g}, max |want| {want.abs().max().item():.3g}")


# ---- conv1d emitting the encoding ----------------------------------------------------------------------------------
def _conv_inputs(D, B, L, seed=0):
    """x as Mamba1 passes it (a (B, D, L) view of the in_proj output (B, L, 2D)); weights and scales that give
    outputs of order 1 with a heavy tail (some channels' weights 8x larger: the outlier channels)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    proj = torch.randint(-128, 128, (B, L, 2 * D), dtype=torch.int8, device="cuda", generator=g)
    qx = proj[..., :D].transpose(1, 2)
    qw = torch.randint(-16, 17, (D, 1, 4), dtype=torch.int8, device="cuda", generator=g)
    hot = torch.rand(D, device="cuda", generator=g) < 0.01
    qw[hot] = torch.randint(-128, 128, (int(hot.sum()), 1, 4), dtype=torch.int8, device="cuda", generator=g)
    sx = torch.tensor(0.02, device="cuda")
    sw = (torch.rand(D, device="cuda", generator=g) + 0.5) * 0.003
    bias = torch.randn(D, device="cuda", generator=g) * 0.3
    return qx, sx, qw, sw, bias


def _conv_out_scales(qx, sx, qw, sw, bias, encoding):
    y = conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.float16)
    s_x_proj = (y.float().abs().amax() / 127).clamp_min(1e-6)  # the single-scale consumer (x_proj.input)
    s_in, dual = _dual_scales(y, encoding)
    return [s_x_proj, s_in], [None, dual]


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("model", list(MODELS))
def test_conv_prefill_emits_the_encoding(model, L, B, encoding):
    qx, sx, qw, sw, bias = _conv_inputs(MODELS[model], B, L)
    scales, duals = _conv_out_scales(qx, sx, qw, sw, bias, encoding)
    (c0, cu), (m0, mu) = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, scales, duals)
    (r0, ru), (_, rmu) = conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.float16, scales, duals)
    assert m0 is None
    _assert_codes_agree(c0, r0)
    if encoding == "mask":
        assert mu.dtype == torch.uint8 and mu.shape == (B, MODELS[model], (L + 7) // 8)
        flags, ref_flags = unpack_mask(mu.contiguous(), L), unpack_mask(rmu, L)
        _assert_codes_agree(cu, ru, flags, ref_flags)
    else:
        assert mu is None
        _assert_codes_agree(cu, ru)
    if L >= 33:  # the test data has outliers, so the outlier branch of the encoding ran
        n_out = int(rmu.ne(0).sum()) if encoding == "mask" else int((ru.int().abs() > KNEE).sum())
        assert n_out > 0


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_dual_outputs_are_bit_exact(encoding):
    """The design claim behind the tolerances: dual_encode reproduces the reference's fp32 ops exactly."""
    for model, D in MODELS.items():
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            qx, sx, qw, sw, bias = _conv_inputs(D, 2, 257)
            scales, duals = _conv_out_scales(qx, sx, qw, sw, bias, encoding)
            got = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, dtype, scales, duals)
            want = conv1d_int8_ref(qx, sx, qw, sw, bias, True, dtype, scales, duals)
            for g, w in zip(got[0], want[0]):
                assert torch.equal(g, w), f"{model} {dtype} codes"
            if encoding == "mask":
                assert torch.equal(got[1][1], want[1][1]), f"{model} {dtype} mask"


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("B", [1, 8])
@pytest.mark.parametrize("model", list(MODELS))
def test_conv_update_emits_the_encoding(model, B, encoding):
    D = MODELS[model]
    qx, sx, qw, sw, bias = _conv_inputs(D, B, 64, seed=5)
    scales, duals = _conv_out_scales(qx, sx, qw, sw, bias, encoding)
    state = qx[..., -4:].contiguous()
    x = qx[..., 0].contiguous()
    ref_state = state.clone()
    (c0, cu), (_, mu) = kconv.conv1d_int8_update(x, state, sx, qw, sw, bias, True, torch.float16, scales, duals)
    (r0, ru), (_, rmu) = conv1d_int8_update_ref(x, ref_state, sx, qw, sw, bias, True, torch.float16, scales, duals)
    assert torch.equal(state, ref_state) and torch.equal(c0, r0) and torch.equal(cu, ru)
    if encoding == "mask":
        assert mu.shape == (B, D) and torch.equal(mu, rmu)
    else:
        assert mu is None


def test_conv_control_equals_single_scale():
    """mask encoding with s_out == s_in (the control group): the same codes as the single-scale output, outliers
    (clamped codes) included."""
    qx, sx, qw, sw, bias = _conv_inputs(1536, 2, 300)
    scales, _ = _conv_out_scales(qx, sx, qw, sw, bias, "mask")  # scales[1]: a percentile scale, which clamps
    single = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, scales)
    codes, masks = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, scales,
                                     [None, DualScale(scales[1].clone(), "mask")])
    assert torch.equal(codes[0], single[0]) and torch.equal(codes[1], single[1])
    assert int(masks[1].ne(0).sum()) > 0  # some elements took the outlier branch, and still match


# ---- the scan reading the encoding ---------------------------------------------------------------------------------
def _scan_inputs(batch, dim, L, encoding, n=NSTATE, seed=0, with_z=True):
    """Codes laid out as Mamba1's mixer passes them (channel-last views); u = silu of a heavy-tailed signal, in the
    dual encoding, its flags packed along L (dual_quantize's layout)."""
    g = torch.Generator(device="cuda").manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    def codes(x):
        s = (x.abs().max().float() / 127).clamp_min(1e-8)
        return quantize(x, s), s

    spikes = (torch.rand(batch, L, dim, generator=g, device="cuda") < 0.005) * 8 * rnd(batch, L, dim).abs()
    u = F.silu(2 * rnd(batch, L, dim) + spikes).transpose(1, 2)  # (b, d, L) channel-last view
    su, dual = _dual_scales(u, encoding)
    qu, mask = dual_quantize(u, su, dual.outlier_scale, encoding, KNEE)
    qdelta, sdelta = codes(1.5 * rnd(batch, L, dim) - 3.0)
    qz, sz = codes(rnd(batch, L, dim))
    qbc, sbc = codes(rnd(batch, L, 2 * n))
    qB, qC = (t.transpose(1, 2) for t in qbc.split([n, n], dim=-1))
    A = -torch.exp(torch.log(torch.arange(1, n + 1, device="cuda", dtype=torch.float32)).repeat(dim, 1)
                   + 0.1 * rnd(dim, n))
    D = 1.0 + 0.1 * rnd(dim)
    inp = dict(qu=qu, u_scale=su, qdelta=qdelta.transpose(1, 2), delta_scale=sdelta, A=A, qB=qB, B_scale=sbc, qC=qC,
               C_scale=sbc, D=D, qz=qz.transpose(1, 2) if with_z else None, z_scale=sz if with_z else None)
    return inp, dict(u_dual=dual, u_mask=mask)


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("L", LENGTHS)
@pytest.mark.parametrize("model", list(MODELS))
def test_scan_prefill_matches_reference(kernel, model, L, batch, encoding):
    inp, dual = _scan_inputs(batch, MODELS[model], L, encoding)
    with torch.no_grad():
        want, want_last = selective_scan_int8_ref(**inp, **dual, out_dtype=torch.float16, return_last_state=True)
    y, last = kernel.selective_scan_int8(**inp, **dual, out_dtype=torch.float16)
    _assert_close(y, want, RTOL[torch.float16], f"{model} L={L} b={batch} {encoding}: y")
    _assert_close(last, want_last, RTOL[torch.float32], f"{model} L={L} b={batch} {encoding}: last state")
    del want, want_last, y, last
    torch.cuda.empty_cache()


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_scan_decodes_u_exactly(kernel, encoding, out_dtype):
    """C = 0, D = 1, no gate: y = u as the kernel decodes it, which must be the reference's decode bit for bit."""
    inp, dual = _scan_inputs(2, 1536, 300, encoding, with_z=False)
    inp["qC"] = torch.zeros_like(inp["qC"])
    inp["D"] = torch.ones_like(inp["D"])
    y, _ = kernel.selective_scan_int8(**inp, **dual, out_dtype=out_dtype)
    u = dequantize_codes(inp["qu"], inp["u_scale"], dual["u_dual"], dual["u_mask"]).to(out_dtype)
    assert torch.equal(y, u)
    n_out = int(dual["u_mask"].ne(0).sum()) if encoding == "mask" else int((inp["qu"].abs() > KNEE).sum())
    assert n_out > 0  # outliers are there, so both branches of the decode ran


@pytest.mark.parametrize("encoding", ENCODINGS)
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", list(MODELS))
def test_scan_update_matches_reference(kernel, model, batch, encoding):
    dim = MODELS[model]
    inp, dual = _scan_inputs(batch, dim, 64, encoding, seed=3)
    t = 17
    step = {k: (v[..., t] if k in ("qu", "qdelta", "qz", "qB", "qC") else v) for k, v in inp.items()}
    flags = unpack_mask(dual["u_mask"], 64)[..., t] if encoding == "mask" else None
    step_dual = dict(u_dual=dual["u_dual"], u_mask=None if flags is None else flags.to(torch.uint8))
    state = 0.5 * torch.randn(batch, dim, NSTATE, device="cuda")
    want_state = state.clone()
    want = selective_scan_int8_update_ref(want_state, **step, **step_dual, out_dtype=torch.float16)
    got = kernel.selective_scan_int8_update(state, **step, **step_dual, out_dtype=torch.float16)
    _assert_close(got, want, RTOL[torch.float16], "update: y")
    _assert_close(state, want_state, RTOL[torch.float32], "update: state")


def test_scan_control_equals_single_scale(kernel):
    """mask encoding with s_out == s_in (the control group): the dual kernel path gives the single-scale result bit
    for bit, prefill and update."""
    inp, dual = _scan_inputs(2, 1536, 200, "mask")
    u = dequantize_codes(inp["qu"], inp["u_scale"], dual["u_dual"], dual["u_mask"])  # values with outliers
    s = inp["u_scale"]  # a percentile scale: the outliers clamp
    qu, mask = dual_quantize(u, s, s, "mask")
    assert torch.equal(qu, quantize(u, s)) and int(mask.ne(0).sum()) > 0
    single = dict(inp, qu=quantize(u, s), u_scale=s)
    control = dict(inp, qu=qu, u_scale=s)
    y1, h1 = kernel.selective_scan_int8(**single, out_dtype=torch.float16)
    y2, h2 = kernel.selective_scan_int8(**control, u_dual=DualScale(s.clone(), "mask"), u_mask=mask,
                                        out_dtype=torch.float16)
    assert torch.equal(y1, y2) and torch.equal(h1, h2)
    step = {k: (v[..., 5] if k in ("qu", "qdelta", "qz", "qB", "qC") else v) for k, v in single.items()}
    st1, st2 = h1.clone(), h1.clone()
    a = kernel.selective_scan_int8_update(st1, **step, out_dtype=torch.float16)
    flags = unpack_mask(mask, 200)[..., 5].to(torch.uint8)
    b = kernel.selective_scan_int8_update(st2, **step, u_dual=DualScale(s.clone(), "mask"), u_mask=flags,
                                          out_dtype=torch.float16)
    assert torch.equal(a, b) and torch.equal(st1, st2)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_conv_to_scan_pipeline(kernel, encoding):
    """The conv kernel's dual output (channel-last codes and mask) feeds the scan kernel directly; the same chain of
    references gives the same y."""
    D, B, L = 1536, 2, 333
    qx, sx, qw, sw, bias = _conv_inputs(D, B, L, seed=9)
    scales, duals = _conv_out_scales(qx, sx, qw, sw, bias, encoding)
    (_, qu), (_, mu) = kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, scales, duals)
    (_, rqu), (_, rmu) = conv1d_int8_ref(qx, sx, qw, sw, bias, True, torch.float16, scales, duals)
    inp, _ = _scan_inputs(B, D, L, encoding, seed=2)
    y = selective_scan_int8(**dict(inp, qu=qu, u_scale=scales[1]), u_dual=duals[1], u_mask=mu,
                            out_dtype=torch.float16, backend="cuda")
    want = selective_scan_int8_ref(**dict(inp, qu=rqu, u_scale=scales[1]), u_dual=duals[1], u_mask=rmu,
                                   out_dtype=torch.float16)
    _assert_close(y, want, RTOL[torch.float16], f"conv -> scan {encoding}")


def test_dual_errors_name_the_fix(kernel):
    inp, dual = _scan_inputs(1, 64, 16, "mask")
    with pytest.raises(ValueError, match="u_mask"):
        kernel.selective_scan_int8(**inp, u_dual=dual["u_dual"])  # mask encoding without its flags
    with pytest.raises(ValueError, match="u_mask"):
        kernel.selective_scan_int8(**inp, u_dual=dual["u_dual"], u_mask=dual["u_mask"][..., :1])
    with pytest.raises(ValueError, match="without u_dual"):
        kernel.selective_scan_int8(**inp, u_mask=dual["u_mask"])
    qx, sx, qw, sw, bias = _conv_inputs(64, 1, 16)
    s = torch.tensor(0.1, device="cuda")
    with pytest.raises(ValueError, match="at most one"):
        kconv.conv1d_int8(qx, sx, qw, sw, bias, True, torch.float16, [s, s],
                          [DualScale(s, "mask"), DualScale(s, "mask")])
