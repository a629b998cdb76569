"""Triton kernels of qmamba (run on CUDA; on CPU tensors under ``TRITON_INTERPRET=1`` for tests)."""
