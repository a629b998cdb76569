"""Mamba1 selective scan: reference implementations and the dispatch to mamba_ssm's CUDA kernel.

Shapes follow mamba_ssm's ``selective_scan_fn`` so the two are interchangeable:
    u, delta, z: (batch, d, L)      A: (d, n)      B, C: (batch, n, L) or (batch, g, n, L) with g dividing d
    D, delta_bias: (d,)             returns y: (batch, d, L) [and the last state (batch, d, n)]
with, per channel and state index,
    delta = softplus(delta + delta_bias) (when asked),   h[t] = exp(delta[t] * A) * h[t-1] + delta[t] * B[t] * u[t],
    y[t] = sum_n C[t] * h[t] + D * u[t],                  y = y * silu(z) (when z is given).
All math is fp32 whatever the input dtype; y comes back in u's dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmamba.ops.backend import try_import, use_fast_path
from qmamba.ops.linear_scan import chunk_len, from_blocks, scan_blocks, shift_blocks, to_blocks


def _grouped(u, delta, A, B, C):
    """Plain views that make the (b, d, L) channel axis (g, r) so grouped B / C broadcast: u, delta (b, g, r, L, 1),
    A (g, r, 1, n), B, C (b, g, 1, L, n)."""
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    b, d, L = u.shape
    g, n = B.shape[1], B.shape[2]
    if d % g:
        raise ValueError(f"selective_scan: B/C have {g} groups, which must divide the {d} channels of u")
    r = d // g
    return (u.reshape(b, g, r, L, 1), delta.reshape(b, g, r, L, 1), A.reshape(g, r, 1, n),
            B.transpose(-1, -2).unsqueeze(2), C.transpose(-1, -2).unsqueeze(2))


def _blocked(x: torch.Tensor, T: int) -> torch.Tensor:
    """(..., L, k) -> contiguous (..., T, nc, k), zero-padded in time (zero delta = no decay, no input)."""
    return to_blocks(x, T, dim=-2).contiguous()


class _SelectiveScanCore(torch.autograd.Function):
    """y[t] = sum_n C[t] h[t] with h[t] = exp(delta[t] A) h[t-1] + delta[t] B[t] u[t]; fp32 inputs.

    Works in the blocked layout of ``linear_scan`` (time as (T, nc)); keeps the (b, d, L, n) decays and states for
    the backward, which runs the recurrence in reverse.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        u5, delta5, A5, B5, C5 = _grouped(u, delta, A, B, C)
        L = u.shape[-1]
        T = chunk or chunk_len(L)
        u6, delta6, B6, C6 = (_blocked(x, T) for x in (u5, delta5, B5, C5))  # (b, g, r|1, T, nc, 1|n)
        A6 = A5.unsqueeze(-2)  # (g, r, 1, 1, n)
        dA = torch.mul(delta6, A6).exp_()  # (b, g, r, T, nc, n)
        h = scan_blocks(dA, (delta6 * u6) * B6)
        y = (h * C6).sum(-1, keepdim=True)  # (b, g, r, T, nc, 1)
        ctx.save_for_backward(u6, delta6, A6, B6, C6, dA, h)
        ctx.shapes = (u.shape, B.shape, C.shape)
        last = h[..., -1, -1, :]  # padded steps keep the state, so the final slot holds the state after step L-1
        return from_blocks(y, L).reshape(u.shape), last.reshape(u.shape[0], u.shape[1], -1)

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u6, delta6, A6, B6, C6, dA, h = ctx.saved_tensors
        u_shape, B_shape, C_shape = ctx.shapes
        b, g, r = u6.shape[:3]
        L, T = u_shape[-1], u6.shape[3]
        gy6 = _blocked(grad_y.reshape(b, g, r, L, 1), T)  # (b, g, r, T, nc, 1)
        gh = gy6 * C6  # dLoss/dh[t] through y[t]
        if grad_last is not None:
            gh[..., -1, -1, :] += grad_last.reshape(gh[..., -1, -1, :].shape)
        grad_C = (h * gy6).sum(2)  # (b, g, T, nc, n)
        gs = scan_blocks(shift_blocks(dA, forward=True), gh, reverse=True)  # g[t] = gh[t] + dA[t+1] g[t+1]
        grad_du = (gs * B6).sum(-1, keepdim=True)  # (b, g, r, T, nc, 1)
        grad_B = (gs * (delta6 * u6)).sum(2)  # (b, g, T, nc, n)
        grad_dA = shift_blocks(h, forward=False).mul_(gs).mul_(dA)  # dLoss/d(delta A) = g[t] h[t-1] dA[t]
        grad_delta = grad_du * u6 + (grad_dA * A6).sum(-1, keepdim=True)
        grad_u = grad_du * delta6
        grad_A = (grad_dA * delta6).sum((0, 3, 4))  # (g, r, n)

        def unblock_bc(x, shape):  # (b, g, T, nc, n) -> (b, g, n, L) -> the input's shape
            return from_blocks(x, L).transpose(-1, -2).reshape(shape)

        return (from_blocks(grad_u, L).reshape(u_shape), from_blocks(grad_delta, L).reshape(u_shape),
                grad_A.reshape(-1, grad_A.shape[-1]), unblock_bc(grad_B, B_shape), unblock_bc(grad_C, C_shape), None)


def _prepare(u, delta, A, delta_bias, delta_softplus):
    delta = delta.float()
    if delta_bias is not None:
        delta = delta + delta_bias.float()[:, None]
    if delta_softplus:
        delta = F.softplus(delta)
    return u.float(), delta, A.float()


def _finish(y, u, D, z, dtype):
    if D is not None:
        y = y + u * D.float()[:, None]
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(dtype)


def selective_scan_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                       return_last_state=False, chunk: int | None = None):
    """Pure-torch selective scan (chunked scan over time, see ``linear_scan``; the math is in the module docstring).
    ``chunk``: time steps per chunk (default about sqrt(L))."""
    dtype = u.dtype
    u, delta, A = _prepare(u, delta, A, delta_bias, delta_softplus)
    y, last = _SelectiveScanCore.apply(u.contiguous(), delta.contiguous(), A.contiguous(), B.float().contiguous(),
                                       C.float().contiguous(), chunk)
    y = _finish(y, u, D, z, dtype)
    return (y, last) if return_last_state else y


def selective_scan_loop_ref(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                            return_last_state=False):
    """The definition: a sequential loop over time with autograd. Slow; used by tests and the CPU benchmark."""
    dtype = u.dtype
    u, delta, A = _prepare(u, delta, A, delta_bias, delta_softplus)
    u5, delta5, A5, B5, C5 = _grouped(u, delta, A, B.float(), C.float())
    state = torch.zeros(*u5.shape[:3], A.shape[-1], dtype=u.dtype, device=u.device)
    ys = []
    for t in range(u.shape[-1]):
        state = torch.exp(delta5[..., t, :] * A5[..., 0, :]) * state + delta5[..., t, :] * u5[..., t, :] * B5[..., t, :]
        ys.append((state * C5[..., t, :]).sum(-1))
    y = torch.stack(ys, dim=-1).reshape(u.shape)
    y = _finish(y, u, D, z, dtype)
    return (y, state.reshape(u.shape[0], u.shape[1], -1)) if return_last_state else y


def selective_scan(u, delta, A, B, C, D=None, z=None, delta_bias=None, delta_softplus=False,
                   return_last_state=False, backend: str = "auto"):
    """Selective scan through mamba_ssm's CUDA kernel where ``backend`` allows, else the reference."""
    if use_fast_path(backend, u, "mamba_ssm", "selective_scan"):
        fn = try_import("mamba_ssm.ops.selective_scan_interface").selective_scan_fn
        return fn(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                  return_last_state=return_last_state)
    return selective_scan_ref(u, delta, A, B, C, D=D, z=z, delta_bias=delta_bias, delta_softplus=delta_softplus,
                              return_last_state=return_last_state)
