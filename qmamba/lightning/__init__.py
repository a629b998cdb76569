"""Lightning glue: the LM module, its metrics and the command-line helpers."""

from qmamba.lightning.metrics import LMMetrics
from qmamba.lightning.module import LMModule

__all__ = ["LMMetrics", "LMModule"]
