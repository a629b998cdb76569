"""Triton fast Walsh-Hadamard transform: ``qmamba.ops.hadamard.hadamard_transform`` (forward) and its autograd
backward, one kernel each instead of torch's ~4 ops per butterfly stage (and, backward, zero-filled select gradients).

    x (..., n) any float -> fp32 (..., n): rows of b = hadamard_block(n) contiguous elements
    forward    stages h = 1, 2, 4, .., b / 2: pairs (i, i + h) inside each group of 2h -> (sum, difference); then * c
    backward   the gradient * c, then the stages in reverse order (h = b / 2, .., 1), the same butterflies
    c = fp32(1 / sqrt(b))

the reference's ops in its order (its autograd backward applies the scale first and the stages last to first), so
values match it bit for bit; gradients as values (a zero's sign may differ: torch adds the two zero-filled select
gradients). Each program holds ROWS rows of b fp32 values in registers and runs the stages there. Used in fakequant
mode for the rotated out_proj input (``QuantLinear`` with ``rotation: hadamard``); the int8 path has its own
rotate + quantize kernel (csrc/hadamard). CPU tests run it under ``TRITON_INTERPRET=1``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from qmamba.kernels.triton.launch import interpreting, on_device_of


@triton.jit
def _butterfly(y, ROWS: tl.constexpr, B: tl.constexpr, H: tl.constexpr):
    """One stage on (ROWS, B): pairs (i, i + H) inside each group of 2H -> (sum, difference)."""
    # (rows, groups of 2H, [first half, second half], H) -> the halves as the last axis -> (sum, difference)
    y = tl.permute(tl.reshape(y, (ROWS, B // (2 * H), 2, H)), (0, 1, 3, 2))
    lo, hi = tl.split(y)
    return tl.reshape(tl.permute(tl.join(lo + hi, lo - hi), (0, 1, 3, 2)), (ROWS, B))


@triton.jit
def _fwht_kernel(x_ptr, y_ptr, rows, scale, B: tl.constexpr, LOG_B: tl.constexpr, ROWS: tl.constexpr,
                 REVERSE: tl.constexpr):
    r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    offs = r[:, None].to(tl.int64) * B + tl.arange(0, B)[None, :]
    mask = (r < rows)[:, None]
    y = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # the stage width is passed as a constexpr argument: a constexpr assigned inside an unrolled loop would be
    # reassigned on its second iteration, which the compiler refuses (the interpreter does not)
    if REVERSE:
        y = y * scale
        for i in tl.static_range(LOG_B):
            y = _butterfly(y, ROWS, B, B >> (i + 1))
    else:
        for i in tl.static_range(LOG_B):
            y = _butterfly(y, ROWS, B, 1 << i)
        y = y * scale
    tl.store(y_ptr + offs, y, mask=mask)


def _launch(x: torch.Tensor, b: int, reverse: bool) -> torch.Tensor:
    """x (contiguous, b | numel) -> fp32 of x's shape: the transform (or its backward) over rows of b."""
    y = torch.empty(x.shape, dtype=torch.float32, device=x.device)
    rows = x.numel() // b
    if rows == 0:
        return y
    per_program = max(1, min(16, 2048 // b)) if not interpreting() else 2
    rows_per = triton.next_power_of_2(per_program)
    # a Python float argument is an fp32 scalar in the kernel: fp32(1 / sqrt(b)), the reference's multiplier
    with on_device_of(x):
        _fwht_kernel[(triton.cdiv(rows, rows_per),)](x, y, rows, 1.0 / math.sqrt(b), B=b, LOG_B=b.bit_length() - 1,
                                                     ROWS=rows_per, REVERSE=reverse, enable_fp_fusion=False,
                                                     num_warps=4 if b * rows_per <= 2048 else 8)
    return y


class HadamardTransform(torch.autograd.Function):
    """``hadamard_transform`` through the Triton kernel: fp32 out, the backward the transposed (= same) rotation in
    the reference autograd's order, cast back to x's dtype."""

    @staticmethod
    def forward(ctx, x, b):
        ctx.b, ctx.x_dtype = b, x.dtype
        return _launch(x.contiguous(), b, reverse=False)

    @staticmethod
    def backward(ctx, grad):
        return _launch(grad.float().contiguous(), ctx.b, reverse=True).to(ctx.x_dtype), None
