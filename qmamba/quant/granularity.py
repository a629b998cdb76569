"""Granularity of a quantization scale, as a type (not a string): which elements of a tensor share one scale.

    PerTensor()                       one scale for the whole tensor                      stat shape ()
    PerChannel(axis=-1)               one scale per index along ``axis``                  stat shape (C,)
    PerGroup(group_size, axis=-1)     one scale per ``group_size`` consecutive channels   stat shape (C // group_size,)
                                      along ``axis`` (per head / per SSD group)

``axis`` is the channel axis of the tensor being quantized: -1 for a linear layer's activations (..., C) and for a
weight's input dim, 0 for a weight's output channels (N, K), 1 for conv1d's activations (B, D, L).

Every granularity maps a tensor to its statistics the same way (``stat_view``), so observers, the quantizer and the
reports agree on which elements a scale covers, and ``broadcast`` puts a stat back against the tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


def _norm_axis(axis: int, ndim: int, who: str) -> int:
    if ndim == 0:
        raise ValueError(f"{who}: a 0-dim tensor has no channel axis; use PerTensor() for scalars")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{who}: axis={axis} is out of range for a tensor with {ndim} dims")
    return axis % ndim


class _StatsFromView:
    """absmax and signed min / max of each stat: reductions over the last dim of ``stat_view(x)``
    ((*stat_shape, n))."""

    def absmax(self, x: torch.Tensor) -> torch.Tensor:
        return self.stat_view(x).abs().amax(-1)

    def min_max(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.aminmax(self.stat_view(x), dim=-1)


@dataclass(frozen=True)
class PerTensor(_StatsFromView):
    """One scale for the whole tensor."""

    def stat_shape(self, channels: int = 1) -> tuple[int, ...]:
        return ()

    def stat_view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (*stat_shape, n): row s holds every element that stat s covers. Here: (numel,)."""
        return x.reshape(-1)

    def broadcast(self, stat: torch.Tensor, ndim: int) -> torch.Tensor:
        if stat.numel() != 1:
            raise ValueError(f"PerTensor.broadcast: expected a single-element stat, got shape {tuple(stat.shape)}")
        return stat.reshape((1,) * ndim)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_tensor"}


@dataclass(frozen=True)
class PerChannel(_StatsFromView):
    """One scale per index along ``axis``."""

    axis: int = -1

    def stat_shape(self, channels: int) -> tuple[int, ...]:
        return (int(channels),)

    def stat_view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (C, n): row c holds every element of channel c."""
        a = _norm_axis(self.axis, x.ndim, "PerChannel")
        return x.movedim(a, 0).reshape(x.shape[a], -1)

    def broadcast(self, stat: torch.Tensor, ndim: int) -> torch.Tensor:
        """(C,) -> shape with C at ``axis`` and 1 elsewhere, e.g. (1, 1, C) for ndim=3, axis=-1."""
        if stat.ndim != 1:
            raise ValueError(f"PerChannel.broadcast: expected a (C,) stat, got shape {tuple(stat.shape)}")
        a = _norm_axis(self.axis, ndim, "PerChannel")
        shape = [1] * ndim
        shape[a] = stat.shape[0]
        return stat.reshape(shape)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_channel", "axis": self.axis}


@dataclass(frozen=True)
class PerGroup(_StatsFromView):
    """One scale per ``group_size`` consecutive channels along ``axis`` (Quamba2: per head group / per SSD group)."""

    group_size: int
    axis: int = -1

    def __post_init__(self):
        if not isinstance(self.group_size, int) or isinstance(self.group_size, bool) or self.group_size < 1:
            raise ValueError(f"PerGroup: group_size must be a positive int, got {self.group_size!r}")

    def stat_shape(self, channels: int) -> tuple[int, ...]:
        channels = int(channels)
        if channels % self.group_size:
            raise ValueError(f"PerGroup: group_size={self.group_size} does not divide the {channels} channels; "
                             f"pick a group size that divides {channels} (e.g. the head dim)")
        return (channels // self.group_size,)

    def stat_view(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as (G, n): row g holds every element of channels [g * group_size, (g + 1) * group_size)."""
        a = _norm_axis(self.axis, x.ndim, "PerGroup")
        (groups,) = self.stat_shape(x.shape[a])
        xc = x.movedim(a, -1).reshape(-1, groups, self.group_size)  # (n / C, G, group_size)
        return xc.transpose(0, 1).reshape(groups, -1)

    def broadcast(self, stat: torch.Tensor, ndim: int) -> torch.Tensor:
        """(G,) -> (C,) by repeating each group's stat ``group_size`` times, placed at ``axis``."""
        if stat.ndim != 1:
            raise ValueError(f"PerGroup.broadcast: expected a (G,) stat, got shape {tuple(stat.shape)}")
        a = _norm_axis(self.axis, ndim, "PerGroup")
        per_channel = stat.repeat_interleave(self.group_size)  # (C,)
        shape = [1] * ndim
        shape[a] = per_channel.shape[0]
        return per_channel.reshape(shape)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "per_group", "group_size": self.group_size, "axis": self.axis}


Granularity = PerTensor | PerChannel | PerGroup

GRANULARITIES: dict[str, type] = {"per_tensor": PerTensor, "per_channel": PerChannel, "per_group": PerGroup}


def granularity_from_dict(d: dict[str, Any] | str | Granularity) -> Granularity:
    """Inverse of ``to_dict``: {"type": "per_group", "group_size": 64, "axis": -1} -> PerGroup(64, -1).

    Also accepts an existing granularity (returned as is) and, for YAML brevity, the bare names "per_tensor" and
    "per_channel" (the defaults of their fields).
    """
    if isinstance(d, (PerTensor, PerChannel, PerGroup)):
        return d
    if isinstance(d, str):
        d = {"type": d}
    if not isinstance(d, dict) or "type" not in d:
        raise ValueError(f"granularity must be a dict with a 'type' key (one of {sorted(GRANULARITIES)}), got {d!r}")
    kwargs = {k: v for k, v in d.items() if k != "type"}
    cls = GRANULARITIES.get(d["type"])
    if cls is None:
        raise ValueError(f"unknown granularity type {d['type']!r}; choose one of {sorted(GRANULARITIES)}")
    try:
        return cls(**kwargs)
    except TypeError as e:
        raise ValueError(f"bad fields for granularity {d['type']!r}: {kwargs} ({e})") from None
