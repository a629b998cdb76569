"""The swappable parts a mixer is built from. They own no parameter beyond what mamba_ssm has at the same place
(conv1d.weight / bias, norm.weight), so swapping a part for its quantized twin renames nothing. The scan parts own
no parameter at all: A_log, D and dt_bias stay on the mixer and are passed in.

Every part carries ``backend`` ("auto" | "torch" | "cuda", see ``qmamba.ops.backend``); ``set_backend`` sets it
model-wide.
"""

from __future__ import annotations

import torch
from torch import nn

from qmamba import ops
from qmamba.ops.backend import validate_backend


class CausalConv1d(nn.Conv1d):
    """Depthwise causal conv1d + SiLU over (batch, channels, L). Weight (channels, 1, k) as in mamba_ssm."""

    def __init__(self, channels: int, kernel_size: int, bias: bool = True, activation: str | None = "silu"):
        super().__init__(channels, channels, kernel_size, groups=channels, padding=kernel_size - 1, bias=bias)
        self.activation = activation
        self.backend = "auto"

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (B, D, L) -> (B, D, L)
        return ops.causal_conv1d(x, self.weight.squeeze(1), self.bias, self.activation, backend=self.backend)


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


PARTS = (CausalConv1d, SelectiveScan, SSDScan, RMSNorm, RMSNormGated)


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set the op backend of every part in ``model`` ("auto" | "torch" | "cuda"). Returns the model."""
    validate_backend(backend)
    for module in model.modules():
        if hasattr(module, "backend"):
            module.backend = backend
    return model
