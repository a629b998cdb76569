"""The schemas of qmamba's CUDA ops as csrc/ declares them (``m.def("name(Tensor x, ...) -> ...")``), read from the
sources without building anything, and a check of a call's arguments against them.

The dry int8 path of ``benchmarks/host_ops.py`` (CPU CI) stands in for every ``torch.ops.qmamba`` op; it checks each
call here, so a wrapper that hands an op the wrong kind of argument (a None for a ``Tensor``, a float for an ``int``,
too few arguments) fails on the CPU instead of on the GPU.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import torch

from qmamba.kernels.build import CSRC

_DEF = re.compile(r'm\.def\(((?:\s*"(?:[^"\\]|\\.)*")+)\s*\)')
_LITERAL = re.compile(r'"((?:[^"\\]|\\.)*)"')
_SIGNATURE = re.compile(r"^\s*(\w+)\s*\((.*)\)\s*->\s*(.+?)\s*$")


@functools.lru_cache(maxsize=None)
def op_schemas(root: str | None = None) -> dict[str, list[tuple[str, str]]]:
    """{op name: [(type, argument name), ...]} for every ``m.def`` under ``root`` (csrc/); the type as written
    (``Tensor``, ``Tensor?``, ``Tensor[]``, ``int``, ``int[]``, ``bool``, ``float``, ``ScalarType``), alias
    annotations such as ``Tensor(a!)`` read as ``Tensor``."""
    schemas = {}
    for path in sorted(Path(root or CSRC).rglob("*.cu")):
        for match in _DEF.finditer(path.read_text()):
            text = "".join(_LITERAL.findall(match.group(1)))
            sig = _SIGNATURE.match(text)
            if sig is None:
                raise ValueError(f"{path}: cannot read the op schema {text!r}")
            name, params = sig.group(1), sig.group(2).strip()
            args = []
            for param in filter(None, (p.strip() for p in params.split(","))):
                kind, _, arg = param.rpartition(" ")
                args.append((re.sub(r"\([^)]*\)", "", kind).strip(), arg))
            if name in schemas:
                raise ValueError(f"{path}: op {name} is defined twice in csrc")
            schemas[name] = args
    return schemas


def _fits(kind: str, value) -> bool:
    if kind == "Tensor":
        return isinstance(value, torch.Tensor)
    if kind == "Tensor?":
        return value is None or isinstance(value, torch.Tensor)
    if kind == "Tensor[]":
        return isinstance(value, (list, tuple)) and all(isinstance(v, torch.Tensor) for v in value)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "int[]":
        return isinstance(value, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    if kind == "bool":
        return isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (float, int)) and not isinstance(value, bool)
    if kind == "ScalarType":
        return isinstance(value, torch.dtype)
    raise ValueError(f"op schema type {kind!r} is not known to qmamba.kernels.schemas: add it to _fits")


def check_call(name: str, args: tuple) -> None:
    """Raises TypeError naming the op and the argument when ``args`` (positional, as the wrappers pass them) do not
    fit the op's schema in csrc/."""
    schema = op_schemas().get(name)
    if schema is None:
        raise TypeError(f"torch.ops.qmamba.{name} is not defined in csrc/ (no m.def)")
    if len(args) != len(schema):
        raise TypeError(f"torch.ops.qmamba.{name} takes {len(schema)} arguments "
                        f"({', '.join(a for _, a in schema)}), got {len(args)}")
    for (kind, arg), value in zip(schema, args):
        if not _fits(kind, value):
            raise TypeError(f"torch.ops.qmamba.{name}: argument {arg} must be {kind}, got "
                            f"{type(value).__name__}{'' if value is not None else ' (None)'}")
