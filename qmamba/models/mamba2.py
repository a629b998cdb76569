"""Mamba2 mixer (SSD), parameter for parameter the same as mamba_ssm's ``Mamba2`` module (no MLP half)."""

from __future__ import annotations

import torch
from torch import nn

from qmamba.config import MambaConfig
from qmamba.models.mamba1 import inverse_softplus_dt
from qmamba.models.parts import CausalConv1d, LayerCache, RMSNormGated, SSDScan, linear_forward, linear_step


class Mamba2Mixer(nn.Module):
    """(B, L, d_model) -> (B, L, d_model). Parts: in_proj, conv1d (+SiLU), scan, norm (gated), out_proj."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        d, di, n, g = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.ngroups
        self.d_inner, self.d_state, self.ngroups = di, n, g
        self.nheads, self.headdim = cfg.nheads, cfg.headdim
        self.conv_dim = di + 2 * g * n
        self.in_proj = nn.Linear(d, 2 * di + 2 * g * n + self.nheads, bias=cfg.bias)  # [z, x, B, C, dt]
        self.conv1d = CausalConv1d(self.conv_dim, cfg.d_conv, bias=cfg.conv_bias)
        self.dt_bias = nn.Parameter(inverse_softplus_dt(self.nheads, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.A_log = nn.Parameter(torch.log(torch.empty(self.nheads).uniform_(1, 16)))
        self.D = nn.Parameter(torch.ones(self.nheads))
        self.scan = SSDScan(cfg.chunk_size, self.nheads, g)
        self.norm = RMSNormGated(di, eps=1e-5, group_size=di // g, norm_before_gate=False)
        self.out_proj = nn.Linear(di, d, bias=cfg.bias)
        for p in (self.dt_bias, self.A_log, self.D):
            p._no_weight_decay = True

    def forward(self, hidden: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """With ``cache`` (prefill), also fill it: the conv's last d_conv inputs and the scan's final state."""
        b, L, _ = hidden.shape
        z, xBC, dt = linear_forward(self.in_proj, hidden, self.in_proj_consumers())
        xBC = xBC.transpose(1, 2)
        xBC = (self.conv1d(xBC) if cache is None else self.conv1d.prefill(xBC, cache.conv_state)).transpose(1, 2)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        args = (x.reshape(b, L, self.nheads, self.headdim), dt, self.A_log,
                B.reshape(b, L, self.ngroups, self.d_state), C.reshape(b, L, self.ngroups, self.d_state),
                self.D, self.dt_bias)
        y = self.scan(*args) if cache is None else self.scan.prefill(cache.ssm_state, *args)  # (B, L, H, P)
        y = self.norm.output_for(y.reshape(b, L, self.d_inner), z, self.out_proj)
        return self.out_proj(y)  # (B, L, d_model)

    def in_proj_consumers(self) -> tuple:
        """in_proj's output columns [z | xBC | dt] and who reads them: in int8 mode, where all three take codes, one
        GEMM (GEMV in decoding) emits each its codes in its own scale (``QuantLinear.forward``)."""
        return ((self.norm, "z", self.d_inner), (self.conv1d, "input", self.conv_dim), (self.scan, "dt", self.nheads))

    def allocate_cache(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> LayerCache:
        return LayerCache(self.conv1d.allocate_state(batch, device, dtype),
                          torch.zeros(batch, self.nheads, self.headdim, self.d_state, device=device,
                                      dtype=torch.float32))

    def step(self, hidden: torch.Tensor, cache: LayerCache) -> torch.Tensor:  # (B, d_model) -> (B, d_model)
        """``forward`` on one token, advancing ``cache`` in place."""
        b = hidden.shape[0]
        z, xBC, dt = linear_step(self.in_proj, hidden, self.in_proj_consumers())
        xBC = self.conv1d.step(xBC, cache.conv_state)  # (B, conv_dim)
        x, B, C = xBC.split([self.d_inner, self.ngroups * self.d_state, self.ngroups * self.d_state], dim=-1)
        y = self.scan.step(cache.ssm_state, x.reshape(b, self.nheads, self.headdim), dt, self.A_log,
                           B.reshape(b, self.ngroups, self.d_state), C.reshape(b, self.ngroups, self.d_state),
                           self.D, self.dt_bias)  # (B, H, P)
        y = self.norm.output_for(y.reshape(b, self.d_inner), z, self.out_proj, step=True)
        return linear_step(self.out_proj, y)
