"""Quantizable twins of the mixer's parts. Each keeps its float twin's parameters (same names, same objects) and adds
quantization points; ``qmode`` picks the path:

- ``fp``: the float part, untouched (observers watch the inputs while calibrating);
- ``fakequant``: inputs and weights pass through dequantize(quantize(.)) with the straight-through estimator;
- ``int8``: the ``torch`` backend of the int8 math: integer GEMM / conv with int32 accumulation then
  ``acc * (s_x * s_w)`` in fp32 (DESIGN §3); the scans dequantize their int8 inputs to fp32.

A point the recipe leaves out stays floating point in every mode.

Codes between parts: in int8 mode a producer (the conv1d twin, a linear's epilogue, the fused pre-norm, Mamba2's
gated norm) hands its consumers their int8 codes straight from its kernel (``qmamba.qnn.codes``) when each
``takes_codes`` at that input; they skip their own quantize, which would have made the same codes from the float
output. Mamba2's SSD kernels quantize the conv's float x / B / C themselves as they load them (``float_in``).

Decoding: ``prefill`` / ``step`` (see ``qmamba.models.parts``) compute per token what ``forward`` computes per
sequence, in every mode. An int8 ``step`` goes through the twin's ``_int8_step`` (codes and scales in), the one place a
decode kernel plugs in.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qmamba import ops
from qmamba.models.parts import CausalConv1d, RMSNormGated, SelectiveScan, SSDScan
from qmamba.qnn.codes import Codes
from qmamba.qnn.point import QuantPoint
from qmamba.quant.granularity import PerTensor
from qmamba.ops.int8_conv1d import conv1d_int8, conv1d_int8_update, w8a8_gemv_conv1d_update
from qmamba.ops.int8_gated_norm import gated_rms_norm_from_codes, gated_rms_norm_hadamard_quantize
from qmamba.ops.int8_hadamard import hadamard_quantize
from qmamba.ops.int8_linear import GemvInputs, out_scale_per_column, w8a8_linear
from qmamba.ops.int8_selective_scan import (DtProjection, RotatedOutput, rotated_counters_size, selective_scan_int8,
                                           selective_scan_int8_update)
from qmamba.ops.int8_ssd import (ssd_chunk_scan_int8, ssd_chunk_scan_int8_from_float, ssd_step_int8,
                                 ssd_step_int8_from_float)
from qmamba.quant.dual_scale import DualScale
from qmamba.quant.numerics import dequantize, quantize, scale_from_absmax
from qmamba.quant.recipe import QuantSpec

QMODES = ("fp", "fakequant", "int8")


class QuantTwin:
    """Mixin: the quantization points of a part. ``POINTS`` maps point -> (is_weight, channel count getter)."""

    POINTS: dict = {}
    DUAL_SCALE_POINTS: tuple[str, ...] = ()  # points that may carry a dual_scale spec (the SSM input)

    @classmethod
    def from_float(cls, module: nn.Module, name: str, specs: dict[str, QuantSpec | None]):
        """The twin of ``module`` sharing its parameters and buffers (nothing is copied or re-initialized)."""
        twin = cls.__new__(cls)
        twin.__dict__ = dict(module.__dict__)
        twin._parameters, twin._buffers, twin._modules = (dict(module._parameters), dict(module._buffers),
                                                         dict(module._modules))
        twin.qmode = "fp"
        twin.backend = getattr(module, "backend", "auto")  # int8 kernels: "auto" | "torch" | "cuda" (set_backend)
        twin.quant_points = nn.ModuleDict()
        for point, spec in specs.items():
            if spec is None:
                continue
            is_weight, channels = cls.POINTS[point]
            if spec.dual_scale is not None and point not in cls.DUAL_SCALE_POINTS:
                raise ValueError(f"dual_scale on {name}.{point}: dual-scale quantization is only for the SSM input "
                                 f"(scan.u of Mamba1, scan.x of Mamba2); elsewhere the op cannot take per-element "
                                 f"scales (e.g. the x_proj GEMM factors one input scale out of its sums) — remove "
                                 f"dual_scale from the recipe target matching {name}.{point}")
            twin._check_spec(point, spec)
            twin.quant_points[point] = QuantPoint(f"{name}.{point}", spec, channels(twin), is_weight=is_weight)
        return twin

    def _check_spec(self, point: str, spec: QuantSpec) -> None:
        if spec.rotation is not None:
            raise ValueError(f"rotation {spec.rotation!r} applies to a linear layer's input only, not to "
                             f"{type(self).__name__} point {point!r} — fix the recipe")

    def weight_to_quantize(self) -> torch.Tensor:
        """The float weight in the frame of the quantized input, which the weight point quantizes (the layer's own
        weight; a rotated linear's is rotated)."""
        return self.weight

    def q(self, point: str) -> QuantPoint | None:
        # read past nn.Module's attribute lookup: every op asks for its points several times a call (host time)
        return self._modules["quant_points"]._modules.get(point)

    def _int8_weight(self, qw: QuantPoint) -> tuple[torch.Tensor, torch.Tensor]:
        """The int8 weight codes and their scale (stored after convert, else quantized on the fly)."""
        if self.weight.dtype == torch.int8:
            return self.weight, qw.scale_for(self.weight)
        return qw.quantize(self.weight_to_quantize())

    def _weight_in_mode(self, qw: QuantPoint | None) -> torch.Tensor:
        """The float weight the current mode computes with."""
        if qw is None or self.qmode == "fp":
            if self.weight.dtype == torch.int8:
                raise RuntimeError(f"{qw.name if qw else 'this layer'} holds int8 weights (a converted model): "
                                   "run it in int8 mode, or load the fp / prepared checkpoint instead")
            return self.weight if self.qmode == "fp" else self.weight_to_quantize()
        if self.weight.dtype == torch.int8:
            return dequantize(self.weight, qw.scale_for(self.weight))
        return qw.fake(self.weight_to_quantize(), self.backend)

    def takes_codes(self, point: str) -> bool:
        """Whether this part, in its current mode, reads input ``point`` only as int8 codes in the point's own
        per-tensor scale (no observer, probe or float use of it): then a producer may hand it ``Codes``."""
        return False

    def _takes_codes_at(self, point: str) -> bool:
        """The checks every ``takes_codes`` shares: int8 mode, a per-tensor point that nobody watches."""
        qp = self.q(point)
        return (self.qmode == "int8" and qp is not None and not qp.watching
                and isinstance(qp.spec.granularity, PerTensor))

    def _codes(self, point: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 mode: activation x observed at ``point``, then its codes and scale (the twin's backend); ``Codes``
        handed on by the producer are taken as they are."""
        qp = self.quant_points[point]
        if isinstance(x, Codes):
            qp.record(x.q)
            return x.q, x.scale
        qp.observe(x)
        return qp.quantize(x, self.backend)

    def _dual_codes(self, point: str, x: torch.Tensor):
        """``_codes`` for a point that may be dual-scale (the SSM input): (codes, inlier scale, DualScale or None,
        packed outlier flags or None). A dual-scale point's codes come from ``QuantPoint.dual_codes`` (torch ops)."""
        qp = self.quant_points[point]
        if qp.dual is None:
            return (*self._codes(point, x), None, None)
        if isinstance(x, Codes):
            qp.record(x.q, x.mask)
            return x.q, x.scale, x.dual, x.mask
        qp.observe(x)
        q, mask, s_in, s_out = qp.dual_codes(x)
        return q, s_in, DualScale(s_out, qp.dual.encoding, qp.dual.knee), mask

    def _in(self, point: str, x: torch.Tensor) -> torch.Tensor:
        """An activation input through its point in the current mode (fp32 dequantized codes in int8 mode)."""
        qp = self.q(point)
        if qp is None or x is None:
            return x
        if isinstance(x, Codes):  # int8 mode, handed on by the producer (only when takes_codes(point))
            qp.record(x.q)
            return _deq(x.q, x.scale, x.dtype)  # what roundtrip gives for the float tensor they stand for
        qp.observe(x)
        if self.qmode == "fakequant":
            return qp.fake(x, self.backend)
        if self.qmode == "int8":
            return qp.roundtrip(x, self.backend)
        return x

    # ---- one-token steps: a CUDA graph captures them, and reading a tensor on the host (``bool(point.ready)`` in
    # ``QuantPoint.scale_for``) is not allowed there. On a GPU the helpers below skip that check (the prefill's
    # forward, run first, made it); they leave observing, recording and forcing to forward.
    def _step_scale(self, qp: QuantPoint, x: torch.Tensor) -> torch.Tensor:
        """``qp.scale_for(x)``, without its host sync on a GPU."""
        return scale_without_sync(qp, x) if x.is_cuda else qp.scale_for(x)

    def _step_codes(self, point: str, x: torch.Tensor | None, time_dim: int | None = None):
        """(int8 codes, scale) of activation x at ``point``, or (x, None) where the recipe leaves it float. x is one
        token of the forward's tensor with its time dim ``time_dim`` dropped: it is quantized with that dim put back
        (L = 1), so a per-channel axis means the same in both; codes and scale come back without it."""
        qp = self.q(point)
        if qp is None or x is None:
            return x, None
        if isinstance(x, Codes):  # the producer's codes, already without the time dim
            return x.q, x.scale
        xt = x if time_dim is None else x.unsqueeze(time_dim)
        s = self._step_scale(qp, xt)
        q = qp.codes(xt, s, self.backend)  # the fused kernel on a GPU: one launch, no host sync
        return (q, s) if time_dim is None else (q.squeeze(time_dim), s.squeeze(time_dim))

    def _step_dual_codes(self, point: str, x: torch.Tensor, time_dim: int):
        """``_step_codes`` for a point that may be dual-scale: (codes, inlier scale, DualScale or None, packed flags or
        None), each without the time dim (the mask of a (B, D) token is (B, D): one flag byte per element)."""
        qp = self.q(point)
        if qp is None or qp.dual is None:
            return (*self._step_codes(point, x, time_dim), None, None)
        if isinstance(x, Codes):
            return x.q, x.scale, x.dual, x.mask
        xt = x.unsqueeze(time_dim)
        q, mask, s_in, s_out = qp.dual_codes(xt, check_ready=not xt.is_cuda)
        dual = DualScale(s_out.squeeze(time_dim), qp.dual.encoding, qp.dual.knee)
        return q.squeeze(time_dim), s_in.squeeze(time_dim), dual, None if mask is None else mask.squeeze(time_dim)

    def _step_act(self, point: str, x: torch.Tensor | None, time_dim: int | None = None):
        """``_in`` for one token: fakequant and int8 both give dequantize(quantize(x)) in x's dtype (the same fp32
        ops as ``fake_quantize``, so the same values)."""
        qp = self.q(point)
        if qp is None or x is None or self.qmode == "fp" or (self.qmode == "fakequant" and not qp.enabled):
            return x
        if qp.dual is not None:
            return self._step_dual(qp, x, time_dim)
        return _deq(*self._step_codes(point, x, time_dim), x.dtype)

    def _step_dual(self, qp: QuantPoint, x: torch.Tensor, time_dim: int | None) -> torch.Tensor:
        """One token of a dual-scale point, dequantized to x's dtype (torch ops; no host sync on a GPU)."""
        xt = x if time_dim is None else x.unsqueeze(time_dim)
        out = qp.dual_roundtrip(xt, check_ready=not xt.is_cuda)
        return out if time_dim is None else out.squeeze(time_dim)

    def _step_int8_weight(self, qw: QuantPoint) -> tuple[torch.Tensor, torch.Tensor]:
        """``_int8_weight`` without a host sync on a GPU."""
        w = self.weight if self.weight.dtype == torch.int8 else self.weight_to_quantize().detach()
        s = self._step_scale(qw, w)
        return (w, s) if w.dtype == torch.int8 else (quantize(w, s, qw.spec.bits), s)

    def _step_weight(self, qw: QuantPoint | None) -> torch.Tensor:
        """``_weight_in_mode`` without a host sync on a GPU."""
        if qw is None or self.qmode == "fp" or (self.weight.dtype != torch.int8 and not qw.enabled):
            return self._weight_in_mode(qw)  # no scale involved
        if self.weight.dtype == torch.int8:
            return dequantize(self.weight, self._step_scale(qw, self.weight))
        w = self.weight_to_quantize().detach()
        s = self._step_scale(qw, w)
        return dequantize(quantize(w, s, qw.spec.bits), s).to(w.dtype)  # = qw.fake(w)


def memo_key(tensors) -> tuple:
    """What a value made from ``tensors`` depends on: each tensor itself (held, so no other tensor can take its
    place at its address while the key lives), its storage, device and version counter (in-place changes)."""
    return tuple((t, t.data_ptr(), t.device, t._version) for t in tensors)


def memo_hit(key, tensors) -> bool:
    """Whether ``key`` (``memo_key`` of earlier tensors) still describes ``tensors``."""
    return key is not None and len(key) == len(tensors) and all(
        k[0] is t and k[1] == t.data_ptr() and k[2] == t.device and k[3] == t._version for k, t in zip(key, tensors))


class NegExpMemo:
    """A = -exp(A_log) in fp32 for the int8 scans, made once per value of A_log instead of at every call (two
    kernels a layer and a decode step otherwise): remade when A_log is replaced, moved, or changed in place (its
    version counter). No gradient flows through it (the int8 scans have none)."""

    def _neg_exp(self, A_log: torch.Tensor) -> torch.Tensor:
        if not memo_hit(getattr(self, "_neg_exp_key", None), (A_log,)):
            with torch.no_grad():
                self._neg_exp_value = -torch.exp(A_log.detach().float())
            self._neg_exp_key = memo_key((A_log,))
        return self._neg_exp_value


def scale_without_sync(qp: QuantPoint, x: torch.Tensor) -> torch.Tensor:
    """``qp.scale_for(x)`` minus its readiness check, which reads a tensor on the host."""
    if qp.is_weight and x.dtype != torch.int8:  # weights are converted (scale stored) iff stored as int8
        absmax = qp.spec.granularity.absmax(x.detach())
        return qp.spec.granularity.broadcast(scale_from_absmax(absmax, qp.spec.bits), x.dim())
    return qp.spec.granularity.broadcast(qp.scale, x.dim())


def _deq(q: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """int8 codes back to ``dtype`` (``QuantPoint.roundtrip``); a float input (scale None) passes through."""
    return q if scale is None else dequantize(q, scale).to(dtype)


class QuantLinear(QuantTwin, nn.Linear):
    """A linear layer with quantized input and weight. With ``rotation: hadamard`` on the input point, the fakequant
    and int8 paths compute ``(H x) (W H)^T`` (= W x, H orthonormal and symmetric) and quantize H x and W H; converted
    weights hold the codes of W H. The fp path uses W and x as they are."""

    POINTS = {"input": (False, lambda m: m.in_features), "weight": (True, lambda m: m.out_features)}

    def _check_spec(self, point, spec):
        if point == "input" and not isinstance(spec.granularity, PerTensor):
            raise ValueError(f"linear input scales must be per-tensor (the int8 GEMM factors s_x out of the sum), "
                             f"got {spec.granularity} — fix the recipe target for {point}")
        if point == "weight":
            super()._check_spec(point, spec)

    def takes_codes(self, point: str) -> bool:
        """The int8 GEMM reads the input as codes when both points are quantized and the input is not rotated (a
        rotated input is quantized after its Hadamard transform, so it needs the float tensor)."""
        return (point == "input" and self._takes_codes_at(point) and self.q("weight") is not None
                and not self.rotated)

    def takes_rotated_codes(self) -> bool:
        """A rotated int8 layer reads its input as the codes of the Hadamard-rotated input when a producer rotates
        and quantizes it in its own op (Mamba2's gated norm): int8 mode, 8-bit per-tensor input nobody watches."""
        qi = self.q("input")
        return (self.rotated and self._takes_codes_at("input") and self.q("weight") is not None
                and qi.spec.bits == 8)

    def input_scale(self, x: torch.Tensor, step: bool = False) -> torch.Tensor:
        """The input point's per-tensor scale (0-d fp32), for a producer that quantizes this layer's input itself
        and hands it ``Codes`` (only when ``takes_codes("input")``); ``step``: without the host sync of the
        readiness check on a GPU (a one-token step, see ``_step_scale``)."""
        qi = self.q("input")
        scale = self._step_scale(qi, x) if step else qi.scale_for(x)
        return scale.detach().reshape(())

    @property
    def rotated(self) -> bool:
        qi = self.q("input")
        return qi is not None and qi.spec.rotation == "hadamard"

    def weight_to_quantize(self) -> torch.Tensor:
        return ops.hadamard_transform(self.weight, self.backend) if self.rotated else self.weight

    def forward(self, x: torch.Tensor, consumers=None) -> torch.Tensor:
        """With ``consumers``, a list of (part, point, columns) splitting the output's N columns in order: each
        consumer's int8 ``Codes`` when this layer runs integer and every consumer takes codes (one GEMM emits them
        all, ``w8a8_linear`` with segment out_scales), else the float output's column slices."""
        if consumers is not None:
            return self._output_for(x, consumers, step=False)
        qi, qw = self.q("input"), self.q("weight")
        dtype = x.dtype
        if isinstance(x, Codes):  # a producer quantized the input for us (only when takes_codes("input"))
            return self._int8_linear(*self._codes("input", x), *self._int8_weight(qw), dtype)
        if self.qmode == "fp":  # observers (calibration) see the input in the frame it is quantized in
            if qi is not None and qi.watching:
                qi.observe(ops.hadamard_transform(x, self.backend) if self.rotated else x)
            return F.linear(x, self._weight_in_mode(qw).to(dtype), self.bias)
        if self.qmode == "int8" and qi is not None and qw is not None and self.rotated and not qi.watching:
            # rotate and quantize in one op (one kernel on a GPU): the codes of quantize(hadamard_transform(x));
            # an observer or probe needs the rotated tensor itself, so it takes the two-step path below
            sx = qi.scale_for(x).detach()
            qx = hadamard_quantize(x.detach(), sx, qi.spec.bits, backend=self.backend)
            if qi.recording:
                qi.recorded = qx
            return self._int8_linear(qx, sx, *self._int8_weight(qw), dtype)
        if self.rotated:
            x = ops.hadamard_transform(x, self.backend)
        if self.qmode == "int8" and qi is not None and qw is not None:
            return self._int8_linear(*self._codes("input", x), *self._int8_weight(qw), dtype)
        x = self._in("input", x).to(dtype)
        return F.linear(x, self._weight_in_mode(qw).to(dtype), self.bias)

    def _int8_linear(self, qx, sx, wq, sw, dtype):
        """int32 sums of the codes, then acc * (s_x * s_w) + bias in fp32, in ``dtype``: the W8A8 kernel on a GPU
        (``backend``), ``int8_linear_ref`` otherwise."""
        return w8a8_linear(qx, sx.reshape(()), wq, sw.reshape(-1) if sw.numel() > 1 else sw.reshape(()), self.bias,
                           out_dtype=dtype, backend=self.backend)

    # ---- codes for the consumers of the output's columns (``step`` with ``consumers``): one GEMV emits each
    # consumer's codes in its own scale (``w8a8_linear`` with segment out_scales)
    emit_codes = True  # hand consumers their codes when they all take them; False: always the float output

    def step(self, x: torch.Tensor, consumers=None):  # (B, K) -> (B, N)
        """``forward`` on one token, free of host syncs (see ``QuantTwin._step_scale``). With ``consumers``, a list
        of (part, point, columns) splitting the output's N columns in order: a list of each consumer's int8
        ``Codes`` when this layer runs integer and every consumer takes codes (one GEMV emits them all), else the
        float output's column slices."""
        if consumers is not None:
            return self._output_for(x, consumers, step=True)
        qi, qw = self.q("input"), self.q("weight")
        dtype = x.dtype
        if isinstance(x, Codes):
            return self._int8_linear(x.q, x.scale, *self._step_int8_weight(qw), dtype)
        if self.qmode == "fp":
            return F.linear(x, self._step_weight(qw).to(dtype), self.bias)
        if self.qmode == "int8" and qi is not None and qw is not None and self.rotated:
            sx = self._step_scale(qi, x)  # rotate + quantize in one op, as in forward (a step observes nothing)
            qx = hadamard_quantize(x.detach(), sx, qi.spec.bits, backend=self.backend)
            return self._int8_linear(qx, sx, *self._step_int8_weight(qw), dtype)
        if self.rotated:
            x = ops.hadamard_transform(x, self.backend)
        if self.qmode == "int8" and qi is not None and qw is not None:
            qx, sx = self._step_codes("input", x)
            return self._int8_linear(qx, sx, *self._step_int8_weight(qw), dtype)
        return F.linear(self._step_act("input", x).to(dtype), self._step_weight(qw).to(dtype), self.bias)

    def _step_gemv_operands(self, x) -> tuple:
        """(input codes, their scale as a 0-d tensor, int8 weight, its scale: 0-d or flat per channel) of the
        one-token integer GEMV, from x or the Codes a producer handed over."""
        qx, sx = (x.q, x.scale) if isinstance(x, Codes) else self._step_codes("input", x)
        wq, sw = self._step_int8_weight(self.q("weight"))
        return qx, sx.reshape(()), wq, (sw.reshape(-1) if sw.numel() > 1 else sw.reshape(()))

    def step_projection(self, x: torch.Tensor, consumer) -> DtProjection | None:
        """This layer's one-token GEMV handed to its single consumer ``consumer`` (part, point) to compute itself
        (Mamba1's dt_proj fused into the scan's update): the input codes and scale, the int8 weight and its scale, the
        bias, as ``step(x, [(part, point, N)])`` would feed the GEMV whose requant epilogue emits the consumer's codes
        (its out_dtype is x's dtype: the consumer's activation dtype). None where that step would not run the integer
        GEMV emitting codes, or the consumer does not take a projection at ``point``: call ``step`` then."""
        part, point = consumer
        takes = getattr(part, "takes_projection", None)
        if takes is None or not takes(point) or not self._emits_codes_for([(part, point, self.out_features)]):
            return None
        return DtProjection(*self._step_gemv_operands(x), None if self.bias is None else self.bias.detach())

    def step_gemv_inputs(self, x: torch.Tensor, consumers) -> GemvInputs | None:
        """The one-token GEMV ``step(x, consumers)`` would run, as its inputs (codes and scale, int8 weight and scale,
        bias, each consumer's out scale and column count), for the first consumer to run it fused with its own op
        (Mamba1's in_proj into the conv1d update: ``QuantCausalConv1d.step_from_projection``). The scales are the
        ones ``step`` puts in each consumer's ``Codes``. None where that step would not run the integer GEMV emitting
        codes: call ``step`` then."""
        if not self._emits_codes_for(consumers):
            return None
        qx, sx, wq, sw = self._step_gemv_operands(x)
        scales = [part._step_scale(part.q(point), qx).detach() for part, point, _ in consumers]
        return GemvInputs(qx, sx, wq, sw, self.bias, scales, [c for _, _, c in consumers])

    def _emits_codes_for(self, consumers) -> bool:
        """Whether this layer hands ``consumers`` their codes: int8 mode, per-tensor input and weight quantized, no
        rotation, and every consumer takes codes at its point."""
        qi, qw = self.q("input"), self.q("weight")
        return (self.emit_codes and self.qmode == "int8" and qi is not None and qw is not None and not self.rotated
                and isinstance(qi.spec.granularity, PerTensor)
                and all(isinstance(part, QuantTwin) and part.takes_codes(point) for part, point, _ in consumers))

    def _output_for(self, x: torch.Tensor, consumers, step: bool) -> list:
        """``forward`` / ``step`` (``step``) with consumers: see ``forward``."""
        columns = [c for _, _, c in consumers]
        if not self._emits_codes_for(consumers):
            y = self.step(x) if step else self(x)
            return list(y.split(columns, dim=-1))
        qw = self.q("weight")
        if step:  # one one-element scale per segment: nothing built per step (a CUDA graph replays it)
            qx, sx = (x.q, x.scale) if isinstance(x, Codes) else self._step_codes("input", x)
            wq, sw = self._step_int8_weight(qw)
            scales = [part._step_scale(part.q(point), qx).detach() for part, point, _ in consumers]
            out_scale, out_columns = [s.reshape(()) for s in scales], columns
        else:  # the GEMM's per-column scales, made once per value of the consumers' scales
            qx, sx = self._codes("input", x)
            wq, sw = self._int8_weight(qw)
            scales = [part.q(point).tensor_scale() for part, point, _ in consumers]
            out_scale, out_columns = self._column_scales(scales, columns), None
        sw = sw.reshape(-1) if sw.numel() > 1 else sw.reshape(())
        q = w8a8_linear(qx, sx.reshape(()), wq, sw, self.bias, out_dtype=x.dtype, out_scale=out_scale,
                        out_columns=out_columns, backend=self.backend)
        return [Codes(c, s, x.dtype) for c, s in zip(q.split(columns, dim=-1), scales)]

    def _column_scales(self, scales: list[torch.Tensor], columns: list[int]) -> torch.Tensor:
        """The (N,) fp32 requant scale of the output's columns: each consumer's per-tensor scale over its columns.
        Kept until one of the scales changes (another tensor, or an in-place update: its version counter)."""
        memo = self.__dict__.get("_column_scale_memo")
        if memo is None or memo[1] != columns or not memo_hit(memo[0], scales):
            memo = (memo_key(scales), list(columns), out_scale_per_column(scales, columns, sum(columns)))
            self.__dict__["_column_scale_memo"] = memo
        return memo[2]


class QuantCausalConv1d(QuantTwin, CausalConv1d):
    POINTS = {"input": (False, lambda m: m.in_channels), "weight": (True, lambda m: m.out_channels)}

    def _check_spec(self, point, spec):
        if point == "input" and not isinstance(spec.granularity, PerTensor):
            raise ValueError(f"conv1d input scales must be per-tensor, got {spec.granularity} — fix the recipe")
        super()._check_spec(point, spec)

    def forward(self, x: torch.Tensor, consumers=None):  # (B, D, L) -> (B, D, L)
        """With ``consumers``, a list: each consumer's int8 ``Codes`` when the conv runs integer and all take codes
        (one ``conv1d_int8`` call emits them all), else the float output for each (``CausalConv1d.forward``)."""
        points = self._code_points(consumers)
        if points is not None:
            return self._int8_codes(x, points)
        y = self._forward(x)
        return y if consumers is None else [y] * len(consumers)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        qi, qw = self.q("input"), self.q("weight")
        if self.qmode == "int8" and qi is not None and qw is not None:
            return self._int8_forward(x, qw)
        x = self._in("input", x)
        w = self._weight_in_mode(qw)
        if self.qmode == "fp":
            return ops.causal_conv1d(x, w.squeeze(1).to(x.dtype), self.bias, self.activation, backend=self.backend)
        # fakequant simulates exact integer sums: keep cuDNN from rounding the products to TF32
        with torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
            return ops.causal_conv1d(x, w.squeeze(1).to(x.dtype), self.bias, self.activation, backend=self.backend)

    def _int8_forward(self, x, qw):
        """Integer depthwise causal conv: int32 sums of int8 x int8, then acc * (s_x * s_w) + bias, then SiLU, in x's
        dtype (``conv1d_int8``: the CUDA kernel on a GPU, the reference elsewhere)."""
        qx, sx = self._codes("input", x)
        wq, sw = self._int8_weight(qw)
        return conv1d_int8(qx, sx.reshape(()), wq.reshape(wq.shape[0], -1), sw.reshape(-1), self.bias,
                           silu=self.activation is not None, out_dtype=x.dtype, backend=self.backend)

    # ---- decoding. In int8 mode (both points quantized) the state holds the int8 codes of the last K inputs, so a
    # step sums exactly the products the prefill summed; otherwise it holds the inputs as the conv consumes them
    # (fakequant: dequantized codes).
    def _integer(self) -> bool:
        return self.qmode == "int8" and self.q("input") is not None and self.q("weight") is not None

    def takes_codes(self, point: str) -> bool:
        """The input as codes when the conv runs integer (it sums int8 codes)."""
        return point == "input" and self._integer() and self._takes_codes_at(point)

    def state_dtype(self, dtype: torch.dtype) -> torch.dtype:
        return torch.int8 if self._integer() else dtype

    def state_input(self, x: torch.Tensor) -> torch.Tensor:
        return self._step_codes("input", x)[0] if self._integer() else self._step_act("input", x)

    def step(self, x: torch.Tensor, conv_state: torch.Tensor, consumers=None):  # (B, D) -> (B, D)
        """One token (``forward``'s output at it, ``consumers`` as there); no host sync on a GPU."""
        self._check_state(conv_state, x.dtype)
        points = self._code_points(consumers)
        if points is not None:
            return self._int8_step_codes(x, conv_state, points)
        y = self._step(x, conv_state)
        return y if consumers is None else [y] * len(consumers)

    def _step(self, x: torch.Tensor, conv_state: torch.Tensor) -> torch.Tensor:
        qw = self.q("weight")
        if self._integer():
            qx, sx = self._step_codes("input", x)
            wq, sw = self._step_int8_weight(qw)
            return self._int8_step(qx, conv_state, sx, wq, sw).to(x.dtype)
        self._shift_in(conv_state, self.state_input(x))
        return self._window_conv(conv_state, self._step_weight(qw).squeeze(1))

    # ---- codes for the consumers (``forward`` / ``step`` with ``consumers``): one op emits each consumer's codes
    emit_codes = True  # hand consumers their codes when they all take them; False: always the float output
    fuse_in_proj = True  # int8 decode: run the producer's GEMV with the update fused (step_from_projection)

    def takes_projected_input(self, consumers) -> bool:
        """Whether ``step_from_projection`` takes this conv's input as its producer's pending GEMV (``GemvInputs``)
        for ``consumers``: int8 with the input taken as codes, ``fuse_in_proj``, and every consumer taking codes (the
        fused op emits the codes ``step`` would: one kernel fewer a layer and step, the same codes bit for bit)."""
        return self.fuse_in_proj and self.takes_codes("input") and self._code_points(consumers) is not None

    def step_from_projection(self, proj: GemvInputs, conv_state: torch.Tensor, dtype: torch.dtype, consumers):
        """``step`` on the codes the producer's one-token GEMV ``proj`` (``QuantLinear.step_gemv_inputs``; its first
        segment of columns is this conv's input, ``dtype`` its activation dtype) would emit, with the GEMV and the
        update in one op (``w8a8_gemv_conv1d_update``). Returns (the consumers' ``Codes``, as ``step`` returns them;
        the ``Codes`` of the GEMV's other segments, as the producer's ``step`` hands them to their consumers)."""
        if not self.takes_projected_input(consumers):
            raise ValueError(f"{self.q('input').name if self.q('input') else 'conv1d.input'}: this conv does not take "
                             "its input as a pending GEMV now (it needs int8 mode, fuse_in_proj and every consumer "
                             "taking codes; check takes_projected_input(consumers)); run the producer's step and hand "
                             "its output to step() instead")
        self._check_state(conv_state, dtype)
        points = self._code_points(consumers)
        wq, sw = self._step_int8_weight(self.q("weight"))
        scales = [self._step_scale(p, proj.q).detach() for p in points]
        out_scales, duals = self._out_args(points, scales)
        codes, result = w8a8_gemv_conv1d_update(proj, conv_state, wq.reshape(wq.shape[0], -1), sw.reshape(-1),
                                                self.bias, silu=self.activation is not None, out_dtype=dtype,
                                                out_scales=out_scales, backend=self.backend, out_duals=duals)
        rest = codes.split(list(proj.out_columns), dim=-1)[1:]
        return (self._as_codes(result, scales, duals, dtype),
                [Codes(c, s, dtype) for c, s in zip(rest, proj.out_scale[1:])])

    def _code_points(self, consumers) -> list[QuantPoint] | None:
        """The consumers' quantization points when this conv runs integer and every consumer takes codes, else None."""
        if not (self.emit_codes and self._integer() and consumers):
            return None
        if not all(isinstance(part, QuantTwin) and part.takes_codes(point) for part, point in consumers):
            return None
        return [part.q(point) for part, point in consumers]

    @staticmethod
    def _out_args(points: list[QuantPoint], scales: list[torch.Tensor]):
        """(out_scales, out_duals) of the conv op for these consumer points (their scales shaped for the output)."""
        duals = [None if p.dual is None else
                 DualScale(p.spec.granularity.broadcast(p.outlier_scale, s.dim()).detach(), p.dual.encoding,
                           p.dual.knee) for p, s in zip(points, scales)]
        return [s.reshape(()) for s in scales], (duals if any(d is not None for d in duals) else [])

    @staticmethod
    def _as_codes(result, scales, duals, dtype) -> list[Codes]:
        codes, masks = result if duals else (result, [None] * len(scales))
        return [Codes(q, s, dtype, d, m) for q, s, d, m in zip(codes, scales, duals or [None] * len(scales), masks)]

    def _int8_codes(self, x: torch.Tensor, points: list[QuantPoint]) -> list[Codes]:
        """The integer conv of ``_int8_forward`` emitting each consumer point's codes (``conv1d_int8`` with
        out_scales / out_duals: the CUDA kernel on a GPU, the reference elsewhere) instead of its float output."""
        qx, sx = self._codes("input", x)
        wq, sw = self._int8_weight(self.q("weight"))
        scales = [p.scale_for(x).detach() for p in points]
        out_scales, duals = self._out_args(points, scales)
        result = conv1d_int8(qx, sx.reshape(()), wq.reshape(wq.shape[0], -1), sw.reshape(-1), self.bias,
                             silu=self.activation is not None, out_dtype=x.dtype, out_scales=out_scales,
                             backend=self.backend, out_duals=duals)
        return self._as_codes(result, scales, duals, x.dtype)

    def _int8_step_codes(self, x: torch.Tensor, conv_state: torch.Tensor, points: list[QuantPoint]) -> list[Codes]:
        """``_int8_codes`` for one token (``conv1d_int8_update``, conv_state advanced in place)."""
        qx, sx = self._step_codes("input", x)
        wq, sw = self._step_int8_weight(self.q("weight"))
        scales = [self._step_scale(p, x).detach() for p in points]
        out_scales, duals = self._out_args(points, scales)
        result = conv1d_int8_update(qx, conv_state, sx.reshape(()), wq.reshape(wq.shape[0], -1), sw.reshape(-1),
                                    self.bias, silu=self.activation is not None, out_dtype=x.dtype,
                                    out_scales=out_scales, backend=self.backend, out_duals=duals)
        return self._as_codes(result, scales, duals, x.dtype)

    def _int8_step(self, qx, conv_state, sx, wq, sw):
        """qx (B, D) int8 shifts into conv_state (B, D, K) int8 (in place); int32 sum over the K codes, then
        acc * (s_x * s_w) + bias and SiLU in fp32 -> (B, D): ``_int8_forward`` at the new token."""
        return conv1d_int8_update(qx, conv_state, sx.reshape(()), wq.reshape(wq.shape[0], -1), sw.reshape(-1),
                                  self.bias, silu=self.activation is not None, out_dtype=torch.float32,
                                  backend=self.backend)


class QuantSelectiveScan(NegExpMemo, QuantTwin, SelectiveScan):
    """Mamba1 scan with quantized u, delta, B, C, z (A_log, D stay fp32). Channel counts come from the mixer."""

    POINTS = {p: (False, lambda m: m.d_inner) for p in ("u", "delta", "z")} | \
             {p: (False, lambda m: m.d_state) for p in ("B", "C")}
    DUAL_SCALE_POINTS = ("u",)

    def _integer(self) -> bool:
        """int8 mode with every input quantized: the scan runs from codes (the int8 kernel on a GPU), a dual-scale u
        as its codes, outlier scale and flags."""
        return self.qmode == "int8" and all(self.q(p) is not None for p in self.POINTS)

    def takes_codes(self, point: str) -> bool:
        """Any input as codes (a dual-scale u included) when the scan runs from codes."""
        return point in self.POINTS and self._integer() and self._takes_codes_at(point)

    fuse_dt_proj = True  # int8 decode: delta as dt_proj's GEMV inputs (the update makes the codes); False: the codes

    def takes_projection(self, point: str) -> bool:
        """Whether ``step`` takes input ``point`` as a ``DtProjection`` (``QuantLinear.step_projection``): delta, when
        it takes delta's codes (the update then makes them itself, bit for bit dt_proj's GEMV: one kernel fewer)."""
        return point == "delta" and self.fuse_dt_proj and self.takes_codes(point)

    def forward(self, u, delta, A_log, B, C, D, z):
        if self._integer():
            return self._int8_scan(None, u, delta, A_log, B, C, D, z)
        u, delta, B, C, z = (self._in(p, t) for p, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)))
        return super().forward(u, delta, A_log, B, C, D, z)

    def prefill(self, ssm_state, u, delta, A_log, B, C, D, z):
        if self._integer():
            return self._int8_scan(ssm_state, u, delta, A_log, B, C, D, z)
        u, delta, B, C, z = (self._in(p, t) for p, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)))
        return super().prefill(ssm_state, u, delta, A_log, B, C, D, z)

    def _int8_scan(self, ssm_state, u, delta, A_log, B, C, D, z):
        """The scan from the codes of its five inputs: ``selective_scan_int8`` (kernel on a GPU; else the reference,
        which dequantizes to u's dtype as ``_in`` does and runs the fp32 scan). ssm_state <- the last state if given."""
        qu, su, u_dual, u_mask = self._dual_codes("u", u)
        codes = [c for p, t in (("delta", delta), ("B", B), ("C", C), ("z", z)) for c in self._codes(p, t)]
        A = self._neg_exp(A_log)
        out = selective_scan_int8(qu, su, *codes[:2], A, *codes[2:6], D.float(), *codes[6:], delta_softplus=True,
                                  out_dtype=u.dtype, return_last_state=ssm_state is not None, backend=self.backend,
                                  u_dual=u_dual, u_mask=u_mask)
        if ssm_state is None:
            return out
        ssm_state.copy_(out[1])
        return out[0]

    # int8 decode: True makes out_proj's rotated input codes in the update (one kernel fewer a layer, bit for bit);
    # off by default: measured no faster on an H100 (2026-12-06, benchmarks/RESULTS.md: the last block's rotation
    # costs what the Hadamard kernel does), so y goes to out_proj, which rotates and quantizes it itself
    emit_rotated = False

    def rotates_for(self, consumer) -> bool:
        """Whether ``step_output_for(consumer, ...)`` hands ``consumer`` (out_proj) its rotated input codes: int8 mode
        with every input quantized, and a consumer that takes rotated codes (``QuantLinear.takes_rotated_codes``)."""
        return (self.emit_rotated and self._integer() and isinstance(consumer, QuantLinear)
                and consumer.takes_rotated_codes())

    def step_output_for(self, consumer, state, u, delta, A_log, B, C, D, z):
        """``step`` for the part that reads y (Mamba1's out_proj): where ``rotates_for(consumer)``, the update also
        rotates and quantizes the consumer's input (``selective_scan_int8_update(rotated=...)``: on a GPU in the update
        kernel, one kernel fewer a layer) and hands it ``Codes`` of the rotated y in the consumer's input scale, bit for
        bit those of ``hadamard_quantize(y)``; else y."""
        if not self.rotates_for(consumer):
            return self.step(state, u, delta, A_log, B, C, D, z)
        qi = consumer.q("input")
        scale = consumer._step_scale(qi, u.q if isinstance(u, Codes) else u).detach().reshape(())
        counters = self._rotation_counters(state.shape[0], state.shape[1], state.device)
        y, codes = self.step(state, u, delta, A_log, B, C, D, z, rotated=RotatedOutput(scale, qi.spec.bits, counters))
        return Codes(codes, scale, y.dtype)

    def _rotation_counters(self, batch: int, dim: int, device) -> torch.Tensor:
        """The update kernel's block counters for the rotation (``RotatedOutput.counters``): kept on the module, one
        tensor per size and device, made once (zeros; the kernel leaves them zero) and never dropped, so a captured
        decode step replays with a live tensor even after steps of another batch size."""
        key = (rotated_counters_size(batch, dim), str(torch.device(device)))
        if not hasattr(self, "_rot_counters"):
            self._rot_counters = {}
        if key not in self._rot_counters:
            self._rot_counters[key] = torch.zeros(key[0], dtype=torch.int32, device=device)
        return self._rot_counters[key]

    def step(self, state, u, delta, A_log, B, C, D, z, rotated: RotatedOutput | None = None):
        """One token. ``delta`` may be a ``DtProjection`` where ``takes_projection("delta")``: dt_proj's GEMV
        inputs, from which the update makes delta's codes in delta's scale itself. ``rotated`` (int8 mode, see
        ``step_output_for``): returns (y, out_proj's rotated input codes)."""
        named = (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z))
        projected = isinstance(delta, DtProjection)
        if projected and not self.takes_projection("delta"):
            raise ValueError(f"{self.q('delta').name if self.q('delta') else 'scan.delta'}: this scan does not take "
                             "delta as a DtProjection now (it needs int8 mode with every input quantized per-tensor "
                             "and fuse_dt_proj); hand it dt_proj's output instead (QuantLinear.step_projection "
                             "returns None for such a consumer)")
        if self.qmode == "int8":
            qu, su, u_dual, u_mask = self._step_dual_codes("u", u, -1)
            (qB, sB), (qC, sC), (qz, sz) = (self._step_codes(p, t, -1) for p, t in named[2:])
            if projected:  # the scale dt_proj's GEMV would requantize in (as _output_for takes it), the codes later
                qd, sd = None, self._step_scale(self.q("delta"), delta.q).detach()
            else:
                qd, sd = self._step_codes("delta", delta, -1)
            return self._int8_step(state, qu, su, qd, sd, A_log, qB, sB, qC, sC, D, qz, sz, u.dtype, u_dual, u_mask,
                                   delta if projected else None, rotated)
        if rotated is not None:
            raise ValueError(f"{self.q('u').name if self.q('u') else 'scan'}: a rotated output needs int8 mode "
                             "(step_output_for checks rotates_for first)")
        u, delta, B, C, z = (self._step_act(p, t, -1) for p, t in named)
        return super().step(state, u, delta, A_log, B, C, D, z)

    def _int8_step(self, state, qu, su, qdelta, sdelta, A_log, qB, sB, qC, sC, D, qz, sz, dtype, u_dual=None,
                   u_mask=None, dt_proj: DtProjection | None = None, rotated: RotatedOutput | None = None):
        """int8 step from codes and scales (scale None: that input is float; u_dual / u_mask: a dual-scale u;
        dt_proj instead of qdelta: the update makes delta's codes; rotated: (y, out_proj's rotated input codes)). The
        torch backend dequantizes the codes to ``dtype`` and runs the float step, as ``forward`` does."""
        if all(s is not None for s in (su, sdelta, sB, sC, sz)):
            return selective_scan_int8_update(state, qu, su, qdelta, sdelta, self._neg_exp(A_log), qB, sB, qC, sC,
                                              D.float(), qz, sz, delta_softplus=True, out_dtype=dtype,
                                              backend=self.backend, u_dual=u_dual, u_mask=u_mask, dt_proj=dt_proj,
                                              rotated=rotated)
        u, delta, B, C, z = (_deq(q, s, dtype) for q, s in ((qu, su), (qdelta, sdelta), (qB, sB), (qC, sC), (qz, sz)))
        y = super().step(state, u, delta, A_log, B, C, D, z)
        if rotated is None:
            return y
        return y, hadamard_quantize(y, rotated.scale, rotated.bits, backend=self.backend)


class QuantSSDScan(NegExpMemo, QuantTwin, SSDScan):
    """Mamba2 scan with quantized x (per head), dt, B, C (per SSD group)."""

    POINTS = {"x": (False, lambda m: m.nheads), "dt": (False, lambda m: m.nheads),
              "B": (False, lambda m: m.ngroups), "C": (False, lambda m: m.ngroups)}
    DUAL_SCALE_POINTS = ("x",)

    def _integer(self) -> bool:
        """int8 mode with every input quantized: the scan runs from codes (the Triton int8 kernel on a GPU), a
        dual-scale x as its codes, outlier scale and flags."""
        return self.qmode == "int8" and all(self.q(p) is not None for p in self.POINTS)

    def takes_codes(self, point: str) -> bool:
        """Any per-tensor input as codes when the scan runs from codes (quamba2_w8a8: dt)."""
        return point in self.POINTS and self._integer() and self._takes_codes_at(point)

    def forward(self, x, dt, A_log, B, C, D, dt_bias):
        if self._integer():
            return self._int8_scan(None, x, dt, A_log, B, C, D, dt_bias)
        x, dt, B, C = (self._in(p, t) for p, t in (("x", x), ("dt", dt), ("B", B), ("C", C)))
        return super().forward(x, dt, A_log, B, C, D, dt_bias)

    def prefill(self, ssm_state, x, dt, A_log, B, C, D, dt_bias):
        if self._integer():
            return self._int8_scan(ssm_state, x, dt, A_log, B, C, D, dt_bias)
        x, dt, B, C = (self._in(p, t) for p, t in (("x", x), ("dt", dt), ("B", B), ("C", C)))
        return super().prefill(ssm_state, x, dt, A_log, B, C, D, dt_bias)

    float_inputs = True  # int8: hand the SSD kernels x / B / C as floats (they quantize them); False: codes first

    def _float_xbc(self, x, B, C) -> bool:
        """Whether x, B, C go to the int8 kernels as the conv's float output (the kernels quantize them as they load
        them): single-scale x, none of them codes already, and no one recording or watching their codes."""
        if not self.float_inputs or self.q("x").dual is not None or any(isinstance(t, Codes) for t in (x, B, C)):
            return False
        return not any(qp.recording or qp.watching for qp in (self.q("x"), self.q("B"), self.q("C")))

    def _int8_scan(self, ssm_state, x, dt, A_log, B, C, D, dt_bias):
        """The SSD scan from the codes of x, dt, B, C: ``ssd_chunk_scan_int8`` (Triton kernel on a GPU, else the
        reference); x, B, C as floats where ``_float_xbc`` (``ssd_chunk_scan_int8_from_float``: their codes made in
        the kernels). ssm_state <- the final state if given."""
        opts = dict(D=D, dt_bias=dt_bias, dt_softplus=True, out_dtype=x.dtype,
                    return_final_states=ssm_state is not None, backend=self.backend)
        if self._float_xbc(x, B, C):
            qdt, sdt = self._codes("dt", dt)
            sx, sB, sC = (self.q(p).scale_for(t).detach() for p, t in (("x", x), ("B", B), ("C", C)))
            out = ssd_chunk_scan_int8_from_float(x, sx, qdt, sdt, self._neg_exp(A_log), B, sB, C, sC,
                                                 self.chunk_size, **opts)
        else:
            qx, sx, x_dual, x_mask = self._dual_codes("x", x)
            codes = [c for p, t in (("dt", dt), ("B", B), ("C", C)) for c in self._codes(p, t)]
            out = ssd_chunk_scan_int8(qx, sx, *codes[:2], self._neg_exp(A_log), *codes[2:], self.chunk_size,
                                      x_dual=x_dual, x_mask=x_mask, **opts)
        if ssm_state is None:
            return out
        ssm_state.copy_(out[1])
        return out[0]

    def step(self, state, x, dt, A_log, B, C, D, dt_bias):  # one token: x (B, H, P), dt (B, H), B / C (B, G, N)
        named = (("x", x), ("dt", dt), ("B", B), ("C", C))
        if self._integer() and self._float_xbc(x, B, C):
            # x, B, C as the conv's float output: the step kernel quantizes them as it loads them (one launch)
            qdt, sdt = self._step_codes("dt", dt, 1)
            sx, sB, sC = (self._step_scale(self.q(p), t).detach() for p, t in (("x", x), ("B", B), ("C", C)))
            return ssd_step_int8_from_float(state, x, sx, qdt, sdt, self._neg_exp(A_log), B, sB, C, sC, D=D,
                                            dt_bias=dt_bias, dt_softplus=True, out_dtype=x.dtype,
                                            backend=self.backend)
        if self.qmode == "int8":
            qx, sx, x_dual, x_mask = self._step_dual_codes("x", x, 1)
            (qdt, sdt), (qB, sB), (qC, sC) = (self._step_codes(p, t, 1) for p, t in named[1:])
            return self._int8_step(state, qx, sx, qdt, sdt, A_log, qB, sB, qC, sC, D, dt_bias, x.dtype, x_dual,
                                   x_mask)
        x, dt, B, C = (self._step_act(p, t, 1) for p, t in named)
        return super().step(state, x, dt, A_log, B, C, D, dt_bias)

    def _int8_step(self, state, qx, sx, qdt, sdt, A_log, qB, sB, qC, sC, D, dt_bias, dtype, x_dual=None, x_mask=None):
        """int8 step from codes and scales (scale None: that input is float; x_dual / x_mask: a dual-scale x); the
        torch backend dequantizes to ``dtype`` and runs the float step."""
        if all(s is not None for s in (sx, sdt, sB, sC)):
            return ssd_step_int8(state, qx, sx, qdt, sdt, self._neg_exp(A_log), qB, sB, qC, sC, D=D, dt_bias=dt_bias,
                                 dt_softplus=True, out_dtype=dtype, backend=self.backend, x_dual=x_dual, x_mask=x_mask)
        x, dt, B, C = (_deq(q, s, dtype) for q, s in ((qx, sx), (qdt, sdt), (qB, sB), (qC, sC)))
        return super().step(state, x, dt, A_log, B, C, D, dt_bias)


class QuantRMSNormGated(QuantTwin, RMSNormGated):
    """Mamba2's gated norm with a quantized gate z."""

    POINTS = {"z": (False, lambda m: m.weight.shape[0])}

    def takes_codes(self, point: str) -> bool:
        """The gate as codes in int8 mode (the norm reads their dequantized values, as it reads z's roundtrip)."""
        return point == "z" and self._takes_codes_at(point)

    def _int8_gate(self, z) -> bool:
        """int8 mode with a quantized gate: the norm reads z's codes."""
        return self.qmode == "int8" and z is not None and self.q("z") is not None

    def forward(self, x, z=None):
        if self._int8_gate(z):
            return self._int8_norm(x, *self._codes("z", z), z.dtype)
        return super().forward(x, self._in("z", z))

    def step(self, x, z=None):  # (B, D) -> (B, D)
        if self.qmode == "int8":
            return self._int8_step(x, *self._step_codes("z", z, 1))
        return super().step(x, self._step_act("z", z, 1))

    def _int8_step(self, x, qz, sz):
        """The norm on one token with the gate as int8 codes (scale None: z is float)."""
        if sz is None:
            return super().step(x, qz)
        return self._int8_norm(x, qz, sz, x.dtype)

    emit_codes = True  # int8: hand out_proj its rotated input codes from the norm's kernel; False: float output

    def output_for(self, x, z, consumer, step: bool = False):
        """int8 mode, one norm group, ``consumer`` a rotated int8 linear that takes rotated codes: the norm, the
        Hadamard rotation and the quantize of the consumer's input in one op (``gated_rms_norm_hadamard_quantize``),
        handed on as ``Codes``; else the norm's float output."""
        if not (self.emit_codes and self._int8_gate(z) and self.group_size in (None, x.shape[-1])
                and isinstance(consumer, QuantLinear) and consumer.takes_rotated_codes()):
            return self.step(x, z) if step else self(x, z)
        qi = consumer.q("input")
        if step:
            qz, sz = self._step_codes("z", z, 1)
            s_out, z_dtype = consumer._step_scale(qi, x).detach().reshape(()), x.dtype
        else:
            qz, sz = self._codes("z", z)
            s_out, z_dtype = qi.tensor_scale(), z.dtype
        codes = gated_rms_norm_hadamard_quantize(x, self.weight, qz, sz, z_dtype, self.eps, self.norm_before_gate,
                                                 s_out, backend=self.backend)
        return Codes(codes, s_out, x.dtype)

    def _int8_norm(self, x, qz, sz, z_dtype):
        """The norm reading the gate's codes: z dequantized to its dtype as ``roundtrip`` gives it, then the gated
        norm (``ops.int8_gated_norm``: one Triton kernel on a GPU, the torch reference elsewhere)."""
        return gated_rms_norm_from_codes(x, self.weight, qz, sz, z_dtype, self.eps, self.group_size,
                                         self.norm_before_gate, backend=self.backend)


TWINS: dict[type, type] = {nn.Linear: QuantLinear, CausalConv1d: QuantCausalConv1d, SelectiveScan: QuantSelectiveScan,
                           SSDScan: QuantSSDScan, RMSNormGated: QuantRMSNormGated}
