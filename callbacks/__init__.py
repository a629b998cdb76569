"""Lightning callbacks of the quantization pipeline (calibration, fake-quant / QAT, mode validation, finalize).

Importable as a package (``callbacks.<name>``) from configs/ by ``class_path``. The pipeline that fills it builds on
qmamba's models, qnn transforms and LightningModule.
"""

from callbacks.quantization import QAT, Calibration, Finalize, ModeValidation

__all__ = ["Calibration", "QAT", "ModeValidation", "Finalize"]
