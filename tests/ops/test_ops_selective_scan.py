"""Mamba1 selective scan: the chunked reference (custom backward) against the sequential loop with autograd."""

import itertools

import pytest
import torch

from qmamba.ops import selective_scan, selective_scan_loop_ref, selective_scan_ref

# Both implementations compute in fp32 whatever the input dtype; they differ only in summation order.
# Errors are measured relative to the largest magnitude of the reference tensor.
RTOL_FP32 = 2e-5  # outputs, last state and every input gradient
RTOL_BF16 = 2e-2  # bf16 output rounding (8 bits of mantissa)

BATCH, DIM, NSTATE = 2, 8, 4


def _max_rel_err(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want.double()).abs().max() / want.double().abs().max().clamp_min(1e-30)).item()


def _inputs(L, groups=None, dtype=torch.float64, softplus=False, with_D=True, with_z=True, with_bias=True):
    """mamba_ssm's layouts; ``groups=None`` gives 3-D B / C (b, n, L), else 4-D (b, g, n, L)."""
    u = torch.randn(BATCH, DIM, L, dtype=dtype)
    if softplus:  # raw dt-projection output, made positive by softplus
        delta = torch.randn(BATCH, DIM, L, dtype=dtype) - 1.0
    else:  # already a time step
        delta = 0.05 + 0.5 * torch.rand(BATCH, DIM, L, dtype=dtype)
    A = -(0.5 + torch.rand(DIM, NSTATE, dtype=torch.float64)).to(dtype)
    bc_shape = (BATCH, NSTATE, L) if groups is None else (BATCH, groups, NSTATE, L)
    B = torch.randn(bc_shape, dtype=dtype)
    C = torch.randn(bc_shape, dtype=dtype)
    D = torch.randn(DIM, dtype=dtype) if with_D else None
    z = torch.randn(BATCH, DIM, L, dtype=dtype) if with_z else None
    delta_bias = (0.1 * torch.randn(DIM, dtype=dtype)) if with_bias else None
    return dict(u=u, delta=delta, A=A, B=B, C=C, D=D, z=z, delta_bias=delta_bias)


def _run(fn, inputs, softplus, return_last_state, requires_grad=False, **kw):
    leaves = {k: (v.clone().requires_grad_(requires_grad) if v is not None else None) for k, v in inputs.items()}
    out = fn(**leaves, delta_softplus=softplus, return_last_state=return_last_state, **kw)
    return out, leaves


CASES = list(itertools.product(
    [None, 1, 2],  # groups of B / C: 3-D, 4-D g=1, 4-D g=2
    [False, True],  # D and z
    [False, True],  # delta_bias and softplus
    [False, True],  # return_last_state
))


@pytest.mark.parametrize("groups,with_Dz,softplus,last", CASES)
def test_forward_matches_loop(groups, with_Dz, softplus, last):
    inputs = _inputs(37, groups, softplus=softplus, with_D=with_Dz, with_z=with_Dz, with_bias=softplus)
    out, _ = _run(selective_scan_ref, inputs, softplus, last)
    ref, _ = _run(selective_scan_loop_ref, inputs, softplus, last)
    if last:
        (out, out_last), (ref, ref_last) = out, ref
        assert out_last.shape == ref_last.shape == (BATCH, DIM, NSTATE)
        assert _max_rel_err(out_last, ref_last) <= RTOL_FP32
    assert out.shape == ref.shape == (BATCH, DIM, 37)
    assert out.dtype == torch.float64  # y in u's dtype
    assert _max_rel_err(out, ref) <= RTOL_FP32


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("L", [1, 15, 33])
def test_forward_chunk_sizes(chunk, L):
    inputs = _inputs(L, groups=2, softplus=True)
    out, _ = _run(selective_scan_ref, inputs, True, True, chunk=chunk)
    ref, _ = _run(selective_scan_loop_ref, inputs, True, True)
    for got, want in zip(out, ref):
        assert _max_rel_err(got, want) <= RTOL_FP32


def test_single_step_closed_form():
    # one step from a zero state: h = delta * B * u, y = sum_n C h + D u
    inputs = _inputs(1, groups=None, softplus=False, with_z=False, with_bias=False)
    u, delta, B, C, D = (inputs[k] for k in ("u", "delta", "B", "C", "D"))
    want = (delta * u) * (B * C).sum(1, keepdim=True) + D[:, None] * u
    got = selective_scan_ref(**inputs)
    assert _max_rel_err(got, want) <= RTOL_FP32


@pytest.mark.parametrize("groups,with_Dz,softplus,last", [c for c in CASES if c[1] == c[2]])
def test_gradients_match_loop(groups, with_Dz, softplus, last):
    inputs = _inputs(21, groups, softplus=softplus, with_D=with_Dz, with_z=with_Dz, with_bias=softplus)
    results = []
    for fn in (lambda **kw: selective_scan_ref(**kw, chunk=4), selective_scan_loop_ref):
        out, leaves = _run(fn, inputs, softplus, last, requires_grad=True)
        y, state = out if last else (out, None)
        torch.manual_seed(1)  # the same upstream gradients for both
        loss = (y * torch.randn_like(y)).sum()
        if state is not None:
            loss = loss + (state * torch.randn_like(state)).sum()
        loss.backward()
        results.append({k: v.grad for k, v in leaves.items() if v is not None})
    got, want = results
    assert got.keys() == want.keys()
    for name in want:
        assert got[name] is not None, name
        assert got[name].shape == inputs[name].shape, name
        assert _max_rel_err(got[name], want[name]) <= RTOL_FP32, name


def test_gradients_of_last_state_only():
    # a loss on the last state alone exercises the backward's grad_last path without any grad from y;
    # C, D and z do not reach the state, so their gradients are zero (or None from the loop's autograd)
    inputs = _inputs(19, groups=2, softplus=True)
    grads = []
    for fn in (selective_scan_ref, selective_scan_loop_ref):
        (_, state), leaves = _run(fn, inputs, True, True, requires_grad=True)
        state.pow(2).sum().backward()
        grads.append({k: (v.grad if v.grad is not None else torch.zeros_like(v)) for k, v in leaves.items()})
    for name in ("u", "delta", "A", "B", "delta_bias"):
        assert grads[1][name].abs().max() > 0, name
        assert _max_rel_err(grads[0][name], grads[1][name]) <= RTOL_FP32, name
    for name in ("C", "D", "z"):
        assert grads[0][name].abs().max() == 0 and grads[1][name].abs().max() == 0, name


def test_bf16_inputs_give_bf16_output():
    inputs = _inputs(40, groups=2, dtype=torch.bfloat16, softplus=True)
    out = selective_scan_ref(**inputs, delta_softplus=True)
    assert out.dtype == torch.bfloat16
    ref = selective_scan_loop_ref(**{k: (v.double() if v is not None else None) for k, v in inputs.items()},
                                  delta_softplus=True)
    assert _max_rel_err(out, ref) <= RTOL_BF16


def test_dispatcher_on_cpu_uses_reference():
    inputs = _inputs(10, groups=2, softplus=True)
    ref = selective_scan_ref(**inputs, delta_softplus=True)
    for backend in ("auto", "torch"):
        torch.testing.assert_close(selective_scan(**inputs, delta_softplus=True, backend=backend), ref,
                                   rtol=0, atol=0)


def test_cuda_backend_on_cpu_raises_with_install_hint():
    with pytest.raises(RuntimeError, match=r"qmamba\[cuda\]"):
        selective_scan(**_inputs(4), backend="cuda")


def test_unknown_backend_raises():
    with pytest.raises(ValueError, match="bogus"):
        selective_scan(**_inputs(4), backend="bogus")


def test_groups_must_divide_channels():
    inputs = _inputs(4, groups=3)
    with pytest.raises(ValueError, match="groups"):
        selective_scan_ref(**inputs)
