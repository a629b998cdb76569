"""Mamba2 state-space duality (SSD) chunked scan: reference and dispatch to mamba_ssm's Triton kernel.

Shapes follow mamba_ssm's ``mamba_chunk_scan_combined``:
    x: (batch, L, h, p)   dt: (batch, L, h)   A: (h,)   B, C: (batch, L, g, n) with g dividing h
    D: (h,) or (h, p)     z: (batch, L, h, p)  dt_bias: (h,)   returns y: (batch, L, h, p)
with, per head (scalar decay),
    dt = softplus(dt + dt_bias) (when asked),   S[t] = exp(dt[t] A) S[t-1] + dt[t] x[t] B[t]^T   (S: p x n),
    y[t] = S[t] C[t] + D x[t],                   y = y * silu(z) (when z is given).
The reference is the chunked form: inside a chunk the output is a masked (T x T) attention-like product with decays
exp(sum of dt A) between positions; chunk-end states pass from chunk to chunk. Math in fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmamba.ops.backend import try_import, use_fast_path


def segment_sum(x: torch.Tensor) -> torch.Tensor:
    """(..., T) -> (..., T, T) with out[..., i, j] = x[j+1] + ... + x[i] for i >= j and -inf above the diagonal.

    Summed as a masked cumsum (not a difference of cumsums) so long chunks lose no precision."""
    T = x.shape[-1]
    rep = x.unsqueeze(-1).expand(*x.shape, T)  # rep[..., i, j] = x[i]
    strictly_lower = torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device), diagonal=-1)
    out = torch.cumsum(rep.masked_fill(~strictly_lower, 0), dim=-2)
    return out.masked_fill(~torch.tril(torch.ones(T, T, dtype=torch.bool, device=x.device)), float("-inf"))


def ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                       initial_states=None, return_final_states=False):
    """Pure-torch SSD scan (see module docstring). ``initial_states``: (batch, h, p, n)."""
    dtype = x.dtype
    b, L, h, p = x.shape
    g, n = B.shape[2], B.shape[3]
    if h % g:
        raise ValueError(f"ssd_chunk_scan: B/C have {g} groups, which must divide the {h} heads of x")
    x, B, C = x.float(), B.float(), C.float()
    dt = dt.float()
    if dt_bias is not None:
        dt = dt + dt_bias.float()
    if dt_softplus:
        dt = F.softplus(dt)
    # heads share their group's B / C
    B = B.repeat_interleave(h // g, dim=2)  # (b, L, h, n)
    C = C.repeat_interleave(h // g, dim=2)
    T = chunk_size
    pad = (-L) % T
    xs = x * dt.unsqueeze(-1)  # discretized input
    a = dt * A.float()  # (b, L, h) log decay per step, <= 0
    if pad:  # zero input and zero log-decay on padded steps
        xs, B, C = (F.pad(t, (0, 0, 0, 0, 0, pad)) for t in (xs, B, C))
        a = F.pad(a, (0, 0, 0, pad))
    nc = (L + pad) // T
    xs = xs.reshape(b, nc, T, h, p)
    B = B.reshape(b, nc, T, h, n)
    C = C.reshape(b, nc, T, h, n)
    a = a.reshape(b, nc, T, h).permute(0, 3, 1, 2)  # (b, h, nc, T)
    a_cum = torch.cumsum(a, dim=-1)

    # 1. within each chunk: y[i] = sum_{j <= i} (C[i] . B[j]) exp(a[j+1..i]) xs[j]
    decay = torch.exp(segment_sum(a))  # (b, h, nc, T, T)
    scores = torch.einsum("bcihn,bcjhn->bhcij", C, B) * decay
    y = torch.einsum("bhcij,bcjhp->bcihp", scores, xs)

    # 2. state each chunk contributes at its end: sum_j exp(a[j+1..T-1]) xs[j] B[j]^T
    to_end = torch.exp(a_cum[..., -1:] - a_cum)  # (b, h, nc, T)
    chunk_states = torch.einsum("bcjhn,bhcj,bcjhp->bchpn", B, to_end, xs)

    # 3. pass states across chunks: entering[c] = sum_{c' < c} exp(total decay of chunks c'+1..c-1) chunk_states[c']
    if initial_states is None:
        initial_states = torch.zeros(b, h, p, n, dtype=xs.dtype, device=xs.device)
    states = torch.cat([initial_states.float().unsqueeze(1), chunk_states], dim=1)  # (b, nc + 1, h, p, n)
    chunk_decay = torch.exp(segment_sum(F.pad(a_cum[..., -1], (1, 0))))  # (b, h, nc + 1, nc + 1)
    states = torch.einsum("bhzc,bchpn->bzhpn", chunk_decay, states)
    entering, final = states[:, :-1], states[:, -1]

    # 4. what the entering state adds inside each chunk: exp(a[0..i]) C[i] . S
    from_start = torch.exp(a_cum)  # (b, h, nc, T)
    y = y + torch.einsum("bcihn,bchpn,bhci->bcihp", C, entering, from_start)

    y = y.reshape(b, nc * T, h, p)[:, :L]
    if D is not None:
        Df = D.float()
        y = y + x * (Df.unsqueeze(-1) if Df.dim() == 1 else Df)
    if z is not None:
        y = y * F.silu(z.float())
    y = y.to(dtype)
    return (y, final) if return_final_states else y


def ssd_chunk_scan(x, dt, A, B, C, chunk_size, D=None, z=None, dt_bias=None, dt_softplus=False,
                   initial_states=None, return_final_states=False, backend: str = "auto"):
    """SSD scan through mamba_ssm's ``mamba_chunk_scan_combined`` where ``backend`` allows, else the reference."""
    if use_fast_path(backend, x, "mamba_ssm", "ssd_chunk_scan"):
        fn = try_import("mamba_ssm.ops.triton.ssd_combined").mamba_chunk_scan_combined
        return fn(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                  initial_states=initial_states, return_final_states=return_final_states)
    return ssd_chunk_scan_ref(x, dt, A, B, C, chunk_size, D=D, z=z, dt_bias=dt_bias, dt_softplus=dt_softplus,
                              initial_states=initial_states, return_final_states=return_final_states)


def ssd_loop_ref(x, dt, A, B, C, D=None, z=None, dt_bias=None, dt_softplus=False):
    """The definition, a sequential loop over time (slow; tests only)."""
    b, L, h, p = x.shape
    g = B.shape[2]
    dt = dt.float() + (dt_bias.float() if dt_bias is not None else 0)
    if dt_softplus:
        dt = F.softplus(dt)
    B = B.float().repeat_interleave(h // g, dim=2)
    C = C.float().repeat_interleave(h // g, dim=2)
    S = torch.zeros(b, h, p, B.shape[-1], dtype=torch.float32, device=x.device)
    ys = []
    for t in range(L):
        S = torch.exp(dt[:, t] * A.float())[..., None, None] * S + \
            (dt[:, t, :, None] * x[:, t].float()).unsqueeze(-1) * B[:, t].unsqueeze(-2)
        ys.append(torch.einsum("bhpn,bhn->bhp", S, C[:, t]))
    y = torch.stack(ys, dim=1)
    if D is not None:
        y = y + x.float() * (D.float().unsqueeze(-1) if D.dim() == 1 else D.float())
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(x.dtype)
