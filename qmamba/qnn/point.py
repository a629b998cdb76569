"""A quantization point: one tensor of one module that a recipe quantizes — its spec, its observer, its scale.

Activation points take their scale from calibration (``observing`` on, then ``freeze_()``); a learnable-scale spec
makes that scale a parameter for QAT. Weight points take their scale from the weight itself (absmax at the spec's
granularity), recomputed on every use until ``convert`` stores the int8 weight and its scale.

A dual-scale point (``spec.dual_scale``, the SSM input only) holds two scales: ``scale`` = the inlier scale s_in and
the buffer ``outlier_scale`` = s_out (both in the state_dict; points without dual_scale have no ``outlier_scale``, so
their state_dict is as before). Its codes come with outlier flags (mask encoding) and must never reach a single-scale
op: ``quantize`` / ``codes`` refuse it; ``dual_codes`` / ``roundtrip`` / ``fake`` handle it.
"""

from __future__ import annotations

import torch
from torch import nn

from qmamba.ops.int8_quantize import quantize_int8
from qmamba.quant.dual_scale import dual_dequantize, dual_fake_quantize, dual_quantize, unpack_mask
from qmamba.quant.numerics import dequantize, fake_quantize, fake_quantize_absmax, quantize, scale_from_absmax
from qmamba.quant.observers import DualScaleObserver, make_observer
from qmamba.quant.recipe import QuantSpec


class QuantPoint(nn.Module):
    def __init__(self, name: str, spec: QuantSpec, channels: int, is_weight: bool = False):
        super().__init__()
        self.name, self.spec, self.is_weight = name, spec, is_weight
        stat_shape = spec.granularity.stat_shape(channels)
        if spec.dual_scale is not None and is_weight:
            raise ValueError(f"{name}: dual_scale applies to the SSM input activation, not to a weight — fix the recipe")
        if not is_weight and spec.dual_scale is not None:
            self.observer = DualScaleObserver(spec.granularity, channels, name, spec.observer.kind,
                                              spec.observer.kwargs(), spec.dual_scale)
            self.register_buffer("outlier_scale", torch.ones(stat_shape))
        elif not is_weight:
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
        self.recorded_mask: torch.Tensor | None = None  # dual-scale mask encoding: its bool outlier flags, likewise
        self.recording = False
        self.forced: torch.Tensor | None = None  # codes fakequant hands on instead of its own (agreement_report)
        self.forced_mask: torch.Tensor | None = None  # their packed outlier flags (dual-scale mask encoding)
        self.enabled = True  # fakequant passes x through unquantized when False (qmamba.sensitivity: one at a time)
        self.probe = None  # callable(point, x) that sees the tensor in fp mode too (qmamba.sensitivity: SQNR)
        self._ready_seen: tuple | None = None  # (the ready tensor, its version, its value): see is_ready

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
            if self.dual is not None:
                s_in, s_out = self.observer.dual_scales(self.spec.bits)
                self.scale.copy_(s_in)
                self.outlier_scale.copy_(s_out)
            else:
                self.scale.copy_(self.observer.scale(self.spec.bits))
            self.ready.fill_(True)

    # ---- dual scale --------------------------------------------------------------------------------------------
    @property
    def dual(self):
        """The point's DualScaleSpec, or None (single scale)."""
        return self.spec.dual_scale

    def _no_dual(self, what: str) -> None:
        if self.dual is not None:
            raise RuntimeError(f"{self.name} is a dual-scale point: its codes need both scales (and the outlier "
                               f"flags), so {what} (single-scale) cannot give them — use dual_codes / roundtrip")

    def dual_scales_for(self, x: torch.Tensor, check_ready: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_in, s_out) shaped to broadcast against x. ``check_ready=False`` skips the readiness check (a host
        read; decode steps under a CUDA graph)."""
        s_in = self.scale_for(x) if check_ready else self.spec.granularity.broadcast(self.scale, x.dim())
        return s_in, self.spec.granularity.broadcast(self.outlier_scale, x.dim())

    def dual_codes(self, x: torch.Tensor, check_ready: bool = True):
        """int8: (codes, packed mask or None, s_in, s_out) of x in the point's dual encoding (torch ops; the kernels
        read these codes, s_in and the flags through a ``DualScale``). Records codes (and flags) when recording."""
        s_in, s_out = (s.detach() for s in self.dual_scales_for(x, check_ready))
        q, mask = dual_quantize(x.detach(), s_in, s_out, self.dual.encoding, self.dual.knee)
        self.record(q, mask)
        return q, mask, s_in, s_out

    def record(self, q: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Keep codes (and a dual-scale point's packed flags, unpacked) when recording; else nothing."""
        if self.recording:
            self.recorded = q
            self.recorded_mask = None if mask is None else unpack_mask(mask, q.shape[-1])

    def dual_roundtrip(self, x: torch.Tensor, check_ready: bool = True) -> torch.Tensor:
        """The dual-scale codes of x dequantized back to fp32, then x's dtype."""
        q, mask, s_in, s_out = self.dual_codes(x, check_ready)
        return dual_dequantize(q, mask, s_in, s_out, self.dual.encoding, self.dual.knee).to(x.dtype)

    # ---- scales ------------------------------------------------------------------------------------------------
    def is_ready(self) -> bool:
        """Whether the scale holds a calibrated value (the ``ready`` buffer), read on the host once per change of the
        buffer instead of at every call: on a GPU each read waits for the device to drain its queue, and every
        point asks at every forward (hundreds of host syncs per training or prefill step otherwise). A change is
        seen by the tensor's identity (``.to()``, ``load_state_dict(assign=True)`` replace it) and its version
        counter (``fill_`` / ``copy_`` in freeze, convert, ``load_state_dict`` bump it)."""
        r = self.ready
        seen = self._ready_seen
        if seen is None or seen[0] is not r or seen[1] != r._version:
            seen = (r, r._version, bool(r))
            self._ready_seen = seen
        return seen[2]

    def _calibrated_scale(self) -> torch.Tensor:
        if not self.is_ready():
            raise RuntimeError(f"quantization point {self.name} has no scale yet: calibrate the model first "
                               "(qmamba.qnn.calibrate or the calibration callback)")
        return self.scale

    def tensor_scale(self) -> torch.Tensor:
        """An activation point's calibrated scale as stored (0-d for a per-tensor point), detached: what a producer
        that hands this point's consumer its codes quantizes with. Errors as ``scale_for`` before calibration."""
        scale = self._calibrated_scale()
        return scale.detach() if scale.requires_grad else scale

    def scale_for(self, x: torch.Tensor) -> torch.Tensor:
        """The scale for tensor x, shaped to broadcast against it."""
        if self.is_weight and not self.is_ready():
            scale = scale_from_absmax(self.spec.granularity.absmax(x.detach()), self.spec.bits)
        else:
            scale = self._calibrated_scale()
        return self.spec.granularity.broadcast(scale, x.dim())

    def store_weight_scale_(self, weight: torch.Tensor) -> None:
        """Freeze a weight point's scale (at convert time)."""
        with torch.no_grad():
            self.scale = scale_from_absmax(self.spec.granularity.absmax(weight.detach().float()), self.spec.bits)
            self.ready.fill_(True)

    # ---- the three paths ---------------------------------------------------------------------------------------
    def fake(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """fakequant: dequantize(quantize(x)) with the straight-through estimator. ``backend`` as in
        ``numerics.fake_quantize`` / ``dual_scale.dual_fake_quantize`` ("auto": the fused Triton kernels on a GPU;
        the same values)."""
        if not self.enabled:
            return x
        if self.dual is not None:
            return self._dual_fake(x, backend)
        if self.is_weight and not self.recording and self.forced is None and not self.is_ready():
            # the weight's own absmax scale, made inside the fused kernel on a GPU (scale_for's ops otherwise)
            return fake_quantize_absmax(x, self.spec.granularity, self.spec.bits, backend)
        # a per-tensor scale (0-d) broadcasts as it is: no reshape of a learned scale for autograd to undo
        scale = self.scale if self.scale.ndim == 0 and self.is_ready() else self.scale_for(x)
        if self.recording:
            self.recorded = quantize(x.detach(), scale.detach(), self.spec.bits)
        if self.forced is not None:  # teacher forcing: downstream ops see the int8 run's codes, not ours
            return dequantize(self.forced, scale.detach()).to(x.dtype)
        return fake_quantize(x, scale, self.spec.bits, backend)

    def _dual_fake(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        d = self.dual
        s_in, s_out = self.dual_scales_for(x)
        if self.recording:
            q, mask = dual_quantize(x.detach(), s_in.detach(), s_out.detach(), d.encoding, d.knee)
            self.recorded = q
            self.recorded_mask = None if mask is None else unpack_mask(mask, q.shape[-1])
        if self.forced is not None:  # teacher forcing (agreement_report): the int8 run's codes and flags
            return dual_dequantize(self.forced, self.forced_mask, s_in.detach(), s_out.detach(), d.encoding,
                                   d.knee).to(x.dtype)
        return dual_fake_quantize(x, s_in, s_out, d.encoding, d.knee, backend)

    def quantize(self, x: torch.Tensor, backend: str = "torch") -> tuple[torch.Tensor, torch.Tensor]:
        """int8: the codes of x and the (broadcastable) scale they are in. ``backend`` as in ``qmamba.ops``: "torch"
        (``numerics.quantize``), "cuda" / "auto" (the fused kernel on a GPU); the same codes either way."""
        self._no_dual("quantize")
        scale = self.scale_for(x).detach()
        q = self.codes(x, scale, backend)
        self.record(q)
        return q, scale

    def codes(self, x: torch.Tensor, scale: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """The int8 codes of x in ``scale``, this point's scale broadcast against x (``scale_for(x)``): one element
        (per-tensor) or C along the granularity's axis (per-channel, per-group). "torch" is ``numerics.quantize``;
        any other backend goes through ``qmamba.ops.int8_quantize.quantize_int8`` (one kernel on a GPU). Reads no
        value on the host (decode steps call it inside a CUDA graph) and records nothing."""
        self._no_dual("codes")
        x = x.detach()
        if backend == "torch":
            return quantize(x, scale, self.spec.bits)
        scale = scale.detach()
        axis = getattr(self.spec.granularity, "axis", -1) if scale.numel() > 1 else -1
        return quantize_int8(x, scale.reshape(-1), axis, self.spec.bits, backend=backend)

    def roundtrip(self, x: torch.Tensor, backend: str = "torch") -> torch.Tensor:
        """int8 codes of x dequantized back to fp32 (an int8 input to an op whose math runs in fp32). A dual-scale
        point uses its dual encoding (torch ops, whatever the backend)."""
        if self.dual is not None:
            return self.dual_roundtrip(x)
        q, scale = self.quantize(x, backend)
        return dequantize(q, scale).to(x.dtype)
