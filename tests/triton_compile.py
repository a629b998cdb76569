"""Compile, for a real GPU, every Triton kernel launch a CPU test makes under the interpreter.

Triton's interpreter (``TRITON_INTERPRET=1``) runs a kernel's Python body with numpy; it never runs Triton's compiler,
so a kernel the compiler refuses (a ``tl.constexpr`` assigned twice in an unrolled loop, a shape that is not a power
of two, a type the lowering lacks) passes every CPU test and fails on the first GPU launch. The ``interpret`` fixture
(tests/conftest.py) therefore records each launch of its script — the kernel, its argument types and constexpr
values, num_warps / num_stages / enable_fp_fusion — and compiles each distinct one here, down to a cubin for
``TARGET`` (sm_90: the H100 / H200 the GPU tests run on). Triton ships its own LLVM and ptxas, so this needs no GPU and
no CUDA toolkit.

    record_launches(path)      (in the interpreted process, before its first launch) write the launches to path
    compile_launches(path)     (in a process without the interpreter) -> the failures, one line each
"""

from __future__ import annotations

import atexit
import importlib
import inspect
import json

TARGET = ("cuda", 90, 32)  # backend, compute capability, warp size
_OPTIONS = ("num_warps", "num_stages", "enable_fp_fusion")
_TORCH_TYPES = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16", "float64": "fp64", "int8": "i8",
                "uint8": "u8", "int16": "i16", "int32": "i32", "int64": "i64", "bool": "i1"}


def _describe(value) -> list:
    """One argument as JSON: ["tensor", dtype] | ["int" | "float" | "bool", v] | ["none"] | ["tl_dtype", name]."""
    import torch
    import triton.language as tl

    if isinstance(value, torch.Tensor):
        return ["tensor", _TORCH_TYPES[str(value.dtype).removeprefix("torch.")]]
    if value is None:
        return ["none"]
    if isinstance(value, bool):
        return ["bool", value]
    if isinstance(value, int):
        return ["int", value]
    if isinstance(value, float):
        return ["float", value]
    if isinstance(value, tl.dtype):
        return ["tl_dtype", str(value)]
    raise TypeError(f"record_launches: cannot describe a kernel argument of type {type(value).__name__}")


def record_launches(path: str) -> None:
    """Patch the interpreter's launch so that each launch (module, kernel, arguments, options) is kept, and write them
    all to ``path`` as JSON when the process exits. The kernels still run."""
    from triton.runtime.interpreter import InterpretedFunction

    launches: list[dict] = []
    run = InterpretedFunction.run

    def recording_run(self, *args, grid, warmup, **kwargs):
        params = list(inspect.signature(self.fn).parameters.values())
        options = {k: kwargs[k] for k in _OPTIONS if k in kwargs}
        bound = dict(zip((p.name for p in params), args))
        bound.update({k: v for k, v in kwargs.items() if k not in _OPTIONS})
        values = {p.name: _describe(bound[p.name] if p.name in bound else p.default) for p in params
                  if p.name in bound or p.default is not inspect.Parameter.empty}
        launches.append({"module": self.fn.__module__, "kernel": self.fn.__name__, "args": values,
                         "options": options})
        return run(self, *args, grid=grid, warmup=warmup, **kwargs)

    InterpretedFunction.run = recording_run
    atexit.register(lambda: open(path, "w").write(json.dumps(launches)))


def _source(launch: dict):
    """The launch as Triton's compiler input: (ASTSource, options)."""
    import triton.language as tl
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(launch["module"]), launch["kernel"])
    signature, constexprs = {}, {}
    for p in fn.params:
        kind, *value = launch["args"][p.name]
        if p.is_constexpr or kind == "none":
            signature[p.name] = "constexpr"
            constexprs[p.name] = (None if kind == "none" else tl.dtype(value[0]) if kind == "tl_dtype"
                                  else value[0])
        elif kind == "tensor":
            signature[p.name] = "*" + value[0]
        else:
            signature[p.name] = {"int": "i64" if abs(value[0]) >= 2 ** 31 else "i32", "float": "fp32",
                                 "bool": "i1"}[kind]
    return ASTSource(fn, signature, constexprs=constexprs), launch["options"]


def compile_launches(path: str, compiled: set | None = None) -> list[str]:
    """Compile each distinct launch written by ``record_launches`` for ``TARGET``; returns one line per failure
    ("module.kernel {constexprs}: error"). ``compiled`` (keys already done) is updated, so a session compiles each
    launch once."""
    import triton
    from triton.backends.compiler import GPUTarget

    with open(path) as f:
        launches = json.load(f)
    compiled = set() if compiled is None else compiled
    failures = []
    for launch in launches:
        try:
            src, options = _source(launch)
            key = src.hash() + json.dumps(options, sort_keys=True)  # the kernel, its types and constexprs
            if key in compiled:
                continue
            compiled.add(key)
            triton.compile(src, target=GPUTarget(*TARGET), options=options)
        except Exception as e:  # the compiler's message is the finding: report it, with the launch that hit it
            # the upper-case arguments: this project's constexprs (the launch's fn may be what failed to load)
            consts = {k: v[1] for k, v in launch["args"].items() if k.isupper() and len(v) > 1}
            message = str(e).strip().splitlines()
            failures.append(f"{launch['module']}.{launch['kernel']} {consts}: {type(e).__name__}: "
                            + " | ".join(message[-6:]))
    return failures
