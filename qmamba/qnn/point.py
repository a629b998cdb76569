"""A quantization point: one tensor of one module that a recipe quantizes — its spec, its observer, its scale.

Activation points take their scale from calibration (``observing`` on, then ``freeze_()``); a learnable-scale spec
makes that scale a parameter for QAT. Weight points take their scale from the weight itself (absmax at the spec's
granularity), recomputed on every use until ``convert`` stores the int8 weight and its scale.
"""

from __future__ import annotations

import torch
from torch import nn

from qmamba.ops.int8_quantize import quantize_int8
from qmamba.quant.numerics import dequantize, fake_quantize, quantize, scale_from_absmax
from qmamba.quant.observers import make_observer
from qmamba.quant.recipe import QuantSpec


class QuantPoint(nn.Module):
    def __init__(self, name: str, spec: QuantSpec, channels: int, is_weight: bool = False):
        super().__init__()
        self.name, self.spec, self.is_weight = name, spec, is_weight
        stat_shape = spec.granularity.stat_shape(channels)
        if not is_weight:
            self.observer = make_observer(spec.observer.kind, spec.granularity, channels, name,
                                          **spec.observer.kwargs())
        scale = torch.ones(stat_shape)
        if spec.learnable_scale and not is_weight:
            self.scale = nn.Parameter(scale)
        else:
            self.register_buffer("scale", scale)
        self.register_buffer("ready", torch.zeros((), dtype=torch.bool))  # scale holds a calibrated value
        self.observing = False
        self.recorded: torch.Tensor | None = None  # int8 codes of the last forward, when recording
        self.recording = False
        self.forced: torch.Tensor | None = None  # codes fakequant hands on instead of its own (agreement_report)
        self.enabled = True  # fakequant passes x through unquantized when False (qmamba.sensitivity: one at a time)
        self.probe = None  # callable(point, x) that sees the tensor in fp mode too (qmamba.sensitivity: SQNR)

    def extra_repr(self) -> str:
        return f"{self.name}, bits={self.spec.bits}, {self.spec.granularity}"

    # ---- calibration -------------------------------------------------------------------------------------------
    @property
    def watching(self) -> bool:
        """Someone wants to see this point's tensor in fp mode: its observer (calibrating) or a probe."""
        return self.observing or self.probe is not None

    def observe(self, x: torch.Tensor) -> None:
        if self.observing and not self.is_weight:
            self.observer(x.detach())
        if self.probe is not None:
            self.probe(self, x.detach())

    def freeze_(self) -> None:
        """Set the scale from what the observer saw (an error names this point if it saw nothing)."""
        if self.is_weight:
            return
        with torch.no_grad():
            self.scale.copy_(self.observer.scale(self.spec.bits))
            self.ready.fill_(True)

    # ---- scales ------------------------------------------------------------------------------------------------
    def scale_for(self, x: torch.Tensor) -> torch.Tensor:
        """The scale for tensor x, shaped to broadcast against it."""
        if self.is_weight and not self.ready:
            scale = scale_from_absmax(self.spec.granularity.absmax(x.detach()), self.spec.bits)
        else:
            if not self.ready:
                raise RuntimeError(f"quantization point {self.name} has no scale yet: calibrate the model first "
                                   "(qmamba.qnn.calibrate or the calibration callback)")
            scale = self.scale
        return self.spec.granularity.broadcast(scale, x.dim())

    def store_weight_scale_(self, weight: torch.Tensor) -> None:
        """Freeze a weight point's scale (at convert time)."""
        with torch.no_grad():
            self.scale = scale_from_absmax(self.spec.granularity.absmax(weight.detach().float()), self.spec.bits)
            self.ready.fill_(True)

    # ---- the three paths ---------------------------------------------------------------------------------------
    def fake(self, x: torch.Tensor) -> torch.Tensor:
        """fakequant: dequantize(quantize(x)) with the straight-through estimator."""
        if not self.enabled:
            return x
        scale = self.scale_for(x)
        if self.recording:
            self.recorded = quantize(x.detach(), scale.detach(), self.spec.bits)
        if self.forced is not None:  # teacher forcing: downstream ops see the int8 run's codes, not ours
            return dequantize(self.forced, scale.detach()).to(x.dtype)
        return fake_quantize(x, scale, self.spec.bits)

    def quantize(self, x: torch.Tensor, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """int8: the codes of x and the (broadcastable) scale they are in. ``backend`` as in ``qmamba.ops``: "torch"
        (``numerics.quantize``), "cuda" / "auto" (the fused kernel on a GPU); the same codes either way."""
        scale = self.scale_for(x).detach()
        q = self.codes(x, scale, backend)
        if self.recording:
            self.recorded = q
        return q, scale

    def codes(self, x: torch.Tensor, scale: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """The int8 codes of x in ``scale``, this point's scale broadcast against x (``scale_for(x)``): one element
        (per-tensor) or C along the granularity's axis (per-channel, per-group). "torch" is ``numerics.quantize``;
        any other backend goes through ``qmamba.ops.int8_quantize.quantize_int8`` (one kernel on a GPU). Reads no
        value on the host (decode steps call it inside a CUDA graph) and records nothing."""
        x = x.detach()
        if backend == "torch":
            return quantize(x, scale, self.spec.bits)
        scale = scale.detach()
        axis = getattr(self.spec.granularity, "axis", -1) if scale.numel() > 1 else -1
        return quantize_int8(x, scale.reshape(-1), axis, self.spec.bits, backend=backend)

    def roundtrip(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """int8 codes of x dequantized back to fp32 (an int8 input to an op whose math runs in fp32)."""
        q, scale = self.quantize(x, backend)
        return dequantize(q, scale).to(x.dtype)
