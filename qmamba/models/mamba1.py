"""Mamba1 mixer (selective SSM), parameter for parameter the same as mamba_ssm's ``Mamba`` module."""

from __future__ import annotations

import math

import torch
from torch import nn

from qmamba.config import MambaConfig
from qmamba.models.parts import CausalConv1d, LayerCache, SelectiveScan, linear_forward, linear_step


def inverse_softplus_dt(n: int, dt_min: float, dt_max: float, floor: float) -> torch.Tensor:
    """Bias whose softplus is a time step drawn log-uniformly in [dt_min, dt_max] (mamba_ssm's dt init)."""
    dt = torch.exp(torch.rand(n) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)).clamp(min=floor)
    return dt + torch.log(-torch.expm1(-dt))


class Mamba1Mixer(nn.Module):
    """(B, L, d_model) -> (B, L, d_model). Parts: in_proj, conv1d (+SiLU), x_proj, dt_proj, scan, out_proj."""

    def __init__(self, cfg: MambaConfig):
        super().__init__()
        d, di, n, r = cfg.d_model, cfg.d_inner, cfg.d_state, cfg.dt_rank_value
        self.d_inner, self.d_state, self.dt_rank = di, n, r
        self.in_proj = nn.Linear(d, 2 * di, bias=cfg.bias)
        self.conv1d = CausalConv1d(di, cfg.d_conv, bias=cfg.conv_bias)
        self.x_proj = nn.Linear(di, r + 2 * n, bias=False)
        self.dt_proj = nn.Linear(r, di, bias=True)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, n + 1, dtype=torch.float32)).repeat(di, 1))  # (di, n)
        self.D = nn.Parameter(torch.ones(di))
        self.scan = SelectiveScan(di, n)
        self.out_proj = nn.Linear(di, d, bias=cfg.bias)

        with torch.no_grad():
            std = r ** -0.5
            self.dt_proj.weight.uniform_(-std, std)
            self.dt_proj.bias.copy_(inverse_softplus_dt(di, cfg.dt_min, cfg.dt_max, cfg.dt_init_floor))
        self.dt_proj.bias._keep_init = True
        for p in (self.A_log, self.D):
            p._no_weight_decay = True

    def forward(self, hidden: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """With ``cache`` (prefill), also fill it: the conv's last d_conv inputs and the scan's final state."""
        # each linear hands its consumers their int8 codes where they take them (int8 mode: one GEMM emits them,
        # no quantize pass of its float output), else column slices of its float output
        di, n = self.d_inner, self.d_state
        x, z = linear_forward(self.in_proj, hidden, ((self.conv1d, "input", di), (self.scan, "z", di)))  # (B, L, di)
        # the conv's output (B, di, L) feeds x_proj and the scan (as u); in int8 mode each may get its own codes
        x, consumers = x.transpose(1, 2), self.conv_consumers()
        x, u = (self.conv1d(x, consumers=consumers) if cache is None
                else self.conv1d.prefill(x, cache.conv_state, consumers=consumers))
        dt, B, C = linear_forward(self.x_proj, x.transpose(1, 2), ((self.dt_proj, "input", self.dt_rank),
                                                                    (self.scan, "B", n), (self.scan, "C", n)))
        (delta,) = linear_forward(self.dt_proj, dt, ((self.scan, "delta", di),))
        args = (u, delta.transpose(1, 2), self.A_log, B.transpose(1, 2), C.transpose(1, 2), self.D, z.transpose(1, 2))
        y = self.scan(*args) if cache is None else self.scan.prefill(cache.ssm_state, *args)
        return self.out_proj(y.transpose(1, 2))  # (B, L, d_model)

    def conv_consumers(self) -> tuple:
        """The (part, input point) pairs that read the conv's output, in the order the conv returns it."""
        return (self.x_proj, "input"), (self.scan, "u")

    def allocate_cache(self, batch: int, device=None, dtype: torch.dtype = torch.float32) -> LayerCache:
        return LayerCache(self.conv1d.allocate_state(batch, device, dtype),
                          torch.zeros(batch, self.d_inner, self.d_state, device=device, dtype=torch.float32))

    def step(self, hidden: torch.Tensor, cache: LayerCache) -> torch.Tensor:  # (B, d_model) -> (B, d_model)
        """``forward`` on one token, advancing ``cache`` in place."""
        # each linear hands its consumers their int8 codes where they take them (int8 mode), else float slices
        di, n = self.d_inner, self.d_state
        x, u, z = self.in_proj_conv_step(hidden, cache.conv_state)  # (B, di) each
        dt, B, C = linear_step(self.x_proj, x, ((self.dt_proj, "input", self.dt_rank), (self.scan, "B", n),
                                                (self.scan, "C", n)))
        delta = self.dt_step(dt)  # (B, di), or dt_proj's GEMV inputs for the scan's update
        return linear_step(self.out_proj, self.scan_step(cache.ssm_state, u, delta, B, C, z))

    def in_proj_conv_step(self, hidden, conv_state):
        """in_proj then the conv update on one token: (the conv's outputs for x_proj and the scan's u, z). In int8 mode,
        where the twins allow it (``QuantCausalConv1d.takes_projected_input``, ``QuantLinear.step_gemv_inputs``),
        one op: in_proj's GEMV runs the conv update in its epilogue, bit for bit the two steps, one kernel fewer a
        layer."""
        di, conv_consumers = self.d_inner, self.conv_consumers()
        in_consumers = ((self.conv1d, "input", di), (self.scan, "z", di))
        takes = getattr(self.conv1d, "takes_projected_input", None)  # the int8 twins' (qmamba.qnn)
        proj = (self.in_proj.step_gemv_inputs(hidden, in_consumers)
                if takes is not None and takes(conv_consumers) and hasattr(self.in_proj, "step_gemv_inputs") else None)
        if proj is not None:
            (x, u), (z,) = self.conv1d.step_from_projection(proj, conv_state, hidden.dtype, conv_consumers)
            return x, u, z
        x, z = linear_step(self.in_proj, hidden, in_consumers)
        x, u = self.conv1d.step(x, conv_state, consumers=conv_consumers)
        return x, u, z

    def scan_step(self, ssm_state, u, delta, B, C, z):
        """The scan's update on one token, for out_proj: in int8 mode, where the twins allow it
        (``QuantSelectiveScan.rotates_for``; its ``emit_rotated`` switch is off by default), the update also rotates
        and quantizes out_proj's input and hands it the codes, bit for bit those of out_proj's own Hadamard +
        quantize, one kernel fewer a layer; else y."""
        output_for = getattr(self.scan, "step_output_for", None)  # the int8 twin's (qmamba.qnn.QuantSelectiveScan)
        if output_for is not None:
            return output_for(self.out_proj, ssm_state, u, delta, self.A_log, B, C, self.D, z)
        return self.scan.step(ssm_state, u, delta, self.A_log, B, C, self.D, z)

    def dt_step(self, dt):
        """dt_proj on one token, for the scan: in int8 mode, where the twins allow it (``QuantLinear.step_projection``:
        the GEMV's inputs, codes and scales, instead of its output), the scan's update computes delta's codes itself,
        bit for bit those of dt_proj's GEMV, one kernel fewer a layer; else dt_proj's output (codes or float)."""
        project = getattr(self.dt_proj, "step_projection", None)  # the int8 twin's (qmamba.qnn.QuantLinear)
        delta = project(dt, (self.scan, "delta")) if project is not None else None
        if delta is None:
            (delta,) = linear_step(self.dt_proj, dt, ((self.scan, "delta", self.d_inner),))
        return delta
