"""The numerics contract (DESIGN.md §3) as stateless ops: every fake-quant and int8 path in qmamba goes through these.

    quantize:    q = clamp(rint(x * inv_scale), qmin, qmax)    inv_scale = 1 / scale, computed once in fp32,
                                                               rint = round half to even (torch.round)
    dequantize:  q * scale                                      fp32
    fake-quant:  dequantize(quantize(x))                        the same fp32 ops, so bit-identical; STE backward
    int8 GEMM:   acc = sum_k qa * qb (int32, exact);  out = acc * (s_a * s_w)  in fp32

Symmetric signed codes: bits=8 -> [-128, 127]. Scales are fp32, > 0, and must already broadcast against the tensor
(``Granularity.broadcast`` builds them).
"""

from __future__ import annotations

import math

import torch

# Largest |product| of two int8 codes: (-128) * (-128).
_MAX_INT8_PRODUCT = 128 * 128


def qrange(bits: int) -> tuple[int, int]:
    """Symmetric signed code range for ``bits``: (-2**(bits-1), 2**(bits-1) - 1); bits in 2..8."""
    if not isinstance(bits, int) or isinstance(bits, bool) or not 2 <= bits <= 8:
        raise ValueError(f"bits must be an int in 2..8 (codes are stored as int8), got {bits!r}")
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def check_scale(scale: torch.Tensor, name: str = "scale") -> torch.Tensor:
    """Raise ValueError unless every element of ``scale`` is finite and > 0. Returns ``scale``.

    Reads the values (a host sync on CUDA): call it where scales are computed or loaded, not per forward.
    """
    s = scale.detach()
    bad = ~(torch.isfinite(s) & (s > 0))
    if bool(bad.any()):
        n_bad = int(bad.sum())
        first = s[bad].reshape(-1)[0].item()
        raise ValueError(f"{name}: quantization scales must be finite and > 0, but {n_bad} of {s.numel()} are not "
                         f"(e.g. {first}); calibrate before quantizing (an observer that saw data gives scale > 0), "
                         f"and for learned (LSQ) scales lower the scale learning rate or clamp the scale")
    return scale


def _as_scale(scale, like: torch.Tensor) -> torch.Tensor:
    if not isinstance(scale, torch.Tensor):
        scale = torch.tensor(float(scale), dtype=torch.float32, device=like.device)
    try:
        out_shape = torch.broadcast_shapes(like.shape, scale.shape)
    except RuntimeError:
        out_shape = None
    if out_shape != like.shape:
        raise ValueError(f"scale of shape {tuple(scale.shape)} does not broadcast against a tensor of shape "
                         f"{tuple(like.shape)}; build it with granularity.broadcast(stat, x.ndim)")
    return scale


def _cheap_check(scale: torch.Tensor) -> None:
    # A value check costs a host sync on CUDA and breaks torch.compile graphs, so it runs only where it is free:
    # on CPU, in eager mode. On CUDA, scales are checked where they are made (observers, loading) via check_scale.
    if scale.device.type == "cuda" or torch.compiler.is_compiling():
        return
    check_scale(scale)


def quantize(x: torch.Tensor, scale: torch.Tensor | float, bits: int = 8) -> torch.Tensor:
    """int8 codes ``clamp(rint(x * (1 / scale)), qmin, qmax)``, the reciprocal computed once in fp32.

    ``scale`` must broadcast against ``x`` without growing it. Returns a torch.int8 tensor of x's shape.
    """
    qmin, qmax = qrange(bits)
    scale = _as_scale(scale, x)
    _cheap_check(scale)
    inv = 1.0 / scale.float()
    return torch.round(x.float() * inv).clamp_(qmin, qmax).to(torch.int8)


def dequantize(q: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """``q * scale`` in fp32."""
    if q.is_floating_point():
        raise TypeError(f"dequantize expects integer codes, got {q.dtype}")
    scale = _as_scale(scale, q)
    return q.float() * scale.float()


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, bits):
        qmin, qmax = qrange(bits)
        inv = 1.0 / scale.float()
        v = x.float() * inv  # pre-clamp value, in units of the scale
        q = torch.round(v).clamp_(qmin, qmax)
        out = q * scale.float()  # same ops as dequantize(quantize(x)): codes are exact in fp32
        ctx.qrange = (qmin, qmax)
        ctx.x_dtype, ctx.scale_shape = x.dtype, scale.shape
        if ctx.needs_input_grad[1]:
            ctx.save_for_backward(x, scale)
        else:
            ctx.save_for_backward((v >= qmin) & (v <= qmax))
        return out.to(x.dtype)

    @staticmethod
    def backward(ctx, grad_out):
        qmin, qmax = ctx.qrange
        if ctx.needs_input_grad[1]:
            x, scale = ctx.saved_tensors
            grad_x, grad_scale = lsq_backward(x, scale, grad_out, qmin, qmax, ctx.needs_input_grad[0], ctx.x_dtype)
            return grad_x, grad_scale, None
        grad_x = None
        if ctx.needs_input_grad[0]:
            (inside,) = ctx.saved_tensors
            grad_x = torch.where(inside, grad_out, torch.zeros_like(grad_out)).to(ctx.x_dtype)
        return grad_x, None, None


def lsq_backward(x: torch.Tensor, scale: torch.Tensor, grad_out: torch.Tensor, qmin: int, qmax: int, want_x: bool,
                 x_dtype: torch.dtype) -> tuple[torch.Tensor | None, torch.Tensor]:
    """fake-quant's backward with a learned scale: (grad_x or None, grad_scale), in torch ops.

    LSQ (Esser et al. 2020): d out / d s = rint(v) - v inside the range, qmin / qmax where clamped, scaled by
    g = 1 / sqrt(N * qmax) with N = elements per scale, so the step size learns at a rate comparable to the weights
    regardless of how many elements share it. grad_x is the straight-through estimator."""
    v = x.float() * (1.0 / scale.float())
    g32 = grad_out.float()
    d_s = torch.where(v < qmin, float(qmin), torch.where(v > qmax, float(qmax), torch.round(v) - v))
    n_per_scale = x.numel() / max(scale.numel(), 1)
    g = 1.0 / math.sqrt(n_per_scale * qmax)
    grad_scale = ((g32 * d_s).sum_to_size(scale.shape) * g).to(scale.dtype)
    grad_x = None
    if want_x:
        inside = (v >= qmin) & (v <= qmax)
        grad_x = torch.where(inside, grad_out, torch.zeros_like(grad_out)).to(x_dtype)
    return grad_x, grad_scale


def fake_quantize(x: torch.Tensor, scale: torch.Tensor | float, bits: int = 8, backend: str = "torch") -> torch.Tensor:
    """``dequantize(quantize(x, scale), scale)`` in x's dtype (values bit-identical before the cast), differentiable.

    Backward: straight-through estimator, the upstream gradient where the pre-clamp value ``x * (1/scale)`` lies in
    [qmin, qmax], zero outside. If ``scale.requires_grad``, the scale gets the LSQ gradient
    ``sum(grad * (rint(v) - v | qmin | qmax)) * g`` with ``g = 1 / sqrt(numel(x) / numel(scale) * qmax)``,
    summed down to the scale's shape.

    ``backend``: ``"torch"`` (these ops, any device), ``"auto"`` (the fused Triton kernels of
    ``qmamba.kernels.fake_quant`` when x is on a GPU and its scale is per-tensor or along one axis, else these ops),
    ``"cuda"`` (the fused kernels, or an error saying why not). Same values and gradients either way; a learned
    scale's gradient to fp32 rounding (another summation order).
    """
    qrange(bits)
    scale = _as_scale(scale, x)
    _cheap_check(scale)
    if use_fused_fake_quant(backend, x, "fake_quantize", lambda: _unsupported(x, scale)):
        from qmamba.kernels.fake_quant import FusedFakeQuantize

        return FusedFakeQuantize.apply(x, scale, bits)
    return _FakeQuantize.apply(x, scale, bits)


def fake_quantize_absmax(x: torch.Tensor, granularity, bits: int = 8, backend: str = "torch",
                         eps: float = 1e-8) -> torch.Tensor:
    """A weight's fake-quant in its own absmax scale: ``fake_quantize(x, s, bits)`` with
    ``s = scale_from_absmax(granularity.absmax(x.detach()), bits, eps)`` broadcast against x (STE gradient to x, none
    to s). ``backend`` as in ``fake_quantize``; ``"auto"`` / ``"cuda"`` make s inside one fused kernel
    (``qmamba.kernels.fake_quant.FusedAbsmaxFakeQuantize``) when x is on a GPU and s is one per row of a contiguous x
    (per-channel along axis 0: a weight's output channels), instead of ~10 torch ops before the fake-quant kernel.
    The same values either way."""
    qrange(bits)
    if use_fused_fake_quant(backend, x, "fake_quantize_absmax", lambda: None):
        from qmamba.kernels.fake_quant import FusedAbsmaxFakeQuantize, absmax_rows

        if absmax_rows(x, granularity) is not None:
            return FusedAbsmaxFakeQuantize.apply(x, bits, float(eps))
    scale = granularity.broadcast(scale_from_absmax(granularity.absmax(x.detach()), bits, eps), x.dim())
    return fake_quantize(x, scale, bits, backend)


def _unsupported(x: torch.Tensor, *scales: torch.Tensor) -> str | None:
    from qmamba.kernels.fake_quant import unsupported

    return unsupported(x, *scales)


def use_fused_fake_quant(backend: str, x: torch.Tensor, op: str, layout_problem) -> bool:
    """Whether fake-quant op ``op`` runs the fused Triton kernels (``qmamba.kernels.fake_quant``) for x:
    ``qmamba.ops.backend.use_triton`` with ``layout_problem()`` (the scales' layout: a reason string or None)."""
    from qmamba.ops.backend import use_triton

    return use_triton(backend, x, op, layout_problem)


def int_matmul_ref(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """Exact ``qa @ qb.T`` for int8 codes via float64 (exact while K * 128 * 128 < 2**53), returned as int32.

    Runs on every device (CUDA has no int64 matmul). qa: (..., K) int8, qb: (N, K) int8 -> (..., N) int32.
    """
    K = _check_int_mm_args(qa, qb)
    assert K * _MAX_INT8_PRODUCT < 2 ** 53, "float64 accumulation would not be exact"
    return (qa.double() @ qb.double().T).to(torch.int32)


def _check_int_mm_args(qa: torch.Tensor, qb: torch.Tensor) -> int:
    if qa.dtype != torch.int8 or qb.dtype != torch.int8:
        raise TypeError(f"int_matmul expects int8 codes, got {qa.dtype} and {qb.dtype}; quantize() them first")
    if qb.ndim != 2 or qa.ndim < 1 or qa.shape[-1] != qb.shape[1]:
        raise ValueError(f"int_matmul: expected qa (..., K) and qb (N, K) (a linear weight), got "
                         f"{tuple(qa.shape)} and {tuple(qb.shape)}")
    K = qb.shape[1]
    if K * _MAX_INT8_PRODUCT >= 2 ** 31:
        raise ValueError(f"int_matmul: K={K} could overflow the int32 accumulator (needs K < "
                         f"{2 ** 31 // _MAX_INT8_PRODUCT}); split the reduction")
    return K


def _int_mm_ok(a2: torch.Tensor, qb: torch.Tensor) -> bool:
    if not hasattr(torch, "_int_mm") or a2.numel() == 0 or qb.numel() == 0:
        return False
    if a2.device.type == "cpu":
        return True
    if a2.device.type == "cuda":  # cuBLASLt int8 GEMM constraints
        M, K = a2.shape
        return M > 16 and K % 8 == 0 and qb.shape[0] % 8 == 0
    return False


def int_matmul(qa: torch.Tensor, qb: torch.Tensor) -> torch.Tensor:
    """Exact integer ``qa @ qb.T``: qa (..., K) int8, qb (N, K) int8 (a linear weight) -> (..., N) int32.

    ``torch._int_mm`` where it applies (CPU; CUDA with M > 16 and K, N multiples of 8), else ``int_matmul_ref``.
    """
    _check_int_mm_args(qa, qb)
    lead = qa.shape[:-1]
    a2 = qa.reshape(math.prod(lead), qa.shape[-1]).contiguous()  # (M, K)
    if _int_mm_ok(a2, qb):
        out = torch._int_mm(a2, qb.T)  # (M, N) int32; qb.T is column-major, as cuBLASLt wants
    else:
        out = int_matmul_ref(a2, qb)
    return out.reshape(*lead, qb.shape[0])


def int8_linear_ref(qx: torch.Tensor, sx: torch.Tensor, qw: torch.Tensor, sw: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor:
    """The contract's int8 linear layer: ``int_matmul(qx, qw).float() * (sx * sw) + bias``, all in fp32.

    qx: (..., K) int8, sx: per-tensor scale (a single element) or anything broadcasting against (..., 1);
    qw: (N, K) int8, sw: per-tensor scale or per-output-channel (N,); bias: (N,) or None. Returns (..., N) fp32.
    """
    N = qw.shape[0]
    if sw.numel() not in (1, N):
        raise ValueError(f"int8_linear_ref: weight scale must be per-tensor or per-output-channel ({N},), "
                         f"got shape {tuple(sw.shape)}")
    sw = sw.float().reshape(-1) if sw.numel() == N and N != 1 else sw.float().reshape(())
    acc = int_matmul(qx, qw)  # (..., N) int32
    out = acc.float() * (sx.float() * sw)
    if bias is not None:
        out = out + bias.float()
    return out


def scale_from_absmax(absmax: torch.Tensor, bits: int = 8, eps: float = 1e-8) -> torch.Tensor:
    """Symmetric scale ``max(absmax, eps) / qmax`` in fp32 (eps keeps an all-zero tensor's scale > 0), an IEEE
    division on every device: torch on a GPU divides by a Python number as a product with its reciprocal (1 ulp off
    the quotient for some absmax), so qmax enters as a 0-d tensor on absmax's device (a fill, no host copy)."""
    _, qmax = qrange(bits)
    a = absmax.float().clamp_min(eps)
    return a / a.new_full((), float(qmax))
