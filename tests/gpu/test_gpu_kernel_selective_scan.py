"""On a CUDA GPU: the int8 Mamba1 selective scan kernels (csrc/selective_scan/selective_scan_int8.cu) against the
reference ``qmamba.ops.int8_selective_scan`` — prefill on the shapes of mamba-130m (d_inner 1536, dt_rank 48) and
mamba-2.8b (d_inner 5120, dt_rank 160), d_state 16, L in (1, 33, 1024, 2048), batch 1 and 8, fp32 and fp16 outputs
(all 32 combinations: the reference of the largest, batch 8 x 5120 x 2048 x 16, peaks near 30 GB), inputs laid out
as the mixer passes them (transposed channel-last views); the one-token update; initial states; options (no gate,
delta_bias, softplus off, bf16, contiguous inputs); other state sizes (1..256, which pick every states-per-lane
variant) and every variant forced on the model shapes; layouts that take byte loads; the update inside a CUDA graph;
argument errors; the update with dt_proj fused (``dt_proj``) against the same kernel fed dt_proj's GEMV codes, bit
for bit.

Tolerances: both sides compute in fp32, but the kernels walk time step by step (the prefill with the SFU's exp2 of
delta A log2(e), the update with CUDA's expf) while the reference is torch's chunked scan with torch.exp, so rounding
and summation order differ. Elementwise,
    |got - want| <= RTOL * |want| + ATOL_FRAC * max|want|
with ATOL_FRAC = 1e-4 and RTOL = 1e-3 for fp32 y and the fp32 states, 4e-3 for fp16 y (about 2 fp16 ulps: one output
rounding each side), 1.6e-2 for bf16 y.
"""

import pytest
import torch
import torch.nn.functional as F

from qmamba.ops.int8_linear import w8a8_linear_ref
from qmamba.ops.int8_selective_scan import (DtProjection, selective_scan_int8, selective_scan_int8_ref,
                                            selective_scan_int8_update, selective_scan_int8_update_ref)
from qmamba.quant.numerics import quantize

pytestmark = pytest.mark.gpu

ATOL_FRAC = 1e-4
RTOL = {torch.float32: 1e-3, torch.float16: 4e-3, torch.bfloat16: 1.6e-2}
MODELS = {"mamba-130m": (1536, 48), "mamba-2.8b": (5120, 160)}  # d_inner, dt_rank
NSTATE = 16


@pytest.fixture(scope="module")
def kernel():
    from qmamba import kernels
    from qmamba.kernels import selective_scan

    kernels.load()
    return selective_scan


def _assert_close(got, want, rtol, what):
    assert got.shape == want.shape, (what, got.shape, want.shape)
    got, want = got.float(), want.float()
    assert torch.isfinite(got).all(), f"{what}: non-finite values"
    err = (got - want).abs()
    bound = rtol * want.abs() + ATOL_FRAC * want.abs().max()
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements out of tolerance, max abs error "
                           f"{err.max().item():.3g}, max |want| {want.abs().max().item():.3g}")


def _codes(x):
    scale = (x.abs().max().float() / 127).clamp_min(1e-8)  # a calibrated absmax per-tensor scale
    return quantize(x, scale), scale


def _inputs(batch, dim, L, n=NSTATE, r=None, with_z=True, channel_last=True, seed=0):
    """Codes with realistic distributions and scales, laid out as Mamba1's mixer passes them when ``channel_last``:
    u (conv output), delta (dt_proj output, bias included), z (second half of in_proj output) as transposed views of
    (b, L, .) tensors; B, C as transposed slices of the x_proj output (b, L, r + 2n)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    r = r or max(1, dim // 32)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, device="cuda")

    if channel_last:
        qu, su = _codes(F.silu(2 * rnd(batch, L, dim)))
        qdelta, sdelta = _codes(1.5 * rnd(batch, L, dim) - 3.0)
        qxz, sz = _codes(rnd(batch, L, 2 * dim))
        qdbc, sbc = _codes(rnd(batch, L, r + 2 * n))
        qu, qdelta, qz = qu.transpose(1, 2), qdelta.transpose(1, 2), qxz[..., dim:].transpose(1, 2)
        qB, qC = (t.transpose(1, 2) for t in qdbc[..., r:].split([n, n], dim=-1))
        sB = sC = sbc
    else:
        qu, su = _codes(F.silu(2 * rnd(batch, dim, L)))
        qdelta, sdelta = _codes(1.5 * rnd(batch, dim, L) - 3.0)
        qz, sz = _codes(rnd(batch, dim, L))
        qB, sB = _codes(rnd(batch, n, L))
        qC, sC = _codes(rnd(batch, n, L))
    A = -torch.exp(torch.log(torch.arange(1, n + 1, device="cuda", dtype=torch.float32)).repeat(dim, 1)
                   + 0.1 * rnd(dim, n))
    D = 1.0 + 0.1 * rnd(dim)
    return dict(qu=qu, u_scale=su, qdelta=qdelta, delta_scale=sdelta, A=A, qB=qB, B_scale=sB, qC=qC, C_scale=sC, D=D,
                qz=qz if with_z else None, z_scale=sz if with_z else None)


def _step(inp, t):
    out = dict(inp)
    for k in ("qu", "qdelta", "qz", "qB", "qC"):
        if out[k] is not None:
            out[k] = out[k][..., t]
    return out


def _piece(inp, start, stop):
    out = dict(inp)
    for k in ("qu", "qdelta", "qz", "qB", "qC"):
        if out[k] is not None:
            out[k] = out[k][..., start:stop]
    return out


def _check_prefill(kernel, inp, out_dtype, what, states_per_lane=0, **kw):
    with torch.no_grad():
        want, want_last = selective_scan_int8_ref(**inp, out_dtype=out_dtype, return_last_state=True, **kw)
    y, last = kernel.selective_scan_int8(**inp, out_dtype=out_dtype, states_per_lane=states_per_lane, **kw)
    b, d, L = inp["qu"].shape
    assert y.shape == (b, d, L) and y.dtype == out_dtype
    assert y.transpose(1, 2).is_contiguous()  # channel-last, as out_proj reads it
    assert last.shape == (b, d, inp["qB"].shape[1]) and last.dtype == torch.float32
    _assert_close(y, want, RTOL[out_dtype], f"{what}: y")
    _assert_close(last, want_last, RTOL[torch.float32], f"{what}: last state")
    return y, last


# ---- prefill on the model shapes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("L", [1, 33, 1024, 2048])
@pytest.mark.parametrize("model", list(MODELS))
def test_prefill_matches_reference(kernel, model, L, batch, out_dtype):
    dim, r = MODELS[model]
    inp = _inputs(batch, dim, L, r=r)
    _check_prefill(kernel, inp, out_dtype, f"{model} b={batch} L={L} {out_dtype}")
    torch.cuda.empty_cache()


@pytest.mark.parametrize("variant", ["no_gate", "delta_bias", "softplus_off", "bf16", "contiguous"])
def test_prefill_options(kernel, variant):
    inp = _inputs(2, 1536, 300, r=48, with_z=variant != "no_gate", channel_last=variant != "contiguous")
    kw, out_dtype = {}, torch.float32
    if variant == "delta_bias":
        kw["delta_bias"] = 0.5 * torch.randn(1536, device="cuda")
    if variant == "softplus_off":  # positive steps, as delta would be after softplus
        inp["qdelta"] = inp["qdelta"].clamp_min(-127).abs()
        kw["delta_softplus"] = False
    if variant == "bf16":
        out_dtype = torch.bfloat16
    assert inp["qu"].is_contiguous() == (variant == "contiguous")
    _check_prefill(kernel, inp, out_dtype, variant, **kw)


@pytest.mark.parametrize("n, batch, dim", [(1, 2, 100), (5, 2, 257), (16, 1, 64), (16, 8, 1536), (64, 8, 1536),
                                           (64, 1, 300), (128, 2, 200), (256, 2, 130)])
def test_other_state_sizes(kernel, n, batch, dim):
    # channel counts that do not fill the last block, and sizes that pick 1, 2, 4 or 8 states per lane
    inp = _inputs(batch, dim, 77, n=n, r=7)
    _check_prefill(kernel, inp, torch.float16, f"N={n} b={batch} D={dim}")


@pytest.mark.parametrize("states_per_lane", [1, 2, 4, 8])
@pytest.mark.parametrize("batch, L", [(1, 1024), (8, 33)])
@pytest.mark.parametrize("model", list(MODELS))
def test_prefill_every_states_per_lane(kernel, model, batch, L, states_per_lane):
    # each variant of the prefill kernel on the model shapes (the GPU's size picks one of them by default)
    dim, r = MODELS[model]
    inp = _inputs(batch, dim, L, r=r)
    _check_prefill(kernel, inp, torch.float16, f"{model} b={batch} L={L} NPL={states_per_lane}",
                   states_per_lane=states_per_lane)


@pytest.mark.parametrize("layout", ["odd_width", "odd_offset", "odd_row_stride"])
def test_prefill_byte_loads(kernel, layout):
    # layouts the word loads / vector stores do not take (channels not a multiple of 4, views whose rows start off a
    # 4-byte boundary, row strides not a multiple of 4): the kernel falls back to byte loads, with the same results
    dim, L, n = (1538 if layout == "odd_width" else 1536), 70, NSTATE
    inp = _inputs(2, dim, L, r=48)
    if layout != "odd_width":
        pad = 1 if layout == "odd_offset" else 0
        extra = 1 if layout == "odd_row_stride" else 0
        for key in ("qu", "qdelta", "qz"):
            t = inp[key].transpose(1, 2)  # (b, L, D) view
            big = torch.zeros(2, L, dim + pad + extra, dtype=torch.int8, device="cuda")
            big[..., pad:pad + dim] = t
            inp[key] = big[..., pad:pad + dim].transpose(1, 2)
        for key in ("qB", "qC"):
            t = inp[key].transpose(1, 2)
            big = torch.zeros(2, L, n + pad + extra, dtype=torch.int8, device="cuda")
            big[..., pad:pad + n] = t
            inp[key] = big[..., pad:pad + n].transpose(1, 2)
    for states_per_lane in (0, 1, 4):
        _check_prefill(kernel, inp, torch.float16, f"{layout} NPL={states_per_lane}", states_per_lane=states_per_lane)


def test_prefill_states_per_lane_error(kernel):
    inp = _inputs(1, 64, 8, r=4)
    with pytest.raises(RuntimeError, match="states_per_lane must be 0"):
        kernel.selective_scan_int8(**inp, states_per_lane=3)


@pytest.mark.parametrize("L", [33, 300])
def test_initial_state(kernel, L):
    inp = _inputs(2, 1536, L, r=48)
    h0 = 0.5 * torch.randn(2, 1536, NSTATE, device="cuda")
    _check_prefill(kernel, inp, torch.float32, f"initial state L={L}", initial_state=h0)
    # two kernel prefills chained through the state == one
    y, last = kernel.selective_scan_int8(**inp)
    y1, h = kernel.selective_scan_int8(**_piece(inp, 0, L // 3))
    y2, last2 = kernel.selective_scan_int8(**_piece(inp, L // 3, L), initial_state=h)
    _assert_close(torch.cat([y1, y2], dim=-1), y, RTOL[torch.float32], "chained prefill: y")
    _assert_close(last2, last, RTOL[torch.float32], "chained prefill: last state")


def test_dispatcher_uses_the_kernel(kernel):
    inp = _inputs(2, 1536, 40, r=48)
    y, last = kernel.selective_scan_int8(**inp, out_dtype=torch.float16)
    got = selective_scan_int8(**inp, out_dtype=torch.float16, return_last_state=True, backend="cuda")
    assert torch.equal(got[0], y) and torch.equal(got[1], last)
    auto = selective_scan_int8(**inp, out_dtype=torch.float16, backend="auto")
    assert torch.equal(auto, y)


# ---- the one-token update ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("with_z", [True, False], ids=["gate", "no_gate"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", list(MODELS))
def test_update_matches_reference(kernel, model, batch, out_dtype, with_z):
    dim, r = MODELS[model]
    step = _step(_inputs(batch, dim, 1, r=r, with_z=with_z), 0)
    state = 0.5 * torch.randn(batch, dim, NSTATE, device="cuda")
    want_state = state.clone()
    want = selective_scan_int8_update_ref(want_state, **step, out_dtype=out_dtype)
    got = kernel.selective_scan_int8_update(state, **step, out_dtype=out_dtype)
    assert got.shape == (batch, dim) and got.dtype == out_dtype
    _assert_close(got, want, RTOL[out_dtype], "update: y")
    _assert_close(state, want_state, RTOL[torch.float32], "update: state")


@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_update_continues_the_prefill(kernel, out_dtype):
    L = 34
    inp = _inputs(8, 1536, L, r=48)
    bias = 0.3 * torch.randn(1536, device="cuda")
    full, full_last = kernel.selective_scan_int8(**inp, delta_bias=bias, out_dtype=out_dtype)
    _, state = kernel.selective_scan_int8(**_piece(inp, 0, L - 1), delta_bias=bias, out_dtype=out_dtype)
    y = selective_scan_int8_update(state, **_step(inp, L - 1), delta_bias=bias, out_dtype=out_dtype, backend="cuda")
    _assert_close(y, full[..., -1], RTOL[out_dtype], "prefill + update: y")
    _assert_close(state, full_last, RTOL[torch.float32], "prefill + update: state")


def test_update_strided_state_and_inputs(kernel):
    inp = _inputs(4, 1536, 3, r=48)
    step = _step(inp, 1)  # (b, d) views with stride L along d
    assert not step["qu"].is_contiguous()
    base = 0.5 * torch.randn(4, NSTATE, 1536, device="cuda")
    state = base.transpose(1, 2)  # (b, d, n) with strides (n d, 1, d)
    want_state = state.contiguous()
    want = selective_scan_int8_update_ref(want_state, **step)
    got = kernel.selective_scan_int8_update(state, **step)
    _assert_close(got, want, RTOL[torch.float32], "strided update: y")
    _assert_close(base.transpose(1, 2), want_state, RTOL[torch.float32], "strided update: state")


def test_update_in_cuda_graph(kernel):
    batch, dim = 2, 1536
    static = _step(_inputs(batch, dim, 1, r=48), 0)
    static = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in static.items()}
    state = torch.zeros(batch, dim, NSTATE, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up off the capture stream, as torch.cuda.graphs asks
        kernel.selective_scan_int8_update(state.clone(), **static, out_dtype=torch.float16)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = kernel.selective_scan_int8_update(state, **static, out_dtype=torch.float16)
    for seed in (1, 2):  # new codes and scales into the captured buffers, then replay
        fresh = _step(_inputs(batch, dim, 1, r=48, seed=seed), 0)
        for k, v in fresh.items():
            if isinstance(v, torch.Tensor) and k != "A" and k != "D":
                static[k].copy_(v)
        h = 0.5 * torch.randn(batch, dim, NSTATE, device="cuda")
        state.copy_(h)
        graph.replay()
        want = selective_scan_int8_update_ref(h, **static, out_dtype=torch.float16)
        _assert_close(y_static, want, RTOL[torch.float16], f"graph replay {seed}: y")
        _assert_close(state, h, RTOL[torch.float32], f"graph replay {seed}: state")


# ---- errors --------------------------------------------------------------------------------------------------------
def test_errors(kernel):
    """Bad arguments are caught by the wrappers' Python checks (check_selective_scan_args /
    check_selective_scan_update_args) before the op is called: a C++ TORCH_CHECK firing inside the extension is a
    backstop only, never reached here."""
    inp = _inputs(1, 64, 8, r=4)
    with pytest.raises(TypeError, match="int8 codes"):
        kernel.selective_scan_int8(**dict(inp, qu=inp["qu"].float()))
    with pytest.raises(ValueError, match="per-tensor"):
        kernel.selective_scan_int8(**dict(inp, u_scale=torch.ones(2, device="cuda")))
    with pytest.raises(ValueError, match="state size N"):
        kernel.selective_scan_int8(**_inputs(1, 8, 4, n=300, r=2))
    with pytest.raises(ValueError, match="no groups"):
        kernel.selective_scan_int8(**dict(inp, qB=inp["qB"][:, None], qC=inp["qC"][:, None]))
    with pytest.raises(ValueError, match="initial_state"):
        kernel.selective_scan_int8(**inp, initial_state=torch.zeros(1, 64, 3, device="cuda"))
    with pytest.raises(ValueError, match="A must have shape"):
        kernel.selective_scan_int8(**dict(inp, A=inp["A"][:, :4]))
    with pytest.raises(ValueError, match="qz and z_scale together"):
        kernel.selective_scan_int8(**dict(inp, z_scale=None))
    with pytest.raises(RuntimeError, match="A is on cpu"):
        kernel.selective_scan_int8(**dict(inp, A=inp["A"].cpu()))
    with pytest.raises(TypeError, match="float32"):
        kernel.selective_scan_int8_update(torch.zeros(1, 64, NSTATE, device="cuda", dtype=torch.float16),
                                          **_step(inp, 0))
    with pytest.raises(ValueError, match="state must have shape"):
        kernel.selective_scan_int8_update(torch.zeros(1, 64, 4, device="cuda"), **_step(inp, 0))
    with pytest.raises(RuntimeError, match="state is on cpu"):
        kernel.selective_scan_int8_update(torch.zeros(1, 64, NSTATE), **_step(inp, 0))


# ---- dt_proj fused into the update ---------------------------------------------------------------------------------
def _dt_projection(batch, dim, r, per_channel, offset=0, seed=0):
    """dt_proj's decode inputs as the mixer hands them: dt a column slice of the x_proj output (batch, R + 2N) (at
    column ``offset``: 0 as in Mamba1, else a view off 16-byte alignment), int8 weight (D, R) with a per-tensor or
    per-channel scale, Mamba1-like bias (softplus^-1 of small steps)."""
    g = torch.Generator(device="cuda").manual_seed(seed + 100)
    xdbc, s_dt = _codes(torch.randn(batch, offset + r + 2 * NSTATE, generator=g, device="cuda"))
    w = torch.randn(dim, r, generator=g, device="cuda") * r ** -0.5
    w_scale = (w.abs().amax(1) if per_channel else w.abs().max()) / 127
    qw = quantize(w, w_scale[:, None] if per_channel else w_scale)
    bias = torch.randn(dim, generator=g, device="cuda") - 4.0
    return DtProjection(xdbc[:, offset:offset + r], s_dt, qw, w_scale, bias)


def _check_fused_update(kernel, step, proj, qdelta, delta_scale, out_dtype, what):
    """The kernel with dt_proj fused == the kernel fed ``qdelta`` (y and the state, bit for bit)."""
    batch, dim = step["qu"].shape
    state = 0.5 * torch.randn(batch, dim, NSTATE, device="cuda")
    want_state, got_state = state.clone(), state.clone()
    want = kernel.selective_scan_int8_update(want_state, **dict(step, qdelta=qdelta, delta_scale=delta_scale),
                                             out_dtype=out_dtype)
    got = kernel.selective_scan_int8_update(got_state, **dict(step, qdelta=None, delta_scale=delta_scale),
                                            out_dtype=out_dtype, dt_proj=proj)
    assert got.dtype == out_dtype and got.shape == (batch, dim)
    assert torch.equal(got, want), f"{what}: y differs in {int((got != want).sum())} of {got.numel()} elements"
    assert torch.equal(got_state, want_state), f"{what}: the state differs"


@pytest.mark.parametrize("per_channel", [False, True], ids=["w_tensor", "w_channel"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", list(MODELS))
def test_update_with_fused_dt_proj_equals_the_gemv_codes(kernel, model, batch, out_dtype, per_channel):
    """The update computing delta's codes from dt_proj's inputs (16-byte loads + __dp4a: R % 16 == 0, aligned rows)
    == the same kernel fed the codes of dt_proj's GEMV kernel (its requant epilogue in delta's scale, one segment,
    as the mixer runs it), bit for bit on y and the state."""
    from qmamba.kernels import linear as klinear

    dim, r = MODELS[model]
    step = _step(_inputs(batch, dim, 1, r=r), 0)
    proj = _dt_projection(batch, dim, r, per_channel)
    v = klinear.w8a8_gemv(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, out_dtype)
    delta_scale = (v.float().abs().max() / 140).reshape(())  # the largest codes clamp, as a calibrated scale lets some
    qdelta = klinear.w8a8_gemv(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, out_dtype,
                               [delta_scale], [dim])
    assert len(qdelta.unique()) > 50 and int((qdelta.int().abs() >= 127).sum()) > 0
    _check_fused_update(kernel, step, proj, qdelta, delta_scale, out_dtype, f"{model} b={batch} {out_dtype}")
    # without a bias: the same
    plain = proj._replace(bias=None)
    qdelta = klinear.w8a8_gemv(plain.q, plain.scale, plain.weight, plain.weight_scale, None, out_dtype,
                               [delta_scale], [dim])
    _check_fused_update(kernel, step, plain, qdelta, delta_scale, out_dtype, f"{model} b={batch} no bias")


@pytest.mark.parametrize("r, offset", [(48, 1), (40, 0), (4, 0), (160, 3)])
@pytest.mark.parametrize("batch", [1, 8])
def test_update_with_fused_dt_proj_byte_loop(kernel, r, offset, batch):
    """R % 16 != 0 or dt rows off 16-byte alignment: the byte loop, the same codes as dt_proj's GEMV reference (the
    GEMV itself needs K % 16 == 0; its reference is it bit for bit)."""
    dim, out_dtype = 1536, torch.float16
    step = _step(_inputs(batch, dim, 1, r=r), 0)
    proj = _dt_projection(batch, dim, r, per_channel=True, offset=offset)
    v = w8a8_linear_ref(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, out_dtype)
    delta_scale = (v.float().abs().max() / 140).reshape(())
    qdelta = w8a8_linear_ref(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, out_dtype,
                             [delta_scale], [dim])
    _check_fused_update(kernel, step, proj, qdelta, delta_scale, out_dtype, f"R={r} offset={offset} b={batch}")


def test_update_with_fused_dt_proj_in_cuda_graph(kernel):
    """Captured once, replayed with new dt codes and scales in the captured buffers: the fused update follows them
    (nothing read on the host, no per-call copies of dt or the weight)."""
    from qmamba.kernels import linear as klinear

    batch, dim, r = 2, 1536, 48
    step = _step(_inputs(batch, dim, 1, r=r), 0)
    proj = _dt_projection(batch, dim, r, per_channel=True)
    delta_scale = torch.tensor(0.05, device="cuda")
    step = dict(step, qdelta=None, delta_scale=delta_scale)
    state = torch.zeros(batch, dim, NSTATE, device="cuda")
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernel.selective_scan_int8_update(state.clone(), **step, out_dtype=torch.float16, dt_proj=proj)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = kernel.selective_scan_int8_update(state, **step, out_dtype=torch.float16, dt_proj=proj)
    for seed in (1, 2):
        fresh = _dt_projection(batch, dim, r, per_channel=True, seed=seed)
        proj.q.copy_(fresh.q)
        proj.scale.copy_(fresh.scale)
        delta_scale.fill_(0.03 * seed)
        h = 0.5 * torch.randn(batch, dim, NSTATE, device="cuda")
        state.copy_(h)
        graph.replay()
        qdelta = klinear.w8a8_gemv(proj.q, proj.scale, proj.weight, proj.weight_scale, proj.bias, torch.float16,
                                   [delta_scale], [dim])
        want = kernel.selective_scan_int8_update(h, **dict(step, qdelta=qdelta), out_dtype=torch.float16)
        assert torch.equal(y_static, want) and torch.equal(state, h), f"graph replay {seed}"


def test_fused_dt_proj_errors(kernel):
    step = dict(_step(_inputs(2, 64, 1, r=16), 0))
    proj = _dt_projection(2, 64, 16, per_channel=False)
    with pytest.raises(ValueError, match="exactly one of qdelta"):
        kernel.selective_scan_int8_update(torch.zeros(2, 64, NSTATE, device="cuda"), **step, dt_proj=proj)
    with pytest.raises(ValueError, match=r"dt_proj.weight must be dt_proj's \(D, R\)"):
        kernel.selective_scan_int8_update(torch.zeros(2, 64, NSTATE, device="cuda"), **dict(step, qdelta=None),
                                          dt_proj=proj._replace(weight=proj.weight[:32]))
    with pytest.raises(RuntimeError, match="dt_proj.weight is on cpu"):
        kernel.selective_scan_int8_update(torch.zeros(2, 64, NSTATE, device="cuda"), **dict(step, qdelta=None),
                                          dt_proj=proj._replace(weight=proj.weight.cpu()))


# ---- out_proj's rotated input made by the update (``rotated``): the kernel's codes vs the Hadamard kernel's of its own
# y, bit for bit (the same device code on the same y), and vs the reference's within the y tolerance above


def _rotated(batch, dim, scale=0.02):
    from qmamba.ops.int8_selective_scan import RotatedOutput, rotated_counters_size

    counters = torch.zeros(rotated_counters_size(batch, dim), dtype=torch.int32, device="cuda")
    return RotatedOutput(torch.tensor(scale, device="cuda"), 8, counters)


@pytest.mark.parametrize("with_dt_proj", [False, True], ids=["delta", "dt_proj"])
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", list(MODELS))
def test_update_rotated_output_equals_the_hadamard_kernel(kernel, model, batch, out_dtype, with_dt_proj):
    from qmamba.kernels.hadamard import hadamard_quantize
    from qmamba.ops.hadamard import hadamard_transform
    from qmamba.ops.int8_hadamard import hadamard_quantize_ref

    dim, r = MODELS[model]
    step = _step(_inputs(batch, dim, 1, r=r, seed=3), 0)
    proj = None
    if with_dt_proj:
        proj = _dt_projection(batch, dim, r, per_channel=True, seed=3)
        step = dict(step, qdelta=None, delta_scale=torch.tensor(0.05, device="cuda"))
    state = 0.5 * torch.randn(batch, dim, NSTATE, device="cuda")
    plain_state, rot_state = state.clone(), state.clone()
    y_plain = kernel.selective_scan_int8_update(plain_state, **step, out_dtype=out_dtype, dt_proj=proj)
    scale = float(hadamard_transform(y_plain).abs().max()) * 0.6 / 127  # some codes clamp
    rotated = _rotated(batch, dim, scale)
    for call in range(3):  # the counters come back zero: every call rotates again
        s = state.clone()
        y, codes = kernel.selective_scan_int8_update(s, **step, out_dtype=out_dtype, dt_proj=proj, rotated=rotated)
        assert torch.equal(y, y_plain) and torch.equal(s, plain_state), f"call {call}: y or the state differ"
        want = hadamard_quantize(y, rotated.scale, 8)
        assert codes.dtype == torch.int8 and codes.shape == (batch, dim)
        assert torch.equal(codes, want), f"call {call}: {int((codes != want).sum())} of {codes.numel()} codes differ"
        assert not rotated.counters.any(), f"call {call}: counters not reset"
    assert int((codes.int().abs() >= 127).sum()) > 0
    ref = hadamard_quantize_ref(y, rotated.scale, 8)  # the Hadamard kernel is the reference's twin, bit for bit
    assert torch.equal(codes, ref)


def test_update_rotated_output_in_cuda_graph(kernel):
    """Captured once and replayed: every replay rotates (the counters are left zero), the codes follow new inputs."""
    from qmamba.kernels.hadamard import hadamard_quantize

    batch, dim = 2, 5120
    step = _step(_inputs(batch, dim, 1, r=160), 0)
    state = torch.zeros(batch, dim, NSTATE, device="cuda")
    rotated = _rotated(batch, dim)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        kernel.selective_scan_int8_update(state.clone(), **step, out_dtype=torch.float16, rotated=rotated)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static, codes_static = kernel.selective_scan_int8_update(state, **step, out_dtype=torch.float16,
                                                                   rotated=rotated)
    for seed in (1, 2, 3):
        h = 0.5 * torch.randn(batch, dim, NSTATE, device="cuda")
        state.copy_(h)
        rotated.scale.fill_(0.01 * seed)
        graph.replay()
        want = kernel.selective_scan_int8_update(h, **step, out_dtype=torch.float16)
        assert torch.equal(y_static, want) and torch.equal(codes_static, hadamard_quantize(want, rotated.scale, 8)), \
            f"graph replay {seed}"
        assert not rotated.counters.any()


def test_update_rotated_output_errors(kernel):
    from qmamba.ops.int8_selective_scan import RotatedOutput

    step = _step(_inputs(2, 1536, 1), 0)
    state = torch.zeros(2, 1536, NSTATE, device="cuda")
    bad = RotatedOutput(torch.tensor(0.02, device="cuda"), 8, torch.zeros(5, dtype=torch.int32, device="cuda"))
    with pytest.raises(ValueError, match="rotated.counters must be a contiguous int32 tensor of 6 zeros"):
        kernel.selective_scan_int8_update(state, **step, rotated=bad)
