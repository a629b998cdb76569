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
from typing import NamedTuple

import torch

from qmamba.quant.numerics import lsq_backward, qrange

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def scale_layout(x: torch.Tensor, scale: torch.Tensor, order: tuple[int, ...] | None = None) -> tuple[int, int] | None:
    """(INNER, NS) of a scale that broadcasts against x: the kernels read element i's scale at (i // INNER) % NS of
    x's elements in ``order`` (its dims outermost first; default: as they are, the contiguous layout). (1, 1)
    per-tensor; None when the scale varies along more than one axis."""
    if scale.numel() == 1:
        return 1, 1
    if scale.ndim > x.ndim:
        return None
    shape = (1,) * (x.ndim - scale.ndim) + tuple(scale.shape)
    axes = [i for i, d in enumerate(shape) if d != 1]
    if len(axes) != 1 or shape[axes[0]] != x.shape[axes[0]]:
        return None
    a = axes[0]
    order = tuple(range(x.ndim)) if order is None else order
    return math.prod(x.shape[d] for d in order[order.index(a) + 1:]), shape[a]


class Layout(NamedTuple):
    """How the kernels walk a tensor without copying it: its dims in memory order (outermost first), and element i
    of that order at (i // cols) * row_stride + i % cols (rows of ``cols`` contiguous elements)."""

    order: tuple[int, ...]
    cols: int
    row_stride: int

    @property
    def strided(self) -> bool:
        return self.row_stride != self.cols


def _row_stride(t: torch.Tensor, order: tuple[int, ...], cols: int) -> int | None:
    """t's row stride when its elements in ``order`` are rows of ``cols`` contiguous elements at one stride, else
    None."""
    dims = [(t.shape[d], t.stride(d)) for d in order if t.shape[d] != 1]
    inner, i = 1, len(dims) - 1
    while i >= 0 and inner < cols:
        if dims[i][1] != inner:
            return None
        inner *= dims[i][0]
        i -= 1
    if inner != cols:
        return None
    if i < 0:
        return cols
    row_stride = span = dims[i][1]
    while i >= 0:
        if dims[i][1] != span:
            return None
        span *= dims[i][0]
        i -= 1
    return row_stride if row_stride >= cols else None


def memory_layout(x: torch.Tensor) -> Layout | None:
    """x's ``Layout``: dims by decreasing stride (size-1 dims first: they move no address), the longest contiguous
    run of inner dims as the columns. A contiguous x is one row; a slice of the last dim of a contiguous tensor (the
    halves of in_proj's output), and any transpose of it, are rows with a gap. None where the kernels cannot walk x
    (overlapping or irregular strides): copy it first."""
    order = tuple(sorted(range(x.ndim), key=lambda d: (x.shape[d] != 1, -x.stride(d), d)))
    dims = [(x.shape[d], x.stride(d)) for d in order if x.shape[d] != 1]
    if not dims:
        return Layout(order, max(x.numel(), 1), max(x.numel(), 1))
    if dims[-1][1] != 1:  # no contiguous run (a column of a matrix): rows of one element
        row_stride = _row_stride(x, order, 1)
        return None if row_stride is None else Layout(order, 1, row_stride)
    cols, i = dims[-1][0], len(dims) - 2
    while i >= 0 and dims[i][1] == cols:
        cols *= dims[i][0]
        i -= 1
    row_stride = _row_stride(x, order, cols)
    return None if row_stride is None else Layout(order, cols, row_stride)


def walkable(t: torch.Tensor, layout: Layout) -> tuple[torch.Tensor, int]:
    """(t, its row stride) in ``layout`` (t has the shape of the tensor the layout is of); a copy of t dense in the
    layout's order when t's own strides do not fit it (a gradient in another layout)."""
    rs = _row_stride(t, layout.order, layout.cols)
    if rs is not None:
        return t, rs
    return dense_in(t.shape, layout.order, t.dtype, t.device).copy_(t), layout.cols


def dense_in(shape, order: tuple[int, ...], dtype: torch.dtype, device) -> torch.Tensor:
    """An empty tensor of ``shape`` whose elements lie densely in ``order`` (the layout torch's elementwise ops give
    their output for an input in that order)."""
    if all(shape[d] == 1 or d == i for i, d in enumerate(order)):  # dims in their own order: contiguous
        return torch.empty(shape, dtype=dtype, device=device)
    inverse = [0] * len(order)
    for i, d in enumerate(order):
        inverse[d] = i
    return torch.empty([shape[d] for d in order], dtype=dtype, device=device).permute(inverse)


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
    """(x, or a contiguous copy where the kernels cannot walk it; its Layout; out dense in that layout's order (x's
    shape); the STE's int8 flags likewise, or a stand-in pointer when none are kept; numel; block)."""
    layout = memory_layout(x)
    if layout is None:
        x = x.contiguous()
        layout = memory_layout(x)
    out = dense_in(x.shape, layout.order, x.dtype, x.device)
    inside = dense_in(x.shape, layout.order, torch.int8, x.device) if keep_inside else out
    return x, layout, out, inside, x.numel(), _block()


def _fp32_flat(scale: torch.Tensor) -> torch.Tensor:
    """The scale as the kernels read it (contiguous fp32, any shape): the tensor itself when it already is one (a
    Triton launch reads the data pointer; no op is dispatched), else a converted copy."""
    if scale.dtype == torch.float32 and scale.is_contiguous():
        return scale
    return scale.detach().float().contiguous()


class FusedFakeQuantize(torch.autograd.Function):
    """``numerics._FakeQuantize`` through the Triton kernels (the caller checked ``unsupported(x, scale)``). x is read
    where it lies (``memory_layout``); the output and gradient are dense in x's memory order, as torch's elementwise
    ops make them."""

    @staticmethod
    def forward(ctx, x, scale, bits):
        import triton

        from qmamba.kernels.triton.fake_quant import _fake_quant_fwd_kernel
        from qmamba.kernels.triton.launch import on_device_of

        qmin, qmax = qrange(bits)
        s32 = _fp32_flat(scale)
        learn = ctx.needs_input_grad[1]
        keep_inside = not learn and ctx.needs_input_grad[0]  # the STE's flags, only when a gradient will want them
        x, layout, out, inside, n, block = _forward_buffers(x, keep_inside)
        inner, ns = scale_layout(x, scale, layout.order)
        if n:
            with on_device_of(x):
                _fake_quant_fwd_kernel[(triton.cdiv(n, block),)](
                    x, s32, out, inside, n, inner, ns, layout.cols, layout.row_stride, PER_TENSOR=ns == 1,
                    QMIN=qmin, QMAX=qmax, STRIDED=layout.strided, WRITE_INSIDE=keep_inside,
                    OUT_BF16=x.dtype == torch.bfloat16, BLOCK_SIZE=block, enable_fp_fusion=False)
        ctx.qrange, ctx.x_dtype, ctx.per_tensor, ctx.layout = (qmin, qmax), x.dtype, ns == 1, layout
        ctx.save_for_backward(*((x, scale) if learn else (inside,) if keep_inside else ()))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        import triton

        from qmamba.kernels.triton.fake_quant import _lsq_bwd_kernel
        from qmamba.kernels.triton.launch import on_device_of

        g = grad_out if grad_out.dtype == ctx.x_dtype else grad_out.to(ctx.x_dtype)
        if not ctx.needs_input_grad[1]:
            return (_ste_backward(ctx, g) if ctx.needs_input_grad[0] else None), None, None
        qmin, qmax = ctx.qrange
        x, scale = ctx.saved_tensors
        if not ctx.per_tensor:  # learned per-channel scale: the reference backward
            return (*lsq_backward(x, scale, g, qmin, qmax, ctx.needs_input_grad[0], ctx.x_dtype), None)
        n, block, layout = g.numel(), _block(), ctx.layout
        if not n:
            return (torch.zeros_like(g) if ctx.needs_input_grad[0] else None), torch.zeros_like(scale), None
        want_x = ctx.needs_input_grad[0]
        g, g_rs = walkable(g, layout)
        grad_x = dense_in(g.shape, layout.order, g.dtype, g.device) if want_x else None
        grid = (triton.cdiv(n, block),)
        # every program writes its slot (no zero fill); each partial sum is already times the LSQ gain
        part = torch.empty(grid[0], dtype=torch.float32, device=g.device)
        with on_device_of(g):
            _lsq_bwd_kernel[grid](x, _fp32_flat(scale), g, grad_x if want_x else g, part, n,
                                  1.0 / math.sqrt(n / scale.numel() * qmax), layout.cols, layout.row_stride, g_rs,
                                  QMIN=qmin, QMAX=qmax, STRIDED=layout.strided or g_rs != layout.cols,
                                  WRITE_GX=want_x, BLOCK_SIZE=block, enable_fp_fusion=False)
        grad_scale = part.sum() if grid[0] > 1 else part.view(())
        if grad_scale.dtype != scale.dtype:
            grad_scale = grad_scale.to(scale.dtype)
        return grad_x, (grad_scale if scale.ndim == 0 else grad_scale.view(scale.shape)), None


def absmax_rows(x: torch.Tensor, granularity) -> int | None:
    """The row length K when ``granularity`` gives x one absmax scale per row of K contiguous elements (per-channel
    along axis 0 of a contiguous x: a weight's output channels), else None."""
    from qmamba.quant.granularity import PerChannel

    if not isinstance(granularity, PerChannel) or x.ndim == 0 or granularity.axis % x.ndim != 0:
        return None
    if not x.is_contiguous() or x.dtype not in FLOAT_DTYPES or x.shape[0] == 0:
        return None
    return x.numel() // x.shape[0]


class FusedAbsmaxFakeQuantize(torch.autograd.Function):
    """``fake_quantize(x, scale_from_absmax(absmax per row of x), bits)`` in one kernel (the scale is made in it, not
    by ~10 torch ops before it), the STE backward; x (N, ...) contiguous, one scale per index of axis 0 (the caller
    checked ``absmax_rows``). The scale is not differentiated (made from x.detach(), as in ``QuantPoint``)."""

    @staticmethod
    def forward(ctx, x, bits, eps):
        import triton

        from qmamba.kernels.triton.fake_quant import _absmax_fake_quant_fwd_kernel
        from qmamba.kernels.triton.launch import on_device_of

        qmin, qmax = qrange(bits)
        keep_inside = ctx.needs_input_grad[0]
        xc, ctx.layout, out, inside, n, _ = _forward_buffers(x, keep_inside)  # x contiguous: its layout is one row
        rows = x.shape[0]
        k = n // rows
        block = min(triton.next_power_of_2(k), _block())
        if n:
            with on_device_of(x):
                _absmax_fake_quant_fwd_kernel[(rows,)](
                    xc, out, inside, k, EPS=eps, QMIN=qmin, QMAX=qmax, WRITE_INSIDE=keep_inside,
                    OUT_BF16=x.dtype == torch.bfloat16, BLOCK_K=block, num_warps=max(1, min(4, block // 256)),
                    enable_fp_fusion=False)
        ctx.save_for_backward(*((inside,) if keep_inside else ()))
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad_out):
        g = grad_out if grad_out.dtype == ctx.x_dtype else grad_out.to(ctx.x_dtype)
        return _ste_backward(ctx, g), None, None


def _ste_backward(ctx, grad_out: torch.Tensor) -> torch.Tensor:
    """grad where the saved ``inside`` flags are set, else 0: one kernel."""
    import triton

    from qmamba.kernels.triton.fake_quant import _ste_bwd_kernel
    from qmamba.kernels.triton.launch import on_device_of

    (inside,) = ctx.saved_tensors
    layout = ctx.layout
    g, g_rs = walkable(grad_out, layout)
    grad_x = dense_in(g.shape, layout.order, g.dtype, g.device)  # the flags' layout
    n, block = g.numel(), _block()
    if n:
        with on_device_of(g):
            _ste_bwd_kernel[(triton.cdiv(n, block),)](g, inside, grad_x, n, layout.cols, g_rs,
                                                      STRIDED=g_rs != layout.cols, BLOCK_SIZE=block)
    return grad_x


class FusedDualFakeQuantize(torch.autograd.Function):
    """``dual_scale._DualFakeQuantize`` through the Triton kernels (the caller checked ``unsupported(x, s_in,
    s_out)``): one forward (values and the STE's flags), the STE backward; the scales get no gradient, as there."""

    @staticmethod
    def forward(ctx, x, s_in, s_out, encoding, knee):
        import triton

        from qmamba.kernels.triton.fake_quant import _dual_fake_quant_fwd_kernel
        from qmamba.kernels.triton.launch import on_device_of

        keep_inside = ctx.needs_input_grad[0]
        x, ctx.layout, out, inside, n, block = _forward_buffers(x, keep_inside)
        inner, ns = scale_layout(x, s_in, ctx.layout.order)
        if n:
            with on_device_of(x):
                _dual_fake_quant_fwd_kernel[(triton.cdiv(n, block),)](
                    x, _fp32_flat(s_in), _fp32_flat(s_out), out, inside, n, inner, ns, ctx.layout.cols,
                    ctx.layout.row_stride, PER_TENSOR=ns == 1, PIECEWISE=encoding == "piecewise", KNEE=float(knee),
                    STRIDED=ctx.layout.strided, WRITE_INSIDE=keep_inside, OUT_BF16=x.dtype == torch.bfloat16,
                    BLOCK_SIZE=block, enable_fp_fusion=False)
        ctx.save_for_backward(*((inside,) if keep_inside else ()))
        return out

    @staticmethod
    def backward(ctx, grad_out):
        return _ste_backward(ctx, grad_out), None, None, None, None
