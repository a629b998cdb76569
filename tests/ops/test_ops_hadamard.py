"""The Hadamard rotation against a Sylvester matrix built here by hand (H_1 = [1], H_2n = [[H, H], [H, -H]]),
block-diagonal for widths that are not powers of two. Tolerances: fp32 sums of up to 1024 terms of size 1 -> 1e-5."""

import math

import pytest
import torch

from qmamba.ops import hadamard_transform
from qmamba.ops.hadamard import hadamard_block, hadamard_matrix


def sylvester(b: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < b:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h / math.sqrt(b)


@pytest.mark.parametrize("n, block", [(1, 1), (2, 2), (8, 8), (12, 4), (48, 16), (64, 64), (1536, 512), (5120, 1024)])
def test_block_is_largest_power_of_two_dividing_width(n, block):
    assert hadamard_block(n) == block


@pytest.mark.parametrize("n", [4, 12, 64, 96])
def test_matches_block_diagonal_sylvester_matrix(n):
    b = hadamard_block(n)
    dense = torch.block_diag(*[sylvester(b)] * (n // b))
    x = torch.randn(3, 5, n, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    got = hadamard_transform(x)
    assert got.dtype == torch.float32 and got.shape == x.shape
    torch.testing.assert_close(got.double(), x @ dense, rtol=0, atol=1e-5)


@pytest.mark.parametrize("n", [16, 24, 1024])
def test_orthonormal_symmetric_involution(n):
    h = hadamard_matrix(n)
    torch.testing.assert_close(h, h.T, rtol=0, atol=0)
    torch.testing.assert_close(h @ h, torch.eye(n), rtol=0, atol=1e-5)
    x = torch.randn(7, n, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(hadamard_transform(hadamard_transform(x)), x, rtol=0, atol=1e-5)
    torch.testing.assert_close(hadamard_transform(x).norm(dim=-1), x.norm(dim=-1), rtol=1e-5, atol=0)


def test_linear_identity_W_x_equals_WH_Hx():
    g = torch.Generator().manual_seed(2)
    w, x = torch.randn(10, 96, generator=g), torch.randn(4, 96, generator=g)
    torch.testing.assert_close(hadamard_transform(x) @ hadamard_transform(w).T, x @ w.T, rtol=1e-5, atol=1e-5)


def test_spreads_a_channel_outlier():
    x = torch.randn(256, 64, generator=torch.Generator().manual_seed(3))
    x[:, 5] *= 100  # one outlier channel dominates the per-tensor absmax
    assert hadamard_transform(x).abs().max() < x.abs().max() / 4


def test_bf16_input_is_rotated_in_fp32():
    x = torch.randn(2, 32, generator=torch.Generator().manual_seed(4)).bfloat16()
    torch.testing.assert_close(hadamard_transform(x), hadamard_transform(x.float()), rtol=0, atol=0)


def test_bad_width():
    with pytest.raises(ValueError, match="positive width"):
        hadamard_block(0)


def test_backend_dispatch_on_cpu():
    x = torch.randn(3, 48)
    assert torch.equal(hadamard_transform(x, "auto"), hadamard_transform(x))  # no GPU: the torch ops
    with pytest.raises(RuntimeError, match="backend='cuda'.*not on a CUDA device"):
        hadamard_transform(x, "cuda")
    with pytest.raises(ValueError, match="backend must be"):
        hadamard_transform(x, "triton")


_INTERPRETER_SCRIPT = """
import os
os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported
import torch
from qmamba.kernels.triton.hadamard import HadamardTransform
from qmamba.ops.hadamard import hadamard_block, hadamard_transform

failures, n_cases = [], 0
# widths: powers of two up to the 1024 block of the 2.8b d_inner, and block-diagonal ones (96 = 3 x 32,
# 192 = 3 x 64, 5120 = 5 x 1024); leading dims with an odd row count (the interpreter's programs take 2 rows)
for n, lead in [(1, (4,)), (2, (3,)), (8, (5,)), (96, (7,)), (192, (2, 3)), (1024, (3,)), (5120, (1,))]:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        g = torch.Generator().manual_seed(n_cases)
        x = (torch.randn(*lead, n, generator=g) * 3).to(dtype)
        x.view(-1)[:2] = torch.tensor([-0.0, float("inf")])  # a signed zero and an inf travel as in torch
        xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
        yr, yf = hadamard_transform(xr), HadamardTransform.apply(xf, hadamard_block(n))
        n_cases += 1
        same = yr.dtype == yf.dtype == torch.float32 and yr.shape == yf.shape and bool(
            ((yr.view(torch.int32) == yf.view(torch.int32)) | (yr.isnan() & yf.isnan())).all())
        if not same:
            failures.append(("forward", n, lead, str(dtype)))
            continue
        go = torch.randn(yr.shape, generator=g)
        yr.backward(go)
        yf.backward(go)
        if xf.grad.dtype != dtype or not torch.equal(xr.grad, xf.grad):  # values (a zero's sign may differ)
            failures.append(("grad", n, lead, str(dtype)))
print("cases", n_cases, "failures", failures)
assert not failures, failures
"""


def test_triton_transform_under_interpreter_equals_torch(interpret):
    assert "failures []" in interpret(_INTERPRETER_SCRIPT)
