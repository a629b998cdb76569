"""The fused fake-quant (Triton, qmamba/kernels/triton/fake_quant.py) as autograd functions: one kernel forward, one
backward, the values and gradients of ``qmamba.quant.numerics.fake_quantize`` / ``dual_scale.dual_fake_quantize``
bit for bit (a learned scale's gradient to fp32 rounding). Launched with ``enable_fp_fusion=False``: no product is
contracted with the rint's add into an FMA. ``fake_quantize(..., backend=...)`` picks it (``"auto"``: x on a GPU in a
layout it takes).

Layouts: any float x (made contiguous); the scale one element, or one per index of a single axis of x (per-channel
weights (N, 1) against (N, K), an activation's (1, 1, C) against (B, L, C)). A learned (LSQ) scale is fused when it is
per-tensor; a learned per-channel scale takes the reference backward (the forward is still fused). Other scales
(several axes, e.g. per-group) are not taken: ``unsupported`` says why, and the dispatch keeps the reference for
them.
"""

from __future__ import annotations

import math

import torch

from qmamba.quant.numerics import lsq_backward, qrange

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def scale_layout(x: torch.Tensor, scale: torch.Tensor) -> tuple[int, int] | None:
    """(INNER, NS) of a scale that broadcasts against x: the kernels read element i's scale at (i // INNER) % NS of
    x's contiguous layout. (1, 1) per-tensor; None when the scale varies along more than one axis."""
    if scale.numel() == 1:
        return 1, 1
    if scale.ndim > x.ndim:
        return None
    shape = (1,) * (x.ndim - scale.ndim) + tuple(scale.shape)
    axes = [i for i, d in enumerate(shape) if d != 1]
    if len(axes) != 1 or shape[axes[0]] != x.shape[axes[0]]:
        return None
    a = axes[0]
    return math.prod(x.shape[a + 1:]), shape[a]


def unsupported(x: torch.Tensor, *scales: torch.Tensor) -> str | None:
    """Why the fused kernels do not take x with these scales (one reason, for an error message), or None: x must be
    fp32 / fp16 / bf16, the scales float, each per-tensor or along one axis of x, all in the same layout."""
    if x.dtype not in FLOAT_DTYPES:
        return f"x is {x.dtype}, the kernels take {', '.join(str(d) for d in FLOAT_DTYPES)}"
    layouts = set()
    for s in scales:
        if not isinstance(s, torch.Tensor) or not s.is_floating_point():
            return f"a scale is {getattr(s, 'dtype', type(s).__name__)}, not a float tensor"
        layout = scale_layout(x, s)
        if layout is None:
            return f"the scale {tuple(s.shape)} varies along more than one axis of x {tuple(x.shape)}"
        layouts.add(layout)
    if len(layouts) > 1:
        return f"the scales {[tuple(s.shape) for s in scales]} do not share one layout against x {tuple(x.shape)}"
    return None


def supported(x: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether the fused kernels take this x and scale (float dtypes, a per-tensor or single-axis scale)."""
    return unsupported(x, scale) is None


def _block() -> int:
    from qmamba.kernels.triton.fake_quant import BLOCK, INTERPRET_BLOCK
    from qmamba.kernels.triton.launch import interpreting

    return INTERPRET_BLOCK if interpreting() else BLOCK


def _forward_buffers(x: torch.Tensor, keep_inside: bool):
    """(x contiguous, out like it, the STE's int8 flags or a stand-in pointer when none are kept, numel, block)."""
    xc = x.contiguous()
    out = torch.empty_like(xc)
    inside = torch.empty(xc.shape, dtype=torch.int8, device=x.device) if keep_inside else out
    return xc, out, inside, xc.numel(), _block()


class FusedFakeQuantize(torch.autograd.Function):
    """``numerics._FakeQuantize`` through the Triton kernels (the caller checked ``unsupported(x, scale)``)."""

    @staticmethod
    def forward(ctx, x, scale, bits):
        import triton

        from qmamba.kernels.triton.fake_quant import _fake_quant_fwd_kernel
        from qmamba.kernels.triton.launch import on_device_of

        qmin, qmax = qrange(bits)
        inner, ns = scale_layout(x, scale)
        s32 = scale.detach().float().reshape(-1).contiguous()
        learn = ctx.needs_input_grad[1]
        keep_inside = not learn and ctx.needs_input_grad[0]  # the STE's flags, only when a gradient will want them
        xc, out, inside, n, block = _forward_buffers(x, keep_inside)
        if n:
            with on_device_of(x):
                _fake_quant_fwd_kernel[(triton.cdiv(n, block),)](
                    xc, s32, out, inside, n, inner, ns, PER_TENSOR=ns == 1, QMIN=qmin, QMAX=qmax,
                    WRITE_INSIDE=keep_inside, OUT_BF16=x.dtype == torch.bfloat16, BLOCK_SIZE=block,
                    enable_fp_fusion=False)
        ctx.qrange, ctx.x_dtype, ctx.scale_shape, ctx.per_tensor = (qmin, qmax), x.dtype, scale.shape, ns == 1
        ctx.save_for_backward(*((xc, scale) if learn else (inside,) if keep_inside else ()))
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        import triton

        from qmamba.kernels.triton.fake_quant import _lsq_bwd_kernel, _ste_bwd_kernel
        from qmamba.kernels.triton.launch import on_device_of

        qmin, qmax = ctx.qrange
        g = grad_out.to(ctx.x_dtype).contiguous()
        n, block = g.numel(), _block()
        grid = (triton.cdiv(n, block),) if n else None
        grad_x = grad_scale = None
        if ctx.needs_input_grad[1]:
            x, scale = ctx.saved_tensors
            if not ctx.per_tensor:  # learned per-channel scale: the reference backward
                return (*lsq_backward(x, scale, g, qmin, qmax, ctx.needs_input_grad[0], ctx.x_dtype), None)
            want_x = ctx.needs_input_grad[0]
            grad_x = torch.empty_like(g) if want_x else None
            part = torch.zeros(max(grid[0], 1) if grid else 1, dtype=torch.float32, device=g.device)
            if n:
                with on_device_of(g):
                    _lsq_bwd_kernel[grid](x, scale.detach().float().reshape(-1), g, grad_x if want_x else g, part, n,
                                          QMIN=qmin, QMAX=qmax, WRITE_GX=want_x, BLOCK_SIZE=block,
                                          enable_fp_fusion=False)
            lsq_gain = 1.0 / math.sqrt(n / max(scale.numel(), 1) * qmax) if n else 0.0
            grad_scale = (part.sum() * lsq_gain).to(scale.dtype).reshape(ctx.scale_shape)
        elif ctx.needs_input_grad[0]:
            (inside,) = ctx.saved_tensors
            grad_x = torch.empty_like(g)
            if n:
                with on_device_of(g):
                    _ste_bwd_kernel[grid](g, inside, grad_x, n, BLOCK_SIZE=block)
        return grad_x, grad_scale, None


class FusedDualFakeQuantize(torch.autograd.Function):
    """``dual_scale._DualFakeQuantize`` through the Triton kernels (the caller checked ``unsupported(x, s_in,
    s_out)``): one forward (values and the STE's flags), the STE backward; the scales get no gradient, as there."""

    @staticmethod
    def forward(ctx, x, s_in, s_out, encoding, knee):
        import triton

        from qmamba.kernels.triton.fake_quant import _dual_fake_quant_fwd_kernel
        from qmamba.kernels.triton.launch import on_device_of

        inner, ns = scale_layout(x, s_in)
        keep_inside = ctx.needs_input_grad[0]
        xc, out, inside, n, block = _forward_buffers(x, keep_inside)
        if n:
            with on_device_of(x):
                _dual_fake_quant_fwd_kernel[(triton.cdiv(n, block),)](
                    xc, s_in.detach().float().reshape(-1).contiguous(), s_out.detach().float().reshape(-1).contiguous(),
                    out, inside, n, inner, ns, PER_TENSOR=ns == 1, PIECEWISE=encoding == "piecewise",
                    KNEE=float(knee), WRITE_INSIDE=keep_inside, OUT_BF16=x.dtype == torch.bfloat16, BLOCK_SIZE=block,
                    enable_fp_fusion=False)
        ctx.save_for_backward(*((inside,) if keep_inside else ()))
        return out.view(x.shape)

    @staticmethod
    def backward(ctx, grad_out):
        import triton

        from qmamba.kernels.triton.fake_quant import _ste_bwd_kernel
        from qmamba.kernels.triton.launch import on_device_of

        (inside,) = ctx.saved_tensors
        g = grad_out.contiguous()
        grad_x = torch.empty_like(g)
        n, block = g.numel(), _block()
        if n:
            with on_device_of(g):
                _ste_bwd_kernel[(triton.cdiv(n, block),)](g, inside, grad_x, n, BLOCK_SIZE=block)
        return grad_x, None, None, None, None
