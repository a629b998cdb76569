"""Mamba2 SSD: the chunked reference against the sequential loop (its definition), state passing, segment_sum."""

import itertools

import pytest
import torch
import torch.nn.functional as F

from qmamba.ops import ssd_chunk_scan, ssd_chunk_scan_ref, ssd_loop_ref
from qmamba.ops.ssd import segment_sum

# Both compute in fp32 whatever the input dtype; errors relative to the largest magnitude of the reference.
RTOL_FP32 = 2e-5  # outputs, states, gradients
RTOL_BF16 = 2e-2

BATCH, HEADS, HEADDIM, NSTATE = 2, 4, 3, 5


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _inputs(L, groups=1, dtype=torch.float64, D_shape="h", with_z=True, softplus=True):
    x = torch.randn(BATCH, L, HEADS, HEADDIM, dtype=dtype)
    # with softplus: a raw projection (softplus(dt + bias) is in ~(0.1, 1)); without: already a positive step
    dt = (torch.randn(BATCH, L, HEADS) - 1.0 if softplus else 0.05 + 0.5 * torch.rand(BATCH, L, HEADS)).to(dtype)
    A = -(0.5 + 1.5 * torch.rand(HEADS)).to(dtype)
    B = torch.randn(BATCH, L, groups, NSTATE, dtype=dtype)
    C = torch.randn(BATCH, L, groups, NSTATE, dtype=dtype)
    D = {None: None, "h": torch.randn(HEADS), "hp": torch.randn(HEADS, HEADDIM)}[D_shape]
    z = torch.randn(BATCH, L, HEADS, HEADDIM, dtype=dtype) if with_z else None
    dt_bias = 0.1 * torch.randn(HEADS, dtype=dtype) if softplus else None
    return dict(x=x, dt=dt, A=A, B=B, C=C, D=None if D is None else D.to(dtype), z=z, dt_bias=dt_bias,
                dt_softplus=softplus)


def _final_state_loop(x, dt, A, B, C, dt_bias=None, dt_softplus=False, initial_states=None, **_):
    """S[t] = exp(dt A) S[t-1] + dt x B^T per head, written out independently of the library: (b, h, p, n)."""
    dt = dt.double() + (dt_bias.double() if dt_bias is not None else 0)
    dt = F.softplus(dt) if dt_softplus else dt
    Bh = B.double().repeat_interleave(HEADS // B.shape[2], dim=2)  # (b, L, h, n)
    S = torch.zeros(BATCH, HEADS, HEADDIM, NSTATE, dtype=torch.float64)
    if initial_states is not None:
        S = initial_states.double().clone()
    for t in range(x.shape[1]):
        decay = torch.exp(dt[:, t] * A.double())[:, :, None, None]
        S = decay * S + (dt[:, t, :, None] * x[:, t].double())[..., None] * Bh[:, t, :, None, :]
    return S


def _split(inputs, t0, t1):
    """The inputs restricted to time steps [t0, t1)."""
    out = dict(inputs)
    for k in ("x", "dt", "B", "C", "z"):
        if out[k] is not None:
            out[k] = out[k][:, t0:t1]
    return out


@pytest.mark.parametrize("chunk,L", [(1, 7), (4, 16), (4, 37), (16, 37), (64, 37), (16, 1)])
@pytest.mark.parametrize("groups", [1, 2])
def test_forward_matches_loop_chunk_sizes(chunk, L, groups):
    inputs = _inputs(L, groups)
    out = ssd_chunk_scan_ref(chunk_size=chunk, **inputs)
    ref = ssd_loop_ref(**inputs)
    assert out.shape == ref.shape == (BATCH, L, HEADS, HEADDIM)
    assert out.dtype == torch.float64
    assert _max_rel_err(out, ref) <= RTOL_FP32


@pytest.mark.parametrize("D_shape,with_z,softplus", list(itertools.product([None, "h", "hp"], [False, True],
                                                                          [False, True])))
def test_forward_matches_loop_options(D_shape, with_z, softplus):
    inputs = _inputs(23, groups=2, D_shape=D_shape, with_z=with_z, softplus=softplus)
    assert _max_rel_err(ssd_chunk_scan_ref(chunk_size=8, **inputs), ssd_loop_ref(**inputs)) <= RTOL_FP32


def test_D_per_head_equals_D_broadcast_over_headdim():
    inputs = _inputs(11, D_shape="h")
    wide = dict(inputs, D=inputs["D"][:, None].expand(HEADS, HEADDIM).contiguous())
    torch.testing.assert_close(ssd_chunk_scan_ref(chunk_size=4, **inputs), ssd_chunk_scan_ref(chunk_size=4, **wide),
                               rtol=0, atol=0)


@pytest.mark.parametrize("chunk", [4, 16])
def test_final_states_match_definition(chunk):
    inputs = _inputs(30, groups=2)
    init = torch.randn(BATCH, HEADS, HEADDIM, NSTATE, dtype=torch.float64)
    _, final = ssd_chunk_scan_ref(chunk_size=chunk, initial_states=init, return_final_states=True, **inputs)
    assert final.shape == (BATCH, HEADS, HEADDIM, NSTATE)
    assert _max_rel_err(final, _final_state_loop(initial_states=init, **inputs)) <= RTOL_FP32


@pytest.mark.parametrize("chunk,cut", [(8, 16), (8, 13), (16, 5)])
def test_two_halves_with_initial_state_equal_whole(chunk, cut):
    inputs = _inputs(40, groups=2, D_shape="hp")
    y, final = ssd_chunk_scan_ref(chunk_size=chunk, return_final_states=True, **inputs)
    y1, s1 = ssd_chunk_scan_ref(chunk_size=chunk, return_final_states=True, **_split(inputs, 0, cut))
    y2, s2 = ssd_chunk_scan_ref(chunk_size=chunk, initial_states=s1, return_final_states=True,
                                **_split(inputs, cut, 40))
    assert _max_rel_err(torch.cat([y1, y2], dim=1), y) <= RTOL_FP32
    assert _max_rel_err(s2, final) <= RTOL_FP32


def test_initial_state_gradient_through_halves():
    # d loss / d(first half inputs) is the same whether the state flows inside one call or across two calls
    inputs = _inputs(24, groups=1)
    w = torch.randn(BATCH, 24, HEADS, HEADDIM, dtype=torch.float64)

    def grad_x(split: bool):
        x = inputs["x"].clone().requires_grad_()
        full = dict(inputs, x=x)
        if split:
            y1, s1 = ssd_chunk_scan_ref(chunk_size=4, return_final_states=True, **_split(full, 0, 10))
            y2 = ssd_chunk_scan_ref(chunk_size=4, initial_states=s1, **_split(full, 10, 24))
            y = torch.cat([y1, y2], dim=1)
        else:
            y = ssd_chunk_scan_ref(chunk_size=4, **full)
        (y * w).sum().backward()
        return x.grad

    assert _max_rel_err(grad_x(True), grad_x(False)) <= RTOL_FP32


@pytest.mark.parametrize("groups,D_shape,chunk", [(1, "h", 4), (2, "hp", 8), (2, "h", 64)])
def test_gradients_match_loop(groups, D_shape, chunk):
    inputs = _inputs(21, groups, D_shape=D_shape)
    tensors = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    w = torch.randn(BATCH, 21, HEADS, HEADDIM, dtype=torch.float64)
    grads = []
    for fn in (lambda **kw: ssd_chunk_scan_ref(chunk_size=chunk, **kw), ssd_loop_ref):
        leaves = {k: v.clone().requires_grad_() for k, v in tensors.items()}
        (fn(**leaves, dt_softplus=True) * w).sum().backward()
        grads.append({k: v.grad for k, v in leaves.items()})
    assert set(grads[0]) == {"x", "dt", "A", "B", "C", "D", "z", "dt_bias"}
    for name, want in grads[1].items():
        assert grads[0][name].shape == tensors[name].shape, name
        assert _max_rel_err(grads[0][name], want) <= RTOL_FP32, name


def test_bf16_inputs_give_bf16_output():
    inputs = _inputs(33, groups=2, dtype=torch.bfloat16)
    out = ssd_chunk_scan_ref(chunk_size=16, **inputs)
    assert out.dtype == torch.bfloat16
    ref = ssd_loop_ref(**{k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in inputs.items()})
    assert _max_rel_err(out, ref) <= RTOL_BF16


def test_segment_sum_values():
    x = torch.tensor([1.0, 2.0, 3.0, 4.0])
    inf = float("-inf")
    expected = torch.tensor([[0.0, inf, inf, inf],
                             [2.0, 0.0, inf, inf],
                             [5.0, 3.0, 0.0, inf],
                             [9.0, 7.0, 4.0, 0.0]])
    torch.testing.assert_close(segment_sum(x), expected, rtol=0, atol=0)
    # leading dims are batched
    batched = segment_sum(torch.stack([x, 2 * x]))
    assert batched.shape == (2, 4, 4)
    torch.testing.assert_close(batched[1].tril(), 2 * expected.tril().nan_to_num(neginf=0.0), rtol=0, atol=0)


def test_segment_sum_exp_is_decay_between_positions():
    # exp(segment_sum(a))[i, j] = prod_{j < k <= i} exp(a[k]): the decay from step j to step i
    a = -torch.rand(6, dtype=torch.float64)
    M = torch.exp(segment_sum(a))
    for i in range(6):
        for j in range(6):
            want = torch.exp(a[j + 1:i + 1].sum()) if i >= j else torch.tensor(0.0, dtype=torch.float64)
            torch.testing.assert_close(M[i, j], want, rtol=1e-12, atol=0)


def test_groups_must_divide_heads():
    inputs = _inputs(4, groups=3)
    with pytest.raises(ValueError, match="groups"):
        ssd_chunk_scan_ref(chunk_size=4, **inputs)


def test_dispatcher_on_cpu():
    inputs = _inputs(9, groups=2)
    ref = ssd_chunk_scan_ref(chunk_size=4, **inputs)
    torch.testing.assert_close(ssd_chunk_scan(chunk_size=4, backend="auto", **inputs), ref, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r"qmamba\[cuda\]"):
        ssd_chunk_scan(chunk_size=4, backend="cuda", **inputs)
    with pytest.raises(ValueError, match="bogus"):
        ssd_chunk_scan(chunk_size=4, backend="bogus", **inputs)
