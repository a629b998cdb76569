"""An activation handed from one int8 part to the next as codes, never as a float tensor.

In int8 mode a producer that can requantize its output for its consumers hands each consumer a ``Codes``. The
producers: the conv1d kernel (one int8 tensor per consumer scale: Mamba1's x_proj and scan), the linears (their GEMM
/ GEMV epilogue requantizes each consumer's columns in its scale: in_proj, x_proj, dt_proj, Mamba2's in_proj for z,
xBC and dt), the blocks' fused residual add + RMSNorm (in_proj's input) and Mamba2's gated norm (out_proj's rotated
input: ``QuantLinear.takes_rotated_codes``). A ``Codes`` holds the int8 codes in that consumer's own quantization point
scale, the activation dtype they stand for, and, for a dual-scale point (issue 5: the SSM input), its ``DualScale``
and packed outlier flags. The consumer then skips its own quantize: the same codes it would have made from the float
output (same fp32 ops, DESIGN §3), with one kernel and no float tensor in between.

A part says whether it can take codes at an input with ``QuantTwin.takes_codes(point)``; a producer hands codes only
when every consumer can (else each gets the float output, as before).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from qmamba.quant.dual_scale import DualScale


@dataclass(frozen=True)
class Codes:
    q: torch.Tensor                  # int8 codes, the layout the consumer reads (e.g. (B, D, L) for the scan's u)
    scale: torch.Tensor              # the consumer point's (inlier) scale, broadcastable against q
    dtype: torch.dtype               # the activation dtype the codes stand for (the consumer's output dtype)
    dual: DualScale | None = None    # dual-scale point: outlier scale and encoding
    mask: torch.Tensor | None = None  # mask encoding: the packed outlier flags

    def __post_init__(self):
        if self.q.dtype != torch.int8:
            raise TypeError(f"Codes.q must hold int8 codes, got {self.q.dtype}")

    @property
    def shape(self) -> torch.Size:
        return self.q.shape

    @property
    def device(self) -> torch.device:
        return self.q.device

    @property
    def is_cuda(self) -> bool:
        return self.q.is_cuda

    def dim(self) -> int:
        return self.q.dim()

    def __getitem__(self, index) -> Codes:
        """A slice of the codes (a view, as ``Tensor.__getitem__``), e.g. the conv's last K inputs for its decoding
        state. Only per-tensor codes without packed flags: a per-channel scale or a mask would need the same slice."""
        if self.mask is not None or self.scale.numel() != 1:
            raise ValueError("Codes[...]: only codes with one per-tensor scale and no packed outlier flags can be "
                             "sliced; slice the float activation instead")
        return replace(self, q=self.q[index])

    def transpose(self, dim0: int, dim1: int) -> Codes:
        """The same codes with two dims swapped (a view), as ``Tensor.transpose``. A mask is packed along the last
        dim, so codes with one cannot be transposed."""
        if self.mask is not None:
            raise ValueError("Codes.transpose: these codes carry packed outlier flags (mask encoding), packed along "
                             "their last dim; they cannot be transposed — hand them to their consumer as they are")
        scale = self.scale.transpose(dim0, dim1) if self.scale.dim() == self.q.dim() else self.scale
        return replace(self, q=self.q.transpose(dim0, dim1), scale=scale)
