"""Causal depthwise conv1d (the short convolution before the scan): reference and dispatch to ``causal_conv1d``.

    x: (batch, d, L)   weight: (d, k)   bias: (d,) or None   returns (batch, d, L)
    out[:, c, t] = bias[c] + sum_{i < k} weight[c, i] * x[:, c, t - (k - 1) + i]   (x = 0 before t = 0)
optionally followed by SiLU. Output dtype = input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qmamba.ops.backend import try_import, use_fast_path

ACTIVATIONS = (None, "silu", "swish")


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                      activation: str | None = None) -> torch.Tensor:
    if activation not in ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {ACTIVATIONS}, got {activation!r}")
    d, k = weight.shape
    L = x.shape[-1]
    out = F.conv1d(x, weight.unsqueeze(1).to(x.dtype), None if bias is None else bias.to(x.dtype),
                   padding=k - 1, groups=d)[..., :L]
    return F.silu(out) if activation is not None else out


def causal_conv1d(x, weight, bias=None, activation=None, backend: str = "auto"):
    """Through ``causal_conv1d.causal_conv1d_fn`` where ``backend`` allows, else the reference."""
    if use_fast_path(backend, x, "causal_conv1d", "causal_conv1d"):
        # the kernel wants weight and bias in x's dtype (under autocast x arrives in bf16, the parameters in fp32)
        return try_import("causal_conv1d").causal_conv1d_fn(x, weight.to(x.dtype),
                                                            None if bias is None else bias.to(x.dtype),
                                                            activation=activation)
    return causal_conv1d_ref(x, weight, bias, activation)
