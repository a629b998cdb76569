"""qmamba's own GPU kernels: the CUDA C++ extension built from ``csrc/`` and the Triton kernels in ``triton/``.

Nothing here is imported or built at ``import qmamba``. ``load()`` builds the extension on first use, for the GPU at
hand only (one architecture), caches it under ``~/.cache/qmamba/kernels`` (``QMAMBA_KERNELS_CACHE`` is not read: pass
``cache_dir``), and registers the ops as ``torch.ops.qmamba.*``. Every kernel has a pure-torch twin, the ``torch``
int8 backend of ``qmamba.qnn``, which it must match under the numerics contract (DESIGN.md §3); the GPU tests in
``tests/gpu/`` check that.

Python entry points (each calls ``load()`` itself):
    conv1d.py          int8 causal depthwise conv1d + SiLU + requantize (prefill, one-token update)
    selective_scan.py  int8 Mamba1 selective scan (prefill, one-token state update)
    norm.py            fused residual add + RMSNorm + int8 quantize
    quantize.py        int8 quantize (per-tensor / per-channel) in one kernel
    hadamard.py        Hadamard rotation + int8 quantize in one kernel (the out_proj input)
    checks.py          argument checks in Python, before any op is called (see below)
    linear.py          W8A8 linear with the dequant (and optional requant) epilogue fused: GEMM and decode GEMV
    triton/ssd_int8.py int8 Mamba2 SSD chunk scan and its decode step (Triton)
    triton/w8a8_gemm.py  W8A8 GEMM with fused epilogue (Triton)
    triton/gated_norm.py Mamba2's gated RMSNorm reading its gate as int8 codes (Triton), for int8 mode
    fake_quant.py      fakequant (QAT) in fused Triton kernels (triton/fake_quant.py): single- and dual-scale
                       fake-quant forward + STE / LSQ backward; no build, picked by ``fake_quantize(backend=...)``
    triton/hadamard.py Walsh-Hadamard transform forward + backward for fakequant (``hadamard_transform(backend=)``)

Arguments are checked in Python before an op is called: on the device image we measured, a C++ exception thrown from
a freshly built extension (a failing TORCH_CHECK) crashed the process instead of raising, so the C++ checks are only
a backstop that valid calls never reach.
"""

from qmamba.kernels.build import KernelsUnavailable, available, load

__all__ = ["KernelsUnavailable", "available", "load"]
