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
from qmamba.ops.linear_scan import DEFAULT_CHUNK, _scan


def _grouped(u, delta, A, B, C):
    """Views that make the (b, d, L) channel axis (g, r) so grouped B / C broadcast: (b, g, r, L, 1) and
    (b, g, 1, L, n); A becomes (g, r, 1, n)."""
    if B.dim() == 3:
        B, C = B.unsqueeze(1), C.unsqueeze(1)
    b, d, L = u.shape
    g, n = B.shape[1], B.shape[2]
    if d % g:
        raise ValueError(f"selective_scan: B/C have {g} groups, which must divide the {d} channels of u")
    r = d // g
    u5 = u.reshape(b, g, r, L, 1)
    delta5 = delta.reshape(b, g, r, L, 1)
    A5 = A.reshape(g, r, 1, n)
    B5 = B.transpose(-1, -2).contiguous().unsqueeze(2)  # (b, g, 1, L, n)
    C5 = C.transpose(-1, -2).contiguous().unsqueeze(2)
    return u5, delta5, A5, B5, C5


class _SelectiveScanCore(torch.autograd.Function):
    """y[t] = sum_n C[t] h[t] with h[t] = exp(delta[t] A) h[t-1] + delta[t] B[t] u[t]; fp32 inputs.

    Keeps the (b, d, L, n) decays and states for the backward, which runs the recurrence in reverse.
    """

    @staticmethod
    def forward(ctx, u, delta, A, B, C, chunk):
        u5, delta5, A5, B5, C5 = _grouped(u, delta, A, B, C)
        dA = torch.mul(delta5, A5).exp_()  # (b, g, r, L, n)
        h = _scan(dA, (delta5 * u5) * B5, None, chunk)
        y = (h * C5).sum(-1)  # (b, g, r, L)
        ctx.save_for_backward(u, delta, A, B, C, dA, h)
        ctx.chunk = chunk
        return y.reshape(u.shape), h[..., -1, :].reshape(u.shape[0], u.shape[1], -1)

    @staticmethod
    def backward(ctx, grad_y, grad_last):
        u, delta, A, B, C, dA, h = ctx.saved_tensors
        u5, delta5, A5, B5, C5 = _grouped(u, delta, A, B, C)
        gy = grad_y.reshape(delta5.shape)  # (b, g, r, L, 1)
        gh = gy * C5  # dLoss/dh[t] through y[t]
        if grad_last is not None:
            gh[..., -1, :] += grad_last.reshape(gh[..., -1, :].shape)
        grad_C = (h * gy).sum(2)  # (b, g, L, n)
        # reverse recurrence: g[t] = gh[t] + dA[t+1] * g[t+1]
        dA_next = torch.cat([dA[..., 1:, :], torch.zeros_like(dA[..., :1, :])], dim=-2)
        g = _scan(dA_next, gh, None, ctx.chunk, reverse=True)
        du = delta5 * u5
        grad_du = (g * B5).sum(-1, keepdim=True)  # (b, g, r, L, 1)
        grad_B = (g * du).sum(2)  # (b, g, L, n)
        # dLoss/d(delta * A) = g[t] * h[t-1] * dA[t] (h[-1] = 0)
        grad_dA = torch.zeros_like(g)
        torch.mul(g[..., 1:, :], h[..., :-1, :], out=grad_dA[..., 1:, :])
        grad_dA *= dA
        grad_delta = grad_du * u5 + (grad_dA * A5).sum(-1, keepdim=True)
        grad_u = grad_du * delta5
        grad_A = (grad_dA * delta5).sum((0, 3))  # (g, r, n)
        grad_B = grad_B.transpose(-1, -2).reshape(B.shape)
        grad_C = grad_C.transpose(-1, -2).reshape(C.shape)
        return (grad_u.reshape(u.shape), grad_delta.reshape(delta.shape), grad_A.reshape(A.shape),
                grad_B, grad_C, None)


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
                       return_last_state=False, chunk: int = DEFAULT_CHUNK):
    """Pure-torch selective scan (chunked parallel scan over time; see module docstring for the math)."""
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
