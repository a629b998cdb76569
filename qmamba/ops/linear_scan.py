"""The first-order linear recurrence ``h[t] = a[t] * h[t-1] + b[t]`` evaluated in parallel, with its exact backward.

This is the core of the pure-torch selective scan. It is a chunked scan with no Python loop over time steps:
time is cut into chunks of ``chunk`` steps; inside every chunk, all chunks at once, a Hillis-Steele doubling scan
(log2(chunk) tensor-wide steps) gives each step's state from a zero start and the decay product since the chunk
start; a short loop over chunks (L / chunk steps on one state-sized tensor) carries the state across chunk
boundaries. The products only ever multiply numbers of the recurrence (no division, no exp of a sum), so it is as
stable as the sequential loop.

The backward is the same recurrence run in reverse (``reverse=True``): with ``g[t] = dLoss/dh[t] + a[t+1] * g[t+1]``,
``dLoss/db[t] = g[t]`` and ``dLoss/da[t] = g[t] * h[t-1]``. Only ``a`` and the output ``h`` are saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 8


def _scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, chunk: int,
          reverse: bool = False) -> torch.Tensor:
    """Recurrence along dim -2 of ``a``, ``b`` (shape (..., L, N)); ``h0`` of shape (..., N) or None.

    ``reverse=True`` runs it from the end: ``h[t] = a[t] * h[t+1] + b[t]``, ``h[L] = h0``."""
    L = a.shape[-2]
    T = max(1, min(chunk, L))
    pad = (-L) % T
    if pad:  # a = 1, b = 0 on padded steps leaves the state unchanged
        where = (0, 0, pad, 0) if reverse else (0, 0, 0, pad)
        a = F.pad(a, where, value=1.0)
        b = F.pad(b, where, value=0.0)
    lead, N = a.shape[:-2], a.shape[-1]
    nc = (L + pad) // T
    # prod: product of a from the chunk start (chunk end if reverse) to the step; h: state reached from zero there
    prod = a.reshape(*lead, nc, T, N)
    h = b.reshape(*lead, nc, T, N)
    step = 1
    while step < T:  # Hillis-Steele doubling: combine each step with the partial result `step` steps before it
        new_h, new_prod = torch.empty_like(h), torch.empty_like(prod)
        if reverse:
            cur, src, keep = slice(None, -step), slice(step, None), slice(T - step, None)
        else:
            cur, src, keep = slice(step, None), slice(None, -step), slice(None, step)
        new_h[..., keep, :] = h[..., keep, :]
        new_prod[..., keep, :] = prod[..., keep, :]
        torch.addcmul(h[..., cur, :], prod[..., cur, :], h[..., src, :], out=new_h[..., cur, :])
        torch.mul(prod[..., cur, :], prod[..., src, :], out=new_prod[..., cur, :])
        h, prod = new_h, new_prod
        step *= 2
    # carry the state across chunk boundaries: carry[c] is the state entering chunk c
    carry = torch.empty(*lead, nc, N, dtype=h.dtype, device=h.device)
    state = h0 if h0 is not None else torch.zeros(*lead, N, dtype=h.dtype, device=h.device)
    last = 0 if reverse else -1
    for c in (range(nc - 1, -1, -1) if reverse else range(nc)):
        carry[..., c, :] = state
        state = torch.addcmul(h[..., c, last, :], prod[..., c, last, :], state)
    h = torch.addcmul(h, prod, carry.unsqueeze(-2))  # (..., nc, T, N)
    h = h.reshape(*lead, nc * T, N)
    return h[..., pad:, :] if reverse else h[..., :L, :]


class _LinearScan(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a, b, h0, chunk):
        h = _scan(a, b, h0, chunk)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk = chunk
        return h

    @staticmethod
    def backward(ctx, grad_h):
        a, h, h0 = ctx.saved_tensors
        # reverse recurrence g[t] = grad_h[t] + a[t+1] * g[t+1], run as a forward scan on flipped time
        a_next = torch.cat([a[..., 1:, :], torch.zeros_like(a[..., :1, :])], dim=-2)
        g = _scan(a_next, grad_h, None, ctx.chunk, reverse=True)
        h_prev = torch.cat([h0.unsqueeze(-2) if h0 is not None else torch.zeros_like(h[..., :1, :]),
                            h[..., :-1, :]], dim=-2)
        grad_a = g * h_prev
        grad_h0 = a[..., 0, :] * g[..., 0, :] if h0 is not None and ctx.needs_input_grad[2] else None
        return grad_a, g, grad_h0, None


def linear_scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None,
                chunk: int = DEFAULT_CHUNK) -> torch.Tensor:
    """All states of ``h[t] = a[t] * h[t-1] + b[t]`` along dim -2, ``h[-1] = h0`` (zeros if None).

    a, b: (..., L, N), same shape and dtype (broadcast them first); h0: (..., N). Returns h: (..., L, N).
    Differentiable in a, b and h0.
    """
    if a.shape != b.shape:
        raise ValueError(f"linear_scan: a and b must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}")
    return _LinearScan.apply(a, b, h0, chunk)


def linear_scan_loop_ref(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None = None) -> torch.Tensor:
    """The plain sequential loop over time: the definition, used only to test `linear_scan` (slow)."""
    state = h0 if h0 is not None else torch.zeros_like(b[..., 0, :])
    out = []
    for t in range(a.shape[-2]):
        state = a[..., t, :] * state + b[..., t, :]
        out.append(state)
    return torch.stack(out, dim=-2)
