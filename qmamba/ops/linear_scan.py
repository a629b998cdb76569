"""The first-order linear recurrence ``h[t] = a[t] * h[t-1] + b[t]`` evaluated in parallel, with its exact backward.

This is the core of the pure-torch selective scan. It is a chunked scan with no Python loop over time steps:
time is cut into chunks of ``chunk`` steps; inside every chunk, all chunks at once, a Hillis-Steele doubling scan
(log2(chunk) tensor-wide steps) gives each step's state from a zero start and the decay product since the chunk
start; a short loop over chunks (L / chunk steps on one state-sized tensor) carries the state across chunk
boundaries. The products only ever multiply numbers of the recurrence (no division, no exp of a sum), so it is as
stable as the sequential loop.

The backward is the same recurrence run in reverse: with ``g[t] = dLoss/dh[t] + a[t+1] * g[t+1]``,
``dLoss/db[t] = g[t]`` and ``dLoss/da[t] = g[t] * h[t-1]``. Only ``a`` and the output ``h`` are saved.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

DEFAULT_CHUNK = 16


def _scan(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor | None, chunk: int) -> torch.Tensor:
    """Forward recurrence along dim -2 of ``a``, ``b`` (shape (..., L, N)); ``h0`` of shape (..., N) or None."""
    L = a.shape[-2]
    T = max(1, min(chunk, L))
    pad = (-L) % T
    if pad:  # a = 1, b = 0 on padded steps leaves the state unchanged
        a = F.pad(a, (0, 0, 0, pad), value=1.0)
        b = F.pad(b, (0, 0, 0, pad), value=0.0)
    lead, N = a.shape[:-2], a.shape[-1]
    nc = (L + pad) // T
    prod = a.reshape(*lead, nc, T, N).clone()  # after the doubling: product of a since the chunk start
    h = b.reshape(*lead, nc, T, N).clone()  # after the doubling: state reached from a zero start in the chunk
    step = 1
    while step < T:
        # combine each step with the partial result `step` steps earlier (right side is evaluated before the write)
        h[..., step:, :] = h[..., step:, :] + prod[..., step:, :] * h[..., :-step, :]
        prod[..., step:, :] = prod[..., step:, :] * prod[..., :-step, :]
        step *= 2
    # carry the state across chunk boundaries: carry[c] is the state entering chunk c
    carry = torch.empty(*lead, nc, N, dtype=h.dtype, device=h.device)
    state = h0 if h0 is not None else torch.zeros(*lead, N, dtype=h.dtype, device=h.device)
    for c in range(nc):
        carry[..., c, :] = state
        state = prod[..., c, -1, :] * state + h[..., c, -1, :]
    h = h + prod * carry.unsqueeze(-2)  # (..., nc, T, N)
    return h.reshape(*lead, nc * T, N)[..., :L, :]


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
        g = _scan(a_next.flip(-2), grad_h.flip(-2), None, ctx.chunk).flip(-2)
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
