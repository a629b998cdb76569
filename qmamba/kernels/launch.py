"""How qmamba's CUDA kernels are launched: overlapped with the kernel before them in the stream (programmatic
dependent launch on sm_90+, the default), or one after the other. A decode step is a chain of small kernels; overlapped,
each one's launch and ramp run while the one before it finishes (the rules that keep it exact are at
``launch_overlapped`` in ``csrc/common/qmamba_common.cuh``). A CUDA graph keeps the launches it captured."""

from __future__ import annotations

import contextlib

import torch

from qmamba.kernels.build import load


def set_launch_overlap(enabled: bool) -> bool:
    """Launch qmamba's kernels overlapped (True) or one after the other (False) from now on; returns the previous."""
    load()
    return bool(torch.ops.qmamba.set_launch_overlap(bool(enabled)))


@contextlib.contextmanager
def launch_overlap(enabled: bool):
    """``set_launch_overlap(enabled)`` inside the block, the previous setting after it."""
    previous = set_launch_overlap(enabled)
    try:
        yield
    finally:
        set_launch_overlap(previous)
