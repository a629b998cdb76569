"""Dual-scale int8 quantization of the SSM input (issue 5): an inlier scale ``s_in`` for the bulk of the values and an
outlier scale ``s_out`` for the rare large ones, with the tensor kept as int8 codes in memory. Stateless ops, pure
torch; every path (fakequant, the ``torch`` int8 backend, the CUDA / Triton kernels) computes exactly these fp32 ops.

Scales are fp32, > 0, and broadcast against x without growing it (per-tensor, or per-channel such as Mamba2's x per
head). ``inv_in = 1 / s_in`` and ``inv_out = 1 / s_out`` are computed once in fp32; ``rint`` is round half to even
(``torch.round``, CUDA ``rintf``). Two encodings:

**mask** (codes + a 1-bit flag per element; extra memory 1/8 of the codes)::

    r    = rint(x * inv_in)                     # fp32
    flag = |r| > 127                            # the inlier code would saturate: an outlier
    q    = flag ? clamp(rint(x * inv_out), -128, 127) : r        (r is in [-127, 127] when flag is 0)
    dequantize: q * (flag ? s_out : s_in)       # fp32

  Flags are packed 8 per uint8 along the last dim (``pack_mask``): byte i of a row holds elements 8i .. 8i+7, element
  8i+j in bit j (little-endian bit order); a last dim that is not a multiple of 8 is zero-padded.
  With s_in == s_out every code and value equals single-scale ``numerics.quantize`` / ``dequantize`` bit for bit
  (an outlier's code is the same clamp(rint(x * inv)) and both branches multiply by the same scale): the control.

**piecewise** (a reserved code range, zero extra memory; K = ``knee`` in 1..126)::

    r     = rint(x * inv_in)                    # fp32
    inlier: |r| <= K  ->  q = r
    else:   v    = |x|                          # fp32
            knee = K * s_in                     # fp32, one product
            t    = rint((v - knee) * inv_out)   # fp32: subtract, then multiply, then rint
            o    = clamp(K + t, K, 127 if x >= 0 else 128)
            q    = x >= 0 ? o : -o
    dequantize: a = |q| (as int16: -128 -> 128)
            a <= K:  q * s_in                   # fp32
            a >  K:  sign(q) * (knee + (a - K) * s_out)     # fp32: (a - K) * s_out, then + knee, then the sign
  Codes |q| <= K are inliers at s_in, codes K < |q| <= 127 (and -128) are outliers in steps of s_out above the knee
  K * s_in. Calibration sets s_in = T / K (T the threshold), s_out = (A - T) / (127 - K) (A the outlier range).

Fake-quant (``dual_fake_quantize``) is dequantize(quantize(x)) with these ops, so bit-identical to the int8 codes
dequantized; its backward is the straight-through estimator: the gradient passes where the pre-rint code lies inside
the code range, as in ``numerics.fake_quantize`` (mask: x * inv_in in [-128, 127] for an inlier, x * inv_out in
[-128, 127] for an outlier, so with s_in == s_out the gradient is the single-scale one bit for bit; piecewise: every
inlier, and outliers whose code before the outer clamp is inside it) and is 0 where the outer ends clamp.
Scales get no gradient (learnable dual scales are not supported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from qmamba.quant import numerics
from qmamba.quant.numerics import _as_scale, _cheap_check, dequantize

ENCODINGS = ("mask", "piecewise")
QMIN, QMAX = -128, 127
# what the kernels get for the encoding (0: an ordinary single-scale tensor)
ENCODING_IDS = {"mask": 1, "piecewise": 2}


def _check(encoding: str, knee: int) -> None:
    if encoding not in ENCODINGS:
        raise ValueError(f"dual-scale encoding must be one of {ENCODINGS}, got {encoding!r}")
    if encoding == "piecewise" and (not isinstance(knee, int) or isinstance(knee, bool) or not 1 <= knee <= 126):
        raise ValueError(f"dual-scale piecewise knee must be an int in 1..126 (codes above it hold outliers), "
                         f"got {knee!r}")


def _scales(x: torch.Tensor, s_in, s_out) -> tuple[torch.Tensor, torch.Tensor]:
    s_in, s_out = _as_scale(s_in, x), _as_scale(s_out, x)
    _cheap_check(s_in)
    _cheap_check(s_out)
    return s_in.float(), s_out.float()


# ---- mask packing ------------------------------------------------------------------------------------------------
def _bits(device) -> torch.Tensor:
    """(1, 2, 4, ..., 128) uint8: bit j of a byte = element 8i + j. Made on the device (no host copy: decode steps
    may run under CUDA graph capture)."""
    return torch.pow(2, torch.arange(8, device=device)).to(torch.uint8)


def pack_mask(flags: torch.Tensor) -> torch.Tensor:
    """Bool flags (..., N) -> uint8 (..., ceil(N / 8)): 8 flags per byte along the last dim, element 8i+j in bit j."""
    if flags.dtype != torch.bool:
        raise TypeError(f"pack_mask expects a bool tensor, got {flags.dtype}")
    n = flags.shape[-1]
    pad = (-n) % 8
    f = torch.nn.functional.pad(flags.to(torch.uint8), (0, pad)) if pad else flags.to(torch.uint8)
    f = f.reshape(*flags.shape[:-1], (n + pad) // 8, 8)  # (..., N/8, 8)
    return (f * _bits(f.device)).sum(-1, dtype=torch.uint8)


def unpack_mask(packed: torch.Tensor, n: int) -> torch.Tensor:
    """uint8 (..., ceil(n / 8)) -> bool (..., n): the inverse of ``pack_mask`` for a last dim of length n."""
    if packed.dtype != torch.uint8:
        raise TypeError(f"unpack_mask expects uint8, got {packed.dtype}")
    if packed.shape[-1] != (n + 7) // 8:
        raise ValueError(f"unpack_mask: a last dim of {n} elements packs into {(n + 7) // 8} bytes, got "
                         f"{packed.shape[-1]}")
    bits = (packed.unsqueeze(-1) & _bits(packed.device)) != 0  # (..., n/8, 8)
    return bits.reshape(*packed.shape[:-1], -1)[..., :n]


# ---- the encodings, on fp32 values -------------------------------------------------------------------------------
def _encode(x32: torch.Tensor, s_in: torch.Tensor, s_out: torch.Tensor, encoding: str, knee: int):
    """(codes as exact fp32 values, outlier flags bool, pre-clamp "inside" bool for the STE)."""
    inv_in, inv_out = 1.0 / s_in, 1.0 / s_out
    vi = x32 * inv_in  # pre-rint inlier code
    r = torch.round(vi)
    if encoding == "mask":
        flag = r.abs() > QMAX
        vo = x32 * inv_out  # pre-clamp outlier code
        qo = torch.round(vo).clamp(QMIN, QMAX)
        q = torch.where(flag, qo, r)
        # inside the code range, as numerics.fake_quantize's STE has it (qmin <= v <= qmax before rint), so with
        # s_in == s_out the gradient is the single-scale one too (an inlier at 127 < v <= 127.5 rounds to 127 but
        # lies beyond the range: no gradient, as in single scale)
        inside = torch.where(flag, (vo >= QMIN) & (vo <= QMAX), (vi >= QMIN) & (vi <= QMAX))
        return q, flag, inside
    flag = r.abs() > knee
    v = x32.abs()
    kn = knee * s_in
    u = (v - kn) * inv_out  # pre-rint distance above the knee, in s_out steps
    top = torch.where(x32 >= 0, float(QMAX), float(-QMIN))
    o = torch.minimum(torch.round(u).add(knee).clamp_min(knee), top)
    q = torch.where(flag, torch.where(x32 >= 0, o, -o), r)
    inside = ~flag | (u + knee <= top)
    return q, flag, inside


def _decode(qf: torch.Tensor, flag: torch.Tensor | None, s_in: torch.Tensor, s_out: torch.Tensor, encoding: str,
            knee: int) -> torch.Tensor:
    """fp32 values from codes given as fp32 (exact) values."""
    if encoding == "mask":
        return qf * torch.where(flag, s_out, s_in)
    a = qf.abs()
    outer = knee * s_in + (a - knee) * s_out
    return torch.where(a > knee, torch.where(qf < 0, -outer, outer), qf * s_in)


# ---- public ops --------------------------------------------------------------------------------------------------
def dual_quantize(x: torch.Tensor, s_in, s_out, encoding: str = "mask", knee: int = 112
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """int8 codes of x (x's shape) and, for "mask", the packed outlier flags (uint8, (..., ceil(N / 8))); None for
    "piecewise". See the module docstring for the exact fp32 ops."""
    _check(encoding, knee)
    s_in, s_out = _scales(x, s_in, s_out)
    q, flag, _ = _encode(x.detach().float(), s_in, s_out, encoding, knee)
    return q.to(torch.int8), (pack_mask(flag) if encoding == "mask" else None)


def dual_dequantize(codes: torch.Tensor, mask: torch.Tensor | None, s_in, s_out, encoding: str = "mask",
                    knee: int = 112) -> torch.Tensor:
    """fp32 values of dual-scale codes (``mask``: the packed flags for "mask", ignored (None) for "piecewise")."""
    _check(encoding, knee)
    if codes.dtype != torch.int8:
        raise TypeError(f"dual_dequantize expects int8 codes, got {codes.dtype}")
    s_in, s_out = _as_scale(s_in, codes).float(), _as_scale(s_out, codes).float()
    flag = None
    if encoding == "mask":
        if mask is None:
            raise ValueError("dual_dequantize: the mask encoding needs its packed outlier flags (dual_quantize's "
                             "second output)")
        flag = unpack_mask(mask, codes.shape[-1])
    return _decode(codes.float(), flag, s_in, s_out, encoding, knee)


class _DualFakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, s_in, s_out, encoding, knee):
        q, flag, inside = _encode(x.float(), s_in, s_out, encoding, knee)
        ctx.save_for_backward(inside)
        ctx.x_dtype = x.dtype
        return _decode(q, flag, s_in, s_out, encoding, knee).to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        (inside,) = ctx.saved_tensors
        return torch.where(inside, grad_out, torch.zeros_like(grad_out)).to(ctx.x_dtype), None, None, None, None


def dual_fake_quantize(x: torch.Tensor, s_in, s_out, encoding: str = "mask", knee: int = 112,
                       backend: str = "torch") -> torch.Tensor:
    """``dual_dequantize(*dual_quantize(x, ...), ...)`` in x's dtype (bit-identical before the cast), differentiable
    in x with the straight-through estimator (module docstring). The scales get no gradient. ``backend`` as in
    ``numerics.fake_quantize``: "auto" runs the fused Triton kernels (``qmamba.kernels.fake_quant``) when x is on a
    GPU and both scales are per-tensor or along one axis in the same layout; the same values and gradients."""
    _check(encoding, knee)
    s_in, s_out = _scales(x, s_in, s_out)
    if numerics.use_fused_fake_quant(backend, x, "dual_fake_quantize",
                                     lambda: numerics._unsupported(x, s_in, s_out)):
        from qmamba.kernels.fake_quant import FusedDualFakeQuantize

        return FusedDualFakeQuantize.apply(x, s_in.detach(), s_out.detach(), encoding, knee)
    return _DualFakeQuantize.apply(x, s_in.detach(), s_out.detach(), encoding, knee)


def outlier_flags(x: torch.Tensor, s_in, encoding: str = "mask", knee: int = 112) -> torch.Tensor:
    """Bool (x's shape): the elements the encoding stores at the outlier scale (|rint(x * inv_in)| > 127 for "mask",
    > knee for "piecewise")."""
    _check(encoding, knee)
    s_in = _as_scale(s_in, x).float()
    r = torch.round(x.detach().float() * (1.0 / s_in))
    return r.abs() > (QMAX if encoding == "mask" else knee)


def outlier_share(x: torch.Tensor, s_in, encoding: str = "mask", knee: int = 112) -> float:
    """The share of elements of x that the encoding stores at the outlier scale (0 .. 1)."""
    if x.numel() == 0:
        return 0.0
    return float(outlier_flags(x, s_in, encoding, knee).double().mean())


# ---- what an op needs to read dual-scale codes -------------------------------------------------------------------
@dataclass(frozen=True)
class DualScale:
    """How to read dual-scale int8 codes besides their inlier scale (the scale every int8 op already takes): the
    outlier scale s_out (shaped like the inlier scale: one element, or one per channel / head) and the encoding. The
    mask encoding's packed flags are data of the tensor, not of the scale: they travel beside the codes (an op takes
    ``<name>_mask``). Ops that take ``<name>_dual=None`` read ordinary single-scale codes."""

    outlier_scale: torch.Tensor
    encoding: str = "mask"
    knee: int = 112

    def __post_init__(self):
        _check(self.encoding, self.knee)
        if not isinstance(self.outlier_scale, torch.Tensor):
            raise TypeError(f"DualScale.outlier_scale must be an fp32 tensor (no host value: decode steps run in "
                            f"CUDA graphs), got {type(self.outlier_scale).__name__}")

    @property
    def encoding_id(self) -> int:
        return ENCODING_IDS[self.encoding]


def check_dual_mask(name: str, codes: torch.Tensor, dual: DualScale | None, mask: torch.Tensor | None) -> None:
    """One clear error where codes, their DualScale and their packed mask do not go together."""
    if dual is None:
        if mask is not None:
            raise ValueError(f"{name}_mask given without {name}_dual: outlier flags mean nothing without the outlier "
                             f"scale — pass {name}_dual=DualScale(...) or drop the mask")
        return
    if not isinstance(dual, DualScale):
        raise TypeError(f"{name}_dual must be a qmamba.quant.dual_scale.DualScale, got {type(dual).__name__}")
    if dual.encoding == "mask":
        if mask is None:
            raise ValueError(f"{name}: the mask encoding needs its packed outlier flags ({name}_mask, the second output "
                             f"of dual_quantize)")
        if mask.dtype != torch.uint8:
            raise TypeError(f"{name}_mask must be uint8 (8 packed flags a byte), got {mask.dtype}")
        want = (*codes.shape[:-1], (codes.shape[-1] + 7) // 8)
        if tuple(mask.shape) != want:
            raise ValueError(f"{name}_mask must be {want} (the flags of {name}'s {tuple(codes.shape)} codes packed along "
                             f"the last dim), got {tuple(mask.shape)}")
    elif mask is not None:
        raise ValueError(f"{name}: the piecewise encoding carries no mask (its codes above the knee are the outliers), "
                         f"got a {name}_mask")


def dequantize_codes(codes: torch.Tensor, scale, dual: DualScale | None = None,
                     mask: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 values of int8 codes: ``q * scale`` (single scale, ``numerics.dequantize``), or ``dual_dequantize`` with
    ``dual``'s outlier scale and encoding (and the packed ``mask`` for the mask encoding)."""
    if dual is None:
        if mask is not None:
            raise ValueError("dequantize_codes: a mask without a DualScale")
        return dequantize(codes, scale)
    return dual_dequantize(codes, mask, scale, dual.outlier_scale, dual.encoding, dual.knee)


def check_out_duals(op: str, out_duals, out_scales) -> list:
    """An op emitting int8 codes for several consumers (``out_scales``), one of which may be dual-scale: ``out_duals``
    empty, or one ``DualScale`` or None per out_scale with at most one DualScale, its outlier scale per-tensor.
    Returns it as a list (empty: no dual-scale output)."""
    duals = list(out_duals or ())
    if not duals:
        return []
    if len(duals) != len(out_scales):
        raise ValueError(f"{op}: out_duals must have one entry (a DualScale or None) per out_scale: {len(out_scales)} "
                         f"out_scales, {len(duals)} out_duals")
    given = [j for j, d in enumerate(duals) if d is not None]
    if len(given) > 1:
        raise ValueError(f"{op}: at most one dual-scale output per call (the SSM input), got {len(given)} at {given}")
    for j in given:
        if not isinstance(duals[j], DualScale):
            raise TypeError(f"{op}: out_duals[{j}] must be a qmamba.quant.dual_scale.DualScale or None, got "
                            f"{type(duals[j]).__name__}")
        if duals[j].outlier_scale.numel() != 1:
            raise ValueError(f"{op}: out_duals[{j}].outlier_scale must be per-tensor (one element), got shape "
                             f"{tuple(duals[j].outlier_scale.shape)}")
    return duals
