"""The chunked parallel linear recurrence ``linear_scan`` against the sequential loop (its definition)."""

import pytest
import torch

from qmamba.ops.linear_scan import from_blocks, linear_scan, linear_scan_loop_ref, scan_blocks, shift_blocks, to_blocks

# float64 in, float64 math: only summation order differs from the loop
RTOL_F64, ATOL_F64 = 1e-10, 1e-12
# float32: the doubling scan and the loop round differently
RTOL_F32, ATOL_F32 = 1e-5, 1e-6


def _inputs(shape, dtype=torch.float64, with_h0=False):
    """Decays a in (0.5, 1) (a stable recurrence, as exp(delta * A) is) and inputs b ~ N(0, 1)."""
    a = 0.5 + 0.5 * torch.rand(shape, dtype=dtype)
    b = torch.randn(shape, dtype=dtype)
    h0 = torch.randn(*shape[:-2], shape[-1], dtype=dtype) if with_h0 else None
    return a, b, h0


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("L", [1, 3, 16, 37, 64])
@pytest.mark.parametrize("with_h0", [False, True])
def test_forward_matches_loop(chunk, L, with_h0):
    a, b, h0 = _inputs((2, 3, L, 5), with_h0=with_h0)
    out = linear_scan(a, b, h0, chunk=chunk)
    ref = linear_scan_loop_ref(a, b, h0)
    assert out.shape == ref.shape == (2, 3, L, 5)
    torch.testing.assert_close(out, ref, rtol=RTOL_F64, atol=ATOL_F64)


def test_forward_float32_matches_loop():
    a, b, h0 = _inputs((2, 100, 8), dtype=torch.float32, with_h0=True)
    out = linear_scan(a, b, h0, chunk=16)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, linear_scan_loop_ref(a, b, h0), rtol=RTOL_F32, atol=ATOL_F32)


def test_known_values():
    # h[t] = 0.5 h[t-1] + 1 from h0 = 2: 2 -> 2, 2, 2 ... ; from h0 = 0: 1, 1.5, 1.75, 1.875
    a = torch.full((1, 4, 1), 0.5, dtype=torch.float64)
    b = torch.ones(1, 4, 1, dtype=torch.float64)
    assert linear_scan(a, b, chunk=2).flatten().tolist() == [1.0, 1.5, 1.75, 1.875]
    assert linear_scan(a, b, torch.full((1, 1), 2.0, dtype=torch.float64), chunk=2).flatten().tolist() == [2.0] * 4


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("L", [5, 16, 21])
def test_gradients_match_loop(chunk, L):
    a, b, h0 = _inputs((2, L, 3), with_h0=True)
    w = torch.randn(2, L, 3, dtype=torch.float64)  # a generic upstream gradient
    grads = []
    for fn in (lambda *t: linear_scan(*t, chunk=chunk), linear_scan_loop_ref):
        leaves = [t.clone().requires_grad_() for t in (a, b, h0)]
        (fn(*leaves) * w).sum().backward()
        grads.append([t.grad for t in leaves])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=RTOL_F64, atol=ATOL_F64)


@pytest.mark.parametrize("chunk", [1, 2, 4])
@pytest.mark.parametrize("with_h0", [False, True])
def test_gradcheck(chunk, with_h0):
    a, b, h0 = _inputs((2, 7, 2), with_h0=with_h0)
    inputs = (a.requires_grad_(), b.requires_grad_(), h0.requires_grad_() if h0 is not None else None)
    assert torch.autograd.gradcheck(lambda a, b, h0: linear_scan(a, b, h0, chunk=chunk), inputs)


def test_h0_without_grad_gets_none():
    a, b, h0 = _inputs((1, 6, 2), with_h0=True)
    a.requires_grad_()
    linear_scan(a, b, h0, chunk=4).sum().backward()
    assert a.grad is not None and h0.grad is None


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        linear_scan(torch.rand(1, 4, 2), torch.rand(1, 4, 3))


@pytest.mark.parametrize("chunk", [1, 4, 16])
@pytest.mark.parametrize("L", [1, 13, 32])
@pytest.mark.parametrize("with_h0", [False, True])
def test_reverse_scan_matches_flipped_loop(chunk, L, with_h0):
    # the backward's engine: h[t] = a[t] * h[t+1] + b[t] from h[L] = h0
    a, b, h0 = _inputs((2, L, 3), with_h0=with_h0)
    pad = (-L) % chunk  # padded steps sit at the end: a = 1, b = 0 carries h0 through them unchanged
    blocks = scan_blocks(to_blocks(a, chunk, pad_value=1.0).contiguous(), to_blocks(b, chunk).contiguous(), h0,
                         reverse=True)
    out = from_blocks(blocks, L)
    assert pad >= 0
    ref = linear_scan_loop_ref(a.flip(-2), b.flip(-2), h0).flip(-2)
    torch.testing.assert_close(out, ref, rtol=RTOL_F64, atol=ATOL_F64)


@pytest.mark.parametrize("chunk", [1, 3, 4])
def test_blocks_round_trip_and_shift(chunk):
    x = torch.arange(2 * 10 * 3, dtype=torch.float64).reshape(2, 10, 3)
    blocks = to_blocks(x, chunk)
    assert blocks.shape[-3:] == (chunk, -(-10 // chunk), 3)
    torch.testing.assert_close(from_blocks(blocks, 10), x)
    nxt = from_blocks(shift_blocks(blocks.contiguous(), forward=True, fill=-1.0), 10)
    prv = from_blocks(shift_blocks(blocks.contiguous(), forward=False, fill=-1.0), 10)
    torch.testing.assert_close(nxt[:, :-1], x[:, 1:])
    torch.testing.assert_close(prv[:, 1:], x[:, :-1])
    assert (prv[:, 0] == -1).all()
