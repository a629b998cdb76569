"""Quantization: numerics (the contract of DESIGN.md §3), granularity types, observers (and, beside them, recipes).

Ops here are stateless; modules that own scales and choose a path live in qmamba.qnn.
"""

from qmamba.quant.dual_scale import (dual_dequantize, dual_fake_quantize, dual_quantize, outlier_share, pack_mask,
                                     unpack_mask)
from qmamba.quant.granularity import (GRANULARITIES, Granularity, PerChannel, PerGroup, PerTensor,
                                      granularity_from_dict)
from qmamba.quant.numerics import (check_scale, dequantize, fake_quantize, int8_linear_ref, int_matmul,
                                   int_matmul_ref, qrange, quantize, scale_from_absmax)
from qmamba.quant.observers import (OBSERVERS, DualScaleObserver, EMAObserver, MinMaxObserver, Observer,
                                    PercentileObserver, make_observer)

__all__ = [
    # granularity
    "Granularity", "PerTensor", "PerChannel", "PerGroup", "GRANULARITIES", "granularity_from_dict",
    # numerics
    "qrange", "check_scale", "quantize", "dequantize", "fake_quantize", "int_matmul", "int_matmul_ref",
    "int8_linear_ref", "scale_from_absmax",
    # observers
    "Observer", "MinMaxObserver", "EMAObserver", "PercentileObserver", "OBSERVERS", "make_observer",
    "DualScaleObserver",
    # dual-scale int8 (the SSM input)
    "dual_quantize", "dual_dequantize", "dual_fake_quantize", "pack_mask", "unpack_mask", "outlier_share",
]
