"""The first-order linear recurrence ``h[t] = a[t] * h[t-1] + b[t]``, as a chunked (blocked) scan.

Time is cut into ``nc`` chunks of ``T`` steps, with T close to sqrt(L), and tensors are laid out *blocked*:
(..., T, nc, N), so step ``tt`` of every chunk is one contiguous slab. The scan then takes two short passes of
Python iterations, each one tensor op over all chunks at once, instead of L iterations:
  1. within chunks (T iterations, every chunk in parallel): the state reached from a zero start, and the product
     of ``a`` since the chunk start;
  2. across chunks (nc iterations on one (..., N) state): the state entering each chunk;
then one fused multiply-add adds the entering state, decayed, to every step. Only products of the recurrence's own
numbers are formed (no division, no exp of a difference), so it is as stable as the sequential loop. The Mamba1
selective scan builds its decays and inputs directly in the blocked layout, so no big tensor is ever transposed.

``reverse=True`` runs the recurrence from the end, ``h[t] = a[t] * h[t+1] + b[t]``, which is what backward needs.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def chunk_len(L: int) -> int:
    """The chunk length used for a sequence of L steps: the power of two nearest sqrt(L)."""
    return 1 << max(0, round(math.log2(max(1, L)) / 2))


def to_blocks(x: torch.Tensor, T: int, dim: int = -2, pad_value: float = 0.0) -> torch.Tensor:
    """(..., L, ...) -> (..., T, nc, ...) along ``dim`` (padded at the end to a multiple of T with ``pad_value``)."""
    dim = dim % x.dim()
    L = x.shape[dim]
    pad = (-L) % T
    if pad:
        widths = [0, 0] * (x.dim() - 1 - dim) + [0, pad]
        x = F.pad(x, widths, value=pad_value)
    nc = (L + pad) // T
    return x.unflatten(dim, (nc, T)).transpose(dim, dim + 1)


def from_blocks(x: torch.Tensor, L: int, dim: int = -3) -> torch.Tensor:
    """Inverse of ``to_blocks``: (..., T, nc, ...) at ``dim`` -> (..., L, ...)."""
    dim = dim % x.dim()
    return x.transpose(dim, dim + 1).flatten(dim, dim + 1).narrow(dim, 0, L)


def scan_blocks(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                reverse: bool = False) -> torch.Tensor:
    """All states of the recurrence for blocked ``a``, ``b`` of shape (..., T, nc, N); ``h0`` (..., N) enters the
    first chunk (the last one if ``reverse``). Returns h, blocked like ``a``. No autograd (see ``linear_scan``)."""
    T, nc = a.shape[-3], a.shape[-2]
    h = torch.empty_like(b)
    prod = torch.empty_like(a)
    steps = range(T - 1, -1, -1) if reverse else range(T)
    first = steps[0]
    h[..., first, :, :] = b[..., first, :, :]
    prod[..., first, :, :] = a[..., first, :, :]
    prev = first
    for tt in steps[1:]:  # within every chunk at once
        torch.addcmul(b[..., tt, :, :], a[..., tt, :, :], h[..., prev, :, :], out=h[..., tt, :, :])
        torch.mul(a[..., tt, :, :], prod[..., prev, :, :], out=prod[..., tt, :, :])
        prev = tt
    last = steps[-1]  # the step where a chunk hands its state on
    carry = torch.empty_like(h[..., 0, :, :])  # (..., nc, N): state entering each chunk
    state = h0 if h0 is not None else torch.zeros_like(h[..., 0, 0, :])
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):  # across chunks
        carry[..., c, :] = state
        state = torch.addcmul(h[..., last, c, :], prod[..., last, c, :], state)
    return h.addcmul_(prod, carry.unsqueeze(-3))


def shift_blocks(x: torch.Tensor, forward: bool, fill: float = 0.0) -> torch.Tensor:
    """The blocked tensor of x[t+1] (``forward``) or x[t-1] (else) along time, ``fill`` past the ends."""
    out = torch.empty_like(x)
    if forward:
        out[..., :-1, :, :] = x[..., 1:, :, :]
        out[..., -1, :-1, :] = x[..., 0, 1:, :]
        out[..., -1, -1, :] = fill
    else:
        out[..., 1:, :, :] = x[..., :-1, :, :]
        out[..., 0, 1:, :] = x[..., -1, :-1, :]
        out[..., 0, 0, :] = fill
    return out


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, chunk):
        L = a.shape[-2]
        T = chunk or chunk_len(L)
        ab, bb = to_blocks(a, T, pad_value=1.0).contiguous(), to_blocks(b, T).contiguous()
        hb = scan_blocks(ab, bb, h0)
        ctx.save_for_backward(ab, hb, h0)
        ctx.L = L
        return from_blocks(hb, L)

    @staticmethod
    def backward(ctx, grad_h):
        ab, hb, h0 = ctx.saved_tensors
        T = ab.shape[-3]
        # g[t] = grad_h[t] + a[t+1] * g[t+1]; then dL/db = g, dL/da[t] = g[t] * h[t-1], dL/dh0 = a[0] * g[0]
        g = scan_blocks(shift_blocks(ab, forward=True), to_blocks(grad_h, T).contiguous(), reverse=True)
        h_prev = shift_blocks(hb, forward=False)
        if h0 is not None:
            h_prev[..., 0, 0, :] = h0
        grad_a = from_blocks(g * h_prev, ctx.L)
        grad_h0 = ab[..., 0, 0, :] * g[..., 0, 0, :] if h0 is not None and ctx.needs_input_grad[2] else None
        return grad_a, from_blocks(g, ctx.L), grad_h0, None


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                chunk: int | None = None) -> torch.Tensor:
    """All states of ``h[t] = a[t] * h[t-1] + b[t]`` along dim -2, ``h[-1] = h0`` (zeros if None).

    a, b: (..., L, N), same shape (broadcast them first); h0: (..., N). Returns h: (..., L, N).
    Differentiable in a, b and h0. ``chunk``: steps per chunk (default ``chunk_len(L)``, about sqrt(L)).
    """
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"linear_scan: chunk must be >= 1, got {chunk}")
    return _LinearScan.apply(a, b, h0, chunk)


def linear_scan_loop_ref(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The plain sequential loop over time: the definition, used only to test `linear_scan` (slow)."""
    state = h0 if h0 is not None else torch.zeros_like(b[..., 0, :])
    out = []
    for t in range(a.shape[-2]):
        state = a[..., t, :] * state + b[..., t, :]
        out.append(state)
    return torch.stack(out, dim=-2)
