"""Argument checks shared by the Python wrappers of qmamba's CUDA ops (``conv1d.py``, ``norm.py``, ``linear.py``,
``selective_scan.py``).

Every condition a ``TORCH_CHECK`` in ``csrc/`` enforces is checked here first, in Python, and raised as a Python
error that names the fix: ``TypeError`` for a wrong dtype or a non-tensor, ``ValueError`` for a wrong shape / count /
size limit, ``RuntimeError`` for a tensor on the wrong device. The C++ checks stay as a backstop that valid calls never
reach: an exception thrown inside an extension op is not always turned into a Python error (on some images it ends
the process), so a user mistake must never get that far.

The checks read only metadata (dtype, shape, device, numel): never a value (no ``.item()``, no host sync), so a decode
step that calls them stays capturable in a CUDA graph. All but ``require_cuda`` work on CPU tensors, which is how the
CPU tests exercise them (``tests/ops/test_kernel_checks.py``).
"""

from __future__ import annotations

import numbers

import torch

# the activation dtypes every kernel can write (its out_dtype) and read (norm inputs)
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INT32_LIMIT = 1 << 31


def shape_of(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def describe(v) -> str:
    """A short description of an argument for error messages (metadata only, never values)."""
    if isinstance(v, torch.Tensor):
        return f"{v.dtype} tensor of shape {shape_of(v)} on {v.device}"
    return f"{type(v).__name__} {v!r}"


def require_tensor(op: str, name: str, v, what: str) -> torch.Tensor:
    """``v`` must be a tensor; ``what`` says which tensor (shape, role) is expected."""
    if not isinstance(v, torch.Tensor):
        raise TypeError(f"{op}: {name} must be {what}, got {describe(v)}")
    return v


def require_int8(op: str, name: str, t, ndim: int | None = None, layout: str = "", fix: str = "quantize it first"
                 ) -> torch.Tensor:
    """``t`` must be an int8 tensor of codes (with ``ndim`` dims, shaped as ``layout`` says, when given)."""
    require_tensor(op, name, t, f"int8 codes {layout}".rstrip())
    if t.dtype != torch.int8:
        raise TypeError(f"{op}: {name} must be int8 codes, got {t.dtype} ({fix})")
    if ndim is not None and t.ndim != ndim:
        raise ValueError(f"{op}: {name} must be {ndim}-D {layout}, got shape {shape_of(t)}".replace("  ", " "))
    return t


def require_shape(op: str, name: str, t, shape: tuple[int, ...], meaning: str = "") -> torch.Tensor:
    """``t`` must be a tensor of exactly ``shape`` (``meaning`` names the dims, e.g. "(D, N)")."""
    expected = f"{meaning} = {tuple(shape)}" if meaning else f"{tuple(shape)}"
    require_tensor(op, name, t, f"a tensor of shape {expected}")
    if shape_of(t) != tuple(shape):
        raise ValueError(f"{op}: {name} must have shape {expected}, got {shape_of(t)}")
    return t


def require_float_dtype(op: str, name: str, t: torch.Tensor, fix: str = "") -> None:
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{op}: {name} must be float32, float16 or bfloat16, got {t.dtype}{fix}")


def require_per_tensor_scale(op: str, name: str, scale, numbers_ok: bool = True) -> None:
    """A per-tensor scale: a one-element tensor of any shape (or, where the wrapper converts it, a Python number)."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() != 1:
            raise ValueError(f"{op}: {name} must be a per-tensor scale (one element), got shape {shape_of(scale)}")
        return
    if numbers_ok and isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        return
    raise TypeError(f"{op}: {name} must be a one-element tensor (a per-tensor scale), got {describe(scale)}")


def require_channel_scale(op: str, name: str, scale, channels: int, what: str = "per-channel",
                          numbers_ok: bool = True) -> None:
    """A per-tensor (1 element) or per-channel (``channels`` elements) scale; Python numbers where ``numbers_ok``."""
    if isinstance(scale, torch.Tensor):
        if scale.numel() not in (1, channels):
            raise ValueError(f"{op}: {name} must have 1 (per-tensor) or {channels} ({what}) elements, got shape "
                             f"{shape_of(scale)}")
        return
    if numbers_ok and isinstance(scale, numbers.Real) and not isinstance(scale, bool):
        return
    raise TypeError(f"{op}: {name} must be a tensor of 1 (per-tensor) or {channels} ({what}) elements, got "
                    f"{describe(scale)}")


def require_numel(op: str, name: str, t, n: int, what: str) -> None:
    """``t`` (None allowed by the caller beforehand) must be a tensor of ``n`` elements; ``what`` names them."""
    require_tensor(op, name, t, f"a tensor of {what}")
    if t.numel() != n:
        raise ValueError(f"{op}: {name} must have {what}, got shape {shape_of(t)}")


def require_out_dtype(op: str, out_dtype) -> None:
    if out_dtype not in FLOAT_DTYPES:
        raise ValueError(f"{op}: out_dtype must be float32, float16 or bfloat16 (the activation dtype), got "
                         f"{out_dtype!r}")


def require_cuda(op: str, name: str, ref: torch.Tensor, **others) -> None:
    """``ref`` must be a CUDA tensor and every other tensor given (None skipped) on its device. Called by the
    wrappers after ``load()``, just before the op, for the tensors they do not move to ``ref``'s device themselves."""
    if not ref.is_cuda:
        raise RuntimeError(f"{op}: {name} must be a CUDA tensor, got one on {ref.device}; move the inputs to the GPU "
                           "or use the op's backend='torch' (qmamba.ops)")
    for other, t in others.items():
        if t is not None and t.device != ref.device:
            raise RuntimeError(f"{op}: {other} is on {t.device} but {name} is on {ref.device}; move it with "
                               f".to({name}.device)")


def fp32_flat(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``t`` as a flat contiguous fp32 tensor on ``device``, the form the kernels read scales, biases and A / D in
    (by element count and data pointer). ``t`` itself, with no op dispatched, when it already is fp32 there with at
    most one dim and contiguous (a calibrated or converted model's scales are): each op dispatched costs host time
    in a prefill."""
    if t.dtype is torch.float32 and t.dim() <= 1 and t.device == device and t.is_contiguous():
        return t
    return t.to(device=device, dtype=torch.float32).reshape(-1).contiguous()
