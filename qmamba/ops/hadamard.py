"""Orthonormal Hadamard rotation of the last dimension (Quamba rotates the out_proj input with it so that its outliers
spread over the channels before per-tensor quantization; ``W x = (W H)(H x)`` because H is symmetric and orthonormal).

For a width ``n`` that is not a power of two the rotation is block-diagonal: ``n / b`` independent Hadamard blocks of
size ``b``, the largest power of two dividing ``n`` (1536 -> 3 blocks of 512, 5120 -> 5 blocks of 1024). It is still
orthonormal and symmetric, so the identity above holds for every width.
"""

from __future__ import annotations

import math

import torch

from qmamba.ops.backend import use_triton


def hadamard_block(n: int) -> int:
    """The block size of the rotation of width ``n``: the largest power of two dividing n."""
    if n < 1:
        raise ValueError(f"a Hadamard rotation needs a positive width, got {n}")
    return n & -n


def hadamard_transform(x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
    """``x @ H`` over the last dimension, H the orthonormal (block-diagonal) Sylvester Hadamard matrix, in fp32.

    A fast Walsh-Hadamard transform: log2(b) butterfly stages of adds and subtracts, then one scale by 1/sqrt(b).
    Returns fp32 (the rotated tensor is what gets quantized; DESIGN §3 quantizes fp32 values). Differentiable.

    ``backend``: "torch" (these ops), "auto" (the Triton kernel of ``qmamba.kernels.triton.hadamard`` when x is on a
    GPU and triton imports: the same values, one kernel forward and one backward), "cuda" (that kernel, or an error
    saying why not).
    """
    n = x.shape[-1]
    b = hadamard_block(n)
    if use_triton(backend, x, "hadamard_transform"):
        from qmamba.kernels.triton.hadamard import HadamardTransform

        return HadamardTransform.apply(x, b)
    lead = x.shape[:-1]
    y = x.float().reshape(-1, n // b, b)
    h = 1
    while h < b:  # stage: pairs (i, i + h) inside every group of 2h -> (sum, difference)
        y = y.reshape(y.shape[0], n // b, b // (2 * h), 2, h)
        y = torch.stack((y[..., 0, :] + y[..., 1, :], y[..., 0, :] - y[..., 1, :]), dim=-2)
        h *= 2
    return (y.reshape(*lead, n) * (1.0 / math.sqrt(b))).contiguous()


def hadamard_matrix(n: int, device=None) -> torch.Tensor:
    """The dense (n, n) matrix of ``hadamard_transform`` (for tests and small widths)."""
    return hadamard_transform(torch.eye(n, device=device))
