"""On a CUDA GPU: the Triton int8 Mamba2 SSD kernels (chunked scan and decode step) against the pure-torch
references of ``qmamba.ops.int8_ssd``, at the shapes of mamba2-130m (24 heads) and mamba2-2.7b (80 heads): headdim 64,
1 group, d_state 128, chunk 256; L in (1, 33, 1024, 2048) x batch 1 and 8 (1 and 33: a partial chunk; 1024 and
2048: 4 and 8 full chunks; the option tests use L = 300 and 1000 + 5 steps: a full chunk plus a partial one).
Batch 8 x 2048 at 80 heads is kept: its fp32 reference peaks at a few GB (the (b, h, chunks, 256, 256) decay tiles).

Tolerances (max |kernel - reference| over max |reference|, outputs y and fp32 states):
    GPU_RTOL = 1e-4   fp32 output. Both sides compute in fp32 (the reference with TF32 off, the kernels with exact
                      int8 dots and tf32x3 fp32 dots); they differ by summation order (256-step chunks, d_state 128,
                      up to 8 chunks of state passing), by decays formed as differences of cumulative log-decays
                      (|a_cum| ~ 100 in a chunk: ~1e-5 relative) and by Triton's approximate exp / log (ex2.approx /
                      lg2.approx). Expect ~1e-6.
    BF16_RTOL = 1e-2  bf16 output: one bf16 rounding (<= 2**-8 of an element) on top.
Decode steps are also checked under CUDA-graph capture (bit-identical to eager), and the dispatchers against the
kernels (bit-identical: the kernels are deterministic, no atomics).

Dual-scale x (issue 5), both encodings, on x with real outliers (~1.5 % of the elements beyond the inlier range):
the same tolerances (the piecewise decode may add one FMA rounding to an outlier's value, far below them); the mask
encoding with s_out == s_in (the control) is the single-scale kernel bit for bit (torch.equal: the decode multiplies
each code by the same scale, and everything after it is the same code).
"""

import pytest
import torch

from qmamba.ops.int8_ssd import (ssd_chunk_scan_int8, ssd_chunk_scan_int8_ref, ssd_step_int8,
                                 ssd_step_int8_ref)
from qmamba.quant.dual_scale import DualScale, dual_quantize, outlier_flags

pytestmark = pytest.mark.gpu

GPU_RTOL = 1e-4
BF16_RTOL = 1e-2

# name: (nheads, headdim, ngroups, d_state); chunk 256 for both
MODELS = {"mamba2-130m": (24, 64, 1, 128), "mamba2-2.7b": (80, 64, 1, 128)}
CHUNK = 256
# float_in vs the kernels fed codes: max |diff| / max |want| (summation order only; see the float_in tests)
FLOAT_IN_TOL = 1e-5


@pytest.fixture(autouse=True)
def _fp32_reference():
    """The reference's einsums in true fp32 (no TF32), whatever another test or the environment set."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _kernels():
    pytest.importorskip("triton", reason="the SSD kernels are written in Triton")
    from qmamba.kernels.triton import ssd_int8

    return ssd_int8


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _codes(*shape):
    """int8 codes shaped like real activations: roughly normal (std 40 codes), some clipped tails."""
    return torch.round(torch.randn(shape, device="cuda") * 40).clamp_(-128, 127).to(torch.int8)


def _inputs(model: str, b: int, L: int, per_head: bool = True, D: str | None = "h", step: bool = False):
    """Codes and realistic scales. dt before bias in ~(-2.5, 2.5); dt_bias as mamba_ssm initializes it (softplus of
    it in [1e-3, 0.1]); A = -exp(A_log), A_log = log(U[1, 16]). ``step``: one token (no L axis)."""
    h, p, g, n = MODELS[model]
    lead = (b,) if step else (b, L)
    dt0 = torch.exp(torch.empty(h, device="cuda").uniform_(-6.9, -2.3))
    per = (lambda k, lo, hi: lo + (hi - lo) * torch.rand(k, device="cuda")) if per_head else \
        (lambda k, lo, hi: torch.tensor((lo + hi) / 2, device="cuda"))
    return dict(qx=_codes(*lead, h, p), x_scale=per(h, 0.01, 0.05), qdt=_codes(*lead, h),
                dt_scale=torch.tensor(0.02, device="cuda"), A=-torch.empty(h, device="cuda").uniform_(1, 16),
                qB=_codes(*lead, g, n), B_scale=per(g, 0.01, 0.03), qC=_codes(*lead, g, n), C_scale=per(g, 0.01, 0.03),
                D={None: None, "h": torch.randn(h, device="cuda"), "hp": torch.randn(h, p, device="cuda")}[D],
                dt_bias=dt0 + torch.log(-torch.expm1(-dt0)))


def _at(inp: dict, t) -> dict:
    return {k: (v[:, t] if k in ("qx", "qdt", "qB", "qC") or (k == "x_mask" and v is not None) else v)
            for k, v in inp.items()}


def _dual_inputs(model: str, b: int, L: int, encoding: str, knee: int = 112, per_head: bool = True,
                 D: str | None = "h", step: bool = False, s_out_equals_s_in: bool = False):
    """``_inputs`` with dual-scale x codes: x normal with a std per head (one std for ``per_head=False``), 0.3 % of
    the elements spiked x8; T = 2.5 std leaves ~1.5 % above it, A = max |x|. Mask: s_in = T / 127, s_out = A / 127;
    piecewise: s_in = T / K, s_out = (A - T) / (127 - K). x_mask (.., h, headdim / 8) uint8, None for piecewise."""
    inp = _inputs(model, b, L, per_head=per_head, D=D, step=step)
    shape, h = inp["qx"].shape, inp["qx"].shape[-2]
    std = (0.5 + torch.rand(h, device="cuda")) if per_head else torch.full((h,), 0.8, device="cuda")
    x = torch.randn(shape, device="cuda") * std[:, None]
    x = torch.where(torch.rand(shape, device="cuda") < 0.003, x * 8, x)
    A = x.abs().movedim(-2, 0).reshape(h, -1).amax(1) if per_head else x.abs().amax().expand(h)
    T = 2.5 * std
    A = torch.maximum(A, 3 * std)
    s_in, s_out = (T / 127, A / 127) if encoding == "mask" else (T / knee, (A - T) / (127 - knee))
    if s_out_equals_s_in:
        s_out = s_in
    if not per_head:
        s_in, s_out = s_in[0], s_out[0]
    bc = (lambda s: s[:, None]) if per_head else (lambda s: s)
    qx, mask = dual_quantize(x, bc(s_in), bc(s_out), encoding, knee)
    assert outlier_flags(x, bc(s_in), encoding, knee).any()
    return dict(inp, qx=qx, x_scale=s_in, x_dual=DualScale(s_out.clone(), encoding, knee), x_mask=mask)


def _single(inp: dict) -> dict:
    """The same codes read at the inlier scale alone."""
    return dict(inp, x_dual=None, x_mask=None)


# ---- chunked scan ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("L", [1, 33, 1024, 2048])
@pytest.mark.parametrize("model", list(MODELS))
def test_chunk_scan_matches_reference(model, L, batch):
    k = _kernels()
    inp = _inputs(model, batch, L)
    y, final = k.ssd_chunk_scan_int8_triton(**inp, chunk_size=CHUNK, return_final_states=True)
    y_ref, final_ref = ssd_chunk_scan_int8_ref(**inp, chunk_size=CHUNK, return_final_states=True)
    h, p, _, n = MODELS[model]
    assert y.shape == (batch, L, h, p) and y.dtype == torch.float32 and y.is_contiguous()
    assert final.shape == (batch, h, p, n) and final.dtype == torch.float32
    assert torch.isfinite(y).all()
    err_y, err_s = _rel(y, y_ref), _rel(final, final_ref)
    assert err_y <= GPU_RTOL, f"y: {err_y:.2e}"
    assert err_s <= GPU_RTOL, f"final state: {err_s:.2e}"


@pytest.mark.parametrize("case", ["per_tensor_scales", "D_per_channel", "initial_states", "bf16_out", "no_D",
                                  "strided_views"])
def test_chunk_scan_options(case):
    """2.7b shapes, batch 2, L = 300 (one full chunk and a partial one)."""
    k = _kernels()
    model, b, L = "mamba2-2.7b", 2, 300
    h, p, g, n = MODELS[model]
    inp = _inputs(model, b, L, per_head=case != "per_tensor_scales",
                  D={"D_per_channel": "hp", "no_D": None}.get(case, "h"))
    kw = dict(chunk_size=CHUNK, return_final_states=True)
    if case == "initial_states":
        kw["initial_states"] = torch.randn(b, h, p, n, device="cuda")
    if case == "bf16_out":
        kw["out_dtype"] = torch.bfloat16
    y_ref, final_ref = ssd_chunk_scan_int8_ref(**inp, **kw)
    if case == "strided_views":  # x / B / C split out of the conv output (conv_dim 5376), dt out of in_proj's output
        xbc = torch.cat([inp["qx"].reshape(b, L, h * p), inp["qB"].reshape(b, L, g * n),
                         inp["qC"].reshape(b, L, g * n)], dim=-1)
        zdt = torch.cat([_codes(b, L, 7), inp["qdt"]], dim=-1)
        inp = dict(inp, qx=xbc[..., :h * p].view(b, L, h, p), qB=xbc[..., h * p:h * p + g * n].view(b, L, g, n),
                   qC=xbc[..., h * p + g * n:].view(b, L, g, n), qdt=zdt[..., 7:])
        assert not inp["qx"].is_contiguous() and not inp["qdt"].is_contiguous()
    y, final = k.ssd_chunk_scan_int8_triton(**inp, **kw)
    assert y.dtype == y_ref.dtype and y.is_contiguous()
    tol = BF16_RTOL if case == "bf16_out" else GPU_RTOL
    assert _rel(y, y_ref) <= tol, f"y: {_rel(y, y_ref):.2e}"
    assert _rel(final, final_ref) <= GPU_RTOL, f"final state: {_rel(final, final_ref):.2e}"


# ---- decode step ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", list(MODELS))
def test_step_matches_reference(model, batch):
    """Four tokens from a random state; kernel and reference states evolve side by side (the kernel's a strided
    view of a wider cache, updated in place)."""
    k = _kernels()
    h, p, g, n = MODELS[model]
    inp = _inputs(model, batch, 4, D="hp")
    cache = torch.randn(batch, h, p, n + 8, device="cuda")
    state = cache[..., :n]
    state_ref = state.clone()
    for t in range(4):
        y = k.ssd_step_int8_triton(state, **_at(inp, t))
        y_ref = ssd_step_int8_ref(state_ref, **_at(inp, t))
        assert y.shape == (batch, h, p) and y.dtype == torch.float32
        assert _rel(y, y_ref) <= GPU_RTOL, f"token {t} y: {_rel(y, y_ref):.2e}"
        assert _rel(state, state_ref) <= GPU_RTOL, f"token {t} state: {_rel(state, state_ref):.2e}"
    assert torch.equal(cache[..., :n], state)


@pytest.mark.parametrize("per_head,out_dtype", [(False, torch.float32), (True, torch.bfloat16)])
def test_step_options(per_head, out_dtype):
    k = _kernels()
    h, p, g, n = MODELS["mamba2-2.7b"]
    inp = _inputs("mamba2-2.7b", 3, 1, per_head=per_head, D="h", step=True)
    state = torch.randn(3, h, p, n, device="cuda")
    state_ref = state.clone()
    y = k.ssd_step_int8_triton(state, **inp, out_dtype=out_dtype)
    y_ref = ssd_step_int8_ref(state_ref, **inp, out_dtype=out_dtype)
    assert y.dtype == out_dtype
    assert _rel(y, y_ref) <= (BF16_RTOL if out_dtype == torch.bfloat16 else GPU_RTOL)
    assert _rel(state, state_ref) <= GPU_RTOL


def test_prefill_then_steps_equals_longer_prefill():
    """Kernels end to end: prefill 1000 tokens (final state), 5 decode steps == prefill of 1005."""
    k = _kernels()
    inp = _inputs("mamba2-2.7b", 2, 1005)
    y_all, final_all = k.ssd_chunk_scan_int8_triton(**inp, chunk_size=CHUNK, return_final_states=True)
    y0, state = k.ssd_chunk_scan_int8_triton(**_at(inp, slice(0, 1000)), chunk_size=CHUNK, return_final_states=True)
    ys = [y0] + [k.ssd_step_int8_triton(state, **_at(inp, t)).unsqueeze(1) for t in range(1000, 1005)]
    assert _rel(torch.cat(ys, dim=1), y_all) <= GPU_RTOL
    assert _rel(state, final_all) <= GPU_RTOL
    y_ref = ssd_chunk_scan_int8_ref(**inp, chunk_size=CHUNK)
    assert _rel(torch.cat(ys, dim=1), y_ref) <= GPU_RTOL


def test_step_captures_in_a_cuda_graph():
    """No host sync and no value-dependent launch: the step records into a CUDA graph and replays bit-identically
    to eager, with new inputs copied into the captured buffers."""
    k = _kernels()
    h, p, g, n = MODELS["mamba2-2.7b"]
    inp = _inputs("mamba2-2.7b", 2, 1, step=True)
    state = torch.randn(2, h, p, n, device="cuda")
    k.ssd_step_int8_triton(state.clone(), **inp)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = k.ssd_step_int8_triton(state, **inp)
    fresh = _inputs("mamba2-2.7b", 2, 1, step=True)
    for key in ("qx", "qdt", "qB", "qC"):
        inp[key].copy_(fresh[key])
    start = torch.randn(2, h, p, n, device="cuda")
    state.copy_(start)
    graph.replay()
    eager_state = start.clone()
    y_eager = k.ssd_step_int8_triton(eager_state, **dict(inp))
    torch.cuda.synchronize()
    assert torch.equal(y_static, y_eager)
    assert torch.equal(state, eager_state)


# ---- dispatch -------------------------------------------------------------------------------------------------
def test_dispatchers_pick_the_kernels_on_cuda():
    k = _kernels()
    inp = _inputs("mamba2-130m", 2, 300)
    want = k.ssd_chunk_scan_int8_triton(**inp, chunk_size=CHUNK)
    for backend in ("cuda", "auto"):
        assert torch.equal(ssd_chunk_scan_int8(**inp, chunk_size=CHUNK, backend=backend), want)
    assert _rel(ssd_chunk_scan_int8(**inp, chunk_size=CHUNK, backend="torch"), want) <= GPU_RTOL
    h, p, g, n = MODELS["mamba2-130m"]
    s0 = torch.randn(2, h, p, n, device="cuda")
    s_kernel, s_dispatch = s0.clone(), s0.clone()
    want = k.ssd_step_int8_triton(s_kernel, **_at(inp, 0))
    assert torch.equal(ssd_step_int8(s_dispatch, **_at(inp, 0), backend="cuda"), want)
    assert torch.equal(s_dispatch, s_kernel)


# ---- dual-scale x ---------------------------------------------------------------------------------------------
ENCODINGS = ["mask", "piecewise"]


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("L", [33, 1024])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_chunk_scan_dual_x_matches_reference(encoding, L, batch):
    k = _kernels()
    model = "mamba2-2.7b"
    inp = _dual_inputs(model, batch, L, encoding)
    y, final = k.ssd_chunk_scan_int8_triton(**inp, chunk_size=CHUNK, return_final_states=True)
    y_ref, final_ref = ssd_chunk_scan_int8_ref(**inp, chunk_size=CHUNK, return_final_states=True)
    h, p, _, n = MODELS[model]
    assert y.shape == (batch, L, h, p) and final.shape == (batch, h, p, n) and torch.isfinite(y).all()
    err_y, err_s = _rel(y, y_ref), _rel(final, final_ref)
    assert err_y <= GPU_RTOL, f"y: {err_y:.2e}"
    assert err_s <= GPU_RTOL, f"final state: {err_s:.2e}"
    # the outlier scale was read: the same codes at s_in alone are far off
    assert _rel(ssd_chunk_scan_int8_ref(**_single(inp), chunk_size=CHUNK), y_ref) > 10 * GPU_RTOL


@pytest.mark.parametrize("case", ["mask_per_tensor", "piecewise_per_tensor", "piecewise_knee_100", "mask_strided",
                                  "mask_bf16_out", "piecewise_D_per_channel"])
def test_chunk_scan_dual_x_options(case):
    """2.7b shapes, batch 2, L = 300 (one full chunk and a partial one), initial states."""
    k = _kernels()
    model, b, L = "mamba2-2.7b", 2, 300
    h, p, g, n = MODELS[model]
    encoding = case.split("_")[0]
    inp = _dual_inputs(model, b, L, encoding, knee=100 if case == "piecewise_knee_100" else 112,
                       per_head="per_tensor" not in case, D="hp" if case == "piecewise_D_per_channel" else "h")
    kw = dict(chunk_size=CHUNK, return_final_states=True, initial_states=torch.randn(b, h, p, n, device="cuda"))
    if case == "mask_bf16_out":
        kw["out_dtype"] = torch.bfloat16
    y_ref, final_ref = ssd_chunk_scan_int8_ref(**inp, **kw)
    if case == "mask_strided":  # the flags in a wider buffer, L and heads swapped in memory
        m = inp["x_mask"]
        buf = torch.zeros(b, h, L, m.shape[-1] + 3, dtype=torch.uint8, device="cuda")
        view = buf[..., 1:1 + m.shape[-1]].transpose(1, 2)
        view.copy_(m)
        assert not view.is_contiguous()
        inp = dict(inp, x_mask=view)
    y, final = k.ssd_chunk_scan_int8_triton(**inp, **kw)
    assert y.dtype == y_ref.dtype
    tol = BF16_RTOL if case == "mask_bf16_out" else GPU_RTOL
    assert _rel(y, y_ref) <= tol, f"y: {_rel(y, y_ref):.2e}"
    assert _rel(final, final_ref) <= GPU_RTOL, f"final state: {_rel(final, final_ref):.2e}"


@pytest.mark.parametrize("per_head", [True, False])
def test_dual_x_control_is_the_single_scale_kernel_bit_for_bit(per_head):
    """The mask encoding with s_out == s_in (flags set) against x_dual=None on the same codes: scan and step."""
    k = _kernels()
    model, b, L = "mamba2-2.7b", 2, 300
    h, p, g, n = MODELS[model]
    inp = _dual_inputs(model, b, L, "mask", per_head=per_head, s_out_equals_s_in=True)
    assert inp["x_mask"].any()
    s0 = torch.randn(b, h, p, n, device="cuda")
    kw = dict(chunk_size=CHUNK, return_final_states=True, initial_states=s0)
    y, final = k.ssd_chunk_scan_int8_triton(**inp, **kw)
    y1, final1 = k.ssd_chunk_scan_int8_triton(**_single(inp), **kw)
    assert torch.equal(y, y1) and torch.equal(final, final1)
    S, S1 = s0.clone(), s0.clone()
    assert torch.equal(k.ssd_step_int8_triton(S, **_at(inp, 7)), k.ssd_step_int8_triton(S1, **_at(_single(inp), 7)))
    assert torch.equal(S, S1)


@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("encoding", ENCODINGS)
def test_step_dual_x_matches_reference(encoding, batch):
    """Four tokens from a random state (the mask of each token a strided slice of the prefill-shaped mask)."""
    k = _kernels()
    h, p, g, n = MODELS["mamba2-2.7b"]
    inp = _dual_inputs("mamba2-2.7b", batch, 4, encoding, D="hp")
    state = torch.randn(batch, h, p, n, device="cuda")
    state_ref, state_single = state.clone(), state.clone()
    for t in range(4):
        y = k.ssd_step_int8_triton(state, **_at(inp, t))
        y_ref = ssd_step_int8_ref(state_ref, **_at(inp, t))
        y_single = ssd_step_int8_ref(state_single, **_at(_single(inp), t))
        assert _rel(y, y_ref) <= GPU_RTOL, f"token {t} y: {_rel(y, y_ref):.2e}"
        assert _rel(state, state_ref) <= GPU_RTOL, f"token {t} state: {_rel(state, state_ref):.2e}"
    assert _rel(state_single, state_ref) > 10 * GPU_RTOL


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_step_dual_x_captures_in_a_cuda_graph(encoding):
    """Dual-scale x reads nothing on the host either: capture, copy new codes (and flags) in, replay == eager."""
    k = _kernels()
    h, p, g, n = MODELS["mamba2-2.7b"]
    inp = _dual_inputs("mamba2-2.7b", 2, 1, encoding, step=True)
    state = torch.randn(2, h, p, n, device="cuda")
    k.ssd_step_int8_triton(state.clone(), **inp)  # compile outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y_static = k.ssd_step_int8_triton(state, **inp)
    fresh = _dual_inputs("mamba2-2.7b", 2, 1, encoding, step=True)
    for key in ("qx", "qdt", "qB", "qC") + (("x_mask",) if encoding == "mask" else ()):
        inp[key].copy_(fresh[key])
    inp["x_dual"].outlier_scale.copy_(fresh["x_dual"].outlier_scale)
    start = torch.randn(2, h, p, n, device="cuda")
    state.copy_(start)
    graph.replay()
    eager_state = start.clone()
    y_eager = k.ssd_step_int8_triton(eager_state, **inp)
    torch.cuda.synchronize()
    assert torch.equal(y_static, y_eager)
    assert torch.equal(state, eager_state)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_dual_x_prefill_then_steps_equals_longer_prefill(encoding):
    k = _kernels()
    inp = _dual_inputs("mamba2-2.7b", 2, 1005, encoding)
    y_all, final_all = k.ssd_chunk_scan_int8_triton(**inp, chunk_size=CHUNK, return_final_states=True)
    y0, state = k.ssd_chunk_scan_int8_triton(**_at(inp, slice(0, 1000)), chunk_size=CHUNK, return_final_states=True)
    ys = [y0] + [k.ssd_step_int8_triton(state, **_at(inp, t)).unsqueeze(1) for t in range(1000, 1005)]
    assert _rel(torch.cat(ys, dim=1), y_all) <= GPU_RTOL
    assert _rel(state, final_all) <= GPU_RTOL
    assert _rel(torch.cat(ys, dim=1), ssd_chunk_scan_int8_ref(**inp, chunk_size=CHUNK)) <= GPU_RTOL


def test_dual_x_dispatchers_pick_the_kernels_on_cuda():
    k = _kernels()
    inp = _dual_inputs("mamba2-130m", 2, 300, "mask")
    want = k.ssd_chunk_scan_int8_triton(**inp, chunk_size=CHUNK)
    assert torch.equal(ssd_chunk_scan_int8(**inp, chunk_size=CHUNK, backend="cuda"), want)
    h, p, g, n = MODELS["mamba2-130m"]
    s0 = torch.randn(2, h, p, n, device="cuda")
    s_kernel, s_dispatch = s0.clone(), s0.clone()
    want = k.ssd_step_int8_triton(s_kernel, **_at(inp, 0))
    assert torch.equal(ssd_step_int8(s_dispatch, **_at(inp, 0), backend="cuda"), want)
    assert torch.equal(s_dispatch, s_kernel)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", list(MODELS))
def test_step_from_float_inputs_matches_the_codes_step(model, batch, dtype):
    """float_in: the step kernel fed the conv's float x / B / C (strided views of one xBC row, per-head x and
    per-group B / C scales) quantizes them as the quantize kernel does: state and output equal, bit for bit, the
    kernel fed those codes (qmamba.ops.int8_quantize, the CUDA kernel), up to fp32 summation order: the two
    compilations may order a reduction differently (measured on an H200: max |diff| / max |y| 1.9e-7, state 9.5e-8);
    one flipped code moves y by ~D * s_x, >= 1e-4 of max |y| here, so FLOAT_IN_TOL = 1e-5 tells them apart."""
    from qmamba.ops.int8_quantize import quantize_int8

    k = _kernels()
    h, p, g, n = MODELS[model]
    torch.manual_seed(batch)
    xbc = (torch.randn(batch, h * p + 2 * g * n, device="cuda") * 2).to(dtype)
    xbc[0, :4] = torch.tensor([0.0, -0.0, 1e4, -1e4])  # signed zeros and clamped values
    x, B, C = xbc[:, :h * p].view(batch, h, p), xbc[:, h * p:h * p + g * n].view(batch, g, n), \
        xbc[:, h * p + g * n:].view(batch, g, n)
    sx = x.float().abs().amax(dim=(0, 2)) / 127 * 0.8
    sB, sC = (t.float().abs().amax(dim=(0, 2)) / 127 * 0.8 for t in (B, C))
    qdt = torch.randint(-100, 100, (batch, h), dtype=torch.int8, device="cuda")
    common = dict(qdt=qdt, dt_scale=torch.tensor(0.02, device="cuda"), A=-torch.rand(h, device="cuda") * 8 - 1,
                  D=torch.randn(h, device="cuda"), dt_bias=torch.rand(h, device="cuda") * 0.1)
    S1 = torch.randn(batch, h, p, n, device="cuda")
    S2 = S1.clone()
    y1 = k.ssd_step_int8_triton(S1, x, sx, B_scale=sB, C_scale=sC, qB=B, qC=C, float_in=True, **common)
    y2 = k.ssd_step_int8_triton(S2, quantize_int8(x, sx, 1, backend="cuda"), sx, B_scale=sB, C_scale=sC,
                                qB=quantize_int8(B, sB, 1, backend="cuda"), qC=quantize_int8(C, sC, 1, backend="cuda"),
                                **common)
    assert _rel(y1, y2) <= FLOAT_IN_TOL and _rel(S1, S2) <= FLOAT_IN_TOL


@pytest.mark.parametrize("L", [1, 33, 1024, 2048])
@pytest.mark.parametrize("batch", [1, 8])
@pytest.mark.parametrize("model", list(MODELS))
def test_chunk_scan_from_float_inputs_matches_the_codes_scan(model, batch, L):
    """float_in: the chunk kernels fed the conv's float x / B / C (fp16 strided views of one xBC row) quantize them
    as the quantize kernel does: y and the final state equal the kernels fed those codes up to fp32 summation order
    (FLOAT_IN_TOL; measured on an H200 at L 1024: y 3.2e-8 of max |y|, final state bit for bit)."""
    from qmamba.ops.int8_quantize import quantize_int8

    k = _kernels()
    h, p, g, n = MODELS[model]
    torch.manual_seed(L + batch)
    xbc = (torch.randn(batch, L, h * p + 2 * g * n, device="cuda") * 2).half()
    x, B, C = (xbc[..., :h * p].view(batch, L, h, p), xbc[..., h * p:h * p + g * n].view(batch, L, g, n),
               xbc[..., h * p + g * n:].view(batch, L, g, n))
    sx = x.float().abs().amax(dim=(0, 1, 3)) / 127 * 0.8
    sB, sC = (t.float().abs().amax(dim=(0, 1, 3)) / 127 * 0.8 for t in (B, C))
    common = dict(qdt=torch.randint(-100, 100, (batch, L, h), dtype=torch.int8, device="cuda"),
                  dt_scale=torch.tensor(0.02, device="cuda"), A=-torch.rand(h, device="cuda") * 8 - 1,
                  D=torch.randn(h, device="cuda"), dt_bias=torch.rand(h, device="cuda") * 0.1, chunk_size=CHUNK,
                  return_final_states=True)
    y1, f1 = k.ssd_chunk_scan_int8_triton(x, sx, qB=B, B_scale=sB, qC=C, C_scale=sC, float_in=True, **common)
    y2, f2 = k.ssd_chunk_scan_int8_triton(quantize_int8(x, sx, 2, backend="cuda"), sx,
                                          qB=quantize_int8(B, sB, 2, backend="cuda"), B_scale=sB,
                                          qC=quantize_int8(C, sC, 2, backend="cuda"), C_scale=sC, **common)
    assert _rel(y1, y2) <= FLOAT_IN_TOL and _rel(f1, f2) <= FLOAT_IN_TOL
