"""The int8 GPU code path on a CPU machine, for tools and tests: the kernel wrappers taken as on a GPU, with stand-ins
for qmamba's CUDA ops. Used by ``benchmarks/host_ops.py --int8`` (dry: each op counted, an empty result of its
shape) and ``tests/kernel_emulation.py`` (each op computed by its torch reference).

``gpu_path_on_cpu(ops, calls, fakes)`` rebinds (``rebound``), in every loaded ``qmamba`` module, the functions that decide and guard the
kernel path (``use_kernels``, ``use_triton``, ``load``, ``require_cuda``, and whatever else ``fakes`` names), sets
``torch.ops.qmamba.<name>`` to ``ops[name]``, each call checked against csrc's schema (``qmamba.kernels.schemas``),
and restores everything on exit, also in modules first imported inside (a lazy import binds a stand-in by name).
"""

from __future__ import annotations

import contextlib
import importlib
import pkgutil
import sys
from collections.abc import Callable

import torch

from qmamba.kernels.schemas import check_call


class CheckedOp:
    """``fn`` standing in for ``torch.ops.qmamba.<name>``: each call's arguments checked against the op's csrc
    schema, then counted in ``calls`` (a dict or Counter of name -> calls), then passed to ``fn``."""

    def __init__(self, name: str, fn: Callable, calls: dict):
        self.name, self.fn, self.calls = name, fn, calls

    def __call__(self, *args):
        check_call(self.name, args)  # what the wrapper hands the op fits csrc's schema (a None for a Tensor fails)
        self.calls[self.name] = self.calls.get(self.name, 0) + 1
        return self.fn(*args)


def import_wrappers() -> None:
    """Import every ``qmamba.ops`` module and kernel wrapper now, so each one's bindings are rebound (a module first
    imported inside would bind the stand-ins by name)."""
    import qmamba.ops

    for info in pkgutil.iter_modules(qmamba.ops.__path__):
        importlib.import_module(f"qmamba.ops.{info.name}")
    for name in ("conv1d", "hadamard", "linear", "norm", "quantize", "selective_scan"):
        importlib.import_module(f"qmamba.kernels.{name}")


def use_triton_on_cpu(b, tensor, op, problem=None) -> bool:
    """``qmamba.ops.backend.use_triton`` for the GPU path on a CPU: yes for any backend but "torch" where the call
    fits the kernel."""
    from qmamba.ops.backend import validate_backend

    return validate_backend(b) != "torch" and (problem() if problem is not None else None) is None


def _kernel_path_fakes() -> dict[str, tuple[Callable, Callable]]:
    import qmamba.kernels.build as build
    import qmamba.kernels.checks as checks
    import qmamba.ops.backend as backend

    return {"use_kernels": (backend.use_kernels, lambda b, tensor, op: backend.validate_backend(b) != "torch"),
            "use_triton": (backend.use_triton, use_triton_on_cpu),
            "load": (build.load, lambda *a, **k: None),
            "require_cuda": (checks.require_cuda, lambda *a, **k: None)}


def _qmamba_modules() -> list:
    return [m for name, m in list(sys.modules.items()) if name.startswith("qmamba") and m is not None]


@contextlib.contextmanager
def rebound(functions: dict[str, tuple[Callable, Callable]]):
    """Inside: in every loaded ``qmamba`` module, each name of ``functions`` bound to its real function (by identity)
    is bound to its stand-in instead ({name: (real, stand-in)}). Yields the undo list [(object, attribute, old
    value)]: entries a caller appends are restored on exit too, and a module first imported inside (which bound a
    stand-in by name) gets the real function back."""
    import_wrappers()
    saved = []
    for mod in _qmamba_modules():
        for name, (real, fake) in functions.items():
            if getattr(mod, name, None) is real:
                saved.append((mod, name, real))
                setattr(mod, name, fake)
    try:
        yield saved
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)
        for mod in _qmamba_modules():
            for name, (real, fake) in functions.items():
                if getattr(mod, name, None) is fake:
                    setattr(mod, name, real)


@contextlib.contextmanager
def gpu_path_on_cpu(ops: dict[str, Callable], calls: dict, fakes: dict[str, tuple[Callable, Callable]] | None = None):
    """Inside: the kernel path taken on CPU tensors, ``torch.ops.qmamba.<name>`` is ``ops[name]`` (schema-checked,
    counted in ``calls``); ``fakes``: more {name: (real function, stand-in)} to rebind wherever the real one is
    bound. Yields ``rebound``'s undo list."""
    ns = torch.ops.qmamba
    with rebound({**_kernel_path_fakes(), **(fakes or {})}) as saved:
        try:
            for name, fn in ops.items():
                setattr(ns, name, CheckedOp(name, fn, calls))
            yield saved
        finally:
            for name in ops:
                if name in ns.__dict__:
                    delattr(ns, name)
