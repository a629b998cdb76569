"""The swappable parts a mixer is built from. They own no parameter beyond what mamba_ssm has at the same place
(conv1d.weight / bias, norm.weight), so swapping a part for its quantized twin renames nothing. The scan parts own
no parameter at all: A_log, D and dt_bias stay on the mixer and are passed in.

Every part carries ``backend`` ("auto" | "torch" | "cuda", see ``qmamba.ops.backend``); ``set_backend`` sets it
model-wide.

Decoding (``qmamba.generation``): a mixer keeps a ``LayerCache``; ``prefill`` is the forward that also fills it, and
``step`` advances it by one token, in place (static tensors, so a CUDA graph can capture the step). Steps are for
inference: no autograd, no observers.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from qmamba import ops
from qmamba.ops.backend import validate_backend


class CausalConv1d(nn.Conv1d):
    """Depthwise causal conv1d + SiLU over (batch, channels, L). Weight (channels, 1, k) as in mamba_ssm."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, activation: str | None = "silu"):
        super().__init__(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=bias)
        self.activation = activation
        self.backend = "auto"

    def forward(self, x: torch.Tensor, consumers=None):  # (B, D, L) -> (B, D, L)
        """With ``consumers`` (the (part, input point) pairs that read the output, named by the mixer), a list: the
        output as each consumer takes it. The float conv gives each the same tensor; the int8 twin may give each its
        int8 codes (``qmamba.qnn.codes``)."""
        y = ops.causal_conv1d(x, self.weight.squeeze(1), self.bias, self.activation, backend=self.backend)
        return y if consumers is None else [y] * len(consumers)

    # ---- decoding: the state holds the last K conv inputs (oldest first), as the conv consumes them --------------
    def state_dtype(self, dtype: torch.dtype) -> torch.dtype:
        """dtype of the conv state for activations in ``dtype`` (the int8 twin keeps input codes)."""
        return dtype

    def allocate_state(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return torch.zeros(batch, self.in_channels, self.kernel_size[0], device=device, dtype=self.state_dtype(dtype))

    def state_input(self, x: torch.Tensor) -> torch.Tensor:
        """Conv inputs as the state holds them (the float part: unchanged)."""
        return x

    def _check_state(self, conv_state: torch.Tensor, dtype: torch.dtype) -> None:
        want = self.state_dtype(dtype)
        if (conv_state.dtype == torch.int8) != (want == torch.int8):
            raise ValueError(f"conv state is {conv_state.dtype}, but this conv1d in mode "
                             f"{getattr(self, 'qmode', 'fp')!r} keeps {want} inputs: allocate the cache after "
                             "set_mode (model.allocate_cache)")

    def prefill(self, x: torch.Tensor, conv_state: torch.Tensor, consumers=None):  # (B, D, L) -> (B, D, L)
        """``forward``, and conv_state (B, D, K) <- its last K inputs (``state_input``), zeros before t = 0."""
        self._check_state(conv_state, x.dtype)
        k = conv_state.shape[-1]
        tail = self.state_input(x[..., -k:])
        conv_state.copy_(F.pad(tail, (k - tail.shape[-1], 0)))
        return self(x, consumers=consumers)

    @staticmethod
    def _shift_in(conv_state: torch.Tensor, x: torch.Tensor) -> None:
        """conv_state (B, D, K) <- shifted left by one, x (B, D) appended; in place."""
        conv_state.copy_(torch.cat((conv_state[..., 1:], x.unsqueeze(-1).to(conv_state.dtype)), dim=-1))

    def _window_conv(self, window: torch.Tensor, w: torch.Tensor) -> torch.Tensor:  # (B, D, K), (D, K) -> (B, D)
        """The conv (+ SiLU) at the window's last position, in the window's dtype like ``forward``."""
        out = (window * w.to(window.dtype)).sum(-1)
        if self.bias is not None:
            out = out + self.bias.to(window.dtype)
        return F.silu(out) if self.activation else out

    def step(self, x: torch.Tensor, conv_state: torch.Tensor, consumers=None):  # (B, D) -> (B, D)
        """One token: x shifts into conv_state (in place); returns forward's output at that token (a list per
        consumer with ``consumers``, as ``forward``)."""
        self._check_state(conv_state, x.dtype)
        self._shift_in(conv_state, x)
        y = self._window_conv(conv_state, self.weight.squeeze(1))
        return y if consumers is None else [y] * len(consumers)


class SelectiveScan(nn.Module):
    """Mamba1 scan. Inputs in mamba_ssm's layout: u, delta, z (B, D, L); B, C (B, N, L); A_log (D, N); D (D,).
    ``delta`` is the dt_proj output (bias included); softplus is applied here. ``d_inner`` / ``d_state`` record the
    channel counts (quantized twins size their scales from them)."""

    def __init__(self, d_inner: int, d_state: int):
        super().__init__()
        self.d_inner, self.d_state = d_inner, d_state
        self.backend = "auto"

    def forward(self, u, delta, A_log, B, C, D, z):
        A = -torch.exp(A_log.float())
        return ops.selective_scan(u, delta, A, B, C, D=D.float(), z=z, delta_softplus=True, backend=self.backend)

    def prefill(self, ssm_state, u, delta, A_log, B, C, D, z):
        """``forward``, and ssm_state (B, D, N) fp32 <- the state after the last step."""
        A = -torch.exp(A_log.float())
        y, last = ops.selective_scan(u, delta, A, B, C, D=D.float(), z=z, delta_softplus=True, return_last_state=True,
                                     backend=self.backend)
        ssm_state.copy_(last)
        return y

    def step(self, state, u, delta, A_log, B, C, D, z):
        """One token, the recurrence of ``ops.selective_scan_loop_ref``: u, delta, z (B, D); B, C (B, N); state
        (B, D, N) fp32, updated in place. Returns y (B, D) in u's dtype."""
        dtype = u.dtype
        u, delta = u.float(), F.softplus(delta.float())
        dA = torch.exp(delta.unsqueeze(-1) * -torch.exp(A_log.float()))  # (B, D, N)
        state.mul_(dA).add_((delta * u).unsqueeze(-1) * B.float().unsqueeze(1))
        y = (state * C.float().unsqueeze(1)).sum(-1) + u * D.float()
        if z is not None:
            y = y * F.silu(z.float())
        return y.to(dtype)


class SSDScan(nn.Module):
    """Mamba2 scan. x (B, L, H, P), dt (B, L, H) before bias and softplus, B / C (B, L, G, N), A_log / D / dt_bias
    (H,). Returns y (B, L, H, P)."""

    def __init__(self, chunk_size: int, nheads: int, ngroups: int):
        super().__init__()
        self.chunk_size, self.nheads, self.ngroups = chunk_size, nheads, ngroups
        self.backend = "auto"

    def forward(self, x, dt, A_log, B, C, D, dt_bias):
        A = -torch.exp(A_log.float())
        return ops.ssd_chunk_scan(x, dt, A, B, C, self.chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                                  backend=self.backend)

    def prefill(self, ssm_state, x, dt, A_log, B, C, D, dt_bias):
        """``forward``, and ssm_state (B, H, P, N) fp32 <- the final state."""
        A = -torch.exp(A_log.float())
        y, final = ops.ssd_chunk_scan(x, dt, A, B, C, self.chunk_size, D=D, dt_bias=dt_bias, dt_softplus=True,
                                      return_final_states=True, backend=self.backend)
        ssm_state.copy_(final)
        return y

    def step(self, state, x, dt, A_log, B, C, D, dt_bias):
        """One token, the recurrence of ``ops.ssd_loop_ref``: x (B, H, P), dt (B, H) before bias and softplus,
        B / C (B, G, N); state (B, H, P, N) fp32, updated in place. Returns y (B, H, P) in x's dtype."""
        (b, h, _), (g, n) = x.shape, B.shape[1:]
        dtype, x, dt = x.dtype, x.float(), dt.float()
        if dt_bias is not None:
            dt = dt + dt_bias.float()
        dt = F.softplus(dt)
        # (B, H, N): heads share their group's B / C (an expand, where repeat_interleave may sync with the host)
        B = B.float().unsqueeze(2).expand(b, g, h // g, n).reshape(b, h, n)
        C = C.float().unsqueeze(2).expand(b, g, h // g, n).reshape(b, h, n)
        dA = torch.exp(dt * -torch.exp(A_log.float()))  # (B, H)
        state.mul_(dA[..., None, None]).add_((dt.unsqueeze(-1) * x).unsqueeze(-1) * B.unsqueeze(-2))
        y = torch.einsum("bhpn,bhn->bhp", state, C)
        Df = D.float()
        return (y + x * (Df.unsqueeze(-1) if Df.dim() == 1 else Df)).to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps, backend=self.backend)


class RMSNormGated(nn.Module):
    """Mamba2's output norm: rms_norm(x * silu(z)) per group of ``group_size`` channels."""

    def __init__(self, dim: int, eps: float = 1e-5, group_size: int | None = None, norm_before_gate: bool = False):
        super().__init__()
        self.eps, self.group_size, self.norm_before_gate = eps, group_size, norm_before_gate
        self.weight = nn.Parameter(torch.ones(dim))
        self.backend = "auto"

    def forward(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return ops.gated_rms_norm(x, self.weight, z, self.eps, self.group_size, self.norm_before_gate,
                                  backend=self.backend)

    def step(self, x: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:  # (B, D) -> (B, D)
        return RMSNormGated.forward(self, x, z)  # per token already; the twin overrides step, not this

    def output_for(self, x: torch.Tensor, z: torch.Tensor | None, consumer: nn.Module, step: bool = False):
        """The norm's output for ``consumer`` (Mamba2's out_proj): here the float output; the quantized twin hands
        an int8 consumer its input codes where it takes them."""
        return self.step(x, z) if step else self(x, z)


@dataclass(eq=False)
class LayerCache:
    """One mixer's decoding state, in mamba_ssm's layout. ``conv_state`` (B, conv channels, d_conv): the last d_conv
    conv inputs, oldest first, as the conv consumes them (``CausalConv1d.state_input``: float inputs, or their int8
    codes in int8 mode). ``ssm_state`` fp32: (B, d_inner, d_state) for Mamba1, (B, nheads, headdim, d_state) for
    Mamba2."""

    conv_state: torch.Tensor
    ssm_state: torch.Tensor


def linear_step(layer: nn.Module, x: torch.Tensor, consumers=None):
    """A linear layer on one token: its ``step`` where it has one (the quantized twin's, free of host syncs), else
    its forward. With ``consumers`` ((part, point, columns) splitting the output's columns in order): a list, one
    output per consumer (int8 codes where the quantized twin emits them, else column slices of the float output)."""
    if hasattr(layer, "step"):
        return layer.step(x) if consumers is None else layer.step(x, consumers)
    y = layer(x)
    return y if consumers is None else list(y.split([c for _, _, c in consumers], dim=-1))


def linear_forward(layer: nn.Module, x: torch.Tensor, consumers):
    """``linear_step``'s twin for a whole sequence (..., K): a list, one output per consumer ((part, point, columns)
    splitting the output's columns in order): int8 codes where the quantized twin emits them (one GEMM), else column
    slices (views) of the float output."""
    if hasattr(layer, "emit_codes"):  # the quantized twin (qmamba.qnn.QuantLinear)
        return layer(x, consumers=consumers)
    return list(layer(x).split([c for _, _, c in consumers], dim=-1))


PARTS = (CausalConv1d, SelectiveScan, SSDScan, RMSNorm, RMSNormGated)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set the op backend of every part in ``model`` ("auto" | "torch" | "cuda"). Returns the model."""
    validate_backend(backend)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    return model
