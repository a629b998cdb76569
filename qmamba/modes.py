"""The three numerics modes of a model, as data. The researchers' old ``testingflag`` integers are aliases:
0 = int8 (real integer kernels), 1 = fp (no quantization, fp32 math), 2 = fakequant (float simulation of the int8
math)."""

from __future__ import annotations

MODES = ("int8", "fp", "fakequant")
ALIASES = {"0": "int8", "1": "fp", "2": "fakequant"}


def parse_mode(value: str | int) -> str:
    """A mode name from a name or its 0 / 1 / 2 alias; an error names the accepted values."""
    key = str(value).strip().lower()
    mode = ALIASES.get(key, key)
    if mode not in MODES:
        raise ValueError(f"unknown mode {value!r}; use one of {', '.join(MODES)} (or 0 / 1 / 2)")
    return mode
