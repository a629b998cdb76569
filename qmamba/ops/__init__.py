"""Stateless ops. Each has a pure-torch ``*_ref`` (runs anywhere, the oracle) and a dispatcher with ``backend=``
that uses mamba_ssm / causal_conv1d kernels on CUDA when they are installed."""

from qmamba.ops.backend import BACKENDS
from qmamba.ops.conv1d import causal_conv1d, causal_conv1d_ref
from qmamba.ops.hadamard import hadamard_transform
from qmamba.ops.linear_scan import linear_scan
from qmamba.ops.norm import gated_rms_norm, gated_rms_norm_ref, rms_norm, rms_norm_ref
from qmamba.ops.selective_scan import selective_scan, selective_scan_loop_ref, selective_scan_ref
from qmamba.ops.ssd import ssd_chunk_scan, ssd_chunk_scan_ref, ssd_loop_ref

__all__ = ["BACKENDS", "causal_conv1d", "causal_conv1d_ref", "hadamard_transform", "linear_scan", "rms_norm",
           "rms_norm_ref",
           "gated_rms_norm", "gated_rms_norm_ref", "selective_scan", "selective_scan_ref", "selective_scan_loop_ref",
           "ssd_chunk_scan", "ssd_chunk_scan_ref", "ssd_loop_ref"]
