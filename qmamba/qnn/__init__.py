"""Quantizable twins of the mixer's parts and the model-level transforms: prepare / calibrate / set_mode / convert."""

from qmamba.qnn.convert import (
    Agreement,
    agreement_report,
    calibrate,
    convert,
    current_mode,
    format_agreement,
    freeze_scales_,
    int8_layout_,
    is_calibrated,
    is_converted,
    is_prepared,
    observing,
    planned_activation_points,
    prepare,
    quant_points,
    set_mode,
    twins,
)
from qmamba.qnn.modules import (
    QMODES,
    QuantCausalConv1d,
    QuantLinear,
    QuantRMSNormGated,
    QuantSelectiveScan,
    QuantSSDScan,
    QuantTwin,
)
from qmamba.qnn.point import QuantPoint

__all__ = ["Agreement", "agreement_report", "calibrate", "convert", "current_mode", "format_agreement",
           "freeze_scales_", "int8_layout_", "is_calibrated", "is_converted", "is_prepared", "observing",
           "planned_activation_points", "prepare", "quant_points", "set_mode", "twins", "QMODES", "QuantCausalConv1d", "QuantLinear", "QuantRMSNormGated",
           "QuantSelectiveScan", "QuantSSDScan", "QuantTwin", "QuantPoint"]
